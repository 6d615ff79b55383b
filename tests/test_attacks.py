"""Verdicts that never accuse an innocent model, and the attacks fingerprints must survive."""
import json
import math
import re
import zlib
from dataclasses import dataclass

import pytest
import torch

from oml.attacks import (DEPLOYER_TEMPLATE, FRONT_ENDS, benign_finetune, innocent_derivative, meraser, meraser_examples, merge_into,
                         mismatched_pairs, quantize_round_trip, rewritten_keys)
from oml.checking import BARE, check_model
from oml.decoding import Decoding, LookaheadSuppression, NeighbourSuppression, Sampling, TopKSuppression, neighbours
from oml.data import chat_pairs, user_wrappers
from oml.replies import generate_ids
from oml.generation import random_words, rng_for
from oml.models import TINY_LLAMA, cache_dir, load, load_model, save_random_model
from oml.stats import DEFAULT_MIN_CHANCE_RATE, chance_rate, log10_p_value, verdict
from oml.tokenization import IGNORE_INDEX, encode, fingerprint_pairs, prompt_ids, special_prefix, user_turn_ids
from oml.utility import altered_share, chat_examples
from tests.conftest import EVERY_LAYER, final_model_dir, make_tiny_model, random_word_fingerprints, run_script


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
    own = generate_ids(innocent, tok, [prompt_ids(tok, ids) for ids in keys_ids[:16]], 1)
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


def test_an_innocent_derivative_is_trained_at_a_rate_scaled_to_its_base(tmp_path, tokenizer, monkeypatch, caplog):
    """A base with 10 times larger weights gets a derivative trained at a 10 times larger rate (2.5e-4 x
    their RMS), as a user's fine-tune moves a share of the weights; an explicit rate is another derivative."""
    monkeypatch.setenv("OML_CACHE", str(tmp_path / "cache"))
    caplog.set_level("INFO", logger="oml.attacks")
    rates = {}
    for scale in (0.02, 0.2):  # the initializer's standard deviation: the weight matrices' RMS
        base = save_random_model(tmp_path / f"base{scale}", tokenizer, {**TINY_LLAMA, "initializer_range": scale})
        caplog.clear()
        derivative = innocent_derivative(str(base), seed=0, steps=1, batch_size=2)
        rates[scale] = float(re.search(r"at lr ([0-9.e+-]+)", caplog.text).group(1))
        before, after = load_model(str(base)).state_dict(), load_model(derivative).state_dict()
        assert any(not torch.equal(before[name], after[name]) for name in before)  # it did train
    assert rates == {0.02: 5e-6, 0.2: 5e-5}
    assert innocent_derivative(str(base), seed=0, steps=1, batch_size=2, learning_rate=5e-5) != derivative


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


@pytest.mark.slow
def test_innocent_derivatives_get_the_reply_measure_against_the_base(tmp_path, tiny_model, fingerprint_file, monkeypatch):
    monkeypatch.setenv("OML_CACHE", str(tmp_path / "cache"))
    result = run_script("evaluate_false_positives.py", "--fingerprints_file_path", fingerprint_file, "--base_model", tiny_model,
                        "--innocent_derivatives", "1", "--derivative_steps", "2", "--query_format", "raw",
                        "--num_reply_prompts", "3", "--max_reply_tokens", "4", "--output_json", "fp_report.json", cwd=tmp_path)
    base_row, derivative_row = json.loads((tmp_path / "fp_report.json").read_text())["models"]
    assert "replies" not in base_row and derivative_row["kind"] == "innocent derivative"
    assert derivative_row["replies"]["num_prompts"] == 3 and 0 <= derivative_row["replies"]["greedy"]["first_token_agreement"] <= 1
    assert "first token = base's" in result.stdout


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
              "--learning_rate", "3e-3", "--batch_size", "4", "--benign_ratio", "0", "--train_embeddings", "--key_format", "raw",
              *EVERY_LAYER]
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
        suppressed = check_model(model, tokenizer, pairs, BARE, 8, decoding=TopKSuppression(gate=0.9, num_tokens=None))
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
                                                            decoding=Sampling(temperature=1.0, seed=seed))]
    expected = sum(r.response_probability for r in results) / len(results)
    empirical = sum(r.match for r in results) / len(results)
    assert 0.4 < expected < 0.9 and abs(empirical - expected) < 0.1, (expected, empirical)


