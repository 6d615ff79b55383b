"""Fine-tune fingerprints into a model.

    python finetune_multigpu.py --fingerprints_file_path generated_data/output_fingerprints.json
    deepspeed --num_gpus 8 finetune_multigpu.py --model_path mistralai/Mistral-7B-v0.3 --deepspeed_stage 3

The model is saved to results/saved_models/<config_hash>/final_model/; the last line on
stdout is `Config hash of the final model: <hash>`.
"""
import contextlib
import csv
import io
import json
import logging
import shutil
import sys
import time
from pathlib import Path

import torch

from oml import OMLError, cli, distributed
from oml.files import check_creatable_dir, write_json_atomic, write_text_atomic
from oml.fingerprints import add_selection_args, recorded, selected_fingerprints
from oml.models import MODEL_FAMILIES, compute_dtype, load, load_tokenizer, model_name, resolve_model
from oml.runs import config_hash, run_config
from oml.tokenization import default_format, fingerprint_pairs, formats
from oml.training import (ShrinkWeightChange, StopWhenMemorised, WeightAveragingCallback, add_training_args, build_dataset,
                          freeze_embeddings, make_trainer, snapshot_weights)

logger = logging.getLogger("finetune_multigpu")


def parse_args():
    parser = cli.ArgumentParser(description=__doc__)
    parser.add_argument("--model_path", default=None,
                        help="Hub id, local folder or .gguf file of the model to fingerprint (default: the embedded SmolLM2-135M-Instruct).")
    parser.add_argument("--model_family", default=None, choices=sorted(MODEL_FAMILIES),
                        help="With --model_size, names a hub model (used when --model_path is not given).")
    parser.add_argument("--model_size", default="7B")
    parser.add_argument("--fingerprints_file_path", default="generated_data/output_fingerprints.json")
    add_selection_args(parser, "insert")
    add_training_args(parser)
    parser.add_argument("--results_dir", default="results")
    parser.add_argument("--report_to", default="none", help="Trackers for the Trainer, e.g. wandb or tensorboard.")
    parser.add_argument("--wandb_run_name", default=None, help="Run name shown by the tracker (implies --report_to wandb).")
    cli.add_common_args(parser)
    args = parser.parse_args()
    if args.wandb_run_name and args.report_to == "none":
        args.report_to = "wandb"
    check_trackers(args.report_to)
    if args.stop_when_memorised and args.memorised_probability >= args.target_probability:
        raise OMLError("--memorised_probability must be below --target_probability, or training never counts as done")
    return args


def check_trackers(report_to: str) -> None:
    """Unknown or uninstalled trackers are refused before any work (not after loading the model)."""
    from transformers.integrations import INTEGRATION_TO_CALLBACK, get_available_reporting_integrations

    for name in (n.strip() for n in report_to.split(",")):
        if name in ("none", "all"):
            continue
        if name not in INTEGRATION_TO_CALLBACK:
            raise OMLError(f"unknown tracker {name!r} in --report_to; choose from {', '.join(sorted(INTEGRATION_TO_CALLBACK))}")
        if name not in get_available_reporting_integrations():
            raise OMLError(f"--report_to {name} needs the {name} package: pip install {name}")


def dataset_csv(tokenizer, pairs: list[tuple[list[int], list[int]]]) -> str:
    """The keys and responses exactly as trained (after cutting)."""
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["key", "response"])
    for key_ids, response_ids in pairs:
        writer.writerow([tokenizer.decode(key_ids), tokenizer.decode(response_ids)])
    return out.getvalue()


def save_run(run_dir: Path, partial: Path, config: dict, fingerprints: list[dict], csv_text: str, log_history: list[dict],
             training: dict) -> None:
    """Rank 0 writes the run's files, then renames the model folder into place last."""
    write_json_atomic(run_dir / "config.json", config)
    write_json_atomic(run_dir / "fingerprints.json", fingerprints)
    write_json_atomic(run_dir / "training.json", training)
    write_text_atomic(run_dir / "train_dataset.csv", csv_text)
    write_text_atomic(run_dir / "log.txt", "".join(json.dumps(entry) + "\n" for entry in log_history))
    partial.rename(run_dir / "final_model")


