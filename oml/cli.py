"""Command-line plumbing shared by the scripts: logging, error reporting, exit codes."""
import logging
import os
import sys
from typing import Callable

import torch

from oml import OMLError
from oml.distributed import is_main_process

USER_ERROR_EXIT_CODE = 2


def setup_logging() -> None:
    """Log to stderr so that stdout carries only the results users read (and parse)."""
    level = logging.INFO if is_main_process() else logging.WARNING
    logging.basicConfig(level=level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Quieten libraries that log at INFO on every call.
    for name in ("transformers", "accelerate", "DeepSpeed", "deepspeed", "torch.distributed"):
        logging.getLogger(name).setLevel(logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not torch.cuda.is_available():  # else DeepSpeed announces its CPU fallback on stdout
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def run(main: Callable[[], None]) -> None:
    """Run a script's main(): user errors become one line on stderr and exit code 2."""
    setup_logging()
    try:
        main()
    except OMLError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(USER_ERROR_EXIT_CODE)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)


def add_common_args(parser) -> None:
    """Flags every script accepts: --local_rank (set by the deepspeed launcher) and remote code."""
    parser.add_argument("--local_rank", type=int, default=-1, help="Set by the deepspeed launcher; ignore.")
    parser.add_argument("--trust_remote_code", action="store_true",
                        help="Allow models whose code lives in their hub repository (off by default: such code runs on your machine).")
