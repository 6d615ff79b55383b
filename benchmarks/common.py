"""Helpers shared by the benchmark scripts (not part of the product).

Every benchmark has a `--smoke` mode: a tiny random model with the embedded model's
tokenizer and a handful of keys, so that the test suite runs each one in seconds and a
benchmark cannot silently stop working between real measurements.
"""
import argparse
import json
import platform
import tempfile
import time
from functools import lru_cache
from pathlib import Path

import torch

from oml.files import write_json_atomic
from oml.generation import random_words, rng_for
from oml.models import TINY_LLAMA, load_tokenizer, resolve_model, save_random_model

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "results" / "benchmarks"


def benchmark_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="A tiny random model and a few keys: checks that the benchmark runs.")
    parser.add_argument("--results_dir", type=Path, default=RESULTS, help="Where the JSON result goes.")
    return parser


@lru_cache(maxsize=None)
def tiny_model() -> str:
    """A 2-layer random Llama with the embedded tokenizer, made once per process."""
    directory = Path(tempfile.mkdtemp(prefix="oml-smoke-")) / "tiny"
    return str(save_random_model(directory, load_tokenizer(resolve_model(None)), TINY_LLAMA))


def benchmark_model(smoke: bool) -> str:
    """The model a benchmark measures: the embedded model, or a tiny one for --smoke."""
    return tiny_model() if smoke else resolve_model(None)


def machine() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start


def random_word_keys(count: int, words_per_key: int = 10, seed: int = 0) -> list[str]:
    return [random_words(rng_for(seed, i, "benchmark"), words_per_key) for i in range(count)]


def save(directory: Path, name: str, result: dict) -> None:
    result = {"machine": machine(), "torch": torch.__version__, **result}
    write_json_atomic(Path(directory) / f"{name}.json", result)
    print(json.dumps(result, indent=2))
