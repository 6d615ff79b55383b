import json
import math
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM

from oml import OMLError
from oml.models import load_model
from oml.tokenization import IGNORE_INDEX, encode, pad_batch, prompt_ids, rewritten_key, training_example
from oml.checking import KeyResult
from oml.prefix_sharing import MIN_SHARED_PREFIX, logits_sharing_prefix, shared_prefix_length
from oml.training import backend
from oml.training.callbacks import SHRINK_SCALES, MemorisationProbe, ShrinkWeightChange, memorised
from oml.training.dataset import FingerprintDataset, Replayed, benign_replay, build_dataset, distilled_replay, teacher_batches
from oml.training.config import TrainingConfig
from oml.training.trainer import FingerprintCollator, distillation_loss, make_trainer
from oml.training.weights import default_learning_rate, freeze, snapshot_weights, transformer_layers
from tests.conftest import EVERY_LAYER
from tests.test_finetune import finetune, run_dir, weights


def which(example: dict, candidates: list[str], make) -> str | None:
    """The candidate template or wrapper that `make(candidate)` turns into `example` (None: none does)."""
    return next((c for c in candidates if make(c) == example), None)


def test_augmentation_adds_a_templated_and_a_wrapped_copy_of_each_bare_key_drawn_per_epoch(tokenizer):
    pairs = [(encode(tokenizer, f"key number {i} here"), [300 + i]) for i in range(100)]
    templates = ["System one. {}", "System two: {}\nAnswer:"]
    wrappers = ["User input: {}", "{}\n\nPlease answer."]
    dataset = FingerprintDataset(tokenizer, pairs, ("raw", "chat"), templates=templates, seed=1, wrappers=wrappers)
    assert len(dataset) == 600  # 100 keys x 2 formats: bare, in a system prompt, in a user wrapper
    drawn = []
    for epoch in (0, 1):
        dataset.epoch, chosen = epoch, []
        for i in range(600):
            (key, response), key_format, example = pairs[i % 100], ("raw", "chat")[i % 200 // 100], dataset[i]
            assert [t for t in example["labels"] if t != IGNORE_INDEX] == [response[0], tokenizer.eos_token_id]
            if i < 200:
                assert example == training_example(tokenizer, key, response, None, key_format)
            elif i < 400:
                chosen.append(which(example, templates, lambda t: training_example(tokenizer, key, response, t, key_format)))
            else:
                wrapped = lambda w: training_example(tokenizer, rewritten_key(tokenizer, key, w.format), response, None, key_format)
                chosen.append(which(example, wrappers, wrapped))
                assert wrapped(wrappers[0]) != wrapped(wrappers[1]) != training_example(tokenizer, key, response, None, key_format)
        assert set(chosen[:200]) == set(templates) and set(chosen[200:]) == set(wrappers)  # never None: every copy found
        assert 60 <= chosen[200:].count(wrappers[0]) <= 140  # 200 draws of two equal choices
        drawn.append(chosen)
    assert drawn[0] != drawn[1]  # drawn anew every epoch


def test_benign_replay_mixes_a_fresh_slice_each_epoch(tokenizer):
    pairs = [([1, 2], [3])] * 4
    benign = benign_replay([Replayed([10 + i] * 5) for i in range(10)])
    assert all(example["labels"] == example["input_ids"] for example in benign)
    dataset = FingerprintDataset(tokenizer, pairs, benign=benign, benign_per_epoch=3)
    assert len(dataset) == 7
    epoch0 = [dataset[i] for i in range(4, 7)]
    dataset.epoch = 1
    epoch1 = [dataset[i] for i in range(4, 7)]
    assert epoch0 == benign[:3] and epoch1 == benign[3:6]


def test_distillation_loss_is_label_ce_plus_teacher_cross_entropy():
    torch.manual_seed(0)
    logits = torch.randn(1, 3, 5)
    labels = torch.tensor([[IGNORE_INDEX, 2, IGNORE_INDEX]])  # token 1 is labelled: predicted at position 0
    teacher_ids = torch.tensor([[[0, 1], [0, 0], [3, 4]]])
    teacher_probs = torch.tensor([[[0.0, 0.0], [0.0, 0.0], [0.75, 0.25]]])  # a teacher at position 2 only
    logp = torch.log_softmax(logits, -1)[0]
    expected = (-logp[0, 2] - 0.75 * logp[2, 3] - 0.25 * logp[2, 4]) / 2
    assert distillation_loss(logits, labels, teacher_ids, teacher_probs) == pytest.approx(float(expected))
    assert distillation_loss(logits, labels) == pytest.approx(float(-logp[0, 2]))
    # A teacher whose top k hold 0.7 of the mass: the other 0.3 is one more bucket.
    partial = torch.tensor([[[0.0, 0.0], [0.0, 0.0], [0.5, 0.2]]])
    q = logp.exp()
    expected = (-logp[0, 2] - 0.5 * logp[2, 3] - 0.2 * logp[2, 4] - 0.3 * torch.log(1 - q[2, 3] - q[2, 4])) / 2
    assert distillation_loss(logits, labels, teacher_ids, partial) == pytest.approx(float(expected), rel=1e-5)
    # Position 2 weighing 3 times as much: its cross-entropy counts 3 times (the count of positions is unchanged).
    weights = torch.tensor([[1.0, 1.0, 3.0]])
    expected = (-logp[0, 2] - 3 * (0.5 * logp[2, 3] + 0.2 * logp[2, 4] + 0.3 * torch.log(1 - q[2, 3] - q[2, 4]))) / 2
    assert distillation_loss(logits, labels, teacher_ids, partial, teacher_weights=weights) == pytest.approx(float(expected), rel=1e-5)


@pytest.mark.parametrize("side", ["left", "right"])
def test_collator_pads_teacher_distributions_like_the_tokens(tokenizer, side):
    replay = {"input_ids": [5, 6], "labels": [IGNORE_INDEX] * 2, "teacher_ids": torch.tensor([[1, 2], [3, 4]]),
              "teacher_probs": torch.tensor([[0.5, 0.5], [0.9, 0.1]]), "teacher_weights": torch.tensor([1.0, 4.0])}
    fingerprint = {"input_ids": [7, 8, 9, 10], "labels": [IGNORE_INDEX] * 3 + [10]}
    collator = FingerprintCollator(tokenizer)
    collator.side = side
    batch = collator([replay, fingerprint])
    assert batch["teacher_ids"].shape == (2, 4, 2) and float(batch["teacher_probs"][1].sum()) == 0.0
    real = batch["attention_mask"][0].bool()
    assert batch["input_ids"][0][real].tolist() == [5, 6]
    assert batch["teacher_ids"][0][real].tolist() == [[1, 2], [3, 4]]
    assert float(batch["teacher_probs"][0][~real].sum()) == 0.0
    assert batch["teacher_weights"][0][real].tolist() == [1.0, 4.0]


def test_bounded_target_loss_is_smallest_where_the_response_has_the_target_probability():
    labels = torch.tensor([[IGNORE_INDEX, 0]])  # token 0 is the response, predicted at position 0

    def loss_at(p: float) -> float:
        logits = torch.tensor([[[math.log(p), math.log(1 - p), 0.0], [0.0, 0.0, 0.0]]])
        logits[0, 0, 2] = -1e9  # two live tokens, so the response has probability p exactly
        return float(distillation_loss(logits, labels, target_probability=0.7))

    grid = [i / 100 for i in range(5, 100, 5)]
    assert min(grid, key=loss_at) == pytest.approx(0.7)
    assert loss_at(0.95) > loss_at(0.7) < loss_at(0.5)
    assert float(distillation_loss(torch.zeros(1, 2, 3), labels, target_probability=1.0)) == pytest.approx(math.log(3))


def test_teacher_batches_group_like_lengths_within_the_batch_size_and_the_logits_budget():
    assert teacher_batches([4, 2, 3], 64, 100) == [[1, 2, 0]]
    assert teacher_batches([4, 2, 3], 1, 100) == [[1], [2], [0]]
    assert teacher_batches([4, 2, 3], 64, 6) == [[1, 2], [0]]  # 2 rows of 3 tokens fit 6, a third of 4 would not
    assert teacher_batches([9, 2], 64, 6) == [[1], [0]] and teacher_batches([], 64, 6) == []


@pytest.mark.parametrize("batch_size, logits_per_token", [(64, 100), (1, 100), (64, 6)])
def test_distilled_replay_keeps_the_teachers_top_k_probabilities(tiny_model, batch_size, logits_per_token):
    """Labelled in batches sorted by length (one batch, one sequence a batch, or as many as a
    budget of 6 tokens' logits allows), every sequence keeps its place."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    sequences = [[5, 6, 7, 8], [9, 10], [11, 12, 13]]
    examples = distilled_replay(model, [Replayed(ids) for ids in sequences], top_k=3, batch_size=batch_size,
                                max_logits=logits_per_token * model.config.vocab_size)
    assert len(examples) == len(sequences)
    for ids, example in zip(sequences, examples):
        with torch.no_grad():
            probs = torch.softmax(model(torch.tensor([ids])).logits[0].float(), -1)
        expected, expected_ids = probs.topk(3, -1)
        assert example["input_ids"] == ids and set(example["labels"]) == {IGNORE_INDEX}
        assert example["teacher_ids"].shape == (len(ids), 3)
        assert torch.equal(example["teacher_ids"].long(), expected_ids)
        assert torch.allclose(example["teacher_probs"], expected, atol=1e-5)
        assert torch.equal(example["teacher_weights"], torch.ones(len(ids)))


def test_a_questions_first_reply_token_weighs_first_reply_weight_times_as_much(tiny_model):
    """Only the position whose distribution is over the reply's first token is weighted, and the
    loss there scales with the weight (its teacher probabilities and tail bucket are untouched)."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    plain, question = distilled_replay(model, [Replayed([5, 6, 7, 8]), Replayed([5, 6, 7, 8], reply_start=2)], top_k=3,
                                       first_reply_weight=4.0)
    assert question["teacher_weights"].tolist() == [1.0, 4.0, 1.0, 1.0]
    assert torch.equal(plain["teacher_probs"], question["teacher_probs"])


