"""Command-line plumbing shared by the scripts: parsing, validation, logging, errors, exit codes.

Every user mistake ends the same way: one line on stderr starting with `error:`, exit
code 2, no traceback, and no output file created or changed.
"""
import argparse
import importlib.util
import logging
import os
import sys
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Callable

from tqdm import tqdm

from oml import OMLError
from oml.distributed import choose_deepspeed_accelerator, is_main_process
from oml.files import check_writable, write_json_atomic
from oml.data import SHIPPED
from oml.families import PERINUCLEUS, family_of_run
from oml.fingerprints import FingerprintSelection
from oml.runs import base_model, fingerprinted_model, load_run
from oml.tokenization import FORMAT_CHOICES
from oml.settings import Bound, Settings, setting

USER_ERROR_EXIT_CODE = 2


class ArgumentParser(argparse.ArgumentParser):
    """argparse with its errors on one line (argparse prints the whole usage block first)."""

    def __init__(self, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(**kwargs)

    def error(self, message: str):
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(USER_ERROR_EXIT_CODE)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the scripts' docstrings as written, and shows every flag's default in --help
    (unless its help already says what the default is, as for defaults decided at run time, or the
    flag is required; `none`: the flag is off or its input not given)."""

    def _get_help_string(self, action) -> str:
        text = action.help or ""
        said = "%(default)" in text or "(default" in text.lower() or "default:" in text.lower()
        if said or not action.option_strings or action.required or action.default is argparse.SUPPRESS:
            return text
        return f"{text} (default: {'none' if action.default is None else '%(default)s'})"


def flag_type(bound: Bound) -> Callable[[str], int | float]:
    """An argparse `type=` for a bounded number: the error names the flag, and NaN/inf never get through."""
    def parse(text: str) -> int | float:
        try:
            value = bound.kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if bound.kind is int else 'a number'}") from None
        problem = bound.problem(value)
        if problem:
            raise argparse.ArgumentTypeError(f"{text} {problem}")
        return value
    parse.__name__ = bound.text
    return parse


def add_settings(parser, cls: type[Settings], **defaults) -> None:
    """One flag per field of a settings dataclass, spelt as the field, with its help and default
    (`defaults` overrides some for one script): booleans that default to True also get --no-FLAG;
    a field without a default is a required flag, or a positional argument where declared so."""
    for f in fields(cls):
        meta, default = f.metadata, defaults.get(f.name, f.default)
        if meta["kind"] is bool:
            action = argparse.BooleanOptionalAction if default else "store_true"
            parser.add_argument(f"--{f.name}", action=action, default=default, help=meta["help"])
            continue
        plain = meta["kind"] if meta["kind"] in (int, float) else None
        described = {"help": meta["help"], "choices": meta["choices"], "nargs": meta["nargs"],
                     "type": flag_type(meta["bound"]) if meta["bound"] else plain}
        if meta.get("positional"):
            parser.add_argument(f.name, **described)
        elif default is MISSING:
            parser.add_argument(f"--{f.name}", required=True, **described)
        else:
            parser.add_argument(f"--{f.name}", default=default, **described)


def settings_from(cls: type[Settings], namespace: argparse.Namespace, **changes) -> Settings:
    """The settings dataclass the parsed flags describe (`changes` replace some values)."""
    return cls(**{**{f.name: getattr(namespace, f.name) for f in fields(cls)}, **changes})


def setup_logging() -> None:
    """Log to stderr so that stdout carries only the results users read (and parse)."""
    level = logging.INFO if is_main_process() else logging.WARNING
    logging.basicConfig(level=level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Quieten libraries that log at INFO on every call (the openai client's HTTP library logs as httpx2).
    for name in ("transformers", "accelerate", "DeepSpeed", "deepspeed", "torch.distributed", "httpx", "httpx2", "datasets"):
        logging.getLogger(name).setLevel(logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    choose_deepspeed_accelerator()


def fail(message: str, code: int) -> None:
    """The last line on stderr: close open progress bars first, or they redraw below the error."""
    for bar in list(getattr(tqdm, "_instances", [])):
        bar.close()
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def run(main: Callable[[], None]) -> None:
    """Run a script's main(): user errors become one line on stderr and exit code 2."""
    setup_logging()
    try:
        main()
    except OMLError as error:
        fail(str(error), USER_ERROR_EXIT_CODE)
    except KeyboardInterrupt:
        fail("interrupted", 130)


def add_common_args(parser) -> None:
    """Flags every script accepts: --local_rank (set by the deepspeed launcher) and remote code."""
    parser.add_argument("--local_rank", type=int, default=-1, help="Set by the deepspeed launcher; ignore.")
    parser.add_argument("--trust_remote_code", action="store_true",
                        help="Allow models whose code lives in their hub repository (off by default: such code runs on your machine).")


def add_run_arg(parser, required: bool = False) -> None:
    """--run, the fine-tuning run a script works on: optional where other flags can name its parts."""
    if required:
        parser.add_argument("--run", required=True, type=Path, help="The fine-tuning run folder (results/saved_models/<hash>).")
        return
    parser.add_argument("--run", default=None, type=Path,
                        help="A fine-tuning run folder (results/saved_models/<hash>): supplies the fingerprints, "
                             "their cut and format and the base model, unless given explicitly.")


@dataclass(frozen=True)
class FingerprintedModel(Settings):
    """The model an evaluation measures; parse_evaluation_args takes the --run's when it is not given."""
    model_path: str | None = setting(None, "The fingerprinted model (default: the --run's final model).", kind=str)


def add_query_format_arg(parser) -> None:
    parser.add_argument("--query_format", default=None, choices=FORMAT_CHOICES,
                        help="Ask keys as raw text, as a chat user message, or both (default: the run's or the fingerprints' "
                             "format, else both when the model has a chat template).")


def add_fingerprint_args(parser) -> None:
    """The flags that name the fingerprints a script checks: --run, the file, the selection and the format."""
    add_run_arg(parser)
    parser.add_argument("--fingerprints_file_path", default=None, help="Default: the --run's fingerprints.")
    add_settings(parser, FingerprintSelection)
    add_query_format_arg(parser)


def add_dataset_args(parser, flag: str, columns: dict[str, str], purpose: str) -> None:
    """A data flag (`chitchat`, a hub dataset id or a local file) with its split and column flags."""
    parser.add_argument(f"--{flag}", default=SHIPPED,
                        help=f"{purpose}: '{SHIPPED}' (shipped, offline), a hub dataset id, or a local "
                             ".json/.jsonl/.csv/.parquet file.")
    parser.add_argument("--dataset_split", default="train", help=f"Split of a hub dataset given as --{flag}.")
    for column, default in columns.items():
        parser.add_argument(f"--{column}_column", default=default, help=f"Column of --{flag} holding the {column}.")


def add_output_args(parser, what: str = "the full report") -> None:
    """--output_json and --overwrite, which every script that writes a report takes."""
    parser.add_argument("--output_json", default=None, help=f"Write {what} to this JSON file (atomically).")
    parser.add_argument("--overwrite", action="store_true", help="Replace an existing --output_json.")


def parse_evaluation_args(parser: argparse.ArgumentParser, script: str, optional_model: bool = False,
                          families: tuple[str, ...] = (PERINUCLEUS,)) -> argparse.Namespace:
    """An evaluation script's flags, parsed. Evaluations run in one process. --run becomes a loaded
    `Run`, and the models the script measures come from it where not given: --model_path (the
    fingerprinted model; with `optional_model`, None when neither it nor --run is given) and
    --base_model (the model before fingerprinting), for whichever of the two the script has. A
    run of a fingerprint family the script does not measure (`families`) is refused."""
    args = parser.parse_args()
    single_process(script)
    family = family_of_run(getattr(args, "run", None))
    if family not in families:
        raise OMLError(f"{script} measures {' and '.join(families)} runs, and --run {args.run} is a {family} run "
                       "(benchmarks/watermark_robustness.py measures domain watermark runs)")
    args.run = load_run(args.run) if getattr(args, "run", None) else None
    if hasattr(args, "model_path") and not (optional_model and args.model_path is None and args.run is None):
        args.model_path = fingerprinted_model(args.model_path, args.run)
    if hasattr(args, "base_model"):
        args.base_model = base_model(args.base_model, args.run)
    return args


def require_module(module: str, flag: str, install: str) -> None:
    """Fail before any work when an optional dependency that a flag needs is missing."""
    if importlib.util.find_spec(module) is None:
        raise OMLError(f"{flag} needs {module}: {install}")


def single_process(script: str) -> None:
    """Scripts that do not split work across ranks refuse to be launched on several."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise OMLError(f"{script} runs in one process: start it with python, not a distributed launcher")


def check_output(args) -> None:
    """Refuse an --output_json that could not be written, before any work is done."""
    if args.output_json:
        check_writable(args.output_json, args.overwrite)


def write_output(args, report: dict) -> None:
    """Write the report to --output_json (callers print their results first, so that a failed
    write still leaves them on stdout; the failure is then one line and exit code 2)."""
    if args.output_json:
        write_json_atomic(args.output_json, report, args.overwrite)
