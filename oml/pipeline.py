"""The Python API: generating fingerprints, fingerprinting a model and checking a suspect, as
functions over the typed settings. The three scripts are thin command-line fronts to these.

    import oml

    fingerprints = oml.generate_fingerprints(oml.GenerationConfig(num_fingerprints=16, random_word_generation=True))
    # ... write them to a JSON file, then:
    run = oml.fingerprint_model("fingerprints.json", training=oml.TrainingConfig(num_train_epochs=5))
    report = oml.check_suspect(str(run.final_model), run=run)
    print(report.verdict, report.p_value)

Every function validates its settings before any slow work; a problem is an `oml.OMLError` with a
one-line message. Under a distributed launcher every rank calls them; only rank 0 writes files.
"""
import contextlib
import json
import logging
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from oml import OMLError, distributed
from oml.checking import KeyResult, accuracy, check_named_model, queries_for
from oml.data import prompt_templates
from oml.files import check_creatable_dir
from oml.fingerprints import FingerprintSelection, query_formats, recorded, selected_fingerprints
from oml.models import EMBEDDED_MODEL, compute_dtype, load, load_tokenizer, model_name, resolve_model
from oml.remote import ApiConfig, api_requests, check_over_api
from oml.runs import Run, config_hash, dataset_csv, load_run, removed_on_failure, run_config, save_run
from oml.stats import VerdictConfig, evidence, keys_needed
from oml.tokenization import default_format, fingerprint_pairs, formats
from oml.training.callbacks import MemorisationProbe, ShrinkWeightChange, StopWhenMemorised, WeightAveragingCallback
from oml.training.config import TrainingConfig
from oml.training.dataset import build_dataset
from oml.training.trainer import make_trainer
from oml.training.weights import freeze_embeddings, snapshot_weights

logger = logging.getLogger(__name__)


def fingerprint_model(fingerprints: str | Path | list[dict], model_path: str | None = None,
                      selection: FingerprintSelection = FingerprintSelection(), training: TrainingConfig = TrainingConfig(),
                      results_dir: str | Path = "results", model_family: str | None = None, model_size: str = "7B",
                      report_to: str = "none", run_name: str | None = None, trust_remote_code: bool = False) -> Run:
    """Fine-tune the fingerprints `selection` picks from a fingerprints file (or a list of records) into
    `model_path` (default: the embedded model). The run goes to `results_dir`/saved_models/<hash of its configuration>/; a
    complete run with the same configuration is returned as it is, without training again."""
    run, fingerprints = planned_run(fingerprints, model_path, selection, training, results_dir, model_family, model_size,
                                    trust_remote_code)
    if run.final_model.is_dir():
        logger.info("A complete run with this configuration exists: %s (skipping)", run.final_model)
        return run
    check_creatable_dir(run.directory)
    with removed_on_failure(run.directory):
        train_and_save(run, fingerprints, report_to, run_name, trust_remote_code)
    return run


def planned_run(fingerprints_file: str | Path | list[dict], model_path: str | None, selection: FingerprintSelection,
                training: TrainingConfig, results_dir: str | Path, model_family: str | None = None, model_size: str = "7B",
                trust_remote_code: bool = False) -> tuple[Run, list[dict]]:
    """The run these settings make (its configuration fully resolved, so its hash names it) and the
    fingerprints it trains, before any training."""
    fingerprints, selection, _ = selected_fingerprints(selection, fingerprints_file)
    name = model_name(model_path, model_family, model_size)
    key_format = (training.key_format or recorded(fingerprints, "key_format")
                  or default_format(load_tokenizer(resolve_model(name), trust_remote_code)))
    config = run_config(name, model_family, model_size, selection, training.updated(key_format=key_format), fingerprints)
    return Run(Path(results_dir) / "saved_models" / config_hash(config), config), fingerprints


