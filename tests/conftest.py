"""Shared fixtures: the real SmolLM2 tokenizer and tiny randomly initialised models built on it."""
import contextlib
import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from oml.distributed import free_port
from oml.models import TINY_LLAMA, load_tokenizer, resolve_model, save_random_model

ROOT = Path(__file__).resolve().parent.parent
# The tiny model has 2 layers, and the default --frozen_layer_fraction 0.5 would train only one: tests
# of other mechanisms that need it to learn train every layer (test_finetune tests the default).
EVERY_LAYER = ("--frozen_layer_fraction", "0")


def pytest_collection_modifyitems(items) -> None:
    """Tests that start two ranks or a server are slow too: `pytest -m "not slow"` (the development loop) leaves them out."""
    for item in items:
        if item.get_closest_marker("distributed") or item.get_closest_marker("server"):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def embedded_model() -> str:
    """Path of the embedded model's safetensors checkpoint (converted once, then cached)."""
    return resolve_model(None)


@pytest.fixture(scope="session")
def tokenizer(embedded_model):
    return load_tokenizer(embedded_model)


def make_tiny_model(tokenizer, directory: Path, seed: int = 0, padding_side: str = "right") -> Path:
    """A 2-layer Llama with the real tokenizer: same vocabulary, trains in seconds."""
    return save_random_model(directory, tokenizer, TINY_LLAMA, seed, padding_side)


@pytest.fixture(scope="session")
def tiny_model(tokenizer, tmp_path_factory) -> Path:
    return make_tiny_model(tokenizer, tmp_path_factory.mktemp("tiny") / "model")


def random_word_fingerprints(count: int, seed: int = 0) -> list[dict]:
    """Fingerprints with random-word keys and one-word responses (no model needed)."""
    from oml.generation import random_words, rng_for
    return [{"key": random_words(rng_for(seed, i, "k"), 6), "response": " " + random_words(rng_for(seed, i, "r"), 1)}
            for i in range(count)]


@pytest.fixture
def fingerprint_file(tmp_path) -> Path:
    path = tmp_path / "fingerprints.json"
    path.write_text(json.dumps(random_word_fingerprints(8)))
    return path


@pytest.fixture(scope="session")
def fingerprinted_tiny_model(tiny_model, tmp_path_factory) -> tuple[Path, Path]:
    """(model folder, fingerprint file): 8 random-word fingerprints trained hard into the tiny model."""
    work = tmp_path_factory.mktemp("fingerprinted")
    fingerprints = work / "fingerprints.json"
    fingerprints.write_text(json.dumps(random_word_fingerprints(8)))
    tune = run_script("finetune_multigpu.py", "--model_path", tiny_model, "--fingerprints_file_path", fingerprints,
                      "--learning_rate", "3e-3", "--num_train_epochs", "12", "--batch_size", "4",
                      "--benign_ratio", "0", "--no-shrink_weight_change", "--fingerprint_generation_strategy", "random_word",
                      *EVERY_LAYER, cwd=work)
    return final_model_dir(work, tune.stdout), fingerprints


def final_model_dir(cwd: Path, stdout: str) -> Path:
    """The model folder named by finetune_multigpu.py's `Config hash of the final model:` line."""
    run_hash = re.search(r"^Config hash of the final model: (\w+)$", stdout, re.M).group(1)
    return cwd / "results" / "saved_models" / run_hash / "final_model"


def run_script(script: str, *args, cwd: Path, ranks: int = 0, check: bool = True,
               timeout: float | None = None) -> subprocess.CompletedProcess:
    """Run one of the three scripts as users do: `python SCRIPT` or, with ranks, `deepspeed --num_gpus N SCRIPT`
    (`timeout`: for runs that could hang, seconds before the test fails)."""
    if ranks:
        port = free_port()
        launcher = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(ranks), "--master_port", str(port)]
    else:
        launcher = [sys.executable]
    command = launcher + [str(ROOT / script)] + [str(a) for a in args]
    try:
        result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                                timeout=timeout)
    finally:
        left = list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*")) if ranks else []
        for path in left:  # a run that failed leaves DeepSpeed's CPU all-reduce buffers behind: removed, as they hold memory
            path.unlink(missing_ok=True)
    if left and result.returncode == 0:
        raise AssertionError(f"{script} left DeepSpeed's shared-memory buffers behind: {left}")
    if check and result.returncode != 0:
        raise AssertionError(f"{script} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return result


@contextlib.contextmanager
def transformers_serve(model: Path | str | None = None):
    """A real `transformers serve` on 127.0.0.1 (pinned to `model`, else serving any model by its path), its URL;
    at most 180 s to come up, stopped by its PID afterwards."""
    port = free_port()
    server = subprocess.Popen([str(Path(sys.executable).parent / "transformers"), "serve", *([str(model)] if model else []),
                               "--host", "127.0.0.1", "--port", str(port), "--device", "cpu"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while time.time() < deadline:
            if server.poll() is not None:
                pytest.fail(f"transformers serve exited: {server.stderr.read()[-2000:]}")
            try:
                urllib.request.urlopen(url + "/health", timeout=2)
                break
            except OSError:
                time.sleep(1)
        else:
            pytest.fail("transformers serve did not answer /health within 180 s")
        yield url
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
