"""Command-line plumbing shared by the scripts: parsing, validation, logging, errors, exit codes.

Every user mistake ends the same way: one line on stderr starting with `error:`, exit
code 2, no traceback, and no output file created or changed.
"""
import argparse
import importlib.util
import logging
import math
import os
import sys
from typing import Callable

import torch
from tqdm import tqdm

from oml import OMLError
from oml.distributed import is_main_process
from oml.files import check_writable, write_json_atomic

USER_ERROR_EXIT_CODE = 2


class ArgumentParser(argparse.ArgumentParser):
    """argparse with its errors on one line (argparse prints the whole usage block first)."""

    def __init__(self, **kwargs):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(**kwargs)

    def error(self, message: str):
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(USER_ERROR_EXIT_CODE)


def _number(text: str, kind: type, check: Callable[[float], bool], requirement: str):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or not check(value):
        raise argparse.ArgumentTypeError(f"{text} is not {requirement}")
    return value


# argparse `type=` validators: the error names the flag, and NaN/inf never get through.
def positive_int(text: str) -> int:
    return _number(text, int, lambda v: v >= 1, "an integer >= 1")


def non_negative_int(text: str) -> int:
    return _number(text, int, lambda v: v >= 0, "an integer >= 0")


def positive_float(text: str) -> float:
    return _number(text, float, lambda v: v > 0, "a finite number > 0")


def non_negative_float(text: str) -> float:
    return _number(text, float, lambda v: v >= 0, "a finite number >= 0")


def unit_interval(text: str) -> float:
    return _number(text, float, lambda v: 0 <= v <= 1, "between 0 and 1")


def probability(text: str) -> float:
    return _number(text, float, lambda v: 0 < v <= 1, "a probability in (0, 1]")


def open_unit_interval(text: str) -> float:
    return _number(text, float, lambda v: 0 < v < 1, "strictly between 0 and 1")


def at_least(minimum: int) -> Callable[[str], int]:
    def check(text: str) -> int:
        return _number(text, int, lambda v: v >= minimum, f"an integer >= {minimum}")
    return check


def setup_logging() -> None:
    """Log to stderr so that stdout carries only the results users read (and parse)."""
    level = logging.INFO if is_main_process() else logging.WARNING
    logging.basicConfig(level=level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Quieten libraries that log at INFO on every call.
    for name in ("transformers", "accelerate", "DeepSpeed", "deepspeed", "torch.distributed", "httpx", "datasets"):
        logging.getLogger(name).setLevel(logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not torch.cuda.is_available():  # else DeepSpeed announces its CPU fallback on stdout
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


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


def add_output_args(parser, what: str = "the full report") -> None:
    """--output_json and --overwrite, which every script that writes a report takes."""
    parser.add_argument("--output_json", default=None, help=f"Write {what} to this JSON file (atomically).")
    parser.add_argument("--overwrite", action="store_true", help="Replace an existing --output_json.")


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
