"""A fine-tuning run folder, results/saved_models/<config_hash>/, and the settings it carries.

Fine-tuning records its whole configuration (`config.json`) and the fingerprints it used
(`fingerprints.json`) beside `final_model/`. Every later command takes `--run DIR` and
reads from there what it would otherwise need retyped: the fingerprints, how they were
cut and asked, and the base model. Settings given explicitly still win, with a warning when
they disagree with what the run did.
"""
import contextlib
import csv
import hashlib
import io
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from oml import OMLError, distributed
from oml.commitment import COMMITMENT_FILE, OTHER_RESPONSES, committed_record, read_commitment, write_commitment
from oml.files import read_json, write_json_atomic, write_text_atomic
from oml.fingerprints import FingerprintSelection
from oml.models import EMBEDDED_MODEL
from oml.tokenization import accepted
from oml.training.config import TrainingConfig

logger = logging.getLogger(__name__)


# Settings added after runs were first recorded, with the value every earlier run had: in the config
# (and its hash) only when they differ from it, so that earlier runs' hashes hold and their configs
# read back as what they trained (not as today's default).
ADDED_LATER = {"use_user_wrappers": False, "frozen_layer_fraction": 0.0, "memorised_share": 1.0, "question_replay": 0.0,
               "train_eos": True, "first_reply_weight": 1.0}
# How a computation is arranged, not what it computes (the same model up to float rounding): never hashed.
UNHASHED = ("share_prompt_prefix",)


def run_config(model_name: str, model_family: str | None, model_size: str, selection: FingerprintSelection,
               training: TrainingConfig, fingerprints: list[dict]) -> dict:
    """Everything that determines the fine-tuned model; its md5 names the run. Where inputs and
    results live, trackers and remote code are not part of it: the fingerprints count by the md5
    of their contents. (The keys are those of every run recorded so far, so their hashes hold.)"""
    settings = {k: v for k, v in training.to_dict().items()
                if not (k in ADDED_LATER and v == ADDED_LATER[k]) and k not in UNHASHED}
    return {"model_path": model_name, "model_family": model_family, "model_size": model_size, **selection.to_dict(),
            **settings, "fingerprints_md5": hashlib.md5(json.dumps(fingerprints, sort_keys=True).encode()).hexdigest()}


def config_hash(config: dict) -> str:
    return hashlib.md5(json.dumps(config, sort_keys=True).encode()).hexdigest()


@dataclass
class Run:
    """A finished (or at least configured) fine-tuning run."""
    directory: Path
    config: dict

    @property
    def fingerprints_file(self) -> Path:
        return self.directory / "fingerprints.json"

    @property
    def final_model(self) -> Path:
        return self.directory / "final_model"

    @property
    def base_model(self) -> str:
        """The model the run fingerprinted: the natural null model for a check."""
        return self.config["model_path"]

    @property
    def commitment(self) -> dict | None:
        """The public commitment to the run's fingerprints (root and count), None for a run made before commitments."""
        return read_commitment(self.directory)[0] if (self.directory / COMMITMENT_FILE).is_file() else None

    @property
    def selection(self) -> FingerprintSelection:
        return FingerprintSelection.from_dict(self.config, f"{self.directory / 'config.json'}")

    @property
    def training(self) -> TrainingConfig:
        return TrainingConfig.from_dict({**ADDED_LATER, **self.config}, f"{self.directory / 'config.json'}")


def load_run(directory: str | Path) -> Run:
    """A run folder, its config.json validated like the flags it records (a hand-edited value of the
    wrong type or out of range is refused here, not used)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise OMLError(f"--run {directory} is not a folder (expected results/saved_models/<hash>)")
    config = read_json(directory / "config.json", "run configuration")
    if not isinstance(config, dict) or "model_path" not in config:
        raise OMLError(f"{directory / 'config.json'} is not a run configuration written by finetune_multigpu.py")
    if not isinstance(config["model_path"], str) or not config["model_path"]:
        raise OMLError(f"{directory / 'config.json'}: model_path must be a model name or path, not {config['model_path']!r}")
    if not (directory / "fingerprints.json").is_file():
        raise OMLError(f"run {directory} has no fingerprints.json")
    run = Run(directory, config)
    _ = run.selection, run.training  # validated now, before any work
    return run


def fingerprinted_model(model_path: str | None, run: Run | None) -> str:
    """The model a script that measures the fingerprinted model itself uses: the given one, else the run's."""
    if model_path is not None:
        return model_path
    if run is None:
        raise OMLError("name the fingerprinted model: --model_path MODEL or --run DIR")
    return str(run.final_model)


def base_model(given: str | None, run: Run | None) -> str:
    """The model before fingerprinting: the given one, else the run's base model, else the embedded model."""
    return given or (run.base_model if run else EMBEDDED_MODEL)


def dataset_csv(tokenizer, pairs: list[tuple[list[int], list[int]]]) -> str:
    """The keys and responses exactly as trained (after cutting): train_dataset.csv. Keys with other
    responses add a third column, each key's others as a JSON list (one row per key, so the file
    still reads as the fingerprints); without any, the file is the two columns it always was."""
    header = ["key", "response"]
    rows = [[tokenizer.decode(key_ids), tokenizer.decode(response_ids)] for key_ids, response_ids in pairs]
    others = [[tokenizer.decode(ids) for ids in accepted(response_ids)[1:]] for _, response_ids in pairs]
    if any(others):
        header.append(OTHER_RESPONSES)
        for row, other in zip(rows, others):
            row.append(json.dumps(other, ensure_ascii=False))
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(header)
    writer.writerows(rows)
    return out.getvalue()


def committed_records(tokenizer, pairs: list[tuple[list[int], list[int]]], key_format: str) -> list[dict]:
    """The fingerprints as trained, in run order, as the commitment holds them: the key and response
    text exactly as cut (what a check sends and expects), the other responses as cut when a key has
    some, the format and both token lengths (of the longest response, when a key has several)."""
    records = []
    for key_ids, response_ids in pairs:
        fingerprint = {"key": tokenizer.decode(key_ids), "response": tokenizer.decode(response_ids)}
        others = [tokenizer.decode(ids) for ids in accepted(response_ids)[1:]]
        if others:
            fingerprint[OTHER_RESPONSES] = others
        records.append(committed_record(fingerprint, key_format, len(key_ids), max(map(len, accepted(response_ids)))))
    return records


def save_run(run_dir: Path, partial: Path, config: dict, fingerprints: list[dict], csv_text: str, log_history: list[dict],
             training: dict, committed: list[dict], protocol: dict) -> None:
    """Rank 0 writes the run's files, the commitment (with the `protocol` of its checks) among them, then renames
    the model folder into place last."""
    write_commitment(run_dir, committed, overwrite=True, protocol=protocol)  # a new run: a leftover of an interrupted one is replaced
    write_json_atomic(run_dir / "config.json", config)
    write_json_atomic(run_dir / "fingerprints.json", fingerprints)
    write_json_atomic(run_dir / "training.json", training)
    write_text_atomic(run_dir / "train_dataset.csv", csv_text)
    write_text_atomic(run_dir / "log.txt", "".join(json.dumps(entry) + "\n" for entry in log_history))
    partial.rename(run_dir / "final_model")


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
