"""Fine-tune fingerprints into a model.

    python finetune_multigpu.py --fingerprints_file_path generated_data/output_fingerprints.json
    deepspeed --num_gpus 8 finetune_multigpu.py --model_path mistralai/Mistral-7B-v0.3 --deepspeed_stage 3

The model is saved to results/saved_models/<config_hash>/final_model/; the last line on
stdout is `Config hash of the final model: <hash>`.
"""
import argparse
import contextlib
import csv
import hashlib
import io
import json
import logging
import shutil
import sys
import time
from pathlib import Path

import torch
from transformers import Trainer, TrainingArguments

from oml import OMLError, cli, distributed
from oml.data import benign_texts, prompt_templates
from oml.files import write_json_atomic, write_text_atomic
from oml.fingerprints import add_selection_args, selected_fingerprints
from oml.models import MODEL_FAMILIES, compute_dtype, load_model, load_tokenizer, resolve_model
from oml.tokenization import FingerprintCollator, encode, fingerprint_pairs, special_prefix
from oml.training import (EpochCallback, FingerprintDataset, DistillationTrainer, WeightAveragingCallback, benign_replay,
                          deepspeed_config, distilled_replay, freeze_embeddings, snapshot_weights, uses_deepspeed)

logger = logging.getLogger("finetune_multigpu")

MAX_REPLAY_POOL = 4096  # distinct benign replay sequences (reused cyclically beyond this)
# Flags that name where inputs and results are or how progress is reported: not part of the
# run's identity (the fingerprints are identified by the md5 of their contents).
NOT_HASHED = ("local_rank", "report_to", "wandb_run_name", "results_dir", "trust_remote_code", "fingerprints_file_path")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_path", default=None,
                        help="Hub id or local folder of the model to fingerprint (default: the embedded SmolLM2-135M-Instruct).")
    parser.add_argument("--model_family", default=None, choices=sorted(MODEL_FAMILIES),
                        help="With --model_size, names a hub model (used when --model_path is not given).")
    parser.add_argument("--model_size", default="7B")
    parser.add_argument("--fingerprints_file_path", default="generated_data/output_fingerprints.json")
    add_selection_args(parser, "insert")
    parser.add_argument("--learning_rate", type=float, default=1e-4)
    parser.add_argument("--num_train_epochs", type=int, default=10)
    parser.add_argument("--batch_size", type=int, default=8, help="Fingerprints per step on each rank.")
    parser.add_argument("--weight_decay", type=float, default=1e-4)
    parser.add_argument("--forgetting_regularizer_strength", type=float, default=0.0,
                        help="At every epoch end, weights <- (1-s)*trained + s*original: 1.0 keeps the original, 0.0 disables averaging.")
    parser.add_argument("--train_embeddings", action="store_true",
                        help="Also train the token embeddings (frozen by default: updating them shifts every token, "
                             "which costs far more utility than it buys in fingerprint accuracy).")
    parser.add_argument("--benign_ratio", type=float, default=1.0,
                        help="Benign chat sequences replayed per fingerprint each epoch (an anti-forgetting regulariser; 0: none).")
    parser.add_argument("--benign_loss", default="distill", choices=("distill", "lm"),
                        help="Replayed text is learned towards the untouched model's own next-token distributions "
                             "('distill': keeps predictions close to the base) or with the language-modelling loss "
                             "('lm': adapts the model to the replayed text).")
    parser.add_argument("--use_augmentation_prompts", action="store_true",
                        help="Wrap each key in a random training system prompt every epoch (robustness to system prompts).")
    parser.add_argument("--deepspeed_stage", type=int, default=2, choices=(0, 1, 2, 3),
                        help="ZeRO stage on GPUs or several ranks (0: no DeepSpeed).")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--results_dir", default="results")
    parser.add_argument("--report_to", default="none", help="Trackers for the Trainer, e.g. wandb or tensorboard.")
    parser.add_argument("--wandb_run_name", default=None, help="Run name shown by the tracker.")
    cli.add_common_args(parser)
    return parser


def parse_args() -> argparse.Namespace:
    args = build_parser().parse_args()
    for name in ("max_key_length", "max_response_length", "num_train_epochs", "batch_size"):
        if getattr(args, name) < 1:
            raise OMLError(f"--{name} must be >= 1")
    if not 0.0 <= args.forgetting_regularizer_strength <= 1.0:
        raise OMLError("--forgetting_regularizer_strength must be between 0 and 1")
    if args.benign_ratio < 0:
        raise OMLError("--benign_ratio must be >= 0")
    return args


def benign_sequences(tokenizer, count: int, length: int = 32) -> list[list[int]]:
    """`count` benign chat texts of `length` tokens: the training split, disjoint from evaluation."""
    sequences = []
    for text in benign_texts("train"):
        ids = (special_prefix(tokenizer) + encode(tokenizer, text[:8 * length]))[:length]  # 8 characters a token is plenty
        if len(ids) == length:
            sequences.append(ids)
        if len(sequences) == count:
            break
    return sequences


def build_dataset(args: argparse.Namespace, tokenizer, pairs: list[tuple[list[int], list[int]]], model) -> FingerprintDataset:
    """Fingerprints (in augmentation templates if asked) plus benign replay (labelled by `model`
    itself, before any training, with --benign_loss distill)."""
    templates = prompt_templates("train") if args.use_augmentation_prompts else None
    benign_per_epoch = round(args.benign_ratio * len(pairs))
    benign = None
    if benign_per_epoch:
        pool = benign_sequences(tokenizer, min(benign_per_epoch * args.num_train_epochs, MAX_REPLAY_POOL))
        benign = distilled_replay(model, pool) if args.benign_loss == "distill" else benign_replay(pool)
    return FingerprintDataset(tokenizer, pairs, templates, args.seed, benign, benign_per_epoch)


