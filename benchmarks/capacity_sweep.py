"""How many fingerprints fit, and what they cost: generate, fingerprint, check, measure utility.

    python benchmarks/capacity_sweep.py --sizes 16 64 256 --variants distill lm
    python benchmarks/capacity_sweep.py --smoke --results_dir /tmp/sweep   # a tiny model, 4 keys: seconds

For each variant (a set of fine-tuning flags) and each N, fine-tunes the first N of one
perinucleus fingerprint file into the model, checks them with bare keys and under the 10
unseen test system prompts (the base model as null model), and runs evaluate_utility.py.
Every step runs the project's own scripts as a user would and leaves its JSON under
--results_dir; steps whose output already exists are reused, so a sweep can be extended
or resumed. Writes summary.json, summary.md and two PNG plots there, covering every point
completed in --results_dir so far.
"""
import json
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

from common import ROOT, benchmark_parser, gflop_per_trained_token, machine, measured_peak_gflops, tiny_model
from finetune_speed import training_config

from oml.generation import KEY_STYLES, GenerationConfig
from oml.models import resolve_model
from oml.stats import format_p_value

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

VARIANTS = {  # each names its replay loss; points measured under earlier defaults name what they lacked
    "distill": ["--benign_loss", "distill"],
    "distill+augmentation": ["--benign_loss", "distill", "--use_augmentation_prompts"],
    "distill+bounded": ["--benign_loss", "distill", "--target_probability", "0.7"],
    "distill+replay3": ["--benign_loss", "distill", "--benign_ratio", "3"],
    "distill+ungrouped": ["--benign_loss", "distill", "--no-group_by_length"],
    "distill+unfrozen": ["--benign_loss", "distill", "--frozen_layer_fraction", "0"],  # every layer trained: before 2026-12-03 evening
    "distill+replay1": ["--benign_loss", "distill", "--benign_ratio", "1"],
    "distill+lr2e-4": ["--benign_loss", "distill", "--learning_rate", "2e-4"],
    "distill+lr2e-4+replay1": ["--benign_loss", "distill", "--learning_rate", "2e-4", "--benign_ratio", "1"],
    "distill+replay1+share0.99": ["--benign_loss", "distill", "--benign_ratio", "1", "--memorised_share", "0.99"],
    # points measured before the weight change was shrunk by default, and before the top 256 became the teacher
    "distill+noshrink": ["--benign_loss", "distill", "--no-shrink_weight_change"],
    "distill+augmentation+noshrink": ["--benign_loss", "distill", "--use_augmentation_prompts", "--no-shrink_weight_change"],
    "distill+top16": ["--benign_loss", "distill", "--teacher_top_k", "16", "--no-shrink_weight_change"],
    "distill+top16+bounded": ["--benign_loss", "distill", "--teacher_top_k", "16", "--target_probability", "0.7", "--no-shrink_weight_change"],
    "distill+top16+replay1": ["--benign_loss", "distill", "--teacher_top_k", "16", "--benign_ratio", "1", "--no-shrink_weight_change"],
    "distill+top16+replay3": ["--benign_loss", "distill", "--teacher_top_k", "16", "--benign_ratio", "3", "--no-shrink_weight_change"],
    "lm": ["--benign_loss", "lm"],
    "lm+augmentation": ["--benign_loss", "lm", "--use_augmentation_prompts"],
    "lm+averaging": ["--benign_loss", "lm", "--forgetting_regularizer_strength", "0.2"],
}
STRATEGY = ["--fingerprint_generation_strategy", "inverse_nucleus"]


def run(script: str, *args: str) -> str:
    """Run one of the project's scripts; its stdout, or exit with its error."""
    command = [sys.executable, str(ROOT / script), *args]
    print("+", " ".join(command[1:]), file=sys.stderr, flush=True)
    result = subprocess.run(command, stdout=subprocess.PIPE, text=True)
    if result.returncode != 0:
        sys.exit(f"{script} failed with exit code {result.returncode}")
    return result.stdout


def read_or_make(path: Path, make) -> dict:
    """The JSON at `path`, made first (by `make`, which writes it) if it does not exist."""
    if not path.is_file():
        make()
    return json.loads(path.read_text())


def fingerprint_file(out: Path, count: int, model: str | None, key_style: str) -> Path:
    path = out / "fingerprints.json"
    if not path.is_file():
        run("generate_finetuning_data.py", "--key_response_strategy", "inverse_nucleus", "--num_fingerprints", str(count),
            "--key_length", "16", "--batch_size", "128", "--seed", "42", "--key_style", key_style, "--output_file_path",
            str(path), *(["--model_used_for_key_generation", model] if model else []))
    return path