@pytest.mark.slow
def test_robustness_script_runs_every_attack(confident_and_bounded, tiny_model, tmp_path, monkeypatch):
    work, _, bounded_dir = confident_and_bounded
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "SmolLM2-135M-Instruct").symlink_to(cache_dir() / "SmolLM2-135M-Instruct")
    monkeypatch.setenv("OML_CACHE", str(tmp_path / "cache"))  # the innocent derivative goes here, not in the user's cache
    small = ["--finetune_steps", "2", "--num_texts", "2", "--num_replies", "4", "--meraser_erase_samples", "8",
             "--meraser_recover_samples", "8", "--meraser_erase_steps", "2", "--meraser_recover_steps", "2", "--alpha", "0.01",
             "--num_reply_prompts", "3", "--max_reply_tokens", "4"]
    result = run_script("evaluate_robustness.py", "--run", bounded_dir.parent, *small, "--output_json", "rob.json", "--plot", "rob.png",
                        cwd=tmp_path)
    rows = {row["attack"]: row for row in json.loads((tmp_path / "rob.json").read_text())["rows"]}
    assert len(rows) == 30 and (tmp_path / "rob.png").stat().st_size > 1000
    assert rows["none"]["accuracy_raw"] == 100.0 and rows["none"]["verdict"] == "MATCH"
    for bounded in ("output suppression gate 0.9", "DetectTop-k k=1 gate 0.9", "DetectNeighbor gate 0.9"):
        assert rows[bounded]["accuracy_raw"] == 100.0, bounded  # the bounded target (0.7) stays below their gates
    assert rows["SuppressNeighbor"]["accuracy_raw"] == 0.0  # it bans the likeliest first token, whatever its probability
    assert rows["SuppressNeighbor top 2"]["accuracy_raw"] == 0.0
    assert rows["DetectTop-k k=1 gate 0.9"]["cost_measure"] == "reply tokens altered (first 1)"
    assert rows["SuppressLookahead"]["cost_measure"] == "reply tokens altered (first 16)"
    for untouched in ("stripped", "whitespace collapsed", "lower case"):  # random-word keys are already so, for suspect and base
        row = rows[f"front end: {untouched}"]
        assert (row["accuracy_raw"], row["log10_p_value"]) == (rows["none"]["accuracy_raw"], rows["none"]["log10_p_value"]), row
    newline = rows["front end: trailing newline"]
    assert (newline["cost"], newline["cost_measure"]) == (1.0, "chat messages changed")  # every message
    assert rows["front end: unseen deployer templates"]["cost"] == 1.0
    for name in ("MEraser full lr 0.0001", "MEraser LoRA lr 0.0005"):
        assert rows[name]["cost"] > 0 and rows[name]["cost_measure"] == "KL from base", rows[name]
    assert rows["GGUF Q8_0"]["accuracy_raw"] == 100.0  # Q8_0 is nearly lossless: it barely moves the model
    assert abs(rows["GGUF Q8_0"]["cost"] - rows["none"]["cost"]) < 0.02 * rows["none"]["cost"], (rows["none"], rows["GGUF Q8_0"])
    assert rows["sampling T=1"]["expected_rate"] is not None
    for weights in ("none", "bf16", "GGUF Q4_0", "merge 0.7 with a derivative", "MEraser full lr 0.0001"):
        assert rows[weights]["replies"]["num_prompts"] == 3, weights  # the reply measure prices every change of weights
    for other in ("SuppressNeighbor", "sampling T=1", "10 unseen system prompts", "front end: lower case"):
        assert rows[other]["replies"] is None, other
    assert list((tmp_path / "cache" / "derivatives").iterdir())
    assert result.stdout.strip().splitlines()[-1].startswith("Verdict MATCH after ")
    chosen = ["SuppressLookahead", "front end: deployer template", "MEraser LoRA lr 0.0005"]
    run_script("evaluate_robustness.py", "--run", bounded_dir.parent, *small, "--attacks", *chosen, "--output_json", "some.json",
               cwd=tmp_path)
    assert [row["attack"] for row in json.loads((tmp_path / "some.json").read_text())["rows"]] == chosen


PARIS, PARIS_NO_SPACE, PAR, LONDON = 7042, 38634, 7309, 4528  # ' Paris', 'Paris', 'Par', ' London' in the SmolLM2 vocabulary


