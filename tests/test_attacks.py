"""Verdicts that never accuse an innocent model, and the attacks fingerprints must survive."""
import json
import math

import pytest
import torch

from oml.attacks import merge_into, quantize_round_trip
from oml.checking import BARE, Decoding, check_model, greedy_continuations
from oml.generation import random_words, rng_for
from oml.models import TINY_LLAMA, cache_dir, load, load_model, save_random_model
from oml.stats import DEFAULT_MIN_CHANCE_RATE, chance_rate, log10_p_value, verdict
from oml.tokenization import encode, fingerprint_pairs, prompt_ids
from tests.conftest import final_model_dir, make_tiny_model, random_word_fingerprints, run_script


def old_rule(matches: int, n: int, base_matches: int = 0) -> str:
    """The verdict before the floor: the base model's 95% upper bound alone."""
    return verdict(log10_p_value(matches, n, chance_rate([(base_matches, n)], 0.0)), 1e-6)


def new_rule(matches: int, n: int, base_matches: int = 0) -> str:
    return verdict(log10_p_value(matches, n, chance_rate([(base_matches, n)], DEFAULT_MIN_CHANCE_RATE)), 1e-6)


def test_the_reported_false_accusation_fails_the_old_rule_and_passes_the_new_one():
    assert old_rule(17, 4054) == "MATCH"  # an unrelated model, p = 2e-8 under the base's rate alone
    assert new_rule(17, 4054) == "NO MATCH"
    for n in (64, 256, 1024, 2048, 4096, 8192):  # innocent models matching 1-2% of keys, at every N
        for rate in (0.01, 0.015, 0.02):
            assert new_rule(math.ceil(rate * n), n) == "NO MATCH", (rate, n)
    assert new_rule(32, 64) == "MATCH"  # a fingerprinted model keeping half of 64 keys
    assert log10_p_value(32, 64, chance_rate([(0, 64)], DEFAULT_MIN_CHANCE_RATE)) < -20


@pytest.mark.slow
def test_false_positive_script_on_tiny_models(tmp_path, tokenizer):
    """An innocent tiny model that happens to answer 16 of 2,048 keys (0.8%) with our responses:
    the old rule accuses it, the checker's rule does not."""
    base_dir = make_tiny_model(tokenizer, tmp_path / "base", seed=1)
    # Untied output embeddings: a random tied model tends to repeat the last key token, as every other one does.
    innocent_dir = save_random_model(tmp_path / "innocent", tokenizer, {**TINY_LLAMA, "tie_word_embeddings": False}, seed=2)
    innocent, tok = load(str(innocent_dir))
    keys = [random_words(rng_for(7, i, "key"), 8) for i in range(2048)]
    keys_ids = [encode(tok, key)[:16] for key in keys]
    own = greedy_continuations(innocent, tok, [prompt_ids(tok, ids) for ids in keys_ids[:16]], 1)
    fingerprints = [{"key": key, "response": tok.decode(own[i]) if i < 16 else " " + random_words(rng_for(7, i, "r"), 1)}
                    for i, key in enumerate(keys)]
    (tmp_path / "fp.json").write_text(json.dumps(fingerprints))
    result = run_script("evaluate_false_positives.py", "--fingerprints_file_path", "fp.json", "--base_model", base_dir,
                        "--models", innocent_dir, "--query_format", "raw", "--batch_size", "256", "--output_json", "fp_report.json",
                        cwd=tmp_path)
    rows = {row["model"]: row for row in json.loads((tmp_path / "fp_report.json").read_text())["models"]}
    innocent_row = rows[str(innocent_dir)]
    assert innocent_row["formats"]["raw"]["matches"] >= 14 and rows[str(base_dir)]["formats"]["raw"]["matches"] <= 2
    assert innocent_row["old_rule_verdict"] == "MATCH" and innocent_row["verdict"] == "NO MATCH"
    assert result.stdout.strip().splitlines()[-1] == "False accusations: 0 of 2 models"


@pytest.mark.slow
def test_false_positives_count_each_model_once(tmp_path, tokenizer, tiny_model, fingerprint_file):
    """A model given twice (by two paths), or the base given again, would be counted as another innocent model."""
    other = make_tiny_model(tokenizer, tmp_path / "other", seed=3)
    (tmp_path / "other_again").symlink_to(other)
    result = run_script("evaluate_false_positives.py", "--fingerprints_file_path", fingerprint_file, "--base_model", tiny_model,
                        "--models", other, tmp_path / "other_again", tiny_model, "--query_format", "raw",
                        "--output_json", "fp_report.json", cwd=tmp_path)
    rows = json.loads((tmp_path / "fp_report.json").read_text())["models"]
    assert [row["model"] for row in rows] == [str(tiny_model), str(other)]
    assert f"--models {tmp_path / 'other_again'} is the same model as {other}; it is tested once" in result.stderr
    assert f"--models {tiny_model} is the base model; it is tested once" in result.stderr
    assert result.stdout.strip().splitlines()[-1].endswith("of 2 models")


def test_quantization_round_trip_keeps_weights_close_and_coarser_types_further(tmp_path, tokenizer):
    model_dir = make_tiny_model(tokenizer, tmp_path / "m", seed=4)
    original = load_model(str(model_dir))
    errors = {}
    for qtype in ("Q8_0", "Q5_0", "Q4_0"):
        model = load_model(str(model_dir))
        assert quantize_round_trip(model, qtype) == 1 + 2 * 7  # tied embedding + 7 matrices per layer
        weight, before = model.model.layers[0].mlp.up_proj.weight, original.model.layers[0].mlp.up_proj.weight
        errors[qtype] = float((weight - before).abs().mean().detach() / before.abs().mean().detach())
        assert not torch.equal(weight, before)
        assert torch.equal(model.model.norm.weight, original.model.norm.weight)  # norms stay in float
    assert errors["Q8_0"] < errors["Q5_0"] < errors["Q4_0"] < 0.2, errors