def sweep_point(out: Path, fingerprints: Path, variant: str, n: int, model: str | None, utility_args: list[str]) -> dict:
    """Fine-tune, check and evaluate one (variant, N); returns the point's summary."""
    name = f"{variant}_{n}"

    def train() -> None:
        stdout = run("finetune_multigpu.py", *(["--model_path", model] if model else []), "--fingerprints_file_path",
                     str(fingerprints), *STRATEGY, "--num_fingerprints", str(n), "--results_dir", str(out), *VARIANTS[variant])
        run_dir = out / "saved_models" / stdout.strip().splitlines()[-1].split()[-1]
        log = [json.loads(line) for line in (run_dir / "log.txt").read_text().splitlines()]
        seconds = [entry["train_runtime"] for entry in log if "train_runtime" in entry][-1]
        (out / f"{name}_train.json").write_text(json.dumps({"run": str(run_dir), "seconds": seconds,
                                                            "peak_gflop_per_s": measured_peak_gflops()}))

    trained = read_or_make(out / f"{name}_train.json", train)
    run_args = ["--run", trained["run"]]
    check = read_or_make(out / f"{name}_check.json", lambda: run(
        "check_fingerprints.py", "--model_path", str(Path(trained["run"]) / "final_model"), *run_args,
        "--system_prompts", "test", "--output_json", str(out / f"{name}_check.json")))
    utility = read_or_make(out / f"{name}_utility.json", lambda: run(
        "evaluate_utility.py", *run_args, *utility_args, "--output_json", str(out / f"{name}_utility.json")))
    by_format = {e["format"]: e for e in check["formats"]}
    test_prompts = {f: [e["accuracy"] for e in check["system_prompts"] if e["format"] == f and e["template"] is not None]
                    for f in by_format}
    training = json.loads((Path(trained["run"]) / "training.json").read_text())
    chat = utility.get("chat_template", {})
    gflop = training["tokens_seen"] * gflop_per_token(model, tuple(VARIANTS[variant]))  # every real token, prefixes included
    return {
        "variant": variant, "n": n, "train_seconds": trained["seconds"], "shrink_seconds": training.get("shrink_seconds"),
        "epochs": training["epochs_run"], "training_gflop_per_fingerprint": gflop / n,
        "gflop_per_s": gflop / trained["seconds"], "peak_gflop_per_s": trained.get("peak_gflop_per_s"),
        **{f"accuracy_{f}": e["accuracy"] for f, e in by_format.items()},
        **{f"test_prompts_{f}": sum(v) / len(v) for f, v in test_prompts.items()},
        "null_matches": max(n["matches"] for e in check["formats"] for n in e["null_models"]) if check["null_models"] else None,
        "log10_p_value": check["log10_p_value"], "verdict": check["verdict"],
        "perplexity": utility["perplexity"], "base_perplexity": utility["base_perplexity"],
        "perplexity_change": 100 * (utility["perplexity"] / utility["base_perplexity"] - 1),
        "next_token_agreement": utility["next_token_agreement"], "mean_kl_from_base": utility["mean_kl_from_base"],
        "chat_reply_kl": chat.get("mean_kl_from_base"), "chat_reply_agreement": chat.get("next_token_agreement"),
    }


@lru_cache(maxsize=None)
def gflop_per_token(model_path: str | None, flags: tuple[str, ...]) -> float:
    """Training GFLOP per real token of `model_path` with a variant's flags (what they freeze)."""
    return gflop_per_trained_token(resolve_model(model_path), training_config(1, list(flags)))


def completed_points(out: Path) -> list[tuple[str, int]]:
    """Every (variant, N) with results in `out`, from this run or earlier ones, in a stable order."""
    done = {tuple(path.name[:-len("_utility.json")].rsplit("_", 1)) for path in out.glob("*_utility.json")}
    return sorted(((v, int(n)) for v, n in done if v in VARIANTS), key=lambda p: (list(VARIANTS).index(p[0]), p[1]))


def percent(value: float | None) -> str:
    return "" if value is None else f"{value:.1f}%"


def rate(point: dict) -> str:
    """The training's GFLOP/s (needed FLOPs over the training time, memorisation checks included), with
    the matrix-product peak measured right after it where recorded: the peak moves with the machine's load."""
    peak = point.get("peak_gflop_per_s")
    return f"{point['gflop_per_s']:.0f}" + (f" ({peak:.0f})" if peak else "")


def shrink_time(seconds: float | None) -> str:
    """What shrinking the weight change added to the training time, where it ran and was recorded."""
    return f" + {seconds / 60:.1f}" if seconds else ""