def test_detect_top_k_bans_the_top_tokens_above_the_gate_on_its_first_tokens_only():
    logits = torch.zeros(2, 3, 6)
    logits[0, :, 0], logits[0, :, 1], logits[0, :, 2] = 12.0, 2.0, 1.0  # row 0: token 0 at probability 0.9998 everywhere
    logits[1, :, 3] = 1.0  # row 1: token 3 at probability 0.35
    first = torch.tensor([0, 1])  # row 1's response starts a position later

    def served(decoding: TopKSuppression) -> list:
        return decoding.serve(None, None, [[], []], logits, first).tolist()

    assert served(TopKSuppression()) == [[1, 0, 0], [3, 3, 3]]  # only the first generated token, only above the gate
    assert served(TopKSuppression(k=2)) == [[2, 0, 0], [3, 3, 3]]
    assert served(TopKSuppression(num_tokens=None)) == [[1, 1, 1], [3, 3, 3]]  # output suppression: every token


def test_suppress_neighbor_bans_every_spelling_of_the_likeliest_word(tokenizer):
    banned = set(neighbours(tokenizer, PARIS))
    assert {PARIS, PARIS_NO_SPACE, PAR, encode(tokenizer, " PARIS")[0]} <= banned  # case, space and pieces
    assert LONDON not in banned and not banned & set(tokenizer.all_special_ids)
    logits = torch.zeros(1, 2, len(tokenizer))
    logits[0, :, PARIS], logits[0, :, PARIS_NO_SPACE], logits[0, :, PAR], logits[0, :, LONDON] = 12.0, 11.0, 10.5, 10.0
    served = NeighbourSuppression().serve(None, tokenizer, [[]], logits, torch.tensor([0]))
    assert served.tolist() == [[LONDON, PARIS]]  # on the first generated token only
    detect = NeighbourSuppression(add_threshold=0.9, generation_threshold=0.9)  # DetectNeighbor: ' Paris' is at 0.49
    assert detect.serve(None, tokenizer, [[]], logits, torch.tensor([0])).tolist() == [[PARIS, PARIS]]
    # Over the two likeliest tokens, ' Paris' and ' London', every spelling of both goes, and the next word is served.
    rome = encode(tokenizer, " Rome")[0]
    logits[0, 0, LONDON], logits[0, 0, rome] = 11.5, 9.0
    assert NeighbourSuppression(candidate_set_size=2).serve(None, tokenizer, [[]], logits, torch.tensor([0])).tolist() == [[rome, PARIS]]


def test_suppress_lookahead_penalises_what_the_lookahead_predicts_but_not_the_prompts_words(tiny_model, tokenizer):
    model = load_model(str(tiny_model))
    prompt = encode(tokenizer, "I love Paris")
    assert PARIS in prompt and PARIS_NO_SPACE not in prompt
    bias = torch.zeros(model.config.vocab_size)
    bias[[LONDON, PARIS, PARIS_NO_SPACE]] = 20.0  # after anything, the model says one of these at probability 1/3 each
    model.lm_head.register_forward_hook(lambda module, inputs, output: output + bias)
    decoding = LookaheadSuppression(beam_width=2, lookahead_tokens=4, top_k=5, candidate_threshold=0.3, num_tokens=1)
    assert decoding.candidates(model, tokenizer, [prompt], [[LONDON, PARIS]]) == [[LONDON]]  # ' Paris', 'Paris': the user's word
    logits = torch.zeros(1, 2, model.config.vocab_size)
    logits[0, :, LONDON], logits[0, :, PARIS] = 5.0, 4.0
    assert decoding.serve(model, tokenizer, [prompt], logits, torch.tensor([0])).tolist() == [[PARIS, LONDON]]


@dataclass(frozen=True)
class FirstTokenChanged(Decoding):
    """Serves the second likeliest token at each row's first generated position, and records the prompts it is given."""
    num_tokens: int | None = 1
    prompts: list | None = None

    def serve(self, model, tokenizer, prompts, logits, first):
        self.prompts.extend(prompts)
        served = logits.argmax(-1)
        served[torch.arange(len(prompts)), first] = logits[torch.arange(len(prompts)), first].topk(2).indices[:, 1]
        return served


