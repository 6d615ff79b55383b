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


def measured_peak_gflops(size: int = 2048, repeats: int = 5) -> float:
    """This machine's matrix-product rate now (fp32 on CPU, bf16 on GPU), measured in the same run as
    the benchmark so that both see the same load: the best of a few large products."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    a, b = torch.randn(size, size, device=device, dtype=dtype), torch.randn(size, size, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(repeats + 1):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * size ** 3 / best / 1e9


def matmul_parameters(model) -> tuple[int, int]:
    """(parameters that take part in matrix products, those of them that are trained). The input
    embedding is a lookup, not a product, unless it is tied to the output layer."""
    embedding = model.get_input_embeddings().weight
    tied = embedding is model.get_output_embeddings().weight
    matmul = [p for p in model.parameters() if tied or p is not embedding]
    return sum(p.numel() for p in matmul), sum(p.numel() for p in matmul if p.requires_grad)


def forward_gflop(model, tokens: int) -> float:
    """Model FLOPs of a forward pass over `tokens` real (not padding) tokens: 2 per matmul parameter."""
    return 2 * matmul_parameters(model)[0] * tokens / 1e9


def training_gflop(model, tokens: int) -> float:
    """Model FLOPs of training on `tokens` real tokens: forward (2 per matmul parameter), gradients
    of the activations (2 more) and of the trained weights (2 per trained matmul parameter)."""
    matmul, trained = matmul_parameters(model)
    return (4 * matmul + 2 * trained) * tokens / 1e9


def utilisation(gflop: float, seconds: float, peak: float) -> dict:
    """Achieved GFLOP/s and the fraction of the measured peak."""
    rate = gflop / seconds
    return {"gflop_per_s": rate, "fraction_of_peak": rate / peak}


def machine() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start


KEY_TOKENS, RESPONSE_TOKENS = 16, 1  # the fingerprint shape every speed benchmark trains and checks


def random_word_keys(count: int, words_per_key: int = 10, seed: int = 0) -> list[str]:
    return [random_words(rng_for(seed, i, "benchmark"), words_per_key) for i in range(count)]


def save(directory: Path, name: str, result: dict) -> None:
    result = {"machine": machine(), "torch": torch.__version__, **result}
    write_json_atomic(Path(directory) / f"{name}.json", result)
    print(json.dumps(result, indent=2))
