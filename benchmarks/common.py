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
from transformers.trainer_pt_utils import LengthGroupedSampler

from oml.checking import Query
from oml.files import write_json_atomic
from oml.generation import random_words, rng_for
from oml.models import TINY_LLAMA, load, load_tokenizer, resolve_model, save_random_model
from oml.tokenization import prompt_ids, to_device
from oml.training.config import TrainingConfig
from oml.training.dataset import build_dataset
from oml.training.trainer import FingerprintCollator, distillation_loss, loss_fields
from oml.training.weights import default_learning_rate, freeze, transformer_layers

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
    of the activations (2 per matmul parameter the backward pass runs through) and of the trained
    weights (2 per trained matmul parameter)."""
    matmul, trained = matmul_parameters(model)
    return (2 * matmul + 2 * backward_parameters(model) + 2 * trained) * tokens / 1e9


def gflop_per_trained_token(model_path: str, config: TrainingConfig) -> float:
    """Training GFLOP per real token of the model at `model_path`, frozen as `config` freezes it."""
    model, _ = load(model_path, dtype=torch.float32, device=None)
    freeze(model, config.train_embeddings, config.frozen_layer_fraction)
    return training_gflop(model, 1)


def backward_parameters(model) -> int:
    """Matmul parameters the backward pass runs through: the output layer and every transformer layer
    from the lowest trained one up (below it nothing needs a gradient when the embeddings are frozen)."""
    layers = transformer_layers(model)
    lowest = 0 if model.get_input_embeddings().weight.requires_grad else next(
        (i for i, layer in enumerate(layers) if any(p.requires_grad for p in layer.parameters())), len(layers))
    return model.get_output_embeddings().weight.numel() + sum(p.numel() for layer in layers[lowest:] for p in layer.parameters())


def utilisation(gflop: float, seconds: float, peak: float) -> dict:
    """Achieved GFLOP/s and the fraction of the measured peak."""
    rate = gflop / seconds
    return {"gflop_per_s": rate, "fraction_of_peak": rate / peak}


def machine() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def synchronize() -> None:
    """Wait for queued GPU work, so that a clock read afterwards counts it."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, *args, **kwargs):
    """(fn's result, its seconds), GPU work included: CUDA calls return before the work is done."""
    synchronize()
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    synchronize()
    return result, time.perf_counter() - start


KEY_TOKENS, RESPONSE_TOKENS = 16, 1  # the fingerprint shape every speed benchmark trains and checks


def random_word_keys(count: int, words_per_key: int = 10, seed: int = 0) -> list[str]:
    return [random_words(rng_for(seed, i, "benchmark"), words_per_key) for i in range(count)]


def bare_training_loop(config: TrainingConfig, model_path: str, pairs: list[tuple[list[int], list[int]]]) -> tuple[list[float], int]:
    """Seconds per epoch, and real tokens per epoch, of fine-tuning `pairs` in a plain PyTorch loop
    with the Trainer's dataset, batch order, loss, frozen embeddings and lower layers, AdamW and gradient clipping:
    the floor that the Trainer's overhead is measured against. fp32 master weights; on a GPU, bf16
    autocast and fused AdamW, as the Trainer runs there."""
    model, tokenizer = load(model_path, dtype=torch.float32)
    dataset = build_dataset(config, tokenizer, pairs, model)
    freeze(model, config.train_embeddings, config.frozen_layer_fraction)
    model.train()
    gpu = torch.cuda.is_available()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate or default_learning_rate(model), weight_decay=config.weight_decay,
                                  fused=gpu)
    lengths = [len(dataset[i]["input_ids"]) for i in range(len(dataset))]
    sampler = (LengthGroupedSampler(config.batch_size, lengths=lengths) if config.group_by_length
               else torch.utils.data.RandomSampler(dataset))  # as the Trainer picks
    loader = torch.utils.data.DataLoader(dataset, batch_size=config.batch_size, sampler=sampler,
                                         collate_fn=FingerprintCollator(tokenizer))

    def one_epoch() -> None:
        for batch in loader:
            batch = to_device(batch, model.device)
            fields = loss_fields(batch)
            with torch.autocast("cuda", torch.bfloat16, enabled=gpu):
                logits = model(**batch).logits
            distillation_loss(logits, **fields, target_probability=config.target_probability).backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad()

    times = []
    for epoch in range(config.num_train_epochs):
        dataset.epoch = epoch
        times.append(timed(one_epoch)[1])
    return times, sum(lengths)


@torch.no_grad()
def one_generate_per_key(model, tokenizer, pairs: list[tuple[list[int], list[int]]], queries: list[Query]) -> list[bool]:
    """Whether greedy generate() says each key's response, one call per key and query, in
    check_model's order (query, then key): the original checker's loop, which the batched
    checker is timed and compared against."""
    matches = []
    for query in queries:
        for key_ids, response_ids in pairs:
            prompt = torch.tensor([prompt_ids(tokenizer, key_ids, query.template, query.key_format)], device=model.device)
            out = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=len(response_ids),
                                 pad_token_id=tokenizer.pad_token_id, temperature=None, top_p=None, top_k=None)
            matches.append(out[0, prompt.shape[1]:].tolist() == response_ids)
    return matches


def save(directory: Path, name: str, result: dict) -> None:
    result = {"machine": machine(), "torch": torch.__version__, **result}
    write_json_atomic(Path(directory) / f"{name}.json", result)
    print(json.dumps(result, indent=2))
