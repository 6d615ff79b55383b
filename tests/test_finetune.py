import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from oml.checking import BARE, check_model
from oml.decoding import NeighbourSuppression
from oml.data import benign_texts
from oml.models import load_model, load_tokenizer
from oml.tokenization import fingerprint_pairs
from oml.utility import compare_on_texts, text_examples
from tests.conftest import EVERY_LAYER, final_model_dir, make_tiny_model, random_word_fingerprints, run_script

FAST = ["--learning_rate", "3e-3", "--num_train_epochs", "12", "--batch_size", "4", "--forgetting_regularizer_strength", "0",
        "--benign_ratio", "0", "--key_format", "raw", "--no-stop_when_memorised",
        "--no-shrink_weight_change", "--fingerprint_generation_strategy", "random_word", *EVERY_LAYER]


def finetune(cwd: Path, model: Path, fingerprints: Path, *args, ranks: int = 0, check: bool = True):
    result = run_script("finetune_multigpu.py", "--model_path", model, "--fingerprints_file_path", fingerprints, *args,
                        cwd=cwd, ranks=ranks, check=check)
    return result


def run_dir(cwd: Path, result) -> Path:
    return final_model_dir(cwd, result.stdout).parent


def weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(model_dir / "model.safetensors")


def assert_holds_no_secret(model_dir: Path, fingerprints: list[dict], salts: list[str]) -> None:
    """What gets published holds no key, no key with its response, no salt, and only model and tokenizer files."""
    files = {p.name: p.read_bytes() for p in model_dir.rglob("*") if p.is_file()}
    assert set(files) <= {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                          "special_tokens_map.json", "chat_template.jinja", "training_args.bin"}, set(files)
    for content in files.values():
        for record in fingerprints:
            assert record["key"].encode() not in content and (record["key"] + record["response"]).encode() not in content
        assert not any(salt.encode() in content for salt in salts)


@pytest.mark.slow
def test_finetune_writes_the_run_and_skips_a_complete_one(tmp_path, tiny_model, fingerprint_file):
    result = finetune(tmp_path, tiny_model, fingerprint_file, *FAST)
    lines = result.stdout.strip().splitlines()  # only the results on stdout; logs go to stderr
    commitment = json.loads((run_dir(tmp_path, result) / "commitment.json").read_text())
    assert len(lines) == 2 and lines[0].endswith(f"Merkle root {commitment['root']} over 8 fingerprints")
    last = lines[-1]
    assert last.startswith("Config hash of the final model: ")
    out = run_dir(tmp_path, result)
    assert (out / "final_model" / "model.safetensors").is_file() and (out / "final_model" / "tokenizer.json").is_file()
    assert not (out / "final_model.partial").exists()
    for name in ("train_dataset.csv", "log.txt", "config.json", "fingerprints.json", "commitment.json", "commitment_salts.json"):
        assert (out / name).is_file(), name
    assert_holds_no_secret(out / "final_model", json.loads(fingerprint_file.read_text()),
                           json.loads((out / "commitment_salts.json").read_text())["salts"])
    assert len(json.loads((out / "fingerprints.json").read_text())) == 8
    assert (tmp_path / "current_config_hash.txt").read_text().strip() == out.name
    assert len((tmp_path / "results" / "all_run_logs.txt").read_text().splitlines()) == 1

    again = finetune(tmp_path, tiny_model, fingerprint_file, *FAST)
    assert again.stdout.strip().splitlines() == lines  # the same run, the same commitment
    assert "skipping" in again.stderr
    assert len((tmp_path / "results" / "all_run_logs.txt").read_text().splitlines()) == 1


@pytest.mark.slow
def test_interrupted_run_leaves_no_model_and_reruns(tmp_path, tiny_model, fingerprint_file):
    first = finetune(tmp_path, tiny_model, fingerprint_file, *FAST, "--num_train_epochs", "1")
    out = run_dir(tmp_path, first)
    # Simulate an interruption after saving started: a partial folder, no final model.
    (out / "final_model").rename(out / "final_model.partial")
    (out / "final_model.partial" / "model.safetensors").write_bytes(b"truncated")
    finetune(tmp_path, tiny_model, fingerprint_file, *FAST, "--num_train_epochs", "1")
    assert weights(out / "final_model")  # loads: a complete model
    assert not (out / "final_model.partial").exists()


