"""Memory per GPU and time for fingerprinting a 7B model on GPUs with finetune_multigpu.py: arithmetic
from parameter counts, not a measurement (no GPU was lent to the session that wrote it).

    python benchmarks/gpu_memory.py                                   # Llama-3-8B, 8 GPUs, 1,024 keys
    python benchmarks/gpu_memory.py --model mistral-7b --gpus 4 --keys 256

Memory (GB = 1e9 bytes) is the standard mixed-precision Adam accounting of the ZeRO paper: 2 bytes
of bf16 weights per parameter, and per trained parameter 2 bytes of bf16 gradients and 12 of
optimizer state (fp32 master weights and Adam's two moments). ZeRO-1 divides the optimizer state
among the GPUs, ZeRO-2 the gradients too, ZeRO-3 the weights too; offloading the optimizer moves
its state (and the update) to host memory. Stage 0 is the plain Trainer (no DeepSpeed): fp32
weights with bf16 autocast, fp32 gradients, Adam's moments. Trained are the transformer layers
above the frozen ones: the embeddings are frozen (the default) and so are the lowest
floor(--frozen_layer_fraction x layers) layers (default: the product's, 0.5), which have weights
only. Added to that: activations (per trained layer s*b*h*(34 + 5*a*s/h) bytes, Korthikanti et
al. 2022: the frozen layers below keep none for the backward pass; plus the logits in fp32) for
batches of --batch_size sequences of the measured mean length (below), and what fine-tuning
keeps beside the model: the original trained weights for shrinking and averaging (host, once per
node: oml.training.weights), the teacher distributions of replayed text (host, every rank:
oml.training.dataset), and, before DeepSpeed takes over, the whole model in fp32 on every GPU for
the teacher's forward pass.

Time: a trained token costs 2 FLOPs per matrix-product parameter (every parameter but the input
embedding, a lookup) for the forward pass, 2 per parameter that the backward pass runs through
(the output layer and every layer from the lowest trained one up: nothing below needs a
gradient) and 2 per trained parameter for the weight gradients (benchmarks/common.py,
training_gflop); a token of the forward passes of the memorisation check (every epoch end and
every shrink scale tried) and of the teacher costs 2 per matrix-product parameter. The tokens
and epochs are today's defaults measured on the embedded model (64 keys, measured 2026-12-03
with --frozen_layer_fraction 0.5: 47,976 tokens in 6 epochs, both key formats, 2 replayed
sequences per key, the weight change shrunk after 5 recounts), assumed the same at 7B. Each
optimizer step also moves the trained weights' gradients and new values between GPUs, timed at
--bus_gb_per_s.
"""
import math

import torch
from common import backward_parameters, benchmark_parser, matmul_parameters
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig

from oml.files import write_json_atomic
from oml.training.config import TrainingConfig
from oml.training.dataset import MAX_REPLAY_POOL, REPLAY_POOL_EPOCHS
from oml.settings import BELOW_ONE
from oml.training.weights import freeze, frozen_layers

MODELS = {  # the hub configs' shapes, so that no download is needed
    "llama-3-8b": LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                              num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False),
    "mistral-7b": MistralConfig(vocab_size=32768, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False),
}
SEQUENCES_PER_KEY = 4  # trained each epoch: the key in both formats, and 2 replayed sequences (--benign_ratio 2)
TOKENS_PER_SEQUENCE = 47976 / (64 * 6 * SEQUENCES_PER_KEY)  # measured: tokens seen / (keys x epochs x sequences a key)
QUERY_TOKENS = 2 * TOKENS_PER_SEQUENCE  # a memorisation check asks every key in both formats
SHRINK_COUNTS = 5  # memorisation checks of the shrink search: 4 or 5 scales tried in the 64- and 256-key measurements
TEACHER_BATCH = 64  # sequences a forward pass of oml.training.dataset.distilled_replay
GB = 1e9


