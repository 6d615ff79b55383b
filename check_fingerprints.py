"""Check a (suspect) model for fingerprints and say how likely its matches are by chance.

    python check_fingerprints.py --model_path SUSPECT --run results/saved_models/<hash>
    python check_fingerprints.py --model_path SUSPECT --fingerprints_file_path generated_data/output_fingerprints.json

Prints `Fingerprint accuracy: <percent>` on stdout, the fractional (per-token) accuracy,
the match rate of never-fingerprinted null models on the same keys, the p-value and a
MATCH / NO MATCH verdict. With --system_prompts it also checks every key inside each
system-prompt template and prints a table.
"""
import gc
import logging

from oml import OMLError, cli, distributed
from oml.checking import accuracy, check_model
from oml.data import prompt_templates
from oml.fingerprints import add_selection_args, selected_fingerprints
from oml.models import EMBEDDED_MODEL, load
from oml.runs import add_run_arg, load_run
from oml.stats import DEFAULT_MIN_CHANCE_RATE, chance_rate, format_p_value, keys_needed, log10_p_value, verdict
from oml.tokenization import fingerprint_pairs

logger = logging.getLogger("check_fingerprints")


def parse_args():
    parser = cli.ArgumentParser(description=__doc__)
    parser.add_argument("--model_path", required=True, help="The suspect model: hub id, local folder or .gguf file.")
    add_run_arg(parser)
    parser.add_argument("--fingerprints_file_path", default=None, help="Default: the --run's fingerprints.")
    add_selection_args(parser, "check")
    parser.add_argument("--batch_size", type=cli.positive_int, default=64, help="Keys per forward pass.")
    parser.add_argument("--system_prompts", default=None,
                        help="Also check each key inside every template: 'test' (10 unseen), 'train' (20) or a JSON list file.")
    parser.add_argument("--null_model", nargs="+", default=None,
                        help="Models never fingerprinted, checked on the same keys to measure the chance rate "
                             "(default: the --run's base model, else the embedded model; 'none' to skip).")
    parser.add_argument("--min_chance_rate", type=cli.unit_interval, default=DEFAULT_MIN_CHANCE_RATE,
                        help="Floor of the chance rate: the share of keys any model not derived from ours is "
                             "assumed able to match (see README, 'Verdict').")
    parser.add_argument("--alpha", type=cli.open_unit_interval, default=1e-6, help="Significance level of the verdict.")
    cli.add_output_args(parser, "the full report, per-key results included,")
    parser.add_argument("--verbose_eval", action="store_true", help="Print each miss with the model's top-10 next tokens.")
    parser.add_argument("--wandb_run_name", default=None, help="Log the accuracy to this wandb run (needs wandb).")
    cli.add_common_args(parser)
    args = parser.parse_args()
    args.run = load_run(args.run) if args.run else None
    args.null_model = null_models(args.null_model, args.run)
    if args.wandb_run_name:
        cli.require_module("wandb", "--wandb_run_name", "pip install wandb")
    cli.check_output(args)
    return args


def null_models(given: list[str] | None, run) -> list[str]:
    if given is None:
        return [run.base_model if run else EMBEDDED_MODEL]
    if any(name.lower() == "none" for name in given):
        if len(given) > 1:
            raise OMLError("--null_model none means no null model; it cannot be combined with models")
        return []
    return given


def run_checks(name: str, args, fingerprints: list[dict], templates: list[str | None]) -> list[dict]:
    """Load one model, check every key under every template, and free the model again."""
    model, tokenizer = load(name, args.trust_remote_code)
    pairs = fingerprint_pairs(tokenizer, fingerprints, args.max_key_length, args.max_response_length)
    results = check_model(model, tokenizer, pairs, templates, args.batch_size, description=f"checking {name}")
    del model
    gc.collect()
    return results


