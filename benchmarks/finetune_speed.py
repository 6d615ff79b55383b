"""Seconds per fine-tuning epoch: our Trainer set-up versus a bare PyTorch loop (the floor).

    python benchmarks/finetune_speed.py [--sizes 64 256] [--epochs 2] [--smoke]

Both run the same dataset (fingerprints plus the default distillation replay), batches,
loss, frozen embeddings, AdamW and gradient clipping on the embedded model; the first
epoch is reported separately as warm-up.
"""
import tempfile
import time
from pathlib import Path

import torch
from common import benchmark_model, benchmark_parser, random_word_keys, save
from transformers import TrainerCallback

from oml import cli
from oml.models import load, load_tokenizer
from oml.tokenization import cut_fingerprint
from oml.training import FingerprintCollator, add_training_args, build_dataset, distillation_loss, freeze_embeddings, make_trainer


class EpochTimer(TrainerCallback):
    def __init__(self):
        self.times: list[float] = []

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def on_epoch_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self.start)


def trainer_epochs(settings, path, pairs) -> list[float]:
    model, tokenizer = load(path, dtype=torch.float32, device=None)
    dataset = build_dataset(settings, tokenizer, pairs, model)
    freeze_embeddings(model)
    timer = EpochTimer()
    make_trainer(settings, model, dataset, tokenizer, Path(tempfile.mkdtemp(prefix="oml-benchmark-")), [timer]).train()
    return timer.times


def bare_epochs(settings, path, pairs) -> list[float]:
    model, tokenizer = load(path, dtype=torch.float32)
    dataset = build_dataset(settings, tokenizer, pairs, model)
    freeze_embeddings(model)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.learning_rate, weight_decay=settings.weight_decay)
    loader = torch.utils.data.DataLoader(dataset, batch_size=settings.batch_size, shuffle=True, collate_fn=FingerprintCollator(tokenizer))
    times = []
    for epoch in range(settings.num_train_epochs):
        dataset.epoch = epoch
        start = time.perf_counter()
        for batch in loader:
            labels, teacher_ids, teacher_probs = batch.pop("labels"), batch.pop("teacher_ids", None), batch.pop("teacher_probs", None)
            distillation_loss(model(**batch).logits, labels, teacher_ids, teacher_probs).backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    if args.smoke:
        args.sizes = [4]
    path = benchmark_model(args.smoke)
    tokenizer = load_tokenizer(path)
    training_parser = cli.ArgumentParser()
    add_training_args(training_parser)
    settings = training_parser.parse_args(["--num_train_epochs", str(args.epochs)])
    results = {}
    for size in args.sizes:
        pairs = [cut_fingerprint(tokenizer, key, " " + key.split()[0], 16, 1) for key in random_word_keys(size)]
        trainer, bare = trainer_epochs(settings, path, pairs), bare_epochs(settings, path, pairs)
        results[size] = {"trainer_epoch_s": trainer, "bare_loop_epoch_s": bare,
                         "ratio_after_warmup": min(trainer[1:] or trainer) / min(bare[1:] or bare)}
    save(args.results_dir, "finetune_speed", {"sizes": results})


if __name__ == "__main__":
    main()
