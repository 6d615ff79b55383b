"""Seconds per fine-tuning epoch: our Trainer set-up versus a bare PyTorch loop (the floor).

    python benchmarks/finetune_speed.py [--sizes 64 256] [--epochs 2] [--smoke]

Both run the same dataset (fingerprints plus the default distillation replay), batches,
loss, frozen embeddings and lower layers, AdamW and gradient clipping on the embedded model; the first
epoch is reported separately as warm-up. Epochs are also given as model GFLOP/s (real tokens:
forward, activation gradients, trained-weight gradients) and as a fraction of the matrix-product
peak measured in the same run. `--settings` gives both runs fine-tuning flags, e.g.
`--settings --no-group_by_length --batch_size 16`; everything after it is one of them.
"""
import argparse
import tempfile
import time
from pathlib import Path

import torch
from common import (KEY_TOKENS, RESPONSE_TOKENS, bare_training_loop, benchmark_model, benchmark_parser, measured_peak_gflops,
                    random_word_keys, save, training_gflop, utilisation)
from transformers import TrainerCallback

from oml import cli
from oml.models import load, load_tokenizer
from oml.tokenization import cut_fingerprint
from oml.training.config import TrainingConfig
from oml.training.dataset import build_dataset
from oml.training.trainer import make_trainer
from oml.training.weights import freeze


class EpochTimer(TrainerCallback):
    def __init__(self):
        self.times: list[float] = []

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def on_epoch_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self.start)


def trainer_epochs(config: TrainingConfig, path: str, pairs: list[tuple[list[int], list[int]]]) -> tuple[list[float], float]:
    """Seconds per epoch, and model GFLOP per epoch."""
    model, tokenizer = load(path, dtype=torch.float32, device=None)
    dataset = build_dataset(config, tokenizer, pairs, model)
    freeze(model, config.train_embeddings, config.frozen_layer_fraction)
    gflop = training_gflop(model, sum(len(dataset[i]["input_ids"]) for i in range(len(dataset))))
    timer = EpochTimer()
    make_trainer(config, model, dataset, tokenizer, Path(tempfile.mkdtemp(prefix="oml-benchmark-")), [timer]).train()
    return timer.times, gflop


def training_config(epochs: int, flags: list[str]) -> TrainingConfig:
    """Both runs' settings: `--epochs` epochs, keys in both formats, then the `--settings` flags,
    parsed as finetune_multigpu.py parses them."""
    parser = cli.ArgumentParser(prog="finetune_speed.py --settings", description="Fine-tuning flags for both runs.")
    cli.add_settings(parser, TrainingConfig, num_train_epochs=epochs, key_format="both")
    return cli.settings_from(TrainingConfig, parser.parse_args(flags))


def main() -> None:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--settings", nargs=argparse.REMAINDER, default=[],
                        help="Fine-tuning flags for both runs, e.g. --no-group_by_length; last: everything after it is one.")
    args = parser.parse_args()
    if args.smoke:
        args.sizes = [4]
    path = benchmark_model(args.smoke)
    tokenizer = load_tokenizer(path)
    config = training_config(args.epochs, args.settings)
    peak = measured_peak_gflops()
    results = {}
    for size in args.sizes:
        pairs = [cut_fingerprint(tokenizer, key, " " + key.split()[0], KEY_TOKENS, RESPONSE_TOKENS) for key in random_word_keys(size)]
        (trainer, gflop), (bare, _) = trainer_epochs(config, path, pairs), bare_training_loop(config, path, pairs)
        best_trainer, best_bare = min(trainer[1:] or trainer), min(bare[1:] or bare)
        results[size] = {"trainer_epoch_s": trainer, "bare_loop_epoch_s": bare, "ratio_after_warmup": best_trainer / best_bare,
                         "model_gflop_per_epoch": gflop, "trainer": utilisation(gflop, best_trainer, peak),
                         "bare_loop": utilisation(gflop, best_bare, peak)}
    save(args.results_dir, "finetune_speed", {"settings": args.settings, "peak_gflop_per_s": peak, "sizes": results})


if __name__ == "__main__":
    main()
