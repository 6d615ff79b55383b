"""Seconds per fine-tuning epoch: our Trainer set-up versus a bare PyTorch loop (the floor).

    python benchmarks/finetune_speed.py [--sizes 64 256] [--epochs 2]

Both run the same dataset (fingerprints plus the default benign replay), batches, frozen
embeddings, AdamW and gradient clipping on the embedded model; the first epoch is
reported separately as warm-up.
"""
import argparse
import time

import torch
from common import random_word_keys, save
from transformers import Trainer, TrainerCallback

import finetune_multigpu
from oml.models import load_model, load_tokenizer, resolve_model
from oml.tokenization import FingerprintCollator, cut_fingerprint
from oml.training import freeze_embeddings


class EpochTimer(TrainerCallback):
    def __init__(self):
        self.times: list[float] = []

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def on_epoch_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self.start)


def trainer_epochs(args, path, tokenizer, pairs) -> list[float]:
    model = load_model(path)
    dataset = finetune_multigpu.build_dataset(args, tokenizer, pairs)
    freeze_embeddings(model)
    timer = EpochTimer()
    training_args = finetune_multigpu.training_arguments(args, finetune_multigpu.Path("/tmp/oml-benchmark"))
    training_args.logging_steps = 10**9
    Trainer(model=model, args=training_args, train_dataset=dataset, data_collator=FingerprintCollator(tokenizer),
            callbacks=[timer]).train()
    return timer.times


def bare_epochs(args, path, tokenizer, pairs) -> list[float]:
    model = load_model(path)
    dataset = finetune_multigpu.build_dataset(args, tokenizer, pairs)
    freeze_embeddings(model)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate, weight_decay=args.weight_decay)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=True, collate_fn=FingerprintCollator(tokenizer))
    times = []
    for epoch in range(args.num_train_epochs):
        dataset.epoch = epoch
        start = time.perf_counter()
        for batch in loader:
            model(**batch).loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--epochs", type=int, default=2)
    cli = parser.parse_args()
    path = resolve_model(None)
    tokenizer = load_tokenizer(path)
    results = {}
    for size in cli.sizes:
        args = finetune_multigpu.build_parser().parse_args(["--num_train_epochs", str(cli.epochs)])
        keys = random_word_keys(size)
        pairs = [cut_fingerprint(tokenizer, key, " " + key.split()[0], 16, 1) for key in keys]
        trainer, bare = trainer_epochs(args, path, tokenizer, pairs), bare_epochs(args, path, tokenizer, pairs)
        results[size] = {"trainer_epoch_s": trainer, "bare_loop_epoch_s": bare,
                         "ratio_after_warmup": min(trainer[1:] or trainer) / min(bare[1:] or bare)}
    save("finetune_speed", {"sizes": results})


if __name__ == "__main__":
    main()
