"""Check a (suspect) model for fingerprints and say how likely its matches are by chance.

    python check_fingerprints.py --model_path SUSPECT --run results/saved_models/<hash>
    python check_fingerprints.py --api_base http://host:8000/v1 --api_model NAME --run results/saved_models/<hash>
    python check_fingerprints.py --model_path SUSPECT.gguf --fingerprints_file_path generated_data/output_fingerprints.json

Each key is asked as raw text and/or as a user message in the suspect's chat template
(--query_format). Prints a row per format, the match rate of never-fingerprinted null
models on the same keys, the p-value and a MATCH / NO MATCH verdict, and last
`Fingerprint accuracy: <percent>`. With --system_prompts it also asks every key inside
each system-prompt template (chat: as the system message) and prints a table.
"""
import logging

from oml import OMLError, cli, distributed
from oml.checking import accuracy, check_named_model
from oml.data import prompt_templates
from oml.fingerprints import add_query_format_arg, add_selection_args, selected_fingerprints
from oml.fingerprints import query_formats as query_formats_of
from oml.models import EMBEDDED_MODEL, load_tokenizer, resolve_model
from oml.runs import add_run_arg, apply_run
from oml.stats import DEFAULT_MIN_CHANCE_RATE, evidence, format_p_value, keys_needed
from oml.tokenization import fingerprint_pairs, system_message

logger = logging.getLogger("check_fingerprints")


def parse_args():
    parser = cli.ArgumentParser(description=__doc__)
    parser.add_argument("--model_path", default=None, help="The suspect model: hub id, local folder or .gguf file.")
    parser.add_argument("--api_base", default=None,
                        help="Instead of --model_path: the base URL of an OpenAI-compatible server running the suspect.")
    parser.add_argument("--api_model", default=None, help="The model name to ask the --api_base server for.")
    parser.add_argument("--api_key_env", default="OPENAI_API_KEY",
                        help="Environment variable holding the server's API key (never printed or saved).")
    parser.add_argument("--api_concurrency", type=cli.positive_int, default=8, help="API requests in flight at once.")
    parser.add_argument("--api_timeout", type=cli.positive_float, default=60.0, help="Seconds per API request.")
    parser.add_argument("--tokenizer", default=None,
                        help="With --api_base: the tokenizer that cuts keys and responses (default: the --run's base model, "
                             "else the embedded model).")
    add_run_arg(parser)
    parser.add_argument("--fingerprints_file_path", default=None, help="Default: the --run's fingerprints.")
    add_selection_args(parser, "check")
    add_query_format_arg(parser)
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
    if (args.model_path is None) == (args.api_base is None):
        raise OMLError("name the suspect: --model_path MODEL, or --api_base URL with --api_model NAME")
    if args.api_base and not args.api_model:
        raise OMLError("--api_base needs --api_model (the model name the server serves)")
    if args.api_base and distributed.world_size() > 1:
        raise OMLError("API checks run in one process: start check_fingerprints.py with python")
    apply_run(args)
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


def queries_for(query_formats: tuple[str, ...], templates: list[str | None]) -> list[tuple[str, str | None]]:
    return [(key_format, template) for key_format in query_formats for template in templates]


def api_checks(args, fingerprints: list[dict], queries: list[tuple[str, str | None]]) -> list[dict]:
    """Ask a suspect behind an OpenAI-compatible API; keys are cut with the owner's tokenizer."""
    from oml.api import ApiQuery, check_over_api  # imported on use: the HTTP client is not needed for local checks
    tokenizer = load_tokenizer(resolve_model(args.tokenizer or (args.run.base_model if args.run else None)), args.trust_remote_code)
    pairs = fingerprint_pairs(tokenizer, fingerprints, args.max_key_length, args.max_response_length)
    asked, api_queries = [], []
    for q, (key_format, template) in enumerate(queries):
        for i, (key_ids, response_ids) in enumerate(pairs):
            key = tokenizer.decode(key_ids)
            raw_prompt = template.replace("{}", key) if template else key
            api_queries.append(ApiQuery(key_format=key_format, prompt=raw_prompt if key_format == "raw" else key,
                                        system=system_message(template) if template and key_format == "chat" else None,
                                        response=tokenizer.decode(response_ids), max_tokens=len(response_ids),
                                        first_token=tokenizer.decode(response_ids[:1])))
            asked.append({"index": i, "format": key_format, "template": template, "query": q})
    answers = check_over_api(args.api_base, args.api_model, api_queries, args.api_key_env, args.api_concurrency, args.api_timeout)
    return [{**where, **answer, "token_accuracy": float(bool(answer["match"])), "top_tokens": []}
            for where, answer in zip(asked, answers)]


