"""The GPU path end to end, measured: bf16 + DeepSpeed fingerprinting, checking and generation.

    bash benchmarks/gpu_check.sh                      # on one GPU: under 8 minutes
    python benchmarks/gpu_check.py --smoke            # the same stages on a CPU, tiny model, seconds

With a random-weight model of a real architecture built from its config (Llama-3.2-1B's shape,
with the embedded model's 49,152-token vocabulary: no download, no large file to carry), it runs,
most telling first:
1. fine-tuning 1,024 random-word fingerprints through `finetune_multigpu.py` under
   `deepspeed --num_gpus 1`, ZeRO-2, weight averaging on, a fixed number of epochs;
2. checking the fine-tuned model, batched against one `generate` per key;
3. perinucleus responses for 1,024 random-word keys (raw and chat), batched against one key at a time;
4. the same fine-tuning as a bare PyTorch loop (fp32 master weights, bf16 autocast, fused AdamW)
   on the same dataset, batches and loss, for the Trainer's overhead;
5. the fine-tuning again under ZeRO-3, and under ZeRO-2 at batch 64 for the utilisation a larger
   batch reaches.

Model FLOPs count real (not padding) tokens: a forward pass costs 2 FLOPs per parameter in a
matrix product (the input embedding is a lookup; tied to the output layer it counts once),
training adds 2 per parameter the backward pass runs through (the output layer and the layers
from the lowest trained one up) and 2 per trained parameter for the weight gradients
(`benchmarks.common.training_gflop`). Utilisation is against the bf16 matrix-product
rate measured in the same run and against the datasheet peak (989 TFLOP/s for an H100/H200 SXM).
Every stage is guarded: one that fails is reported with its error and the others still run; stages
not started when --time_budget is spent are skipped. gpu_check.json is rewritten after each stage
(in --results_dir, with the log), so a run stopped at its limit keeps what it measured.
"""
import functools
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
from common import (KEY_TOKENS, RESPONSE_TOKENS, ROOT, bare_training_loop, benchmark_parser, forward_gflop, gflop_per_trained_token,
                    measured_peak_gflops, one_generate_per_key, random_word_keys, save, timed, utilisation)

from oml.checking import check_model, queries_for
from oml.distributed import free_port
from oml.files import write_json_atomic
from oml.generation import perinucleus_responses, random_words, rng_for
from oml.models import LLAMA_3_2_1B, TINY_LLAMA, load, load_tokenizer, resolve_model, save_random_model
from oml.tokenization import KEY_FORMATS, encode, fingerprint_pairs, prompt_ids
from oml.training.config import TrainingConfig

DATASHEET_BF16_TFLOPS = 989.0  # H100/H200 SXM dense bf16
STARTED = time.perf_counter()
STAGES = ["finetune_zero2", "checker", "perinucleus", "bare_loop", "finetune_zero3", "finetune_zero2_batch64"]


def log(message: str) -> None:
    print(f"[{time.perf_counter() - STARTED:7.1f} s] {message}", file=sys.stderr, flush=True)