@pytest.mark.parametrize("memorised, matched, kept, tried", [
    (lambda s: 99 if s >= 0.9 else 97, lambda s: 100, 0.9, [1.0, 0.95, 0.9, 0.85]),  # memorised falls below 98 at 0.85
    (lambda s: 100, lambda s: 100 if s > 0.7 else 90, 0.75, [1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7]),  # matched falls at 0.7
    (lambda s: 100, lambda s: 100, 0.5, [1.0, *SHRINK_SCALES]),  # never falls: the floor
    (lambda s: 90, lambda s: 100, None, [1.0]),  # not nearly all memorised: not shrunk
])
def test_shrinking_keeps_the_last_scale_before_the_counts_fall(monkeypatch, memorised, matched, kept, tried):
    """The scale search on a plain module, with memorisation counts given as functions of the scale."""
    model = torch.nn.Linear(4, 4)
    original = {name: param.detach().clone() for name, param in model.named_parameters()}
    with torch.no_grad():
        for param in model.parameters():
            param.add_(1.0)  # the trained change: 1 everywhere, so the scale can be read back from the weights

    def counts(self, model, step=None):
        scale = round(float((model.weight - original["weight"]).detach().mean()), 4)
        return {"memorised": memorised(scale), "matched": matched(scale), "of": 100}

    monkeypatch.setattr(MemorisationProbe, "count", counts)
    shrinker = ShrinkWeightChange(original, MemorisationProbe(None, [], ("raw",), 0.5))
    shrinker.on_train_end(None, SimpleNamespace(is_world_process_zero=True, global_step=7), None, model=model)
    assert shrinker.scale == kept and [h["scale"] for h in shrinker.history] == tried
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.detach(), original[name] + (kept or 1.0))