def parameters(config, frozen_layer_fraction: float) -> dict[str, int]:
    """Parameter counts of a model built on the meta device and frozen as fine-tuning freezes it
    (oml.training.weights.freeze): all, trained, those in matrix products, those the backward pass
    runs through."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    freeze(model, frozen_layer_fraction=frozen_layer_fraction)
    matmul, trained = matmul_parameters(model)
    return {"total": sum(p.numel() for p in model.parameters()), "trained": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "matmul": matmul, "trained_matmul": trained, "backward": backward_parameters(model),
            "frozen_layers": frozen_layers(config, frozen_layer_fraction)}


def model_states(stage: int, offload: bool, total: int, trained: int, gpus: int) -> tuple[float, float]:
    """(GPU, host) bytes per rank of weights, gradients and optimizer state."""
    if stage == 0:
        return 4 * total + 4 * trained + 8 * trained, 0.0
    weights, gradients, optimizer = 2 * total, 2 * trained, 12 * trained
    gradients /= gpus if stage >= 2 else 1
    weights /= gpus if stage == 3 else 1
    optimizer /= gpus
    return (weights + gradients, optimizer) if offload else (weights + gradients + optimizer, 0.0)


def activations(config, batch_size: int, tokens: float, frozen_layers: int) -> float:
    """Bytes of activations kept for the backward pass (by the layers above the frozen ones), and the
    logits in fp32 with their gradient."""
    h, a, s, b = config.hidden_size, config.num_attention_heads, tokens, batch_size
    return (config.num_hidden_layers - frozen_layers) * s * b * h * (34 + 5 * a * s / h) + 2 * 4 * b * s * config.vocab_size


def estimate(args) -> dict:
    config = MODELS[args.model]
    counts = parameters(config, args.frozen_layer_fraction)
    total, trained = counts["total"], counts["trained"]
    acts = activations(config, args.batch_size, TOKENS_PER_SEQUENCE, counts["frozen_layers"])
    memory = []
    for stage in (0, 1, 2, 3):
        for offload in (False, True) if stage else (False,):
            gpu, host = model_states(stage, offload, total, trained, args.gpus)
            memory.append({"stage": stage, "offload_optimizer": offload, "model_states_gb": gpu / GB,
                           "gpu_gb": (gpu + acts) / GB, "host_gb_per_rank": host / GB})
    pool = min(MAX_REPLAY_POOL, 2 * args.keys * REPLAY_POOL_EPOCHS)  # replayed sequences labelled by the teacher
    extras = {"activations_gb": acts / GB,
              "shrink_copy_host_gb_per_node": 2 * trained / GB,
              "teacher_host_gb_per_rank": pool * TOKENS_PER_SEQUENCE * args.teacher_top_k * 8 / GB,  # int32 id + fp32 probability
              "teacher_pass_gpu_gb": (4 * total + 2 * 4 * TEACHER_BATCH * TOKENS_PER_SEQUENCE * config.vocab_size) / GB,
              "load_host_gb_per_rank": 4 * total / GB}
    trained_tokens = SEQUENCES_PER_KEY * TOKENS_PER_SEQUENCE * args.epochs  # per key
    forward_tokens = QUERY_TOKENS * (args.epochs + SHRINK_COUNTS) + pool / args.keys * TOKENS_PER_SEQUENCE
    per_trained_token = 2 * counts["matmul"] + 2 * counts["backward"] + 2 * counts["trained_matmul"]
    flops = per_trained_token * trained_tokens + 2 * counts["matmul"] * forward_tokens
    compute_s = flops * args.keys / (args.gpus * args.peak_tflops * 1e12 * args.mfu)
    steps = args.epochs * math.ceil(SEQUENCES_PER_KEY * args.keys / (args.batch_size * args.gpus))
    moved = 4 * trained * (args.gpus - 1) / args.gpus  # ZeRO-2: trained gradients reduce-scattered, weights all-gathered, in bf16
    time = {"tokens_trained_per_key": trained_tokens, "tokens_forward_per_key": forward_tokens, "tflop_per_key": flops / 1e12,
            "compute_s": compute_s, "steps": steps, "communication_s": steps * moved / (args.bus_gb_per_s * GB)}
    return {"model": args.model, "parameters": total, "trained_parameters": trained,
            "frozen_layer_fraction": args.frozen_layer_fraction, "frozen_layers": counts["frozen_layers"],
            "layers": config.num_hidden_layers, "gpus": args.gpus, "keys": args.keys, "memory": memory, "extras": extras,
            "time": time}


def table(result: dict) -> str:
    rows = ["| ZeRO stage | optimizer offload | weights, gradients, optimizer (GB/GPU) | with activations (GB/GPU) | host (GB/rank) |",
            "|---|---|---|---|---|"]
    rows += [f"| {m['stage']} | {'yes' if m['offload_optimizer'] else 'no'} | {m['model_states_gb']:.1f} | {m['gpu_gb']:.1f} | "
             f"{m['host_gb_per_rank']:.1f} |" for m in result["memory"]]
    e, t = result["extras"], result["time"]
    frozen = "embeddings" + (f" and the lowest {result['frozen_layers']} of {result['layers']} layers" if result["frozen_layers"] else "")
    return "\n".join([
        f"{result['model']}: {result['parameters'] / 1e9:.2f}e9 parameters, {result['trained_parameters'] / 1e9:.2f}e9 trained "
        f"({frozen} frozen: --frozen_layer_fraction {result['frozen_layer_fraction']:g}), {result['gpus']} GPUs, "
        f"{result['keys']} keys", "", *rows, "",
        f"activations (in the table): {e['activations_gb']:.1f} GB/GPU",
        f"original weights for shrinking and averaging: {e['shrink_copy_host_gb_per_node']:.1f} GB of host memory per node",
        f"teacher distributions of replayed text: {e['teacher_host_gb_per_rank']:.2f} GB of host memory per rank",
        f"before training: {e['load_host_gb_per_rank']:.1f} GB of host memory per rank to load the model in fp32, then "
        f"{e['teacher_pass_gpu_gb']:.1f} GB/GPU for the teacher's forward pass in fp32",
        f"per key: {t['tokens_trained_per_key']:.0f} tokens trained and {t['tokens_forward_per_key']:.0f} forward only, "
        f"{t['tflop_per_key']:.0f} TFLOP",
        f"{result['keys']} keys: {t['compute_s']:.0f} s of compute, {t['steps']} optimizer steps with {t['communication_s']:.0f} s "
        f"of ZeRO-2 communication"])


def main() -> None:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--model", default="llama-3-8b", choices=sorted(MODELS))
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--keys", type=int, default=1024)
    parser.add_argument("--epochs", type=int, default=6,
                        help="Epochs until memorised (6 at 64 and 256 keys on the embedded model; the cap is 20).")
    parser.add_argument("--batch_size", type=int, default=8, help="Examples per step on each GPU (--batch_size of finetune_multigpu.py).")
    parser.add_argument("--frozen_layer_fraction", type=float, default=TrainingConfig().frozen_layer_fraction,
                        help="Share of the transformer layers, from the input, kept frozen (finetune_multigpu.py's flag).")
    parser.add_argument("--teacher_top_k", type=int, default=256)
    parser.add_argument("--peak_tflops", type=float, default=989.0, help="bf16 dense peak of one GPU (H100/H200 SXM: 989).")
    parser.add_argument("--mfu", type=float, default=0.3,
                        help="Assumed fraction of the peak reached (benchmarks/gpu_check.sh measures it).")
    parser.add_argument("--bus_gb_per_s", type=float, default=300.0, help="Assumed NCCL bus bandwidth between the GPUs (NVLink).")
    args = parser.parse_args()  # --smoke changes nothing: the arithmetic takes no time
    if problem := BELOW_ONE.problem(args.frozen_layer_fraction):
        parser.error(f"--frozen_layer_fraction {problem}")
    result = estimate(args)
    args.results_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.results_dir / "gpu_memory.json", result)
    print(table(result))


if __name__ == "__main__":
    main()