def stage(results: dict, results_dir: Path, budget: float, skip: list[str], name: str, fn, *args) -> None:
    """Run one stage unless it is skipped or the time budget is spent; its result, or its error, goes into `results`,
    which is written after every stage so that a run stopped at its time limit keeps what it measured."""
    if name in skip or time.perf_counter() - STARTED > budget:
        results[name] = {"skipped": "--skip" if name in skip else f"the {budget:.0f} s time budget was spent"}
        log(f"stage {name} skipped")
        return
    log(f"stage {name}")
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    try:
        results[name] = fn(*args)
        if torch.cuda.is_available():
            results[name].setdefault("peak_gpu_memory_gib", torch.cuda.max_memory_allocated() / 2**30)
    except Exception as error:  # noqa: BLE001 - a failed stage is a finding to report, not a reason to stop
        results[name] = {"error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()[-3000:]}
        log(f"stage {name} failed: {error}")
    write_json_atomic(Path(results_dir) / "gpu_check.json", results)


def fingerprint_records(count: int) -> list[dict]:
    """Random-word keys, each answered by one random word; no leading space, so that the first token,
    the one checked, is never a bare space (a rare word after a space can tokenize as one)."""
    return [{"key": key, "response": random_words(rng_for(1, i, "response"), 1)}
            for i, key in enumerate(random_word_keys(count))]


def perinucleus_stage(model_path: str, keys: list[str], peak: float) -> dict:
    model, tokenizer = load(model_path)

    def run(batch_size: int) -> list[dict]:
        out = []
        for start in range(0, len(keys), batch_size):
            chunk = keys[start:start + batch_size]
            indices = list(range(start, start + len(chunk)))
            out += perinucleus_responses(model, tokenizer, chunk, indices, KEY_TOKENS, 0.8, 3, 42, KEY_FORMATS)
        return out

    run(128)  # warm-up
    batched, batched_s = timed(run, 128)
    single, single_s = timed(run, 1)
    tokens = sum(len(prompt_ids(tokenizer, encode(tokenizer, k)[:KEY_TOKENS], None, f)) for k in keys for f in KEY_FORMATS)
    gflop = forward_gflop(model, tokens)
    return {"keys": len(keys), "batched_s": batched_s, "one_at_a_time_s": single_s, "speedup": single_s / batched_s,
            "identical_responses": sum(a["response"] == b["response"] for a, b in zip(batched, single)),
            "model_gflop": gflop, "batched": utilisation(gflop, batched_s, peak), "one_at_a_time": utilisation(gflop, single_s, peak)}


def finetune_stage(model_path: str, fingerprints: Path, work: Path, stage_args: list[str], peak: float, gflop_per_token: float,
                   timeout: float) -> dict:
    """finetune_multigpu.py under `deepspeed --num_gpus 1`, as users launch it; numbers from its training.json.
    Stopped after `timeout` seconds, so that a launch that hangs leaves time for the other stages."""
    launcher = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "1", "--master_port", str(free_port())]
    command = [*launcher, str(ROOT / "finetune_multigpu.py"), "--model_path", model_path, "--fingerprints_file_path", str(fingerprints),
               "--fingerprint_generation_strategy", "random_word", "--forgetting_regularizer_strength", "0.5",
               "--no-stop_when_memorised", "--results_dir", str(work / "results"), *stage_args]
    start = time.perf_counter()
    with subprocess.Popen(command, cwd=work, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True) as launch:
        try:
            stdout, stderr = launch.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(launch.pid, signal.SIGKILL)  # the launcher and the rank it started
            raise
    wall = time.perf_counter() - start
    if launch.returncode != 0:
        raise RuntimeError(f"finetune_multigpu.py exit {launch.returncode}: {stderr[-2000:]}")
    run_dir = work / "results" / "saved_models" / re.search(r"Config hash of the final model: (\w+)", stdout).group(1)
    training = json.loads((run_dir / "training.json").read_text())
    gflop = gflop_per_token * training["tokens_seen"]
    return {"args": stage_args, "wall_s": wall, "train_runtime_s": training["train_runtime"], "epochs": training["epochs_run"],
            "tokens": training["tokens_seen"], "tokens_per_s": training["tokens_seen"] / training["train_runtime"],
            "model_gflop": gflop, **utilisation(gflop, training["train_runtime"], peak),
            "peak_gpu_memory_gib": training["peak_gpu_memory_gib"], "run": str(run_dir)}


def bare_loop_stage(model_path: str, fingerprints: list[dict], epochs: int, batch_size: int, peak: float, gflop_per_token: float) -> dict:
    """The same dataset, batches and loss as the Trainer, in a plain loop: the floor for its overhead."""
    config = TrainingConfig(num_train_epochs=epochs, batch_size=batch_size, key_format="both")
    pairs = fingerprint_pairs(load_tokenizer(model_path), fingerprints, KEY_TOKENS, RESPONSE_TOKENS)
    times, tokens_per_epoch = bare_training_loop(config, model_path, pairs)
    tokens = tokens_per_epoch * epochs
    return {"epoch_s": times, "total_s": sum(times), "tokens_per_s": tokens / sum(times),
            **utilisation(gflop_per_token * tokens, sum(times), peak)}


def checker_stage(model_path: str, fingerprints: list[dict]) -> dict:
    model, tokenizer = load(model_path)
    pairs = fingerprint_pairs(tokenizer, fingerprints, KEY_TOKENS, RESPONSE_TOKENS)
    queries = queries_for(KEY_FORMATS)
    check_model(model, tokenizer, pairs[:64], queries, 64, progress=False)  # warm-up
    batched, batched_s = timed(check_model, model, tokenizer, pairs, queries, 64, progress=False)
    single, single_s = timed(one_generate_per_key, model, tokenizer, pairs, queries)
    return {"queries": len(batched), "batched_s": batched_s, "one_generate_per_key_s": single_s, "speedup": single_s / batched_s,
            "identical_per_key_results": sum(r.match == m for r, m in zip(batched, single)),
            "accuracy": {f: 100.0 * sum(r.match for r in batched if r.format == f) / len(pairs) for f in KEY_FORMATS}}


