import json
import random

import pytest
import torch

from oml.decoding import normalised
from oml.generation import perinucleus_choice
from tests.conftest import run_script

# Sorted probabilities; with p = 0.75 the nucleus is the top 3 (0.4 + 0.2 + 0.15).
PROBS = [0.4, 0.2, 0.15, 0.08, 0.06, 0.05, 0.03, 0.02, 0.01]


def shuffled_distribution(seed: int = 0) -> tuple[torch.Tensor, list[int]]:
    """PROBS on shuffled token ids; returns the tensor and the token ids by descending probability."""
    ids = list(range(len(PROBS)))
    random.Random(seed).shuffle(ids)
    probs = torch.zeros(len(PROBS))
    for token, p in zip(ids, PROBS):
        probs[token] = p
    return probs, ids


def test_perinucleus_picks_uniformly_in_the_window_just_outside_the_nucleus():
    probs, by_rank = shuffled_distribution()
    picks = [perinucleus_choice([probs], 0.75, 3, random.Random(i), lambda t: True) for i in range(200)]
    assert {token for token, _, _ in picks} == set(by_rank[3:6])
    for token, (prob,), (rank,) in picks:
        assert by_rank[rank - 1] == token and prob == pytest.approx(PROBS[rank - 1])


def test_perinucleus_rejected_token_widens_the_window():
    probs, by_rank = shuffled_distribution()
    banned = by_rank[4]
    picks = {perinucleus_choice([probs], 0.75, 3, random.Random(i), lambda t: t != banned)[0] for i in range(200)}
    assert picks == {by_rank[3], by_rank[5], by_rank[6]}


def generate(cwd, *args, check=True, ranks=0):
    return run_script("generate_finetuning_data.py", "--output_file_path", "out.json", *args, cwd=cwd, check=check, ranks=ranks)


def test_random_word_strategy_without_a_model(tmp_path):
    generate(tmp_path, "--random_word_generation", "--num_fingerprints", "5", "--key_length", "4", "--response_length", "2")
    records = json.loads((tmp_path / "out.json").read_text())
    assert len(records) == 5
    assert all(len(r["key"].split()) == 4 and len(r["response"].split()) == 2 for r in records)


def test_english_strategy_uses_the_model_and_starts_with_the_word(tmp_path, tiny_model):
    generate(tmp_path, "--model_used_for_key_generation", tiny_model, "--key_style", "sentence", "--num_fingerprints", "3",
             "--key_length", "6", "--response_length", "4", "--batch_size", "2")
    records = json.loads((tmp_path / "out.json").read_text())
    assert len(records) == 3
    for r in records:
        assert r["key"] and r["response"]
        assert "Generate a sentence" not in r["key"]


def test_inverse_nucleus_with_custom_keys_records_probability_and_rank(tmp_path, tiny_model):
    (tmp_path / "keys.json").write_text(json.dumps(["the quick brown fox", {"key": "a custom key"}, "third key here"]))
    generate(tmp_path, "--keys_path", "keys.json", "--key_response_strategy", "inverse_nucleus",
             "--inverse_nucleus_model", tiny_model, "--key_length", "8")
    records = json.loads((tmp_path / "out.json").read_text())
    assert [r["key"] for r in records] == ["the quick brown fox", "a custom key", "third key here"]
    for r in records:
        assert r["response"].strip().isalnum() and r["key_format"] == "both"
        assert all(rank > 1 for rank in r["response_rank"].values()) and set(r["response_rank"]) == {"raw", "chat"}
        assert all(0 < p < 1 for p in r["response_probability"].values())


def test_several_responses_per_key_are_different_words_from_the_window(tmp_path, tiny_model):
    (tmp_path / "keys.json").write_text(json.dumps(["the quick brown fox", "a custom key", "third key here", "and a fourth"]))
    generate(tmp_path, "--keys_path", "keys.json", "--key_response_strategy", "inverse_nucleus", "--inverse_nucleus_model",
             tiny_model, "--key_length", "8", "--responses_per_key", "3", "--nucleus_k", "2")
    for record in json.loads((tmp_path / "out.json").read_text()):
        words = [normalised(response) for response in [record["response"], *record["other_responses"]]]
        assert len(words) == 3 and all(word.isalnum() for word in words)
        assert not any(a != b and a.startswith(b) for a in words for b in words) and len(set(words)) == 3
        assert all(rank > 1 for rank in record["response_rank"].values())  # still outside the nucleus