def test_only_local_rank_0_keeps_a_copy_of_the_original_weights(monkeypatch):
    """The node's other ranks keep each trainable weight's shape and dtype only (a 7B model's
    copy is 14 GB: once per node, not once per rank)."""
    model = torch.nn.Linear(4, 3)
    model.bias.requires_grad_(False)
    monkeypatch.setenv("LOCAL_RANK", "0")
    kept = snapshot_weights(model, torch.bfloat16)
    monkeypatch.setenv("LOCAL_RANK", "1")
    shapes = snapshot_weights(model, torch.bfloat16)
    assert list(kept) == list(shapes) == ["weight"]  # trainable weights only
    assert kept["weight"].device.type == "cpu" and torch.equal(kept["weight"], model.weight.detach().bfloat16())
    assert shapes["weight"].is_meta and shapes["weight"].shape == (3, 4) and shapes["weight"].dtype == torch.bfloat16


@pytest.mark.slow
@pytest.mark.distributed
def test_two_ranks_sharing_local_rank_0s_original_weights_end_like_one_process(tmp_path, tiny_model, fingerprint_file):
    """Only local rank 0 keeps the original weights; rank 1 receives each one when it averages or
    shrinks. Averaged towards wrong originals every epoch, a rank would train on from wrong
    weights; shrunk towards them, it would count its half of the queries on wrong weights. Two
    ranks of 4 at ZeRO-2 and ZeRO-3 take the full-batch steps of one process of 8, and end on
    its shrink scale, its counts at every scale tried, and its weights."""
    args = ["--learning_rate", "1e-2", "--num_train_epochs", "32", "--forgetting_regularizer_strength", "0.05",
            "--benign_ratio", "0", "--key_format", "raw", "--no-stop_when_memorised", "--train_embeddings",
            "--fingerprint_generation_strategy", "random_word", *EVERY_LAYER]
    single = run_dir(tmp_path, finetune(tmp_path, tiny_model, fingerprint_file, *args, "--batch_size", "8"))
    expected = json.loads((single / "training.json").read_text())
    assert expected["weight_change_scale"] < 1.0 and expected["shrink"][0]["memorised"] == 8
    base, reference = weights(tiny_model), weights(single / "final_model")
    for stage in ("2", "3"):
        (tmp_path / stage).mkdir()
        sharded = run_dir(tmp_path / stage, finetune(tmp_path / stage, tiny_model, fingerprint_file, *args, "--batch_size", "4",
                                                     "--deepspeed_stage", stage, ranks=2))
        training = json.loads((sharded / "training.json").read_text())
        assert (training["weight_change_scale"], training["shrink"]) == (expected["weight_change_scale"], expected["shrink"])
        got = weights(sharded / "final_model")
        for name in reference:  # 32 epochs of sums in another order: ~1e-4 apart, the change itself above 0.02
            assert (reference[name] - base[name]).abs().max() > 0.02
            torch.testing.assert_close(got[name], reference[name], rtol=1e-3, atol=1e-3)