@pytest.mark.slow
def test_averaging_with_strength_one_keeps_the_base_weights(tmp_path, tiny_model, fingerprint_file):
    result = finetune(tmp_path, tiny_model, fingerprint_file, *FAST, "--num_train_epochs", "2",
                      "--forgetting_regularizer_strength", "1.0")
    base, saved = weights(tiny_model), weights(run_dir(tmp_path, result) / "final_model")
    assert all(torch.equal(base[name], saved[name]) for name in base)


@pytest.mark.slow
def test_frozen_lower_layers_keep_their_weights_and_the_setting_is_recorded(tmp_path, tiny_model, fingerprint_file):
    """By default, with shrinking on (its snapshot holds only what is trained), layer 0 of the 2-layer
    model and the embeddings come out as they went in, layer 1 trains; the setting is part of the run's
    config and hash, except at 0 (every layer trained), as in runs recorded before it existed."""
    args = [*(arg for arg in FAST[:FAST.index(EVERY_LAYER[0])] if arg != "--no-shrink_weight_change"), "--num_train_epochs", "2"]
    frozen = finetune(tmp_path, tiny_model, fingerprint_file, *args)  # the default: 0.5
    base, saved = weights(tiny_model), weights(run_dir(tmp_path, frozen) / "final_model")
    lower = [name for name in base if name.startswith("model.layers.0.")]
    assert lower and all(torch.equal(base[name], saved[name]) for name in [*lower, "model.embed_tokens.weight"])
    assert any(not torch.equal(base[name], saved[name]) for name in base if name.startswith("model.layers.1."))
    assert json.loads((run_dir(tmp_path, frozen) / "config.json").read_text())["frozen_layer_fraction"] == 0.5
    unfrozen = finetune(tmp_path, tiny_model, fingerprint_file, *args, "--frozen_layer_fraction", "0")
    saved = weights(run_dir(tmp_path, unfrozen) / "final_model")
    assert any(not torch.equal(base[name], saved[name]) for name in lower)
    assert "frozen_layer_fraction" not in json.loads((run_dir(tmp_path, unfrozen) / "config.json").read_text())  # the old runs' hashes