def build_report(args, fingerprints, query_formats, templates, suspect: list[dict], nulls: dict[str, list[dict]]) -> dict:
    return {
        "model": args.model_path or f"{args.api_base} ({args.api_model})", "fingerprints_file": args.fingerprints_file_path,
        **evidence(suspect, nulls, query_formats, args.min_chance_rate, args.alpha),
        "system_prompts": [{"format": f, "template": t,
                            "accuracy": accuracy([r for r in suspect if r["format"] == f and r["template"] == t and r.get("error") is None])[0]}
                           for f in query_formats for t in templates],
        "min_chance_rate": args.min_chance_rate, "alpha": args.alpha,
        "keys_needed": keys_needed(args.alpha, args.min_chance_rate, len(nulls)),
        "keys": [{**fingerprints[r["index"]], **r} for r in suspect],
    }


def print_report(report: dict, verbose: bool) -> None:
    if verbose:
        for r in report["keys"]:
            if not r["match"]:
                top = ", ".join(f"{token!r} {prob:.3f}" for token, prob in r["top_tokens"])
                print(f"MISS [{r['index']}] format={r['format']} template={r['template']!r} key={r['key']!r} "
                      f"expected={r['response']!r} got={r['predicted']!r} rank={r['response_rank']} "
                      f"{'error=' + r['error'] if r.get('error') else 'top-10: ' + top}")
    formats_ = [e["format"] for e in report["formats"]]
    if len(report["system_prompts"]) > len(formats_):
        print(f"{'system prompt':<60} " + " ".join(f"{f:>8}" for f in formats_))
        templates = list(dict.fromkeys(entry["template"] for entry in report["system_prompts"]))
        cell = {(e["format"], e["template"]): e["accuracy"] for e in report["system_prompts"]}
        for t in templates:
            label = "(none)" if t is None else t.replace("\n", " ")
            print(f"{label[:58]:<60} " + " ".join(f"{cell[(f, t)]:8.2f}" for f in formats_))
        print(f"{'mean over templates':<60} " + " ".join(
            f"{sum(cell[(f, t)] for t in templates[1:]) / (len(templates) - 1):8.2f}" for f in formats_))
    for e in report["formats"]:
        nulls = ", ".join(f"{n['model']} {n['matches']}/{n['of']}" for n in e["null_models"]) or "none"
        errors = f", {e['errors']} errors (not counted)" if e["errors"] else ""
        print(f"Format {e['format']}: {e['accuracy']:.2f} ({e['matches']}/{e['num_fingerprints']}{errors}); null models: {nulls}; "
              f"chance rate {e['chance_rate']:.4g}; p-value {format_p_value(e['log10_p_value'])}")
    n, needed = report["num_fingerprints"], report["keys_needed"]
    if needed is None or n < needed:
        print(f"Note: with {n} keys even {n}/{n} matches cannot reach alpha {report['alpha']:g}; "
              f"{'at least ' + str(needed) if needed else 'many more'} keys are needed")
    correction = f", x{len(formats_)} formats" if len(formats_) > 1 else ""
    print(f"P-value of {report['matches']}/{n} matches by chance ({report['format']}{correction}): "
          f"{format_p_value(report['log10_p_value'])}")
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
    suspect_tokenizer = None if args.api_base else load_tokenizer(resolve_model(args.model_path), args.trust_remote_code)
    query_formats = query_formats_of(args, fingerprints, suspect_tokenizer)
    templates = [None] + (prompt_templates(args.system_prompts) if args.system_prompts else [])
    distributed.init()

    if args.api_base:
        suspect = api_checks(args, fingerprints, queries_for(query_formats, templates))
    else:
        suspect = check_named_model(args.model_path, args, fingerprints, queries_for(query_formats, templates), suspect=True)
    nulls = {name: check_named_model(name, args, fingerprints, queries_for(query_formats, [None]), suspect=False)
             for name in args.null_model}
    if distributed.is_main_process():
        report = build_report(args, fingerprints, query_formats, templates, suspect, nulls)
        print_report(report, args.verbose_eval)
        cli.write_output(args, report)
        if args.wandb_run_name:
            log_to_wandb(args.wandb_run_name, report)
    distributed.finish()


if __name__ == "__main__":
    cli.run(main)