def run_config(args: argparse.Namespace, model_path: str, fingerprints: list[dict]) -> dict:
    """Everything that determines the fine-tuned model; its md5 names the run."""
    config = {k: v for k, v in vars(args).items() if k not in NOT_HASHED}
    config["model_path"] = model_path
    config["fingerprints_md5"] = hashlib.md5(json.dumps(fingerprints, sort_keys=True).encode()).hexdigest()
    return config


def config_hash(config: dict) -> str:
    return hashlib.md5(json.dumps(config, sort_keys=True).encode()).hexdigest()


def training_arguments(args: argparse.Namespace, run_dir: Path) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(run_dir),
        per_device_train_batch_size=args.batch_size,
        num_train_epochs=args.num_train_epochs,
        learning_rate=args.learning_rate,
        weight_decay=args.weight_decay,
        lr_scheduler_type="constant",
        save_strategy="no",
        logging_steps=1,
        report_to=args.report_to,
        run_name=args.wandb_run_name,
        seed=args.seed,
        bf16=torch.cuda.is_available(),
        use_cpu=not torch.cuda.is_available(),
        deepspeed=deepspeed_config(args.deepspeed_stage) if uses_deepspeed(args.deepspeed_stage) else None,
        remove_unused_columns=False,
        dataloader_num_workers=0,
    )


def dataset_csv(tokenizer, pairs: list[tuple[list[int], list[int]]]) -> str:
    """The keys and responses exactly as trained (after cutting)."""
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["key", "response"])
    for key_ids, response_ids in pairs:
        writer.writerow([tokenizer.decode(key_ids), tokenizer.decode(response_ids)])
    return out.getvalue()


def save_run(run_dir: Path, partial: Path, config: dict, fingerprints: list[dict], csv_text: str, log_history: list[dict]) -> None:
    """Rank 0 writes the run's files, then renames the model folder into place last."""
    write_json_atomic(run_dir / "config.json", config)
    write_json_atomic(run_dir / "fingerprints.json", fingerprints)
    write_text_atomic(run_dir / "train_dataset.csv", csv_text)
    write_text_atomic(run_dir / "log.txt", "".join(json.dumps(entry) + "\n" for entry in log_history))
    partial.rename(run_dir / "final_model")


def fine_tune(args: argparse.Namespace, model_path: str, fingerprints: list[dict], config: dict, run_dir: Path) -> None:
    """Train, then (rank 0) write the run folder with final_model/ appearing last."""
    tokenizer = load_tokenizer(model_path, args.trust_remote_code)
    pairs = fingerprint_pairs(tokenizer, fingerprints, args.max_key_length, args.max_response_length)
    model = load_model(model_path, trust_remote_code=args.trust_remote_code)
    dataset = build_dataset(args, tokenizer, pairs, model)
    if not args.train_embeddings:
        freeze_embeddings(model)
    callbacks = [EpochCallback(dataset)]
    if args.forgetting_regularizer_strength > 0:
        original = snapshot_weights(model, compute_dtype())
        callbacks.append(WeightAveragingCallback(original, args.forgetting_regularizer_strength))
    trainer_class = DistillationTrainer if args.benign_loss == "distill" else Trainer
    trainer = trainer_class(model=model, args=training_arguments(args, run_dir), train_dataset=dataset,
                            data_collator=FingerprintCollator(tokenizer), callbacks=callbacks)
    logger.info("Fine-tuning %d fingerprints into %s (run %s)", len(pairs), model_path, run_dir.name)
    partial = run_dir / "final_model.partial"
    if distributed.is_main_process() and partial.exists():
        shutil.rmtree(partial)  # left by an interrupted run
    with contextlib.redirect_stdout(sys.stderr):  # the Trainer prints its logs; stdout is for results
        trainer.train()
        trainer.save_model(str(partial))  # collective under ZeRO-3; only rank 0 writes
    if distributed.is_main_process():
        tokenizer.save_pretrained(partial)
        save_run(run_dir, partial, config, fingerprints, dataset_csv(tokenizer, pairs), trainer.state.log_history)
        with open(run_dir.parent.parent / "all_run_logs.txt", "a", encoding="utf-8") as log:
            log.write(json.dumps({"time": time.strftime("%Y-%m-%d %H:%M:%S"), "config_hash": run_dir.name, **config}) + "\n")


def main() -> None:
    args = parse_args()
    fingerprints = selected_fingerprints(args)
    model_path = resolve_model(args.model_path, args.model_family, args.model_size)
    config = run_config(args, model_path, fingerprints)
    run_hash = config_hash(config)
    run_dir = Path(args.results_dir) / "saved_models" / run_hash
    if (run_dir / "final_model").is_dir():
        logger.info("A complete run with this configuration exists: %s (skipping)", run_dir / "final_model")
    else:
        fine_tune(args, model_path, fingerprints, config, run_dir)
    if distributed.is_main_process():
        write_text_atomic("current_config_hash.txt", run_hash + "\n")
        print(f"Config hash of the final model: {run_hash}", flush=True)
    distributed.finish()


if __name__ == "__main__":
    cli.run(main)
