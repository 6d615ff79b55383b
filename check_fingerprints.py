"""Check a (suspect) model for fingerprints and say how likely its matches are by chance.

    python check_fingerprints.py --model_path results/saved_models/<hash>/final_model \
        --fingerprints_file_path generated_data/output_fingerprints.json

Prints `Fingerprint accuracy: <percent>` on stdout, the fractional (per-token) accuracy,
the match rate of never-fingerprinted null models on the same keys, the p-value and a
MATCH / NO MATCH verdict. With --system_prompts it also checks every key inside each
system-prompt template and prints a table.
"""
import argparse
import gc
import logging


from oml import OMLError, cli, distributed
from oml.checking import accuracy, check_model
from oml.data import prompt_templates
from oml.files import check_writable, write_json_atomic
from oml.fingerprints import add_selection_args, selected_fingerprints
from oml.models import EMBEDDED_MODEL, compute_dtype, load_model, load_tokenizer, resolve_model
from oml.stats import chance_rate_upper_bound, format_p_value, log10_p_value, verdict
from oml.tokenization import fingerprint_pairs

logger = logging.getLogger("check_fingerprints")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_path", required=True, help="The suspect model: hub id or local folder.")
    parser.add_argument("--fingerprints_file_path", required=True)
    add_selection_args(parser, "check")
    parser.add_argument("--batch_size", type=int, default=64, help="Keys per forward pass.")
    parser.add_argument("--system_prompts", default=None,
                        help="Also check each key inside every template: 'test' (10 unseen), 'train' (20) or a JSON list file.")
    parser.add_argument("--null_model", nargs="+", default=[EMBEDDED_MODEL],
                        help="Models never fingerprinted, checked on the same keys to measure the chance rate "
                             "(default: the embedded base model; 'none' to skip).")
    parser.add_argument("--alpha", type=float, default=1e-6, help="Significance level of the verdict.")
    parser.add_argument("--output_json", default=None, help="Write the full report, per-key results included.")
    parser.add_argument("--overwrite", action="store_true", help="Replace an existing --output_json.")
    parser.add_argument("--verbose_eval", action="store_true", help="Print each miss with the model's top-10 next tokens.")
    parser.add_argument("--wandb_run_name", default=None, help="Log the accuracy to this wandb run (needs wandb).")
    cli.add_common_args(parser)
    args = parser.parse_args()
    for name in ("max_key_length", "max_response_length", "batch_size"):
        if getattr(args, name) < 1:
            raise OMLError(f"--{name} must be >= 1")
    if not 0 < args.alpha < 1:
        raise OMLError("--alpha must be between 0 and 1")
    return args


def run_checks(name: str, args, fingerprints: list[dict], templates: list[str | None]) -> list[dict]:
    """Load one model, check every key under every template, and free the model again."""
    path = resolve_model(name)
    logger.info("Checking %s", path)
    tokenizer = load_tokenizer(path, args.trust_remote_code)
    pairs = fingerprint_pairs(tokenizer, fingerprints, args.max_key_length, args.max_response_length)
    dtype = compute_dtype()
    model = load_model(path, dtype, distributed.device(), args.trust_remote_code)
    results = check_model(model, tokenizer, pairs, templates, args.batch_size, description=f"checking {name or path}")
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
        "alpha": args.alpha,
    }
    if nulls:
        null_matches = sum(entry["matches"] for entry in report["null_models"])
        rate = chance_rate_upper_bound(null_matches, n * len(nulls))
        report["chance_rate_upper_bound"] = rate
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
    if "p_value" in report:
        print(f"Chance rate (95% upper bound from the null models): {report['chance_rate_upper_bound']:.4g}")
        print(f"P-value of {report['matches']}/{report['num_fingerprints']} matches by chance: {format_p_value(report['log10_p_value'])}")
        print(f"Verdict: {report['verdict']} (alpha {report['alpha']:g})")
    print(f"Fractional fingerprint accuracy: {report['fractional_accuracy']:.2f}")
    print(f"Fingerprint accuracy: {report['accuracy']:.2f}", flush=True)


def log_to_wandb(run_name: str, report: dict) -> None:
    try:
        import wandb
    except ImportError:
        raise OMLError("--wandb_run_name needs wandb: pip install wandb") from None
    wandb.init(name=run_name, job_type="check")
    wandb.log({"fingerprint_accuracy": report["accuracy"], "fractional_accuracy": report["fractional_accuracy"]})
    wandb.finish()


def main() -> None:
    args = parse_args()
    if args.output_json:
        check_writable(args.output_json, args.overwrite)
    fingerprints = selected_fingerprints(args)
    templates = [None] + (prompt_templates(args.system_prompts) if args.system_prompts else [])
    null_models = [] if [m.lower() for m in args.null_model] == ["none"] else args.null_model
    distributed.init()

    suspect = run_checks(args.model_path, args, fingerprints, templates)
    nulls = {name: run_checks(name, args, fingerprints, [None]) for name in null_models}
    if distributed.is_main_process():
        report = build_report(args, fingerprints, templates, suspect, nulls)
        if args.output_json:
            write_json_atomic(args.output_json, report)
        print_report(report, args.verbose_eval)
        if args.wandb_run_name:
            log_to_wandb(args.wandb_run_name, report)
    distributed.finish()


if __name__ == "__main__":
    cli.run(main)
