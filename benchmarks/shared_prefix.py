"""Fine-tuning epochs and checks with the prefix a batch shares computed once (--share_prompt_prefix, the
default) against once per example, side by side.

    python benchmarks/shared_prefix.py [--sizes 64] [--epochs 2] [--rounds 2] [--smoke] [--settings FLAGS...]

Both arms train today's defaults (keys in both formats, distillation replay, length-grouped
batches), changed by any --settings flags, on the embedded model, from the same weights and
data; the arms alternate for
`--rounds` rounds, so that a slower spell of a shared machine falls on both, and the first epoch
of each run counts as warm-up. Reported per arm: seconds per epoch, the model GFLOP an epoch
needs (every real token; the same for both), the GFLOP it computed (less the shared prefixes
computed once), seconds and GFLOP per fingerprint, and the fraction of the matrix-product peak
measured in the same run (needed GFLOP over time, so both arms are compared on the same work).
Then the same for checking: seconds to check the keys bare and inside the 10 test system prompts,
in both formats, with each batch's shared prefix computed once or per key.
"""
import argparse
import time

import torch
from common import (KEY_TOKENS, RESPONSE_TOKENS, benchmark_model, benchmark_parser, gflop_per_trained_token, measured_peak_gflops,
                    random_word_keys, save)
from finetune_speed import trainer_epochs, training_config

from oml import prefix_sharing
from oml.checking import check_model, queries_for
from oml.data import prompt_templates
from oml.models import load_model, load_tokenizer
from oml.tokenization import cut_fingerprint

ARMS = {"shared prefix": True, "prefix per example": False}


class PrefixTally:
    """Counts, through `shared_prefix_length`, the token positions that sharing did not compute:
    (rows - 1) x prefix for each batch whose prefix ran once."""

    def __init__(self):
        self.saved, self.measure = 0, prefix_sharing.shared_prefix_length

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> int:
        prefix = self.measure(input_ids, attention_mask)
        if input_ids.shape[0] > 1 and prefix_sharing.MIN_SHARED_PREFIX <= prefix < input_ids.shape[1]:
            self.saved += (input_ids.shape[0] - 1) * prefix
        return prefix


def run_arm(config, path: str, pairs, share: bool) -> dict:
    """One training run; its epoch times, needed GFLOP an epoch, and the share of token positions not computed."""
    tally = PrefixTally()
    prefix_sharing.shared_prefix_length = tally
    try:
        times, gflop = trainer_epochs(config.updated(share_prompt_prefix=share), path, pairs)
    finally:
        prefix_sharing.shared_prefix_length = tally.measure
    return {"epoch_s": times, "gflop_per_epoch": gflop, "saved_positions": tally.saved // max(len(times), 1)}


def main() -> None:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[64])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--settings", nargs=argparse.REMAINDER, default=[],
                        help="Fine-tuning flags for both arms, e.g. --frozen_layer_fraction 0; last: everything after it is one.")
    args = parser.parse_args()
    if args.smoke:
        args.sizes, args.rounds = [4], 1
    path = benchmark_model(args.smoke)
    tokenizer = load_tokenizer(path)
    model = load_model(path)
    config = training_config(args.epochs, args.settings)
    peak = measured_peak_gflops()
    gflop_per_token = gflop_per_trained_token(path, config)  # as trainer_epochs trains it
    results = {}
    for size in args.sizes:
        pairs = [cut_fingerprint(tokenizer, key, " " + key.split()[0], KEY_TOKENS, RESPONSE_TOKENS) for key in random_word_keys(size)]
        runs = {name: [] for name in ARMS}
        for _ in range(args.rounds):
            for name, share in ARMS.items():
                runs[name].append(run_arm(config, path, pairs, share))
        results[size] = {name: summary(arm, size, peak, gflop_per_token) for name, arm in runs.items()}
        results[size]["speed-up"] = results[size]["prefix per example"]["epoch_s"] / results[size]["shared prefix"]["epoch_s"]
        checks = {name: min(check_seconds(model, tokenizer, pairs, share) for _ in range(args.rounds)) for name, share in ARMS.items()}
        results[size]["check_s"] = {**checks, "speed-up": checks["prefix per example"] / checks["shared prefix"]}
    save(args.results_dir, "shared_prefix", {"peak_gflop_per_s": peak, "sizes": results})


def check_seconds(model, tokenizer, pairs, share: bool) -> float:
    """Seconds to check every key bare and inside each of the 10 test system prompts, in both
    formats (the check of `check_fingerprints.py --system_prompts test`), with each batch's shared
    prefix computed once or per key."""
    queries = queries_for(("raw", "chat"), [None, *prompt_templates("test")])
    allowed = prefix_sharing.checks_share_prefix
    prefix_sharing.checks_share_prefix = allowed if share else (lambda model, width: False)
    try:
        started = time.perf_counter()
        check_model(model, tokenizer, pairs, queries, batch_size=64, progress=False, decode_misses=False)
        return time.perf_counter() - started
    finally:
        prefix_sharing.checks_share_prefix = allowed


def summary(runs: list[dict], size: int, peak: float, gflop_per_token: float) -> dict:
    """An arm's best epoch after warm-up over its runs, per epoch and per fingerprint."""
    epoch_s = min(t for run in runs for t in (run["epoch_s"][1:] or run["epoch_s"]))
    needed = runs[0]["gflop_per_epoch"]
    computed = needed - runs[0]["saved_positions"] * gflop_per_token
    return {"epoch_s": epoch_s, "s_per_fingerprint_epoch": epoch_s / size, "tokens_per_epoch": round(needed / gflop_per_token),
            "positions_not_computed_per_epoch": runs[0]["saved_positions"], "needed_gflop_per_epoch": needed,
            "computed_gflop_per_epoch": computed, "needed_gflop_per_fingerprint_epoch": needed / size,
            "computed_gflop_per_fingerprint_epoch": computed / size, "fraction_of_peak": needed / epoch_s / peak}


if __name__ == "__main__":
    main()
