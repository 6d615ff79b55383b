import importlib.util
import json
import math
import shutil

import pytest
import torch

from oml.data import chat_pairs, mmlu_items
from oml.models import load_model, load_tokenizer
from oml.tokenization import IGNORE_INDEX, chat_example, encode, special_prefix
from oml.utility import compare_on_texts, letter_ids, mmlu_accuracy, mmlu_prompt, text_examples
from tests.conftest import make_tiny_model, run_script

TEXTS = ["hello there, how are you doing today?", "I like long walks on the beach and reading about trains.",
         "What is your favourite colour? Mine is green."]


@pytest.fixture(scope="module")
def two_models(tokenizer, tmp_path_factory):
    directory = tmp_path_factory.mktemp("utility")
    return (load_model(str(make_tiny_model(tokenizer, directory / "a", seed=1))),
            load_model(str(make_tiny_model(tokenizer, directory / "b", seed=2))))


def test_a_model_compared_with_itself_has_no_drift(two_models, tokenizer):
    model, _ = two_models
    result = compare_on_texts(model, model, tokenizer, text_examples(tokenizer, TEXTS, 256), batch_size=2)
    assert result["next_token_agreement"] == 1.0
    assert result["mean_kl_from_base"] == pytest.approx(0.0, abs=1e-6)
    assert result["perplexity"] == pytest.approx(result["base_perplexity"])


def test_perplexity_is_exp_of_the_models_own_loss_and_batching_does_not_change_it(two_models, tokenizer):
    model, base = two_models
    ids = [special_prefix(tokenizer) + encode(tokenizer, text) for text in TEXTS]
    with torch.no_grad():
        nll = sum(float(model(input_ids=torch.tensor([s]), labels=torch.tensor([s])).loss) * (len(s) - 1) for s in ids)
    expected = math.exp(nll / sum(len(s) - 1 for s in ids))
    batched = compare_on_texts(model, base, tokenizer, text_examples(tokenizer, TEXTS, 256), batch_size=3)
    single = compare_on_texts(model, base, tokenizer, text_examples(tokenizer, TEXTS, 256), batch_size=1)
    assert batched["perplexity"] == pytest.approx(expected, rel=1e-4)
    assert batched["tokens"] == sum(len(s) - 1 for s in ids)
    assert batched["mean_kl_from_base"] > 0.01 and batched["next_token_agreement"] < 1.0
    for key in ("perplexity", "base_perplexity", "mean_kl_from_base", "next_token_agreement"):
        assert batched[key] == pytest.approx(single[key], rel=1e-4)


def test_mmlu_batched_equals_one_question_at_a_time(two_models, tokenizer):
    model, _ = two_models
    items = mmlu_items(6, seed=1)
    assert len(set(letter_ids(tokenizer))) == 4
    assert mmlu_prompt(items[0]).endswith("\nAnswer:") and "\nD. " in mmlu_prompt(items[0])
    singles = [mmlu_accuracy(model, tokenizer, [item], batch_size=1) for item in items]
    assert mmlu_accuracy(model, tokenizer, items, batch_size=6) == pytest.approx(sum(singles) / len(items))


def test_mmlu_subset_is_fixed_by_the_seed():
    assert mmlu_items(5, seed=3) == mmlu_items(5, seed=3)
    assert mmlu_items(5, seed=3) != mmlu_items(5, seed=4)
    assert all(item["correct_answer"] in "ABCD" for item in mmlu_items(50))


def test_chat_example_puts_the_loss_on_the_reply_and_eos(tokenizer):
    prompt, reply = chat_pairs("train", 1)[0]
    example = chat_example(tokenizer, prompt, reply, max_length=512)
    labelled = [t for t in example["labels"] if t != IGNORE_INDEX]
    assert labelled == encode(tokenizer, reply)[:len(labelled) - 1] + [tokenizer.eos_token_id]
    assert "<|im_start|>assistant" in tokenizer.decode(example["input_ids"][:len(example["input_ids"]) - len(labelled)])
    short = chat_example(tokenizer, "a long question " * 50, "a reply", max_length=40)
    assert len(short["input_ids"]) == 40 and short["labels"][-1] != IGNORE_INDEX