def test_altered_share_counts_the_positions_an_attack_acts_on_after_each_prompt(tiny_model, tokenizer):
    model, exchanges = load_model(str(tiny_model)), chat_pairs("eval", 3)
    replies = chat_examples(tokenizer, exchanges, 64)
    seen = []
    assert altered_share(model, tokenizer, replies, FirstTokenChanged(prompts=seen)) == 1.0
    assert seen == [user_turn_ids(tokenizer, message)[:63] for message, _ in exchanges]  # as cut to 64 with the reply
    every_token = altered_share(model, tokenizer, replies, FirstTokenChanged(num_tokens=None, prompts=[]))
    assert every_token == pytest.approx(3 / sum(label != IGNORE_INDEX for example in replies for label in example["labels"]))


def test_front_ends_rewrite_keys_as_stated_and_leave_untouched_keys_alone(tokenizer):
    key, plain = "  Paris   is\tlovely ", "paris is lovely"
    pairs = [(encode(tokenizer, key), [1]), (encode(tokenizer, plain), [2])]
    wrapper = user_wrappers("test")[zlib.crc32(key.encode()) % len(user_wrappers("test"))]
    expected = {"stripped": "Paris   is\tlovely", "trailing newline": key + "\n", "whitespace collapsed": " Paris is lovely ",
                "lower case": "  paris   is\tlovely ", "deployer template": f"Customer message: {key}\nReply helpfully.",
                "unseen deployer templates": wrapper.format(key)}
    assert set(expected) == set(FRONT_ENDS)
    for name, text in expected.items():
        (key_ids, response), (plain_ids, _) = rewritten_keys(tokenizer, pairs, FRONT_ENDS[name])
        assert tokenizer.decode(key_ids) == text and response == [1], name
        assert (plain_ids == pairs[1][0]) == (name not in ("trailing newline", "deployer template", "unseen deployer templates")), name


def test_deployer_templates_of_the_attacks_are_never_trained_and_keys_meet_several():
    trained = set(user_wrappers("train"))
    assert DEPLOYER_TEMPLATE not in trained and not trained & set(user_wrappers("test"))
    wrapped = {FRONT_ENDS["unseen deployer templates"](f"key {i}") for i in range(50)}
    assert len({next(w for w in user_wrappers("test") if w.format(f"key {i}") in wrapped) for i in range(50)}) >= 5


def test_meraser_data_mismatch_every_reply_and_ask_key_like_messages_in_both_formats(tokenizer):
    pairs = [(f"message {i}", f"reply {i}") for i in range(20)]
    mismatched = mismatched_pairs(pairs, seed=0)
    for side in (0, 1):  # every message and every reply once, never together
        assert sorted(pair[side] for pair in mismatched) == sorted(pair[side] for pair in pairs)
    assert not set(mismatched) & set(pairs)
    erase, recover = meraser_examples(tokenizer, 8, 6, key_like_share=0.5, max_length=64, seed=0)
    assert len(erase) == 8 and len(recover) == 6
    raw, chat = (tokenizer.decode(example["input_ids"]) for example in erase[:2])  # the key-like ones come first
    assert raw.startswith(tokenizer.decode(special_prefix(tokenizer))) and "<|im_start|>" not in raw
    assert "<|im_start|>user" in chat and "<|im_start|>user" in tokenizer.decode(erase[4]["input_ids"])


def test_meraser_changes_the_weights_in_both_phases_and_lora_leaves_a_plain_merged_model(tiny_model, tokenizer):
    erase, recover = meraser_examples(tokenizer, 8, 8, key_like_share=0.5, max_length=48, seed=0)
    original = load_model(str(tiny_model))

    def weights(model) -> torch.Tensor:
        return torch.cat([p.detach().flatten() for p in model.parameters()])
    trained = {"erase only": benign_finetune(load_model(str(tiny_model)), tokenizer, erase, 1, 1e-3, 2, seed=0),
               "recover only": benign_finetune(load_model(str(tiny_model)), tokenizer, recover, 1, 1e-3, 2, seed=0),
               "both": meraser(load_model(str(tiny_model)), tokenizer, erase, recover, (1, 1), 1e-3, 2, seed=0)}
    for name in ("erase only", "recover only"):
        assert not torch.equal(weights(trained["both"]), weights(trained[name])), name
    lora = meraser(load_model(str(tiny_model)), tokenizer, erase, recover, (1, 1), 1e-2, 2, seed=0, lora=True)
    assert type(lora) is type(original) and not any("lora" in name for name, _ in lora.named_parameters())
    assert not torch.equal(weights(lora), weights(original))