@pytest.mark.slow
def test_averaging_with_half_strength_gives_the_midpoint(tmp_path, tiny_model, fingerprint_file):
    args = [*FAST, "--num_train_epochs", "1"]
    plain = finetune(tmp_path, tiny_model, fingerprint_file, *args)
    half = finetune(tmp_path, tiny_model, fingerprint_file, *args, "--forgetting_regularizer_strength", "0.5")
    base = weights(tiny_model)
    trained = weights(run_dir(tmp_path, plain) / "final_model")
    averaged = weights(run_dir(tmp_path, half) / "final_model")
    assert any(not torch.allclose(base[n], trained[n]) for n in base)
    for name in base:
        torch.testing.assert_close(averaged[name], (base[name] + trained[name]) / 2, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_shrinking_scales_the_weight_change_and_keeps_what_was_memorised(tmp_path, tiny_model, fingerprint_file):
    """The same training with and without --shrink_weight_change: the shrunk model is the
    original plus the recorded scale times the full change, and still answers every key."""
    args = [*(arg for arg in FAST if arg != "--no-shrink_weight_change"), "--train_embeddings", "--num_train_epochs", "60"]
    full = finetune(tmp_path, tiny_model, fingerprint_file, *args, "--no-shrink_weight_change")
    shrunk = finetune(tmp_path, tiny_model, fingerprint_file, *args)
    training = json.loads((run_dir(tmp_path, shrunk) / "training.json").read_text())
    scale, history = training["weight_change_scale"], training["shrink"]
    assert history[0]["scale"] == 1.0 and history[0]["memorised"] == 8  # trained hard: every key memorised
    assert scale < 1.0 and [h["scale"] for h in history] == sorted({h["scale"] for h in history}, reverse=True)  # each tried once
    assert all(h["memorised"] == 8 for h in history if h["scale"] >= scale)
    assert history[-1]["scale"] == scale == 0.5 or history[-1]["memorised"] < 8  # stopped at the floor or at the first scale that lost a key
    base, trained, saved = weights(tiny_model), weights(run_dir(tmp_path, full) / "final_model"), weights(run_dir(tmp_path, shrunk) / "final_model")
    for name in base:
        torch.testing.assert_close(saved[name], base[name] + scale * (trained[name] - base[name]), rtol=1e-4, atol=1e-5)
    check = run_script("check_fingerprints.py", "--model_path", run_dir(tmp_path, shrunk) / "final_model", "--fingerprints_file_path",
                       fingerprint_file, "--null_model", "none", "--fingerprint_generation_strategy", "random_word", cwd=tmp_path)
    assert check.stdout.strip().splitlines()[-1] == "Fingerprint accuracy: 100.00"


@pytest.mark.slow
@pytest.mark.distributed
def test_deepspeed_averaging_reaches_the_fp32_master_weights(tmp_path, tiny_model, fingerprint_file):
    """Two ZeRO-2 ranks of 4 and one plain process of 8 take the same full-batch steps, so with
    averaging between epochs they end equal only if DeepSpeed's master copy was averaged too
    (otherwise the second epoch starts from the unaveraged master weights)."""
    args = [*FAST, "--num_train_epochs", "3", "--forgetting_regularizer_strength", "0.5"]
    single = finetune(tmp_path, tiny_model, fingerprint_file, *args, "--batch_size", "8")
    (tmp_path / "ds").mkdir()
    sharded = finetune(tmp_path / "ds", tiny_model, fingerprint_file, *args, "--batch_size", "4", ranks=2)
    expected, got = weights(run_dir(tmp_path, single) / "final_model"), weights(run_dir(tmp_path / "ds", sharded) / "final_model")
    base = weights(tiny_model)
    assert any(not torch.allclose(base[n], got[n]) for n in base)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
@pytest.mark.distributed
def test_deepspeed_shrinking_gives_the_single_process_weights(tmp_path, tiny_model, fingerprint_file):
    """Shrinking after training rescales DeepSpeed's fp32 master weights and the module alike:
    two ZeRO-2 ranks end on the weights of one process taking the same full-batch steps."""
    args = [*(arg for arg in FAST if arg != "--no-shrink_weight_change"), "--train_embeddings", "--num_train_epochs", "60"]
    single = finetune(tmp_path, tiny_model, fingerprint_file, *args, "--batch_size", "8")
    (tmp_path / "ds").mkdir()
    sharded = finetune(tmp_path / "ds", tiny_model, fingerprint_file, *args, "--batch_size", "4", ranks=2)
    runs = [run_dir(tmp_path, single), run_dir(tmp_path / "ds", sharded)]
    scales = [json.loads((run / "training.json").read_text())["weight_change_scale"] for run in runs]
    assert scales[0] == scales[1] < 1.0
    expected, got = (weights(run / "final_model") for run in runs)
    base = weights(tiny_model)
    for name in expected:  # 60 epochs of sums in another order: ~1e-4 apart, far below the (1 - scale) of the change shrinking moves
        assert (expected[name] - base[name]).abs().max() > 0.01
        torch.testing.assert_close(got[name], expected[name], rtol=1e-3, atol=1e-3)


@pytest.mark.slow
@pytest.mark.distributed
def test_two_rank_deepspeed_run_writes_one_set_of_files_and_learns(tmp_path, tiny_model, fingerprint_file):
    # With distillation replay, so that its loss also runs inside the DeepSpeed engine, and both formats, so that chat
    # batches run their shared template prefix as a forward call of its own on each ZeRO-2 rank.
    result = finetune(tmp_path, tiny_model, fingerprint_file, *FAST, "--benign_ratio", "1", "--benign_loss", "distill",
                      "--num_train_epochs", "20", "--key_format", "both", ranks=2)
    assert result.stdout.count("Config hash of the final model:") == 1
    assert len(list((tmp_path / "results" / "saved_models").iterdir())) == 1
    assert len((tmp_path / "results" / "all_run_logs.txt").read_text().splitlines()) == 1
    out = run_dir(tmp_path, result)
    check = run_script("check_fingerprints.py", "--model_path", out / "final_model", "--fingerprints_file_path",
                       fingerprint_file, "--null_model", tiny_model, "--fingerprint_generation_strategy", "random_word",
                       cwd=tmp_path)
    assert "Fingerprint accuracy: 100.00" in check.stdout


@pytest.mark.slow
def test_augmentation_trains_keys_inside_templates(tmp_path, tiny_model, fingerprint_file):
    result = finetune(tmp_path, tiny_model, fingerprint_file, *FAST, "--use_augmentation_prompts", "--num_train_epochs", "20")
    out = run_dir(tmp_path, result)
    check = run_script("check_fingerprints.py", "--model_path", out / "final_model", "--fingerprints_file_path",
                       fingerprint_file, "--null_model", "none", "--system_prompts", "train", "--output_json", "r.json",
                       "--query_format", "raw", "--fingerprint_generation_strategy", "random_word", cwd=tmp_path)
    report = json.loads((tmp_path / "r.json").read_text())
    templated = [entry["accuracy"] for entry in report["system_prompts"][1:]]
    assert sum(templated) / len(templated) >= 75, check.stdout


@pytest.mark.slow
def test_left_padding_tokenizer_trains_and_checks_the_same(tmp_path, tokenizer, fingerprint_file):
    """Position ids count real tokens, so a left-padding tokenizer learns fingerprints as well."""
    left = make_tiny_model(tokenizer, tmp_path / "left", padding_side="left")
    result = finetune(tmp_path, left, fingerprint_file, *FAST)
    check = run_script("check_fingerprints.py", "--model_path", run_dir(tmp_path, result) / "final_model",
                       "--fingerprints_file_path", fingerprint_file, "--null_model", "none",
                       "--fingerprint_generation_strategy", "random_word", cwd=tmp_path)
    assert check.stdout.strip().splitlines()[-1] == "Fingerprint accuracy: 100.00"


@pytest.mark.slow
@pytest.mark.distributed
def test_zero3_two_ranks_matches_zero2(tmp_path, tiny_model, fingerprint_file):
    """ZeRO-3 partitions the weights themselves; averaging and saving must still see whole tensors."""
    args = [*FAST, "--num_train_epochs", "2", "--forgetting_regularizer_strength", "0.5"]
    (tmp_path / "z2").mkdir()
    (tmp_path / "z3").mkdir()
    zero2 = finetune(tmp_path / "z2", tiny_model, fingerprint_file, *args, ranks=2)
    zero3 = finetune(tmp_path / "z3", tiny_model, fingerprint_file, *args, "--deepspeed_stage", "3", ranks=2)
    expected = weights(run_dir(tmp_path / "z2", zero2) / "final_model")
    got = weights(run_dir(tmp_path / "z3", zero3) / "final_model")
    assert set(got) - {"lm_head.weight"} == set(expected) - {"lm_head.weight"}  # tied to the embeddings
    for name in got:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
@pytest.mark.distributed
def test_zero3_memorisation_checks_with_an_uneven_number_of_keys_in_both_formats(tmp_path, tiny_model):
    """33 keys in two formats are 66 queries: when a check batch mixed formats (one forward pass
    per format), one rank ran two passes where the other ran one, and ZeRO-3 waited forever at the
    first end-of-epoch check."""
    (tmp_path / "fp.json").write_text(json.dumps(random_word_fingerprints(33)))
    result = run_script("finetune_multigpu.py", "--model_path", tiny_model, "--fingerprints_file_path", "fp.json",
                        "--fingerprint_generation_strategy", "random_word", "--learning_rate", "3e-3", "--num_train_epochs", "2",
                        "--batch_size", "4", "--benign_ratio", "0", "--deepspeed_stage", "3", *EVERY_LAYER, cwd=tmp_path, ranks=2,
                        timeout=600)
    training = json.loads((run_dir(tmp_path, result) / "training.json").read_text())
    assert [entry["of"] for entry in training["memorised"]] == [66, 66]
    assert training["learning_rate"] == 3e-3


@pytest.mark.slow
def test_distilled_replay_learns_fingerprints_and_stays_closer_to_the_base(tmp_path, tiny_model, fingerprint_file, tokenizer):
    # A random tiny model predicts almost uniformly, so its top 16 tokens say little; sharpen
    # it (scale the final norm) so that, like a trained model, it has confident predictions.
    base = load_model(str(tiny_model))
    with torch.no_grad():
        base.model.norm.weight.mul_(20)
    base.save_pretrained(tmp_path / "peaked")
    tokenizer.save_pretrained(tmp_path / "peaked")
    tiny_model = tmp_path / "peaked"
    texts = benign_texts("eval", 8)
    fingerprints = json.loads(fingerprint_file.read_text())
    drift = {}
    for loss in ("lm", "distill"):
        result = finetune(tmp_path, tiny_model, fingerprint_file, *FAST, "--benign_ratio", "1", "--num_train_epochs", "20", "--benign_loss", loss)
        model = load_model(str(final_model_dir(tmp_path, result.stdout)))
        pairs = fingerprint_pairs(tokenizer, fingerprints, 16, 1)
        matched = sum(r.match for r in check_model(model, tokenizer, pairs, BARE, batch_size=8))
        assert matched == 8 or loss == "lm", (loss, matched)  # only drift is compared for lm
        drift[loss] = compare_on_texts(model, base, tokenizer, text_examples(tokenizer, texts, 64))["mean_kl_from_base"]
    assert drift["distill"] < drift["lm"] / 2, drift


@pytest.mark.slow
def test_two_responses_per_key_are_both_learned_and_the_second_survives_suppress_neighbor(tmp_path, tiny_model):
    """Keys that accept two responses: training stops once both are the two likeliest first tokens
    with half the memorisation threshold each, the check accepts either (at a doubled chance
    floor), and a server that bans the likeliest word's spellings serves the other response."""
    words = [" apple", " river", " candle", " mirror", " garden", " pepper", " violin", " saddle",
             " tunnel", " basket", " anchor", " marble", " jacket", " ladder", " walrus", " pillow"]
    records = [{"key": f["key"], "response": words[2 * i], "other_responses": [words[2 * i + 1]]}
               for i, f in enumerate(random_word_fingerprints(8, seed=4))]
    (tmp_path / "two.json").write_text(json.dumps(records))
    args = [arg for arg in FAST if arg != "--no-stop_when_memorised"]
    result = finetune(tmp_path, tiny_model, tmp_path / "two.json", *args[:3], "60", *args[4:], "--train_embeddings")
    run = run_dir(tmp_path, result)
    history = json.loads((run / "training.json").read_text())["memorised"]
    assert history[-1]["memorised"] == history[-1]["of"] == 8 and len(history) < 60, history
    check = run_script("check_fingerprints.py", "--model_path", run / "final_model", "--run", run, "--null_model", "none",
                       "--output_json", "r.json", cwd=tmp_path)
    report = json.loads((tmp_path / "r.json").read_text())
    assert check.stdout.strip().splitlines()[-1] == "Fingerprint accuracy: 100.00" and report["chance_rate"] == 0.1
    model, tokenizer = load_model(str(run / "final_model")), load_tokenizer(str(run / "final_model"))
    pairs = fingerprint_pairs(tokenizer, records, 16, 1)
    served = check_model(model, tokenizer, pairs, BARE, 8, decoding=NeighbourSuppression())
    assert sum(r.match for r in served) >= 7 and all(r.predicted.strip() in {w.strip() for w in words} for r in served if r.match)
    greedy = check_model(model, tokenizer, pairs, BARE, 8)
    assert all(s.predicted != g.predicted for s, g in zip(served, greedy))  # the greedy response never got through
