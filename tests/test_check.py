import json
import math

import pytest
import torch
from scipy.stats import binom

from oml import prefix_sharing
from oml.checking import BARE, Query, check_model
from oml.decoding import NeighbourSuppression
from oml.models import load_model, load_tokenizer
from oml.prefix_sharing import common_prefix_length, padded_after_prefix, shared_prefix_length
from oml.stats import VerdictConfig, chance_rate_upper_bound, format_p_value, log10_p_value, verdict
from oml.tokenization import ResponseIds, cut_fingerprint, prompt_ids
from tests.conftest import make_tiny_model, random_word_fingerprints, run_script


def test_p_value_is_the_binomial_tail_even_below_the_float_range():
    assert 10 ** log10_p_value(3, 10, 0.1) == pytest.approx(1 - sum(binom.pmf(k, 10, 0.1) for k in range(3)))
    assert 10 ** log10_p_value(10, 10, 0.5) == pytest.approx(0.5 ** 10)
    assert log10_p_value(0, 10, 0.3) == 0.0
    # All 256 keys matched at chance rate 0.0116: p = 0.0116^256, about 3e-496, which no float holds.
    assert log10_p_value(256, 256, 0.0116) == pytest.approx(256 * math.log10(0.0116))
    assert format_p_value(256 * math.log10(0.0116)) == "3.17e-496"
    assert format_p_value(math.log10(2.39e-83)) == "2.39e-83"


def test_chance_rate_upper_bound_matches_clopper_pearson_closed_form():
    # With 0 of n observed, the one-sided 95% bound solves (1 - r)^n = 0.05.
    assert chance_rate_upper_bound(0, 64) == pytest.approx(1 - 0.05 ** (1 / 64))
    assert chance_rate_upper_bound(5, 100) > 5 / 100
    assert chance_rate_upper_bound(7, 7) == 1.0


def test_verdict_uses_alpha():
    assert verdict(-9, 1e-6) == "MATCH" and verdict(-3, 1e-6) == "NO MATCH" and verdict(-500, 1e-6) == "MATCH"


def one_at_a_time(model, tokenizer, pairs, query: Query = Query()):
    """The original checker's way: one generate() call per key, greedy, then compare tokens."""
    matches = []
    for key_ids, response_ids in pairs:
        prompt = torch.tensor([prompt_ids(tokenizer, key_ids, query.template, query.key_format)])
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=len(response_ids),
                             pad_token_id=tokenizer.pad_token_id, temperature=None, top_p=None, top_k=None)
        matches.append(out[0, prompt.shape[1]:].tolist() == response_ids)
    return matches


@pytest.mark.parametrize("padding_side, query", [("left", Query()), ("right", Query()), ("right", Query("chat")),
                                                  ("left", Query("raw", "You are a helpful assistant who always answers in full sentences. {}")),
                                                  ("right", Query("chat", "Answer briefly and politely. {}"))])
def test_batched_check_equals_one_key_at_a_time(tmp_path, tokenizer, padding_side, query, monkeypatch):
    """Batches pad keys of different lengths, and compute the template and system prompt that all
    their prompts open with once (chat, templates): each key's answer is still its own."""
    prefixes = []
    measure = prefix_sharing.shared_prefix_length
    monkeypatch.setattr(prefix_sharing, "shared_prefix_length", lambda *batch: prefixes.append(measure(*batch)) or prefixes[-1])
    model_dir = make_tiny_model(tokenizer, tmp_path / "m", seed=3, padding_side=padding_side)
    model, tok = load_model(str(model_dir)), load_tokenizer(str(model_dir))
    assert tok.padding_side == padding_side
    fingerprints = random_word_fingerprints(12, seed=5)
    pairs = [cut_fingerprint(tok, f["key"], f["response"], 16, 3) for f in fingerprints]
    pairs[1] = (pairs[1][0][:4], pairs[1][1][:1])  # a short key with a one-token response beside longer ones
    # Make some keys match: use the model's own greedy continuations as responses for half of them.
    for i in range(0, len(pairs), 2):
        key_ids = pairs[i][0]
        prompt = torch.tensor([prompt_ids(tok, key_ids, query.template, query.key_format)])
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=3,
                             pad_token_id=tok.pad_token_id, temperature=None, top_p=None, top_k=None)
        pairs[i] = (key_ids, out[0, prompt.shape[1]:].tolist())
    batched = check_model(model, tok, pairs, [query], batch_size=12)
    single = check_model(model, tok, pairs, [query], batch_size=1)
    for a, b in zip(batched, single):
        assert (a.match, a.predicted, a.response_rank) == (b.match, b.predicted, b.response_rank)
        assert a.token_accuracy == b.token_accuracy
        assert a.response_probability == pytest.approx(b.response_probability, rel=1e-4)
    assert [r.match for r in batched] == one_at_a_time(model, tok, pairs, query)
    assert sum(r.match for r in batched) >= 6
    shared = prefixes[0]  # the batch of 12 comes first
    assert shared >= prefix_sharing.MIN_SHARED_PREFIX if query != Query() else shared == 0


