from oml.tokenization import IGNORE_INDEX, training_example
from oml.training import FingerprintDataset, benign_replay


def test_augmentation_draws_templates_per_epoch_and_keeps_loss_on_the_response(tokenizer):
    pairs = [([100 + i, 200 + i], [300 + i]) for i in range(200)]
    templates = ["System one. {}", "System two: {}\nAnswer:"]
    dataset = FingerprintDataset(tokenizer, pairs, templates, seed=1)
    first = [dataset.template(i) for i in range(200)]
    dataset.epoch = 1
    second = [dataset.template(i) for i in range(200)]
    assert first != second and set(first) == {None, *templates}
    assert 70 <= first.count(None) <= 130  # the bare key half of the time
    for i in range(200):
        example = dataset[i]
        assert example == training_example(tokenizer, *pairs[i], second[i])
        assert [t for t in example["labels"] if t != IGNORE_INDEX] == [300 + i, tokenizer.eos_token_id]


def test_benign_replay_mixes_a_fresh_slice_each_epoch(tokenizer):
    pairs = [([1, 2], [3])] * 4
    benign = benign_replay([[10 + i] * 5 for i in range(10)])
    assert all(example["labels"] == example["input_ids"] for example in benign)
    dataset = FingerprintDataset(tokenizer, pairs, benign=benign, benign_per_epoch=3)
    assert len(dataset) == 7
    epoch0 = [dataset[i] for i in range(4, 7)]
    dataset.epoch = 1
    epoch1 = [dataset[i] for i in range(4, 7)]
    assert epoch0 == benign[:3] and epoch1 == benign[3:6]