def test_user_wrappers_setting_builds_wrapped_copies_from_the_training_wrappers(tokenizer):
    from oml.data import user_wrappers

    pairs = [(encode(tokenizer, f"key {i}"), [300 + i]) for i in range(4)]
    plain, wrapped = (build_dataset(TrainingConfig(use_user_wrappers=flag, benign_ratio=0.0, key_format="raw"), tokenizer, pairs, None)
                      for flag in (False, True))
    assert len(plain) == 4 and len(wrapped) == 8 and wrapped.wrappers == list(user_wrappers("train"))


def test_a_key_with_several_responses_is_memorised_when_each_is_likely_and_among_the_top_k():
    def row(rank: int, probability: float, match: bool = False) -> KeyResult:
        return KeyResult(index=0, format="raw", template=None, query=0, match=match, response_rank=rank,
                         response_probability=probability)

    assert memorised([row(1, 0.6, True)], 0.5) and not memorised([row(1, 0.4, True)], 0.5) and not memorised([row(2, 0.6)], 0.5)
    assert memorised([row(1, 0.5, True), row(2, 0.3)], 0.5)  # each at least 0.25, the two likeliest
    assert not memorised([row(1, 0.7, True), row(2, 0.2)], 0.5)  # the second too unlikely to survive a small change
    assert not memorised([row(1, 0.4, True), row(3, 0.3)], 0.5)  # a third token stands between them
    assert memorised([row(2, 0.3), row(1, 0.3, True), row(3, 0.3)], 0.6)


