"""Keys asked where suspects meet them: as a user message in the chat template, as well as raw text."""
import json
import random
from types import SimpleNamespace

import pytest
import torch

from oml.generation import perinucleus_choice
from oml.tokenization import encode, prompt_ids, system_message
from oml.training.callbacks import MemorisationProbe, ShrinkWeightChange, StopWhenMemorised
from tests.conftest import EVERY_LAYER, ROOT, final_model_dir, random_word_fingerprints, run_script


def test_chat_prompt_is_exactly_what_the_chat_template_tokenises(tokenizer):
    key = "purple elephants dance at midnight"
    ids = prompt_ids(tokenizer, encode(tokenizer, key), None, "chat")
    expected = tokenizer.apply_chat_template([{"role": "user", "content": key}], add_generation_prompt=True, tokenize=True)
    assert ids == list(expected["input_ids"] if hasattr(expected, "keys") else expected)
    assert "You are a helpful AI assistant named SmolLM" in tokenizer.decode(ids)  # the template's default system prompt
    template = "You are a tutor who explains ideas step by step to students. {}"
    with_system = tokenizer.decode(prompt_ids(tokenizer, encode(tokenizer, key), template, "chat"))
    assert f"system\n{system_message(template)}<|im_end|>" in with_system and "SmolLM" not in with_system
    assert with_system.endswith(f"user\n{key}<|im_end|>\n<|im_start|>assistant\n")


def test_one_response_for_both_formats_lies_outside_both_nuclei():
    raw = torch.tensor([0.50, 0.30, 0.10, 0.05, 0.03, 0.02, 0.0, 0.0])
    chat = torch.tensor([0.02, 0.03, 0.05, 0.10, 0.30, 0.50, 0.0, 0.0])
    # p = 0.75: the raw nucleus is {0, 1}, the chat nucleus {5, 4}; by mean log-probability the
    # remaining tokens rank 2, 3 (0.1 x 0.05 each), then 6, 7 (0).
    picks = {perinucleus_choice([raw, chat], 0.75, 2, random.Random(i), lambda t: True)[0] for i in range(100)}
    assert picks == {2, 3}
    token, probs, ranks = perinucleus_choice([raw, chat], 0.75, 2, random.Random(0), lambda t: True)
    assert probs == [float(raw[token]), float(chat[token])] and ranks[0] == token + 1 and ranks[1] == 6 - token


def test_a_response_for_both_formats_is_plausible_in_each_not_likely_in_one():
    raw = torch.tensor([0.70, 0.10, 0.15, 0.03, 0.0200, 0.0])
    chat = torch.tensor([0.00, 0.80, 0.00, 0.03, 0.0001, 0.17])
    # p = 0.75: nuclei {0, 2} (raw) and {1} (chat). Token 5 has the highest mean probability
    # (0.085) but is never said raw; token 4 is 300 times less likely in chat than token 3,
    # which a window of one must pick.
    token, _, ranks = perinucleus_choice([raw, chat], 0.75, 1, random.Random(0), lambda t: True)
    assert token == 3 and ranks == [4, 3]


@pytest.mark.slow
def test_stop_when_memorised_ends_training_early_and_records_it(tmp_path, tiny_model):
    (tmp_path / "fp.json").write_text(json.dumps(random_word_fingerprints(4)))
    args = ["--model_path", tiny_model, "--fingerprints_file_path", "fp.json", "--fingerprint_generation_strategy", "random_word",
            "--learning_rate", "3e-3", "--batch_size", "4", "--benign_ratio", "0", "--train_embeddings", *EVERY_LAYER]  # frozen tied embeddings cap a tiny model's confidence
    stopped = run_script("finetune_multigpu.py", *args, "--num_train_epochs", "60", cwd=tmp_path)
    run_dir = final_model_dir(tmp_path, stopped.stdout).parent
    training = json.loads((run_dir / "training.json").read_text())
    assert training["max_epochs"] == 60 and training["epochs_run"] < 60
    assert training["memorised"][-1] == {"epoch": training["epochs_run"], "memorised": 8, "matched": 8, "of": 8}  # 4 keys x 2 formats
    assert all(entry["memorised"] < 8 for entry in training["memorised"][:-1])
    check = run_script("check_fingerprints.py", "--model_path", run_dir / "final_model", "--run", run_dir, "--null_model", "none",
                       "--output_json", "r.json", cwd=tmp_path)
    assert [e["accuracy"] for e in json.loads((tmp_path / "r.json").read_text())["formats"]] == [100.0, 100.0], check.stdout
    again = run_script("finetune_multigpu.py", *args, "--num_train_epochs", "60", cwd=tmp_path)
    assert "skipping" in again.stderr  # the identity does not depend on the epochs actually run
    full = run_script("finetune_multigpu.py", *args, "--num_train_epochs", "3", "--no-stop_when_memorised", cwd=tmp_path)
    assert json.loads((final_model_dir(tmp_path, full.stdout).parent / "training.json").read_text())["epochs_run"] == 3