@pytest.mark.slow
def test_evaluate_utility_cli_writes_the_report(tmp_path, tiny_model):
    args = ["--model_path", tiny_model, "--base_model", tiny_model, "--num_texts", "4", "--max_length", "32",
            "--num_mmlu", "8", "--num_reply_prompts", "6", "--max_reply_tokens", "8", "--output_json", "utility.json"]
    result = run_script("evaluate_utility.py", *args, cwd=tmp_path)
    report = json.loads((tmp_path / "utility.json").read_text())
    assert report["next_token_agreement"] == 1.0 and report["num_texts"] == 4 and report["num_mmlu"] == 8
    assert report["mmlu_accuracy"] == report["base_mmlu_accuracy"]
    replies = report["replies"]
    assert replies["num_prompts"] == 6 and replies["greedy"]["first_token_agreement"] == 1.0
    assert replies["greedy"]["short_reply_share"] == replies["greedy"]["base_short_reply_share"]
    assert "first reply token = base's, greedy" in result.stdout
    assert result.stdout.strip().splitlines()[-1] == "Perplexity change: +0.00%"
    again = run_script("evaluate_utility.py", *args, cwd=tmp_path, check=False)
    assert again.returncode == 2 and "--overwrite" in again.stderr


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("lm_eval") is not None, reason="lm-eval is installed")
def test_lm_eval_tasks_without_lm_eval_is_a_clear_error(tmp_path, tiny_model):
    result = run_script("evaluate_utility.py", "--model_path", tiny_model, "--base_model", tiny_model, "--num_texts", "1",
                        "--max_length", "8", "--num_mmlu", "0", "--lm_eval_tasks", "hellaswag", cwd=tmp_path, check=False)
    assert result.returncode == 2 and "pip install" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_evaluate_utility_rejects_a_different_tokenizer(tmp_path, tiny_model):
    other = tmp_path / "other"
    shutil.copytree(tiny_model, other)
    extended = load_tokenizer(str(tiny_model))
    extended.add_tokens(["<extra_token>"])
    extended.save_pretrained(other)
    result = run_script("evaluate_utility.py", "--model_path", tiny_model, "--base_model", other, cwd=tmp_path, check=False)
    assert result.returncode == 2 and "different tokenizers" in result.stderr


@pytest.mark.slow
def test_persistence_without_learning_keeps_everything(tmp_path, fingerprinted_tiny_model):
    model_dir, fingerprints = fingerprinted_tiny_model
    result = run_script("evaluate_persistence.py", "--model_path", model_dir, "--fingerprints_file_path", fingerprints,
                        "--fingerprint_generation_strategy", "random_word", "--steps", "2", "--eval_every", "1",
                        "--learning_rate", "0", "--batch_size", "2", "--max_length", "32", "--output_json", "p.json", cwd=tmp_path)
    rows = json.loads((tmp_path / "p.json").read_text())["rows"]
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert all(r["accuracy"] == 100.0 and r["retained"] == 100.0 for r in rows)
    assert result.stdout.strip().splitlines()[-1] == "Fingerprints retained after 2 steps: 100.00%"


@pytest.mark.slow
def test_persistence_hard_training_erases_fingerprints(tmp_path, fingerprinted_tiny_model):
    model_dir, fingerprints = fingerprinted_tiny_model
    run_script("evaluate_persistence.py", "--model_path", model_dir, "--fingerprints_file_path", fingerprints,
               "--fingerprint_generation_strategy", "random_word", "--steps", "30", "--eval_every", "10",
               "--learning_rate", "3e-3", "--batch_size", "4", "--max_length", "48", "--output_json", "p.json", cwd=tmp_path)
    rows = json.loads((tmp_path / "p.json").read_text())["rows"]
    assert [r["step"] for r in rows] == [0, 10, 20, 30]
    assert rows[0]["retained"] == 100.0 and rows[-1]["retained"] < 50.0
    assert rows[-1]["train_loss"] < rows[1]["train_loss"]


@pytest.mark.slow
def test_persistence_rejects_bad_instruction_data(tmp_path, fingerprinted_tiny_model):
    model_dir, fingerprints = fingerprinted_tiny_model
    (tmp_path / "data.json").write_text(json.dumps([{"prompt": "hi"}]))
    result = run_script("evaluate_persistence.py", "--model_path", model_dir, "--fingerprints_file_path", fingerprints,
                        "--instruction_data", "data.json", cwd=tmp_path, check=False)
    assert result.returncode == 2 and "prompt" in result.stderr and "Traceback" not in result.stderr
