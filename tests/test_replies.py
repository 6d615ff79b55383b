"""The reply measure: does a fingerprinted model still answer? Generated replies compared with the base's."""
import json

import pytest

from oml import OMLError
from oml.attacks import benign_finetune
from oml.data import assistant_prompts, chat_pairs, is_open_question, user_questions
from oml.models import load_model
from oml.replies import ReplyMeasure, ReplySettings, ended, reply_length
from oml.tokenization import chat_example, encode
from tests.conftest import make_tiny_model, run_script

FEW = ReplySettings(num_reply_prompts=12, max_reply_tokens=12, reply_batch_size=4)


def stops_at_once(model, tokenizer):
    """The model trained to end its turn as soon as it starts: every reply is the stop token alone."""
    examples = [chat_example(tokenizer, message, "", 64) for message, _ in chat_pairs("train", 32)]
    return benign_finetune(model, tokenizer, examples, steps=40, learning_rate=3e-3, batch_size=8, seed=0)


@pytest.fixture(scope="module")
def tiny_base(tokenizer, tmp_path_factory):
    return load_model(str(make_tiny_model(tokenizer, tmp_path_factory.mktemp("replies") / "base", seed=3)))


def test_a_model_that_stops_at_once_is_short_and_its_base_is_not(tiny_base, tokenizer, tmp_path):
    measure = ReplyMeasure(tiny_base, tokenizer, FEW)
    same = measure.compare(tiny_base)
    assert same["greedy"]["short_reply_share"] == same["greedy"]["base_short_reply_share"] == 0.0
    assert same["greedy"]["first_token_agreement"] == same["greedy"]["prefix_agreement"] == 1.0
    assert same["greedy"]["relative_length"] == 1.0 and same["sampled"]["short_reply_share"] == 0.0

    stopping = stops_at_once(load_model(str(make_tiny_model(tokenizer, tmp_path / "m", seed=3))), tokenizer)
    report = measure.compare(stopping)
    for decoding in ("greedy", "sampled"):
        assert report[decoding]["short_reply_share"] == 1.0 and report[decoding]["base_short_reply_share"] == 0.0
        assert report[decoding]["relative_length"] < 0.1
    assert report["greedy"]["first_token_agreement"] == 0.0
    assert set(report["greedy"]["short_reply_share_by_kind"]) == {"user questions", "chitchat first turns", "MMLU questions"}


def test_sampled_replies_are_seeded_and_differ_from_greedy(tiny_base, tokenizer):
    measure = ReplyMeasure(tiny_base, tokenizer, FEW)
    again = ReplyMeasure(tiny_base, tokenizer, FEW)
    assert measure.base == again.base  # the same seed: the same replies
    other = ReplyMeasure(tiny_base, tokenizer, FEW.updated(reply_seed=1))
    assert other.base["greedy"] == measure.base["greedy"] and other.base["sampled"] != measure.base["sampled"]


def test_reply_length_counts_tokens_before_the_stop():
    assert ended([5, 6, 2, 2, 2], {2}) == [5, 6, 2] and ended([5, 6, 7], {2}) == [5, 6, 7]
    assert reply_length([5, 6, 2], {2}) == 2 and reply_length([5, 6, 7], {2}) == 3 and reply_length([2], {2}) == 0


def test_held_out_prompts_are_of_three_kinds_and_never_a_key():
    prompts, kinds = assistant_prompts(30)
    assert len(prompts) == 30 and len(set(prompts)) == 30
    assert [kinds.count(k) for k in ("user questions", "chitchat first turns", "MMLU questions")] == [10, 10, 10]
    assert [assistant_prompts(4)[1].count(k) for k in ("user questions", "chitchat first turns", "MMLU questions")] == [2, 1, 1]
    excluded, _ = assistant_prompts(30, exclude={prompts[0]})
    assert prompts[0] not in excluded and len(excluded) == 30
    assert not set(user_questions("test")) & set(user_questions("train"))  # replayed questions are never measured


def test_mmlu_questions_asked_openly_stand_on_their_own():
    assert is_open_question("Which structure is found in the inner ear?")
    for text in ("Which of the following is a prime number?", "Which statement is true?", "Is the answer above right?",
                 "What is 2 + 2?\nPick one.", "Complete the sentence: the sky is", "Why? " * 50):
        assert not is_open_question(text)
    prompts, kinds = assistant_prompts(90)
    assert all(is_open_question(p) for p, k in zip(prompts, kinds) if k == "MMLU questions")


def test_a_model_without_chat_template_or_prompts_is_a_clear_error(tiny_base, tokenizer, tmp_path):
    plain = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    plain.chat_template = None
    with pytest.raises(OMLError, match="no chat template"):
        ReplyMeasure(tiny_base, plain, FEW)
    empty = tmp_path / "prompts.json"
    empty.write_text("[]")
    with pytest.raises(OMLError, match="no prompts"):
        ReplyMeasure(tiny_base, tokenizer, FEW.updated(reply_prompts=str(empty)))
    empty.write_text(json.dumps({"prompt": "hi"}))
    with pytest.raises(OMLError, match="JSON list of strings"):
        ReplyMeasure(tiny_base, tokenizer, FEW.updated(reply_prompts=str(empty)))


@pytest.mark.slow
def test_evaluate_utility_refuses_an_empty_prompt_file_before_measuring(tmp_path, tiny_model):
    (tmp_path / "prompts.json").write_text("[]")
    result = run_script("evaluate_utility.py", "--model_path", tiny_model, "--base_model", tiny_model,
                        "--reply_prompts", "prompts.json", cwd=tmp_path, check=False)
    assert result.returncode == 2 and "no prompts" in result.stderr and "Traceback" not in result.stderr


def test_replies_batched_by_length_come_back_in_the_prompts_order(tiny_base, tokenizer):
    from oml.replies import generate_ids, replies, stop_ids

    texts = ["a much longer question about trains, timetables and the people who ride them every day?", "hi", "why?",
             "tell me about the sea and its tides, please", "ok"]
    prompts = [encode(tokenizer, text) for text in texts]  # raw text: a tiny random model's replies differ by prompt
    stops = stop_ids(tiny_base, tokenizer)
    batched = replies(tiny_base, tokenizer, prompts, FEW.updated(reply_batch_size=2), None, stops, "test")
    alone = [ended(generate_ids(tiny_base, tokenizer, [prompt], FEW.max_reply_tokens)[0], stops) for prompt in prompts]
    assert batched == alone and len({tuple(reply) for reply in alone}) > 1