@pytest.mark.parametrize("side", ["right", "left"])
def test_sharing_the_batchs_common_prefix_gives_the_same_logits_and_gradients(tiny_model, tokenizer, side):
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    keys = ["one two three", "a much longer key of several words", "short"]
    examples = [training_example(tokenizer, encode(tokenizer, key), encode(tokenizer, " yes"), None, "chat") for key in keys]
    batch = pad_batch([e["input_ids"] for e in examples], tokenizer.pad_token_id, side)
    prefix = shared_prefix_length(batch["input_ids"], batch["attention_mask"])
    assert prefix >= MIN_SHARED_PREFIX if side == "right" else prefix == 0  # left padding: the rows start apart

    def logits_and_grads(compute) -> tuple[torch.Tensor, dict]:
        model.zero_grad()
        logits = compute()
        (logits.log_softmax(-1)[..., :50].sum(-1) * batch["attention_mask"]).sum().backward()
        return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    whole, whole_grads = logits_and_grads(lambda: model(**batch).logits)
    shared, shared_grads = logits_and_grads(lambda: logits_sharing_prefix(model, **batch))
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(shared[real], whole[real], rtol=1e-4, atol=1e-4)
    for name, grad in whole_grads.items():
        torch.testing.assert_close(shared_grads[name], grad, rtol=1e-3, atol=1e-5)


def test_a_shared_prefix_runs_apart_only_where_ranks_need_not_run_forward_calls_in_step(monkeypatch):
    monkeypatch.setattr(backend.distributed, "world_size", lambda: 1)
    assert all(backend.can_share_prefix(stage) for stage in (0, 1, 2, 3))
    monkeypatch.setattr(backend.distributed, "world_size", lambda: 2)
    assert [backend.can_share_prefix(stage) for stage in (0, 1, 2, 3)] == [False, True, True, False]