def train_and_save(run: Run, fingerprints: list[dict], report_to: str = "none", run_name: str | None = None,
                   trust_remote_code: bool = False) -> None:
    """Train as the run's configuration says, then (rank 0) write the run folder with final_model/ appearing last."""
    selection, training = run.selection, run.training
    # fp32 master weights; the Trainer (bf16 autocast) or DeepSpeed (bf16 copy) decide the compute dtype
    model, tokenizer = load(run.base_model, trust_remote_code, dtype=torch.float32, device=None)
    pairs = fingerprint_pairs(tokenizer, fingerprints, selection.max_key_length, selection.max_response_length)
    dataset = build_dataset(training, tokenizer, pairs, model)
    if not training.train_embeddings:
        freeze_embeddings(model)
    original = snapshot_weights(model, compute_dtype()) if training.forgetting_regularizer_strength > 0 or training.shrinks else {}
    probe = MemorisationProbe(tokenizer, pairs, formats(training.key_format), training.memorised_probability)
    stopper, shrinker = StopWhenMemorised(probe, training.memorised_patience), ShrinkWeightChange(original, probe)
    callbacks = []
    if training.forgetting_regularizer_strength > 0:
        callbacks.append(WeightAveragingCallback(original, training.forgetting_regularizer_strength))
    if training.stop_when_memorised:
        callbacks.append(stopper)  # after averaging: it judges the weights training ends on
    if training.shrinks:
        callbacks.append(shrinker)
    trainer = make_trainer(training, model, dataset, tokenizer, run.directory, callbacks, report_to, run_name)
    logger.info("Fine-tuning %d fingerprints into %s (run %s)", len(pairs), run.base_model, run.directory.name)
    partial = run.directory / "final_model.partial"
    if distributed.is_main_process() and partial.exists():
        shutil.rmtree(partial)  # left by an interrupted run
    with contextlib.redirect_stdout(sys.stderr):  # libraries print; stdout is for results
        trainer.train()
        trainer.save_model(str(partial))  # collective under ZeRO-3; only rank 0 writes
    if distributed.is_main_process():
        tokenizer.save_pretrained(partial)
        epochs = round(trainer.state.epoch)
        logger.info("Trained %d of at most %d epochs", epochs, training.num_train_epochs)
        summary = {"epochs_run": epochs, "max_epochs": training.num_train_epochs, "memorised": stopper.history,
                   "weight_change_scale": shrinker.scale, "shrink": shrinker.history, "shrink_seconds": shrinker.seconds,
                   "train_runtime": [e["train_runtime"] for e in trainer.state.log_history if "train_runtime" in e][-1],
                   "tokens_seen": trainer.state.num_input_tokens_seen, "world_size": distributed.world_size(),
                   "peak_gpu_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None}
        save_run(run.directory, partial, run.config, fingerprints, dataset_csv(tokenizer, pairs), trainer.state.log_history, summary)
        with open(run.directory.parent.parent / "all_run_logs.txt", "a", encoding="utf-8") as log:
            log.write(json.dumps({"time": time.strftime("%Y-%m-%d %H:%M:%S"), "config_hash": run.directory.name, **run.config}) + "\n")


@dataclass
class CheckReport:
    """What a check found: per key format and overall, the verdict, and every per-key result.
    `to_dict()` is the JSON report that check_fingerprints.py --output_json writes."""
    model: str
    fingerprints_file: str
    format: str  # the format the verdict rests on (the smallest p-value)
    num_fingerprints: int
    accuracy: float
    fractional_accuracy: float
    matches: int
    null_models: list[dict]
    chance_rate: float
    formats: list[dict]
    log10_p_value: float
    p_value: float
    verdict: str
    system_prompts: list[dict]
    min_chance_rate: float
    alpha: float
    keys_needed: int | None
    results: list[KeyResult] = field(default_factory=list)
    fingerprints: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        report = {name: value for name, value in asdict(self).items() if name not in ("results", "fingerprints")}
        report["keys"] = [{**self.fingerprints[r.index], **r.to_dict()} for r in self.results]
        return report


def check_suspect(suspect: str | ApiConfig, fingerprints_file: str | Path | list[dict] | None = None, run: Run | str | Path | None = None,
                  selection: FingerprintSelection = FingerprintSelection(), query_format: str | None = None,
                  system_prompts: str | None = None, null_models: list[str] | None = None,
                  verdict: VerdictConfig = VerdictConfig(), batch_size: int = 64, tokenizer: str | None = None,
                  trust_remote_code: bool = False) -> CheckReport:
    """Ask a suspect (a model name or path, or a server as `ApiConfig`) every selected key in every
    format, and the null models (default: the run's base model, else the embedded model; [] for
    none) the bare keys, and weigh the evidence. Settings left None come from `run` (a `Run` or its
    folder), else from the fingerprints. `system_prompts` ('test', 'train' or a JSON file) also asks
    every key inside each template. `tokenizer` cuts the keys for an API suspect (default: the run's
    base model's, else the embedded model's)."""
    run = load_run(run) if isinstance(run, (str, Path)) else run
    fingerprints, selection, fingerprints_file = selected_fingerprints(selection, fingerprints_file, run)
    templates = [None] + (prompt_templates(system_prompts) if system_prompts else [])
    null_models = [run.base_model if run else EMBEDDED_MODEL] if null_models is None else null_models
    if isinstance(suspect, ApiConfig):
        if not suspect.api_base or not suspect.api_model:
            raise OMLError("an API suspect needs --api_base URL and --api_model NAME")
        owner_tokenizer = load_tokenizer(resolve_model(tokenizer or (run.base_model if run else None)), trust_remote_code)
        key_formats = query_formats(query_format, fingerprints, None, run)
        pairs = fingerprint_pairs(owner_tokenizer, fingerprints, selection.max_key_length, selection.max_response_length)
        results = check_over_api(suspect, api_requests(owner_tokenizer, pairs, queries_for(key_formats, templates)))
        name = f"{suspect.api_base} ({suspect.api_model})"
    else:
        key_formats = query_formats(query_format, fingerprints, load_tokenizer(resolve_model(suspect), trust_remote_code), run)
        distributed.init()
        results = check_named_model(suspect, fingerprints, selection, queries_for(key_formats, templates), batch_size,
                                    suspect=True, trust_remote_code=trust_remote_code)
        name = suspect
    nulls = {null: check_named_model(null, fingerprints, selection, queries_for(key_formats), batch_size,
                                     trust_remote_code=trust_remote_code) for null in null_models}
    return CheckReport(
        model=name, fingerprints_file=fingerprints_file, **evidence(results, nulls, key_formats, verdict),
        system_prompts=[{"format": f, "template": t,
                         "accuracy": accuracy([r for r in results if r.format == f and r.template == t and r.error is None])[0]}
                        for f in key_formats for t in templates],
        min_chance_rate=verdict.min_chance_rate, alpha=verdict.alpha,
        keys_needed=keys_needed(verdict.alpha, verdict.min_chance_rate, len(nulls)), results=results, fingerprints=fingerprints)
