"""Do fingerprints survive when someone fine-tunes the model further?

    python evaluate_persistence.py --model_path results/saved_models/<hash>/final_model \
        --fingerprints_file_path generated_data/output_fingerprints.json

Plays the part of a user who takes the published model and continues training it on
benign instruction data (by default message/reply pairs from chitchat-dataset, in the
model's chat template, loss on the replies), and re-checks the fingerprints after every
--eval_every steps. Retention is the share of the fingerprints that matched before the
extra training and still match. Nothing is saved but the report (--output_json).
"""
import logging
from dataclasses import dataclass

import torch

from oml import cli
from oml.attacks import benign_finetune
from oml.checking import KeyResult, Query, accuracy, check_model, queries_for
from oml.data import instruction_pairs
from oml.fingerprints import FingerprintSelection, query_formats, selected_fingerprints
from oml.models import load
from oml.settings import NON_NEGATIVE_FLOAT, POSITIVE_INT, Settings, at_least, setting
from oml.tokenization import fingerprint_pairs
from oml.utility import chat_examples

logger = logging.getLogger("evaluate_persistence")


@dataclass(frozen=True)
class PersistenceSettings(Settings):
    """The further fine-tuning a user does, and how often the fingerprints are checked during it."""
    steps: int = setting(200, "Optimizer steps of further fine-tuning.", POSITIVE_INT)
    eval_every: int = setting(50, "Re-check the fingerprints after every this many steps.", POSITIVE_INT)
    learning_rate: float = setting(1e-5, "AdamW learning rate (constant).", NON_NEGATIVE_FLOAT)
    batch_size: int = setting(8, "Instruction examples per step.", POSITIVE_INT)
    max_length: int = setting(128, "Tokens per instruction example.", at_least(2))
    check_batch_size: int = setting(64, "Keys per forward pass when checking.", POSITIVE_INT)
    seed: int = setting(0, "Seed of the data order.")


def build_parser() -> cli.ArgumentParser:
    parser = cli.ArgumentParser(description=__doc__)
    cli.add_settings(parser, cli.FingerprintedModel)
    cli.add_fingerprint_args(parser)
    cli.add_dataset_args(parser, "instruction_data", {"prompt": "prompt", "response": "response"},
                         "Instruction data for the further fine-tuning (default: message/reply pairs of the shipped chat)")
    cli.add_settings(parser, PersistenceSettings)
    cli.add_output_args(parser, "the retention table")
    cli.add_common_args(parser)
    return parser


def parse_args():
    args = cli.parse_evaluation_args(build_parser(), "evaluate_persistence.py")
    cli.check_output(args)
    return args


def retention_row(step: int, results: list[KeyResult], matched_before: set[tuple], loss: float | None) -> dict:
    """Accuracy (over every key in every format, and per format) and the share of the
    (format, key) pairs that matched before the extra training and still match."""
    matched = {(r.format, r.index) for r in results if r.match}
    retained = len(matched & matched_before) / len(matched_before) if matched_before else 0.0
    by_format = {f: accuracy([r for r in results if r.format == f])[0] for f in dict.fromkeys(r.format for r in results)}
    return {"step": step, "accuracy": accuracy(results)[0], "accuracy_by_format": by_format, "retained": 100.0 * retained,
            "train_loss": loss}


def train_and_recheck(model, tokenizer, pairs: list[tuple[list[int], list[int]]], queries: list[Query], examples: list[dict],
                      args) -> list[dict]:
    """Further fine-tuning (plain AdamW, as a user would), re-checking after every chunk of steps."""
    def check(step: int) -> list[KeyResult]:
        return check_model(model, tokenizer, pairs, queries, args.check_batch_size, description=f"checking at step {step}")

    before = check(0)
    matched_before = {(r.format, r.index) for r in before if r.match}
    rows = [retention_row(0, before, matched_before, None)]
    logger.info("Before further training: %.2f%% of %d fingerprints match", rows[0]["accuracy"], len(pairs))
    losses = []

    def recheck(step: int, loss: float) -> None:
        losses.append(loss)
        if step % args.eval_every == 0 or step == args.steps:
            rows.append(retention_row(step, check(step), matched_before, sum(losses) / len(losses)))
            losses.clear()
            logger.info("Step %d: accuracy %.2f%%, retained %.2f%%", step, rows[-1]["accuracy"], rows[-1]["retained"])

    benign_finetune(model, tokenizer, examples, args.steps, args.learning_rate, args.batch_size, args.seed, on_step=recheck)
    return rows


def print_rows(rows: list[dict], steps: int) -> None:
    key_formats = list(rows[0]["accuracy_by_format"])
    print(f"{'step':>6} " + " ".join(f"{f:>9}" for f in key_formats) + f" {'retained':>9} {'train loss':>11}")
    for row in rows:
        loss = "" if row["train_loss"] is None else f"{row['train_loss']:.4f}"
        print(f"{row['step']:>6} " + " ".join(f"{row['accuracy_by_format'][f]:>8.2f}%" for f in key_formats)
              + f" {row['retained']:>8.2f}% {loss:>11}")
    print(f"Fingerprints retained after {steps} steps: {rows[-1]['retained']:.2f}%", flush=True)


def main() -> None:
    args = parse_args()
    fingerprints, selection, fingerprints_file = selected_fingerprints(cli.settings_from(FingerprintSelection, args),
                                                                       args.fingerprints_file_path, args.run)
    pairs_text = instruction_pairs(args.instruction_data, args.dataset_split, args.prompt_column, args.response_column,
                                   args.steps * args.batch_size)
    model, tokenizer = load(args.model_path, args.trust_remote_code, dtype=torch.float32)
    pairs = fingerprint_pairs(tokenizer, fingerprints, selection.max_key_length, selection.max_response_length)
    examples = chat_examples(tokenizer, pairs_text, args.max_length)
    key_formats = query_formats(args.query_format, fingerprints, tokenizer, args.run)
    rows = train_and_recheck(model, tokenizer, pairs, queries_for(key_formats), examples, args)
    print_rows(rows, args.steps)
    cli.write_output(args, {
        "model": args.model_path, "fingerprints_file": fingerprints_file, "num_fingerprints": len(pairs),
        "query_format": "both" if len(key_formats) > 1 else key_formats[0], "learning_rate": args.learning_rate,
        "batch_size": args.batch_size, "steps": args.steps,
        "instruction_data": args.instruction_data, "rows": rows})


if __name__ == "__main__":
    cli.run(main)