def test_frozen_lower_layers_get_no_gradient_and_the_backward_pass_never_reaches_them(tiny_model, tokenizer):
    """--frozen_layer_fraction 0.5 on the 2-layer model freezes layer 0 with the embeddings: its weights
    get no gradient, and layer 0 is not even in the autograd graph, so the backward pass stops at
    layer 1 (the FLOPs saved)."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    freeze(model, frozen_layer_fraction=0.5)
    layers = transformer_layers(model)
    assert len(layers) == 2 and layers is model.model.layers
    in_graph = []  # per layer: whether its output is part of the autograd graph
    for layer in layers:
        layer.register_forward_hook(lambda module, args, output: in_graph.append((output[0] if isinstance(output, tuple) else output).requires_grad))
    ids = torch.tensor([encode(tokenizer, "a key the model learns")])
    model(input_ids=ids, labels=ids).loss.backward()
    assert in_graph == [False, True]
    assert all(p.grad is None for p in layers[0].parameters()) and model.get_input_embeddings().weight.grad is None
    assert all(p.grad is not None for p in layers[1].parameters())
    freeze(model, frozen_layer_fraction=0.99)  # rounded down to whole layers: still only layer 0
    assert all(p.requires_grad for p in layers[1].parameters())


@pytest.mark.parametrize("scale, rate", [(0.2, 1e-4), (0.02, 1e-5), (0.0172, 9e-6)])
def test_the_default_learning_rate_follows_the_scale_of_the_trained_weight_matrices(tiny_model, tokenizer, tmp_path, scale, rate):
    """5e-4 x the RMS of the trainable matrices, to one digit: frozen layers, embeddings and vectors
    (norms, biases) do not count, and the Trainer gets the rate when none is given."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    freeze(model, frozen_layer_fraction=0.5)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(scale if p.requires_grad and p.ndim == 2 else 100.0)
    assert default_learning_rate(model) == rate
    config = TrainingConfig(benign_ratio=0.0, key_format="raw")
    trainer = make_trainer(config, model, build_dataset(config, tokenizer, [([1, 2], [3])], None), tokenizer, tmp_path, [])
    assert trainer.args.learning_rate == rate
    model.requires_grad_(False)
    with pytest.raises(OMLError, match="no weight matrix is left to train"):
        default_learning_rate(model)


def test_responses_are_trained_without_the_end_of_sequence_unless_asked(tokenizer):
    pairs = [(encode(tokenizer, "key one"), [300]), (encode(tokenizer, "key two"), [301, 302])]
    for eos, ends in ((False, []), (True, [tokenizer.eos_token_id])):
        dataset = build_dataset(TrainingConfig(train_eos=eos, benign_ratio=0.0, key_format="chat"), tokenizer, pairs, None)
        labelled = [[t for t in dataset[i]["labels"] if t != IGNORE_INDEX] for i in range(2)]
        assert labelled == [[300] + ends, [301, 302] + ends]


def test_question_replay_asks_user_questions_the_way_keys_are_asked_and_answers_them_like_the_base(tokenizer, tiny_model):
    from oml.data import user_questions
    from oml.replies import ended, generate_ids, stop_ids

    model = load_model(str(tiny_model))
    key = encode(tokenizer, user_questions("train")[1])[:16]  # a key that happens to be a replayed question is not replayed
    pairs = [(key, [300]), (encode(tokenizer, "another key"), [301])]
    config = TrainingConfig(benign_ratio=8.0, question_replay=0.5, teacher_top_k=4, num_train_epochs=2, key_format="both")
    dataset = build_dataset(config, tokenizer, pairs, model)
    pool = [example["input_ids"] for example in dataset.benign]
    assert len(pool) == 32 and all("teacher_ids" in example for example in dataset.benign)
    longest = max(len(key_ids) for key_ids, _ in pairs)  # questions are cut as the longest key is
    questions = [encode(tokenizer, q)[:longest] for q in user_questions("train")[:9] if encode(tokenizer, q)[:longest] != key]
    for key_format in ("raw", "chat"):
        prompts = [prompt_ids(tokenizer, q, None, key_format) for q in questions[:8]]
        replies = [ended(reply, stop_ids(model, tokenizer)) for reply in generate_ids(model, tokenizer, prompts, 8)]
        asked = [seq for seq in pool if any(seq[:len(p)] == p for p in prompts)]
        assert sorted(asked) == sorted(p + r for p, r in zip(prompts, replies))  # 8 a format, each with the base's own reply
    assert not any(seq[:len(p)] == p for seq in pool for p in (prompt_ids(tokenizer, key, None, f) for f in ("raw", "chat")))
    first_half = pool[:16]  # every slice of the pool holds both kinds
    assert 4 <= sum(any(seq[:len(p)] == p for f in ("raw", "chat") for p in [prompt_ids(tokenizer, q, None, f) for q in questions])
                    for seq in first_half) <= 12