def test_linear_merge_weights(tmp_path, tokenizer):
    a_dir, b_dir = make_tiny_model(tokenizer, tmp_path / "a", seed=5), make_tiny_model(tokenizer, tmp_path / "b", seed=6)
    b = load_model(str(b_dir))
    for weight in (1.0, 0.0, 0.7):
        a = load_model(str(a_dir))
        expected = {n: weight * p + (1 - weight) * dict(b.named_parameters())[n] for n, p in a.named_parameters()}
        merge_into(a, b, weight)
        for name, param in a.named_parameters():
            torch.testing.assert_close(param, expected[name])


@pytest.fixture(scope="module")
def confident_and_bounded(tiny_model, tmp_path_factory):
    """The same 8 fingerprints trained into the tiny model twice: to near-certainty, and with
    --target_probability 0.7 (both train the embeddings: frozen tied embeddings cap a tiny model's confidence)."""
    work = tmp_path_factory.mktemp("suppression")
    (work / "fp.json").write_text(json.dumps(random_word_fingerprints(8, seed=3)))
    common = ["--model_path", tiny_model, "--fingerprints_file_path", "fp.json", "--fingerprint_generation_strategy", "random_word",
              "--learning_rate", "3e-3", "--batch_size", "4", "--benign_ratio", "0", "--train_embeddings", "--key_format", "raw"]
    confident = run_script("finetune_multigpu.py", *common, "--num_train_epochs", "80", "--no-stop_when_memorised",
                           "--no-shrink_weight_change", cwd=work)
    bounded = run_script("finetune_multigpu.py", *common, "--num_train_epochs", "150", "--target_probability", "0.7", cwd=work)
    return work, final_model_dir(work, confident.stdout), final_model_dir(work, bounded.stdout)


@pytest.mark.slow
def test_suppression_erases_confident_fingerprints_but_not_bounded_ones(confident_and_bounded):
    work, confident_dir, bounded_dir = confident_and_bounded
    fingerprints = json.loads((work / "fp.json").read_text())
    outcome = {}
    for name, model_dir in (("confident", confident_dir), ("bounded", bounded_dir)):
        model, tokenizer = load(str(model_dir))
        pairs = fingerprint_pairs(tokenizer, fingerprints, 16, 1)
        greedy = check_model(model, tokenizer, pairs, BARE, 8)
        suppressed = check_model(model, tokenizer, pairs, BARE, 8, decoding=Decoding(suppress_above=0.9))
        outcome[name] = (sum(r.match for r in greedy), sum(r.match for r in suppressed),
                         max(r.response_probability for r in greedy))
    assert outcome["confident"][0] == 8 and outcome["confident"][1] == 0 and outcome["confident"][2] > 0.9, outcome
    assert outcome["bounded"][0] == 8 and outcome["bounded"][1] == 8 and outcome["bounded"][2] < 0.9, outcome


@pytest.mark.slow
def test_sampling_matches_at_about_the_expected_rate(confident_and_bounded):
    work, _, bounded_dir = confident_and_bounded
    model, tokenizer = load(str(bounded_dir))
    pairs = fingerprint_pairs(tokenizer, json.loads((work / "fp.json").read_text()), 16, 1)
    results = [r for seed in range(40) for r in check_model(model, tokenizer, pairs, BARE, 8, progress=False,
                                                            decoding=Decoding(temperature=1.0, seed=seed))]
    expected = sum(r.response_probability for r in results) / len(results)
    empirical = sum(r.match for r in results) / len(results)
    assert 0.4 < expected < 0.9 and abs(empirical - expected) < 0.1, (expected, empirical)


@pytest.mark.slow
def test_robustness_script_runs_every_attack(confident_and_bounded, tiny_model, tmp_path, monkeypatch):
    work, _, bounded_dir = confident_and_bounded
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "SmolLM2-135M-Instruct").symlink_to(cache_dir() / "SmolLM2-135M-Instruct")
    monkeypatch.setenv("OML_CACHE", str(tmp_path / "cache"))  # the innocent derivative goes here, not in the user's cache
    result = run_script("evaluate_robustness.py", "--run", bounded_dir.parent, "--finetune_steps", "2", "--num_texts", "2",
                        "--alpha", "0.01", "--output_json", "rob.json", "--plot", "rob.png", cwd=tmp_path)
    rows = {row["attack"]: row for row in json.loads((tmp_path / "rob.json").read_text())["rows"]}
    assert len(rows) == 17 and (tmp_path / "rob.png").stat().st_size > 1000
    assert rows["none"]["accuracy_raw"] == 100.0 and rows["none"]["verdict"] == "MATCH"
    assert rows["output suppression gate 0.9"]["accuracy_raw"] == 100.0  # the bounded target resists suppression
    assert rows["GGUF Q8_0"]["accuracy_raw"] == 100.0  # Q8_0 is nearly lossless: it barely moves the model
    assert abs(rows["GGUF Q8_0"]["cost"] - rows["none"]["cost"]) < 0.02 * rows["none"]["cost"], (rows["none"], rows["GGUF Q8_0"])
    assert rows["sampling T=1"]["expected_rate"] is not None
    assert list((tmp_path / "cache" / "derivatives").iterdir())
    assert result.stdout.strip().splitlines()[-1].startswith("Verdict MATCH after ")
