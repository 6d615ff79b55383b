"""Helpers shared by the benchmark scripts (not part of the product)."""
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from oml.files import write_json_atomic  # noqa: E402
from oml.generation import random_words, rng_for  # noqa: E402

RESULTS = Path(__file__).resolve().parent.parent / "results" / "benchmarks"


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


def save(name: str, result: dict) -> None:
    result = {"machine": machine(), "torch": torch.__version__, **result}
    write_json_atomic(RESULTS / f"{name}.json", result)
    print(json.dumps(result, indent=2))