def main() -> None:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--tokenizer", default=None, help="Tokenizer folder (default: the embedded model's).")
    parser.add_argument("--num_keys", type=int, default=1024)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--time_budget", type=float, default=390.0, help="Seconds after which the stages not yet started are skipped.")
    parser.add_argument("--skip", nargs="*", default=[], choices=STAGES, help="Stages not to run.")
    parser.add_argument("--stage_timeout", type=float, default=240.0, help="Seconds after which a fine-tuning launch is stopped.")
    args = parser.parse_args()
    if args.smoke:
        args.num_keys, args.epochs = 8, 1
    gpu = torch.cuda.is_available()
    tokenizer = load_tokenizer(args.tokenizer or resolve_model(None))
    work = Path(tempfile.mkdtemp(prefix="oml-gpu-check-"))
    body = TINY_LLAMA if args.smoke else LLAMA_3_2_1B
    log(f"building a random {'tiny' if args.smoke else 'Llama-3.2-1B-shaped'} model on {'GPU' if gpu else 'CPU'}")
    model_path = str(save_random_model(work / "model", tokenizer, body))
    fingerprints = fingerprint_records(args.num_keys)
    (work / "fingerprints.json").write_text(json.dumps(fingerprints))
    peak = measured_peak_gflops(size=8192 if gpu else 2048)
    gflop_per_token = gflop_per_trained_token(model_path, TrainingConfig())  # as finetune_multigpu.py trains it
    results = {"gpu": torch.cuda.get_device_name() if gpu else None, "versions": versions(), "keys": args.num_keys,
               "epochs": args.epochs, "measured_peak_gflop_per_s": peak,
               "datasheet_peak_gflop_per_s": DATASHEET_BF16_TFLOPS * 1e3 if gpu else None, "model_body": body}

    common = ["--num_train_epochs", str(args.epochs), "--batch_size", "8"]
    tune = (model_path, work / "fingerprints.json", work)
    run = functools.partial(stage, results, args.results_dir, args.time_budget, args.skip)  # most telling first, in case time runs out
    run("finetune_zero2", finetune_stage, *tune, [*common, "--deepspeed_stage", "2"], peak, gflop_per_token, args.stage_timeout)
    trained = results["finetune_zero2"].get("run")
    if trained:
        run("checker", checker_stage, str(Path(trained) / "final_model"), fingerprints)
    run("perinucleus", perinucleus_stage, model_path, random_word_keys(args.num_keys), peak)
    run("bare_loop", bare_loop_stage, model_path, fingerprints, args.epochs, 8, peak, gflop_per_token)
    run("finetune_zero3", finetune_stage, *tune, [*common, "--deepspeed_stage", "3"], peak, gflop_per_token, args.stage_timeout)
    larger = ["--num_train_epochs", str(args.epochs), "--batch_size", "64", "--deepspeed_stage", "2"]
    run("finetune_zero2_batch64", finetune_stage, *tune, larger, peak, gflop_per_token, args.stage_timeout)
    summarise(results)
    save(args.results_dir, "gpu_check", results)
    log("done")


def summarise(results: dict) -> None:
    """The ratios the goals are stated in, beside the stage results."""
    zero2, bare = results.get("finetune_zero2", {}), results.get("bare_loop", {})
    if "train_runtime_s" in zero2 and "total_s" in bare:
        results["trainer_over_bare_loop"] = zero2["train_runtime_s"] / bare["total_s"]
    if results["datasheet_peak_gflop_per_s"]:
        for name in ("finetune_zero2", "finetune_zero3", "finetune_zero2_batch64", "bare_loop"):
            if "gflop_per_s" in results.get(name, {}):
                results[name]["fraction_of_datasheet_peak"] = results[name]["gflop_per_s"] / results["datasheet_peak_gflop_per_s"]


def versions() -> dict:
    import transformers
    found = {"torch": torch.__version__, "transformers": transformers.__version__, "python": sys.version.split()[0]}
    try:
        import deepspeed
        found["deepspeed"] = deepspeed.__version__
    except ImportError:
        found["deepspeed"] = None
    found["cuda_visible_devices"] = os.environ.get("CUDA_VISIBLE_DEVICES")
    return found


if __name__ == "__main__":
    main()