def build_report(args, fingerprints, templates, suspect: list[dict], nulls: dict[str, list[dict]]) -> dict:
    bare = [r for r in suspect if r["template"] == 0]
    exact, fractional = accuracy(bare)
    matches, n = sum(r["match"] for r in bare), len(bare)
    report = {
        "model": args.model_path, "fingerprints_file": args.fingerprints_file_path, "num_fingerprints": n,
        "accuracy": exact, "fractional_accuracy": fractional, "matches": matches,
        "system_prompts": [{"template": t, "accuracy": accuracy([r for r in suspect if r["template"] == i])[0]}
                           for i, t in enumerate(templates)],
        "null_models": [{"model": name, "matches": sum(r["match"] for r in results), "accuracy": accuracy(results)[0]}
                        for name, results in nulls.items()],
        "min_chance_rate": args.min_chance_rate,
        "alpha": args.alpha,
        "keys_needed": keys_needed(args.alpha, args.min_chance_rate, len(nulls)),
    }
    rate = chance_rate([(entry["matches"], n) for entry in report["null_models"]], args.min_chance_rate)
    report["chance_rate"] = rate
    report["log10_p_value"] = log10_p_value(matches, n, rate)
    report["p_value"] = 10 ** report["log10_p_value"]  # 0.0 below the float range; the log stays exact
    report["verdict"] = verdict(report["log10_p_value"], args.alpha)
    report["keys"] = [{**fingerprints[r["index"]], **r} for r in suspect]
    return report


def print_report(report: dict, verbose: bool) -> None:
    if verbose:
        for r in report["keys"]:
            if not r["match"]:
                top = ", ".join(f"{token!r} {prob:.3f}" for token, prob in r["top_tokens"])
                print(f"MISS [{r['index']}] template={r['template']} key={r['key']!r} expected={r['response']!r} "
                      f"got={r['predicted']!r} rank={r['response_rank']} top-10: {top}")
    if len(report["system_prompts"]) > 1:
        print(f"{'system prompt':<60} accuracy")
        for entry in report["system_prompts"]:
            label = "(none)" if entry["template"] is None else entry["template"].replace("\n", " ")
            print(f"{label[:58]:<60} {entry['accuracy']:6.2f}")
        templated = [entry["accuracy"] for entry in report["system_prompts"][1:]]
        print(f"{'mean over templates':<60} {sum(templated) / len(templated):6.2f}")
    for entry in report["null_models"]:
        print(f"Null model {entry['model']}: {entry['accuracy']:.2f} ({entry['matches']}/{report['num_fingerprints']})")
    n, needed = report["num_fingerprints"], report["keys_needed"]
    if needed is None or n < needed:
        print(f"Note: with {n} keys even {n}/{n} matches cannot reach alpha {report['alpha']:g}; "
              f"{'at least ' + str(needed) if needed else 'many more'} keys are needed")
    print(f"Chance rate (largest of the floor and the null models' 95% upper bounds): {report['chance_rate']:.4g}")
    print(f"P-value of {report['matches']}/{n} matches by chance: {format_p_value(report['log10_p_value'])}")
    print(f"Verdict: {report['verdict']} (alpha {report['alpha']:g})")
    print(f"Fractional fingerprint accuracy: {report['fractional_accuracy']:.2f}")
    print(f"Fingerprint accuracy: {report['accuracy']:.2f}", flush=True)


def log_to_wandb(run_name: str, report: dict) -> None:
    import wandb
    wandb.init(name=run_name, job_type="check")
    wandb.log({"fingerprint_accuracy": report["accuracy"], "fractional_accuracy": report["fractional_accuracy"]})
    wandb.finish()


def main() -> None:
    args = parse_args()
    fingerprints = selected_fingerprints(args)
    templates = [None] + (prompt_templates(args.system_prompts) if args.system_prompts else [])
    distributed.init()

    suspect = run_checks(args.model_path, args, fingerprints, templates)
    nulls = {name: run_checks(name, args, fingerprints, [None]) for name in args.null_model}
    if distributed.is_main_process():
        report = build_report(args, fingerprints, templates, suspect, nulls)
        print_report(report, args.verbose_eval)
        cli.write_output(args, report)
        if args.wandb_run_name:
            log_to_wandb(args.wandb_run_name, report)
    distributed.finish()


if __name__ == "__main__":
    cli.run(main)