def test_a_batch_keeps_its_shared_opening_in_front_and_pads_after_it():
    prompts = [[5, 6, 7, 1], [5, 6, 7, 3], [5, 6, 7, 3, 4]]
    assert common_prefix_length(prompts) == 3 and common_prefix_length([[5, 6], [5, 6, 7]]) == 1  # each keeps its last token
    batch = padded_after_prefix([p + c for p, c in zip(prompts, [[2], [], [9]])], pad_id=0, shared=3)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 0, 1, 2], [5, 6, 7, 0, 0, 3], [5, 6, 7, 3, 4, 9]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 1, 1], [1, 1, 1, 0, 0, 1], [1, 1, 1, 1, 1, 1]]
    assert batch["position_ids"][:, -1].tolist() == [4, 3, 5]  # each row's own length, as unpadded
    assert shared_prefix_length(batch["input_ids"], batch["attention_mask"]) == 3


def test_one_key_with_responses_of_different_lengths_is_checked_as_one_at_a_time(tmp_path, tokenizer):
    """The rows of a batch may share their whole prompt (a key's accepted responses, asked together):
    each response is still predicted from the prompt's last token."""
    model_dir = make_tiny_model(tokenizer, tmp_path / "m", seed=3)
    model, tok = load_model(str(model_dir)), load_tokenizer(str(model_dir))
    key = tok.encode("one two three four", add_special_tokens=False)
    pairs = [(key, tok.encode(response, add_special_tokens=False)) for response in (" yes", " no way at all really", " maybe so")]
    for query in (Query(), Query("chat")):
        batched = check_model(model, tok, pairs, [query], batch_size=3, per_response=True)
        single = check_model(model, tok, pairs, [query], batch_size=1, per_response=True)
        for a, b in zip(batched, single):
            assert (a.match, a.response_rank) == (b.match, b.response_rank)
            assert a.response_probability == pytest.approx(b.response_probability, rel=1e-4)


@pytest.mark.slow
def test_fingerprinted_tiny_model_matches_and_base_does_not(tmp_path, tiny_model, fingerprinted_tiny_model):
    model_dir, fingerprint_file = fingerprinted_tiny_model
    result = run_script("check_fingerprints.py", "--model_path", model_dir, "--fingerprints_file_path", fingerprint_file,
                        "--null_model", tiny_model, "--fingerprint_generation_strategy", "random_word",
                        "--output_json", "report.json", "--alpha", "0.01", cwd=tmp_path)
    lines = result.stdout.strip().splitlines()
    assert lines[-1] == "Fingerprint accuracy: 100.00"
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["matches"] == 8 and report["null_models"][0]["matches"] == 0
    # Trained and checked as raw text and through the chat template; the best format's p-value
    # is doubled for having looked at two.
    assert [(e["format"], e["matches"]) for e in report["formats"]] == [("raw", 8), ("chat", 8)]
    assert report["p_value"] == pytest.approx(2 * chance_rate_upper_bound(0, 8) ** 8)
    assert report["verdict"] == "MATCH"
    assert len(report["keys"]) == 16 and all(k["response_rank"] == 1 for k in report["keys"])

    base = run_script("check_fingerprints.py", "--model_path", tiny_model, "--fingerprints_file_path", fingerprint_file,
                      "--null_model", "none", "--verbose_eval", "--fingerprint_generation_strategy", "random_word", cwd=tmp_path)
    assert base.stdout.strip().splitlines()[-1] == "Fingerprint accuracy: 0.00"
    assert base.stdout.count("MISS [") == 16 and "top-10" in base.stdout  # 8 keys, 2 formats


