"""A fine-tuning run folder, results/saved_models/<config_hash>/, and the settings it carries.

Fine-tuning records its whole configuration (`config.json`) and the fingerprints it used
(`fingerprints.json`) beside `final_model/`. Every later command takes `--run DIR` and
reads from there what it would otherwise need retyped: the fingerprints, how they were
cut and asked, and the base model. Flags given explicitly still win, with a warning when
they disagree with what the run did.
"""
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from oml import OMLError
from oml.files import read_json
from oml.models import EMBEDDED_MODEL

logger = logging.getLogger(__name__)

# Flags that say where inputs and results are, how progress is reported or how fast the run
# goes: not part of the run's identity (the fingerprints count by the md5 of their contents).
NOT_HASHED = ("local_rank", "report_to", "wandb_run_name", "results_dir", "trust_remote_code", "fingerprints_file_path")
# Settings a check inherits from the run that made the model: (flag of the check, key in config.json).
INHERITED = (("fingerprint_generation_strategy", "fingerprint_generation_strategy"),
             ("max_key_length", "max_key_length"),
             ("max_response_length", "max_response_length"),
             ("query_format", "key_format"))


def run_config(args, model_name: str, fingerprints: list[dict]) -> dict:
    """Everything that determines the fine-tuned model; its md5 names the run."""
    config = {k: v for k, v in vars(args).items() if k not in NOT_HASHED}
    config["model_path"] = model_name
    config["fingerprints_md5"] = hashlib.md5(json.dumps(fingerprints, sort_keys=True).encode()).hexdigest()
    return config


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


def load_run(directory: str | Path) -> Run:
    directory = Path(directory)
    if not directory.is_dir():
        raise OMLError(f"--run {directory} is not a folder (expected results/saved_models/<hash>)")
    config = read_json(directory / "config.json", "run configuration")
    if not isinstance(config, dict) or "model_path" not in config:
        raise OMLError(f"{directory / 'config.json'} is not a run configuration written by finetune_multigpu.py")
    if not (directory / "fingerprints.json").is_file():
        raise OMLError(f"run {directory} has no fingerprints.json")
    return Run(directory, config)


def add_run_arg(parser) -> None:
    parser.add_argument("--run", default=None, type=Path,
                        help="A fine-tuning run folder (results/saved_models/<hash>): supplies the fingerprints, "
                             "their cut and format and the base model, unless given explicitly.")


def inherit_settings(args, run: Run) -> None:
    """Fill the flags the user left out from the run's configuration; warn where given ones disagree."""
    for flag, key in INHERITED:
        recorded = run.config.get(key)
        if recorded is None or not hasattr(args, flag):
            continue
        given = getattr(args, flag)
        if given is None:
            setattr(args, flag, recorded)
        elif given != recorded:
            logger.warning("--%s %s differs from the %s the run %s was fine-tuned with; the check may not see "
                           "what was trained", flag, given, recorded, run.directory.name)


def apply_run(args, fingerprinted_model: bool = False) -> None:
    """Load --run into `args.run`, and fill in from it what the user left out: --model_path when
    the script measures the fingerprinted model itself (the run's final model), and --base_model
    where the script has one (the run's base model, else the embedded model)."""
    args.run = load_run(args.run) if args.run else None
    if fingerprinted_model and args.model_path is None:
        if args.run is None:
            raise OMLError("name the fingerprinted model: --model_path MODEL or --run DIR")
        args.model_path = str(args.run.final_model)
    if getattr(args, "base_model", "") is None:
        args.base_model = args.run.base_model if args.run else EMBEDDED_MODEL