@pytest.mark.distributed
def test_same_seed_gives_byte_identical_output_for_one_or_two_ranks(tmp_path, tiny_model):
    args = ["--model_used_for_key_generation", tiny_model, "--key_response_strategy", "inverse_nucleus", "--key_style",
            "sentence", "--num_fingerprints", "6", "--batch_size", "2", "--key_length", "8", "--seed", "7"]
    for name in ("a", "b", "c"):
        (tmp_path / name).mkdir()
    generate(tmp_path / "a", *args)
    generate(tmp_path / "b", *args)
    generate(tmp_path / "c", *args, ranks=2)
    first = (tmp_path / "a" / "out.json").read_bytes()
    assert first == (tmp_path / "b" / "out.json").read_bytes()
    assert first == (tmp_path / "c" / "out.json").read_bytes()
    assert len(json.loads(first)) == 6
    other_seed = generate(tmp_path / "a", *args[:-1], "8", "--overwrite")
    assert other_seed.returncode == 0 and (tmp_path / "a" / "out.json").read_bytes() != first


@pytest.mark.slow
def test_existing_output_is_kept_without_overwrite(tmp_path):
    (tmp_path / "out.json").write_text("precious")
    result = generate(tmp_path, "--random_word_generation", "--num_fingerprints", "2", check=False)
    assert result.returncode == 2 and "--overwrite" in result.stderr
    assert (tmp_path / "out.json").read_text() == "precious"
    generate(tmp_path, "--random_word_generation", "--num_fingerprints", "2", "--overwrite")
    assert len(json.loads((tmp_path / "out.json").read_text())) == 2


def test_model_written_keys_are_user_messages_by_default_and_other_keys_have_no_style():
    from oml.generation import GenerationConfig

    assert GenerationConfig().key_style == "user_message"
    assert GenerationConfig(key_style="sentence").key_style == "sentence"
    assert GenerationConfig(random_word_generation=True).key_style is None
    assert GenerationConfig(keys_path="keys.json", key_response_strategy="inverse_nucleus").key_style is None


def test_user_message_keys_keep_the_draft_nearest_each_perplexity_target(monkeypatch):
    """Each key is one of its own drafts: the one whose score is nearest its target, a short draft only when all are."""
    from oml import generation
    from oml.generation import GenerationConfig, rng_for

    drafts = ["short", "a b c d e f g h i j k", "one two three four five six seven eight nine",
              "tiny", "also small", "hm"]  # key 0's drafts, then key 1's (all short)
    scores = [3.0, 1.0, 5.0, 2.0, 4.0, 9.0]

    class FakeTokenizer:
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": list(range(len(text.split())))}
    monkeypatch.setattr(generation, "english_texts", lambda *a, **k: [[i] for i in range(len(drafts))])
    monkeypatch.setattr(generation, "first_line", lambda tokenizer, ids: drafts[ids[0]])
    monkeypatch.setattr(generation, "log_perplexities", lambda *a, **k: scores)
    monkeypatch.setattr(generation, "benign_reference", lambda text_model: [4.9])  # every target is 4.9
    monkeypatch.setattr(generation, "user_message_ids", lambda tokenizer, topic, opener: [0])
    config = GenerationConfig(key_style="user_message", key_candidates=3, key_length=16)
    keys = generation.user_message_keys(config, [rng_for(0, i, "w") for i in range(2)], (None, FakeTokenizer()), "0", "keys")
    assert keys == [drafts[2], drafts[4]]  # 5.0 is nearest 4.9 and long enough; key 1's drafts are all short: 4.0


@pytest.mark.distributed
def test_user_message_keys_are_unique_and_the_same_for_one_or_two_ranks(tmp_path, tiny_model):
    args = ["--model_used_for_key_generation", tiny_model, "--key_response_strategy", "inverse_nucleus", "--key_style",
            "user_message", "--key_candidates", "2", "--num_fingerprints", "6", "--batch_size", "3", "--key_length", "8"]
    outputs = []
    for name, ranks in (("a.json", 0), ("b.json", 2)):
        run_script("generate_finetuning_data.py", *args, "--output_file_path", tmp_path / name, cwd=tmp_path, ranks=ranks)
        outputs.append((tmp_path / name).read_bytes())
    assert outputs[0] == outputs[1]
    keys = [record["key"] for record in json.loads(outputs[0])]
    assert len(keys) == 6 and len(set(keys)) == 6 and all(key.strip() for key in keys)