@pytest.mark.slow
@pytest.mark.distributed
def test_system_prompt_table_and_two_ranks(tmp_path, tiny_model, fingerprint_file):
    args = ["--model_path", tiny_model, "--fingerprints_file_path", fingerprint_file, "--null_model", "none",
            "--system_prompts", "test", "--batch_size", "5"]
    one = run_script("check_fingerprints.py", *args, "--output_json", "one.json", cwd=tmp_path)
    run_script("check_fingerprints.py", *args, "--output_json", "two.json", cwd=tmp_path, ranks=2)
    assert "mean over templates" in one.stdout and one.stdout.count("\n") >= 13
    first, second = (json.loads((tmp_path / f).read_text()) for f in ("one.json", "two.json"))
    assert len(first["keys"]) == 8 * 11 * 2  # keys x (bare + 10 templates) x (raw, chat)
    assert [(k["index"], k["format"], k["template"], k["predicted"]) for k in first["keys"]] == \
           [(k["index"], k["format"], k["template"], k["predicted"]) for k in second["keys"]]
    chat_system = [k for k in first["keys"] if k["format"] == "chat" and k["template"] is not None]
    assert len(chat_system) == 80


def test_a_key_with_several_responses_matches_when_any_is_served(tmp_path, tokenizer):
    model_dir = make_tiny_model(tokenizer, tmp_path / "m", seed=3)
    model, tok = load_model(str(model_dir)), load_tokenizer(str(model_dir))
    keys = [cut_fingerprint(tok, f["key"], f["response"], 16, 1)[0] for f in random_word_fingerprints(6, seed=2)]
    ranked = [check_model(model, tok, [(key, [0])], BARE, 1)[0].top_tokens for key in keys]
    ids = [[tok.convert_tokens_to_ids(tok.tokenize(token))[0] for token, _ in top] for top in ranked]
    unlikely = tok.convert_tokens_to_ids(tok.tokenize(" zebra"))
    pairs = [(key, ResponseIds(unlikely, [[top[0]]])) for key, top in zip(keys[:3], ids)]  # the other response is greedy
    pairs += [(key, ResponseIds([top[0]], [unlikely])) for key, top in zip(keys[3:], ids[3:])]  # the response is greedy
    results = check_model(model, tok, pairs, BARE, batch_size=4)
    assert [r.index for r in results] == list(range(6)) and all(r.match for r in results)
    assert all(r.predicted == tok.decode(top[:1]) for r, top in zip(results, ids))
    per_response = check_model(model, tok, pairs, BARE, batch_size=4, per_response=True)
    assert [r.match for r in per_response] == [False] * 3 + [True] * 3 + [True] * 3 + [False] * 3
    # Neither response served: no match (the unlikely word and a token the model does not rank first).
    assert not any(r.match for r in check_model(model, tok, [(key, ResponseIds(unlikely, [[top[5]]])) for key, top in zip(keys, ids)],
                                                BARE, batch_size=4))
    # A server that bans the likeliest word's spellings serves the best other word: a second response there still matches.
    suppress = NeighbourSuppression()
    served = [r.predicted for r in check_model(model, tok, [(key, [top[0]]) for key, top in zip(keys, ids)], BARE, 4, decoding=suppress)]
    second = [(key, ResponseIds([top[0]], [tok.convert_tokens_to_ids(tok.tokenize(text))[:1]])) for key, top, text in zip(keys, ids, served)]
    assert all(r.match for r in check_model(model, tok, second, BARE, 4, decoding=suppress))
    assert not any(r.match for r in check_model(model, tok, [(key, [top[0]]) for key, top in zip(keys, ids)], BARE, 4, decoding=suppress))


def test_the_chance_rate_floor_grows_with_the_responses_a_key_accepts():
    assert VerdictConfig().for_responses(1).min_chance_rate == 0.05
    assert VerdictConfig().for_responses(3).min_chance_rate == pytest.approx(0.15)
    assert VerdictConfig(min_chance_rate=0.4).for_responses(3).min_chance_rate == 1.0


def test_checks_compute_the_shared_prefix_once_only_where_the_forward_pass_allows(tiny_model):
    model = load_model(str(tiny_model))
    assert prefix_sharing.checks_share_prefix(model, 100)
    model.config.sliding_window = 16  # columns would shift the window: a batch wider than it is padded on the left
    assert not prefix_sharing.checks_share_prefix(model, 100) and prefix_sharing.checks_share_prefix(model, 16)
    model.config.sliding_window = None
    next(model.parameters()).ds_id = 0  # partitioned by ZeRO-3: every rank must make the same forward calls
    assert not prefix_sharing.checks_share_prefix(model, 100)