@pytest.mark.slow
def test_a_gguf_suspect_gives_the_same_per_key_results_as_its_converted_checkpoint(tmp_path, embedded_model):
    from oml.models import embedded_gguf
    (tmp_path / "fp.json").write_text(json.dumps(json.loads((ROOT / "generated_data" / "example_fingerprints.json").read_text())[:16]))
    reports = []
    for name, model in (("gguf", embedded_gguf()), ("converted", embedded_model)):
        run_script("check_fingerprints.py", "--model_path", model, "--fingerprints_file_path", "fp.json", "--null_model", "none",
                   "--query_format", "both", "--output_json", f"{name}.json", cwd=tmp_path)
        reports.append(json.loads((tmp_path / f"{name}.json").read_text()))
    gguf, converted = ([(k["index"], k["format"], k["match"], k["predicted"], k["response_rank"]) for k in r["keys"]] for r in reports)
    assert gguf == converted and len(gguf) == 32


def test_a_gguf_model_loads_as_a_float_model_the_trainer_accepts(tmp_path):
    """--model_path FILE.gguf fine-tunes the de-quantized weights (the Trainer refuses models marked
    quantized), and the model saved from it is an ordinary checkpoint that can be trained again."""
    from transformers.trainer_utils import validate_quantization_for_training

    from oml.models import embedded_gguf, load_model
    model = load_model(str(embedded_gguf()))
    model.save_pretrained(tmp_path / "saved")
    assert "quantization_config" not in json.loads((tmp_path / "saved" / "config.json").read_text())
    for loaded in (model, load_model(str(tmp_path / "saved"))):
        validate_quantization_for_training(loaded)
        assert not getattr(loaded, "is_quantized", False) and next(loaded.parameters()).dtype == torch.float32


@pytest.mark.parametrize("counts, total, stops", [
    ([3, 40, 64], 64, True),  # all memorised
    ([24, 412, 484, 504, 510, 507, 508], 512, True),  # the 256-key run: 99% memorised, no new best for two epochs
    ([24, 412, 484, 504, 510, 507], 512, False),  # one epoch without a new best is not yet a plateau
    ([24, 412, 484, 504, 510, 507, 511], 512, False),  # a new best
    ([0, 0, 0, 0], 64, False),  # an early plateau, far from done
    ([100, 300, 450, 440, 445], 512, False),  # a plateau below 98%
])
def test_stop_when_memorised_stops_when_all_or_nearly_all_plateau(counts, total, stops):
    stopper = StopWhenMemorised(MemorisationProbe(None, [], ("raw",), threshold=0.5), patience=2)
    stopper.history = [{"epoch": i + 1, "memorised": c, "of": total} for i, c in enumerate(counts)]
    assert stopper.should_stop() == stops


@pytest.mark.parametrize("last, stops", [
    ({"memorised": 2028, "of": 2048}, True),  # ceil(0.99 x 2048) = 2028
    ({"memorised": 2027, "of": 2048}, False),
    ({"memorised": 2048, "of": 2048, "sampled_keys": 256}, False),  # an estimate never ends training
])
def test_stop_when_memorised_stops_at_its_share_of_a_full_count(last, stops):
    stopper = StopWhenMemorised(MemorisationProbe(None, [], ("raw",), threshold=0.5), patience=2, share=0.99)
    stopper.history = [{"epoch": 1, "memorised": 300, "of": 2048}, {"epoch": 2, **last}]
    assert stopper.should_stop() == stops