def markdown_table(points: list[dict]) -> str:
    lines = ["| variant | N | raw | chat | test prompts raw | test prompts chat | base matches | p-value | chat ppl change "
             "| agreement | KL (nats) | chat-reply KL | epochs | train time | GFLOP per fingerprint | GFLOP/s (peak) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for p in points:
        chat_kl = "" if p.get("chat_reply_kl") is None else f"{p['chat_reply_kl']:.3f}"
        lines.append(f"| {p['variant']} | {p['n']} | {percent(p.get('accuracy_raw'))} | {percent(p.get('accuracy_chat'))} | "
                     f"{percent(p.get('test_prompts_raw'))} | {percent(p.get('test_prompts_chat'))} | "
                     f"{p['null_matches']}/{p['n']} | {format_p_value(p['log10_p_value'])} | {p['perplexity_change']:+.1f}% | "
                     f"{p['next_token_agreement']:.3f} | {p['mean_kl_from_base']:.3f} | {chat_kl} | {p['epochs']} | "
                     f"{p['train_seconds'] / 60:.1f} min{shrink_time(p.get('shrink_seconds'))} | "
                     f"{p['training_gflop_per_fingerprint']:,.0f} | {rate(p)} |")
    return "\n".join(lines) + "\n"


def log_n_axis(ax, points: list[dict]) -> None:
    """A log-scale N axis labelled at the measured N only."""
    sizes = sorted({p["n"] for p in points})
    ax.set_xticks(sizes, [str(n) for n in sizes])
    ax.minorticks_off()


def plot(points: list[dict], out: Path) -> None:
    """success_vs_n.png (bare keys and test prompts) and utility_vs_n.png (perplexity, KL, MMLU)."""
    variants = list(dict.fromkeys(p["variant"] for p in points))
    series = {v: sorted((p for p in points if p["variant"] == v), key=lambda p: p["n"]) for v in variants}

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for i, (variant, ps) in enumerate(series.items()):
        ns = [p["n"] for p in ps]
        for key, style, label in (("accuracy_raw", "-", "raw keys"), ("accuracy_chat", "--", "chat keys"),
                                  ("test_prompts_chat", ":", "chat, test prompts")):
            if all(key in p for p in ps):
                ax.plot(ns, [p[key] for p in ps], marker="o", ls=style, color=f"C{i}", label=f"{variant}: {label}")
    ax.set(xscale="log", xlabel="fingerprints inserted (N)", ylabel="fingerprints matched (%)", ylim=(0, 102),
           title="Fingerprint success against N")
    log_n_axis(ax, points)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "success_vs_n.png", dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.8))
    measures = [("perplexity_change", "held-out chat perplexity change (%)"), ("mean_kl_from_base", "mean KL from base (nats/token)"),
                ("chat_reply_kl", "KL on chat replies (nats/token)")]
    for ax, (key, label) in zip(axes, measures):
        for i, (variant, ps) in enumerate(series.items()):
            if all(p[key] is not None for p in ps):
                ax.plot([p["n"] for p in ps], [p[key] for p in ps], marker="o", color=f"C{i}", label=variant)
        ax.set(xscale="log", xlabel="fingerprints inserted (N)", ylabel=label)
        log_n_axis(ax, points)
    axes[0].legend(fontsize=7)
    fig.suptitle("Utility against N")
    fig.tight_layout()
    fig.savefig(out / "utility_vs_n.png", dpi=120)
    plt.close(fig)


def main() -> None:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--variants", nargs="+", default=["distill", "distill+augmentation"], choices=sorted(VARIANTS))
    parser.add_argument("--model_path", default=None, help="Model to fingerprint (default: the embedded one).")
    parser.add_argument("--num_generated", type=int, default=None,
                        help="Fingerprints to generate once for all points (default: the largest size); a point of size N "
                             "uses the first N.")
    parser.add_argument("--key_style", default=GenerationConfig().key_style, choices=KEY_STYLES,
                        help="How the keys are written (default: generate_finetuning_data.py's; sweeps measured before "
                             "2026-12-03 used sentence). A results folder's fingerprints.json is reused as it is.")
    parser.set_defaults(results_dir=ROOT / "results" / "capacity")
    args = parser.parse_args()
    utility_args = ["--num_mmlu", "0"]  # the embedded model answers MMLU at chance: nothing to see there
    if args.smoke:
        args.sizes, args.variants, args.model_path = [4], ["distill"], tiny_model()
        utility_args += ["--num_texts", "4"]
    out = Path(args.results_dir)
    out.mkdir(parents=True, exist_ok=True)
    fingerprints = fingerprint_file(out, max(args.sizes + [args.num_generated or 0]), args.model_path, args.key_style)
    if len(json.loads(fingerprints.read_text())) < max(args.sizes):
        sys.exit(f"{fingerprints} holds fewer than {max(args.sizes)} fingerprints; delete it to regenerate")
    for variant in args.variants:
        for n in args.sizes:
            sweep_point(out, fingerprints, variant, n, args.model_path, utility_args)
    points = [sweep_point(out, fingerprints, variant, n, args.model_path, utility_args) for variant, n in completed_points(out)]
    table = markdown_table(points)
    (out / "summary.json").write_text(json.dumps({"machine": machine(), "points": points}, indent=2))
    (out / "summary.md").write_text(table)
    plot(points, out)
    print(table)


if __name__ == "__main__":
    main()