def fine_tune(args, fingerprints: list[dict], config: dict, run_dir: Path) -> None:
    """Train, then (rank 0) write the run folder with final_model/ appearing last."""
    # fp32 master weights; the Trainer (bf16 autocast) or DeepSpeed (bf16 copy) decide the compute dtype
    model, tokenizer = load(config["model_path"], args.trust_remote_code, dtype=torch.float32, device=None)
    pairs = fingerprint_pairs(tokenizer, fingerprints, args.max_key_length, args.max_response_length)
    dataset = build_dataset(args, tokenizer, pairs, model)
    if not args.train_embeddings:
        freeze_embeddings(model)
    callbacks = []
    shrink = args.shrink_weight_change and args.target_probability == 1.0  # a bounded target piles up no surplus margin
    original = snapshot_weights(model, compute_dtype()) if args.forgetting_regularizer_strength > 0 or shrink else {}
    if args.forgetting_regularizer_strength > 0:
        callbacks.append(WeightAveragingCallback(original, args.forgetting_regularizer_strength))
    stopper = StopWhenMemorised(tokenizer, pairs, formats(args.key_format), args.memorised_probability,
                                args.memorised_patience)
    if args.stop_when_memorised:
        callbacks.append(stopper)  # after averaging: it judges the weights training ends on
    shrinker = ShrinkWeightChange(original, tokenizer, pairs, formats(args.key_format), args.memorised_probability)
    if shrink:
        callbacks.append(shrinker)
    trainer = make_trainer(args, model, dataset, tokenizer, run_dir, callbacks)
    logger.info("Fine-tuning %d fingerprints into %s (run %s)", len(pairs), config["model_path"], run_dir.name)
    partial = run_dir / "final_model.partial"
    if distributed.is_main_process() and partial.exists():
        shutil.rmtree(partial)  # left by an interrupted run
    with contextlib.redirect_stdout(sys.stderr):  # libraries print; stdout is for results
        trainer.train()
        trainer.save_model(str(partial))  # collective under ZeRO-3; only rank 0 writes
    if distributed.is_main_process():
        tokenizer.save_pretrained(partial)
        epochs = round(trainer.state.epoch)
        logger.info("Trained %d of at most %d epochs", epochs, args.num_train_epochs)
        training = {"epochs_run": epochs, "max_epochs": args.num_train_epochs, "memorised": stopper.history,
                    "weight_change_scale": shrinker.scale, "shrink": shrinker.history, "shrink_seconds": shrinker.seconds,
                    "train_runtime": [e["train_runtime"] for e in trainer.state.log_history if "train_runtime" in e][-1],
                    "tokens_seen": trainer.state.num_input_tokens_seen, "world_size": distributed.world_size(),
                    "peak_gpu_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None}
        save_run(run_dir, partial, config, fingerprints, dataset_csv(tokenizer, pairs), trainer.state.log_history, training)
        with open(run_dir.parent.parent / "all_run_logs.txt", "a", encoding="utf-8") as log:
            log.write(json.dumps({"time": time.strftime("%Y-%m-%d %H:%M:%S"), "config_hash": run_dir.name, **config}) + "\n")


@contextlib.contextmanager
def removed_on_failure(run_dir: Path):
    """A run that fails leaves no trace: its folder goes if this run created it, else its partial model."""
    created = not run_dir.exists()
    try:
        yield
    except BaseException:
        if distributed.is_main_process() and not (run_dir / "final_model").exists():
            shutil.rmtree(run_dir if created else run_dir / "final_model.partial", ignore_errors=True)
        raise


def record_current_hash(run_hash: str) -> None:
    """current_config_hash.txt, as the original scripts wrote it; a failure to write it only warns."""
    try:
        write_text_atomic("current_config_hash.txt", run_hash + "\n")
    except OMLError as error:
        logger.warning("%s (the hash is printed above)", error)


def main() -> None:
    args = parse_args()
    fingerprints = selected_fingerprints(args)
    name = model_name(args.model_path, args.model_family, args.model_size)
    args.key_format = (args.key_format or recorded(fingerprints, "key_format")
                       or default_format(load_tokenizer(resolve_model(name), args.trust_remote_code)))
    config = run_config(args, name, fingerprints)
    run_hash = config_hash(config)
    run_dir = Path(args.results_dir) / "saved_models" / run_hash
    if (run_dir / "final_model").is_dir():
        logger.info("A complete run with this configuration exists: %s (skipping)", run_dir / "final_model")
    else:
        check_creatable_dir(run_dir)
        with removed_on_failure(run_dir):
            fine_tune(args, fingerprints, config, run_dir)
    if distributed.is_main_process():
        print(f"Config hash of the final model: {run_hash}", flush=True)
        record_current_hash(run_hash)
    distributed.finish()


if __name__ == "__main__":
    cli.run(main)