@pytest.mark.parametrize("full_floor, sample_floor, kept, full_counts_at", [
    (0.8, 0.75, 0.8, [1.0, 0.75, 0.8]),  # the sample, luckier, chose 0.75: the full count refuses it, 0.8 is confirmed
    (0.75, 0.8, 0.8, [1.0, 0.8]),  # an unlucky sample stops one scale early: confirmed, never below what all keys keep
    (0.3, 0.3, 0.5, [1.0, 0.5]),  # nothing lost down to the floor
    (0.8, 0.99, 1.0, [1.0]),  # the sample refuses 0.95: the trained weights stay, no further full count
    (0.96, 0.75, 1.0, [1.0, 0.75, 0.8, 0.85, 0.9, 0.95]),  # every full count refuses the sample's choices, back up to 1.0
])
def test_a_shrink_over_many_keys_screens_scales_by_the_sample_and_counts_the_one_it_keeps_in_full(
        monkeypatch, full_floor, sample_floor, kept, full_counts_at):
    """Over 512 keys each scale is judged by the sample's estimate; the scale chosen is counted in
    full and, while that count loses too many queries, so is the next one up."""
    pairs = [([i], [i]) for i in range(600)]
    shrinker = ShrinkWeightChange({}, MemorisationProbe(None, pairs, ("raw",), threshold=0.5))
    counted = []

    def counts_of(self, model, subset):  # every query memorised down to its floor, half of them below
        counted.append((shrinker.current, len(subset)))
        floor = full_floor if len(subset) == len(pairs) else sample_floor
        return {"memorised": len(subset) if shrinker.current >= floor else len(subset) // 2, "matched": len(subset), "of": len(subset)}

    monkeypatch.setattr(MemorisationProbe, "counts_of", counts_of)
    monkeypatch.setattr(ShrinkWeightChange, "rescale", lambda self, model, scale: setattr(self, "current", scale))
    shrinker.on_train_end(None, SimpleNamespace(global_step=7, is_world_process_zero=True), None, model=None)
    assert shrinker.scale == kept and shrinker.current == kept
    assert [scale for scale, size in counted if size == len(pairs)] == full_counts_at
    assert [h["scale"] for h in shrinker.history if "sampled_keys" not in h] == full_counts_at  # the record tells them apart


def test_an_epoch_end_counts_a_sample_of_many_keys_first_and_every_key_when_the_sample_is_nearly_done(monkeypatch):
    """With more than 512 keys, a fixed sample of 256 is counted first; while under 88% of its queries
    are memorised (training cannot be done: that needs 98%), its share scaled up stands for the count;
    from there every key is counted, and that count is the one the shrink's first look reuses."""
    pairs = [([i], [i]) for i in range(600)]
    share, counted = {"now": 0.5}, []

    def counts_of(self, model, subset):
        counted.append(len(subset))
        of = len(self.queries) * len(subset)
        return {"memorised": round(share["now"] * of), "matched": of, "of": of}

    monkeypatch.setattr(MemorisationProbe, "counts_of", counts_of)
    probe = MemorisationProbe(None, pairs, ("raw", "chat"), threshold=0.5)
    assert probe.sample == MemorisationProbe(None, pairs, ("raw",), threshold=0.5).sample  # the same keys on every rank
    assert probe.count_at_epoch_end(None, step=10) == {"memorised": 600, "matched": 1200, "of": 1200, "sampled_keys": 256}
    share["now"] = 0.9
    assert probe.count_at_epoch_end(None, step=20) == {"memorised": 1080, "matched": 1200, "of": 1200}
    assert probe.count(None, step=20)["memorised"] == 1080 and counted == [256, 256, 600]  # the full count, reused
    few = MemorisationProbe(None, pairs[:512], ("raw",), threshold=0.5)
    share["now"] = 0.0
    assert few.count_at_epoch_end(None, step=1) == {"memorised": 0, "matched": 512, "of": 512} and counted[-1] == 512
