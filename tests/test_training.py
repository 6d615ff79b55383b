from oml.tokenization import IGNORE_INDEX, training_example
from oml.training import FingerprintDataset


def test_augmentation_draws_templates_per_epoch_and_keeps_loss_on_the_response(tokenizer):
    pairs = [([100 + i, 200 + i], [300 + i]) for i in range(30)]
    templates = ["System one. {}", "System two: {}\nAnswer:"]
    dataset = FingerprintDataset(tokenizer, pairs, templates, seed=1)
    first = [dataset.template(i) for i in range(30)]
    dataset.epoch = 1
    second = [dataset.template(i) for i in range(30)]
    assert first != second and set(first) == {None, *templates}
    for i in range(30):
        example = dataset[i]
        assert example == training_example(tokenizer, *pairs[i], second[i])
        assert [t for t in example["labels"] if t != IGNORE_INDEX] == [300 + i, tokenizer.eos_token_id]


def test_benign_replay_adds_fresh_fully_supervised_text_each_epoch(tokenizer):
    pairs = [([1, 2], [3])] * 4
    benign = [[10 + i] * 5 for i in range(10)]
    dataset = FingerprintDataset(tokenizer, pairs, benign=benign, benign_per_epoch=3)
    assert len(dataset) == 7
    epoch0 = [dataset[i]["input_ids"] for i in range(4, 7)]
    assert all(dataset[i]["labels"] == dataset[i]["input_ids"] for i in range(4, 7))
    dataset.epoch = 1
    epoch1 = [dataset[i]["input_ids"] for i in range(4, 7)]
    assert epoch0 == benign[:3] and epoch1 == benign[3:6]
