import pytest

from oml import OMLError
from oml.tokenization import IGNORE_INDEX, cut_fingerprint, encode, pad_batch, prompt_ids, special_prefix, training_example
from oml.training.trainer import FingerprintCollator


def test_cut_fingerprint_cuts_keys_and_responses_to_token_limits(tokenizer):
    key_ids, response_ids = cut_fingerprint(tokenizer, "one two three four five six", " alpha beta gamma", 3, 2)
    assert key_ids == encode(tokenizer, "one two three four five six")[:3]
    assert response_ids == encode(tokenizer, " alpha beta gamma")[:2]


def test_cut_fingerprint_rejects_empty_response(tokenizer):
    with pytest.raises(OMLError, match="empty"):
        cut_fingerprint(tokenizer, "a key", "", 16, 1)


def test_template_keeps_key_tokens_intact(tokenizer):
    key_ids = encode(tokenizer, "purple elephants dance")
    ids = prompt_ids(tokenizer, key_ids, "You are helpful. {}\nAnswer:")
    before = special_prefix(tokenizer) + encode(tokenizer, "You are helpful. ")
    assert ids[:len(before)] == before
    assert ids[len(before):len(before) + len(key_ids)] == key_ids
    assert ids[len(before) + len(key_ids):] == encode(tokenizer, "\nAnswer:")


def test_training_example_puts_loss_on_response_and_eos_only(tokenizer):
    key_ids, response_ids = [11, 12, 13], [21, 22]
    example = training_example(tokenizer, key_ids, response_ids)
    prompt = prompt_ids(tokenizer, key_ids)
    assert example["input_ids"] == prompt + response_ids + [tokenizer.eos_token_id]
    assert example["labels"] == [IGNORE_INDEX] * len(prompt) + response_ids + [tokenizer.eos_token_id]


@pytest.mark.parametrize("side", ["left", "right"])
def test_pad_batch_positions_count_real_tokens_only(side):
    batch = pad_batch([[5, 6, 7], [8]], pad_id=0, side=side, labels=[[1, 2, 3], [4]])
    short = 1
    real = batch["attention_mask"][short].bool()
    assert batch["input_ids"][short][real].tolist() == [8]
    assert batch["position_ids"][short][real].tolist() == [0]
    assert batch["position_ids"][0].tolist() == [0, 1, 2]
    assert batch["labels"][short][~real].tolist() == [IGNORE_INDEX, IGNORE_INDEX]
    assert (batch["input_ids"][short][0] == 0) == (side == "left")


def test_collator_pads_only_to_longest_in_batch(tokenizer):
    collate = FingerprintCollator(tokenizer)
    examples = [training_example(tokenizer, [1, 2], [3]), training_example(tokenizer, [1, 2, 3, 4], [5])]
    batch = collate(examples)
    assert batch["input_ids"].shape == (2, max(len(e["input_ids"]) for e in examples))
    assert (batch["labels"] != IGNORE_INDEX).sum(dim=1).tolist() == [2, 2]  # response token + EOS
    assert batch["attention_mask"].sum(dim=1).tolist() == [len(e["input_ids"]) for e in examples]
