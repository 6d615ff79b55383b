"""Seconds per fine-tuning epoch: our Trainer set-up versus a bare PyTorch loop (the floor).

    python benchmarks/finetune_speed.py [--sizes 64 256] [--epochs 2] [--smoke]

Both run the same dataset (fingerprints plus the default distillation replay), batches,
loss, frozen embeddings, AdamW and gradient clipping on the embedded model; the first
epoch is reported separately as warm-up. Epochs are also given as model GFLOP/s (real tokens:
forward, activation gradients, trained-weight gradients) and as a fraction of the matrix-product
peak measured in the same run; `--no-group_by_length` style comparisons come from `--settings`.
"""
import tempfile
import time
from pathlib import Path

import torch
from common import (KEY_TOKENS, RESPONSE_TOKENS, benchmark_model, benchmark_parser, measured_peak_gflops, random_word_keys, save,
                    training_gflop, utilisation)
from transformers import TrainerCallback
from transformers.trainer_pt_utils import LengthGroupedSampler

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


def trainer_epochs(settings, path, pairs) -> tuple[list[float], float]:
    """Seconds per epoch, and model GFLOP per epoch."""
    model, tokenizer = load(path, dtype=torch.float32, device=None)
    dataset = build_dataset(settings, tokenizer, pairs, model)
    freeze_embeddings(model)
    gflop = training_gflop(model, sum(len(dataset[i]["input_ids"]) for i in range(len(dataset))))
    timer = EpochTimer()
    make_trainer(settings, model, dataset, tokenizer, Path(tempfile.mkdtemp(prefix="oml-benchmark-")), [timer]).train()
    return timer.times, gflop


def bare_epochs(settings, path, pairs) -> list[float]:
    model, tokenizer = load(path, dtype=torch.float32)
    dataset = build_dataset(settings, tokenizer, pairs, model)
    freeze_embeddings(model)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.learning_rate, weight_decay=settings.weight_decay)
    sampler = (LengthGroupedSampler(settings.batch_size, lengths=[len(dataset[i]["input_ids"]) for i in range(len(dataset))])
               if settings.group_by_length else torch.utils.data.RandomSampler(dataset))  # the Trainer's batches
    loader = torch.utils.data.DataLoader(dataset, batch_size=settings.batch_size, sampler=sampler, collate_fn=FingerprintCollator(tokenizer))
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
    parser.add_argument("--settings", nargs="*", default=[], help="Extra fine-tuning flags, e.g. --no-group_by_length.")
    args = parser.parse_args()
    if args.smoke:
        args.sizes = [4]
    path = benchmark_model(args.smoke)
    tokenizer = load_tokenizer(path)
    training_parser = cli.ArgumentParser()
    add_training_args(training_parser)
    settings = training_parser.parse_args(["--num_train_epochs", str(args.epochs), "--key_format", "both", *args.settings])
    peak = measured_peak_gflops()
    results = {}
    for size in args.sizes:
        pairs = [cut_fingerprint(tokenizer, key, " " + key.split()[0], KEY_TOKENS, RESPONSE_TOKENS) for key in random_word_keys(size)]
        (trainer, gflop), bare = trainer_epochs(settings, path, pairs), bare_epochs(settings, path, pairs)
        best_trainer, best_bare = min(trainer[1:] or trainer), min(bare[1:] or bare)
        results[size] = {"trainer_epoch_s": trainer, "bare_loop_epoch_s": bare, "ratio_after_warmup": best_trainer / best_bare,
                         "model_gflop_per_epoch": gflop, "trainer": utilisation(gflop, best_trainer, peak),
                         "bare_loop": utilisation(gflop, best_bare, peak)}
    save(args.results_dir, "finetune_speed", {"settings": args.settings, "peak_gflop_per_s": peak, "sizes": results})


if __name__ == "__main__":
    main()
