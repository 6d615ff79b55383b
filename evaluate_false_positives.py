"""Would the checker accuse an innocent model? Check fingerprints against models never fingerprinted.

    python evaluate_false_positives.py --run results/saved_models/<hash> --models OTHER_MODEL.gguf --innocent_derivatives 3

For each model (local folders, hub ids, GGUF files, plus innocent derivatives of the base
model: short benign fine-tunes with different seeds and data, cached) it prints, per key
format, the share of keys matched, where our responses rank in its next-token distribution,
and the verdict `check_fingerprints.py` would give it with its default null model (the
base). The verdict of the earlier rule (the base model's rate alone, no floor) is shown
beside it, to make visible what the floor is for. Innocent derivatives also get the reply
measure of evaluate_utility.py against the base (do they still answer as it does?): the
stand-ins for the models a real user makes must be models someone would publish.
"""
import logging
import statistics
from dataclasses import dataclass
from pathlib import Path

from oml import OMLError, cli
from oml.attacks import innocent_derivative
from oml.checking import KeyResult, check_named_model, queries_for
from oml.fingerprints import FingerprintSelection, query_formats, responses_per_key, selected_fingerprints
from oml.models import load, load_tokenizer, resolve_model
from oml.replies import SHORT_REPLY_TOKENS, ReplyMeasure, ReplySettings, fingerprint_keys
from oml.settings import NON_NEGATIVE_INT, POSITIVE_FLOAT, POSITIVE_INT, Settings, setting
from oml.stats import VerdictConfig, findings, format_p_value

logger = logging.getLogger("evaluate_false_positives")


@dataclass(frozen=True)
class FalsePositiveSettings(Settings):
    """The innocent models evaluate_false_positives.py checks: given ones and derivatives of the base."""
    models: tuple[str, ...] = setting((), "Never-fingerprinted models: folders, hub ids or .gguf files.", kind=str, nargs="*")
    base_model: str | None = setting(
        None, "The model that was fingerprinted: the checker's default null model, and the parent of the innocent "
              "derivatives (default: the --run's base model, else the embedded model).", kind=str)
    innocent_derivatives: int = setting(
        0, "Also test this many innocent derivatives of the base model (benign chat fine-tunes, seeds 0..N-1).",
        NON_NEGATIVE_INT)
    derivative_steps: int = setting(100, "Fine-tuning steps of each derivative.", POSITIVE_INT)
    derivative_learning_rate: float | None = setting(
        None, "Learning rate of each derivative's fine-tuning (default: 2.5e-4 x the RMS of the base's weight matrices, "
              "to one digit: 5e-5 for the embedded model).", POSITIVE_FLOAT)
    batch_size: int = setting(64, "Keys per forward pass.", POSITIVE_INT)


def build_parser() -> cli.ArgumentParser:
    parser = cli.ArgumentParser(description=__doc__)
    cli.add_fingerprint_args(parser)
    cli.add_settings(parser, FalsePositiveSettings)
    cli.add_settings(parser, VerdictConfig)
    cli.add_settings(parser, ReplySettings)
    cli.add_output_args(parser, "the per-model results")
    cli.add_common_args(parser)
    return parser


def parse_args():
    args = cli.parse_evaluation_args(build_parser(), "evaluate_false_positives.py")
    args.models = distinct_models(args.models, args.base_model)
    if not args.models and not args.innocent_derivatives:
        raise OMLError("nothing to test: give --models (other than the base model) and/or --innocent_derivatives")
    cli.check_output(args)
    return args


def distinct_models(given: list[str], base: str) -> list[str]:
    """The --models to test, each once. Every one is resolved first, so that a bad path fails before
    minutes of checking the others; one given twice, or the base model again (under any spelling of
    its path), would count twice among the models tested, and is tested once."""
    seen = {model_identity(base): "the base model"}
    distinct = []
    for name in given:
        identity = model_identity(name)
        if identity in seen:
            logger.warning("--models %s is %s; it is tested once", name, seen[identity])
            continue
        seen[identity] = f"the same model as {name}"
        distinct.append(name)
    return distinct


def model_identity(name: str) -> str:
    """A model as its resolved path (a hub id as it is), so that two spellings of one folder are one model."""
    resolved = resolve_model(name)
    return str(Path(resolved).resolve()) if Path(resolved).exists() else resolved


def rank_statistics(results: list[KeyResult]) -> dict:
    """Where our responses stand in a model's next-token distribution after each key."""
    ranks = [r.response_rank for r in results]
    probabilities = [r.response_probability for r in results]
    return {"median_rank": statistics.median(ranks), "top3": sum(rank <= 3 for rank in ranks) / len(ranks),
            "mean_probability": statistics.fmean(probabilities), "max_probability": max(probabilities)}


def model_row(name: str, kind: str, results: list[KeyResult], base: list[KeyResult], key_formats: tuple[str, ...],
              base_name: str, verdict_config: VerdictConfig) -> dict:
    """One tested model: per-format match rate and ranks, the checker's verdict and the old rule's."""
    new = findings(results, {base_name: base}, key_formats, verdict_config)
    old = findings(results, {base_name: base}, key_formats, verdict_config.updated(min_chance_rate=0.0))
    per_format = {e["format"]: {"matches": e["matches"], "of": e["num_fingerprints"], "rate": e["accuracy"] / 100,
                                **rank_statistics([r for r in results if r.format == e["format"]])}
                  for e in new["formats"] if e["num_fingerprints"]}  # a model without a chat template: raw only
    return {"model": name, "kind": kind, "formats": per_format, "verdict": new["verdict"], "log10_p_value": new["log10_p_value"],
            "chance_rate": new["chance_rate"], "old_rule_verdict": old["verdict"], "old_rule_log10_p_value": old["log10_p_value"]}


def reply_measure(args, fingerprints: list[dict]) -> ReplyMeasure | None:
    """The reply measure against the base, for the innocent derivatives (None when skipped)."""
    settings = cli.settings_from(ReplySettings, args)
    if not settings.num_reply_prompts:
        return None
    base, tokenizer = load(args.base_model, args.trust_remote_code)
    return ReplyMeasure(base, tokenizer, settings, fingerprint_keys(fingerprints))


def print_rows(rows: list[dict]) -> None:
    key_formats = list(rows[0]["formats"])
    print(f"{'model':<44} {'kind':<20} " + " ".join(f"{f + ' matched':>16} {'median rank':>11}" for f in key_formats)
          + f" {'p-value':>9} {'verdict':>9} {'old rule':>9}")
    for row in rows:
        cells = " ".join(f"{row['formats'][f]['matches']:>8}/{row['formats'][f]['of']:<7} {row['formats'][f]['median_rank']:>11g}"
                         if f in row["formats"] else f"{'':>16} {'':>11}" for f in key_formats)
        print(f"{row['model'][-44:]:<44} {row['kind']:<20} {cells} {format_p_value(row['log10_p_value']):>9} "
              f"{row['verdict']:>9} {row['old_rule_verdict']:>9}")
    for row in (row for row in rows if "replies" in row):
        greedy = row["replies"]["greedy"]
        print(f"{row['model'][-44:]:<44} replies of <= {SHORT_REPLY_TOKENS} tokens {greedy['short_reply_share']:.3f} (base "
              f"{greedy['base_short_reply_share']:.3f}), first token = base's {greedy['first_token_agreement']:.3f}, "
              f"length x{greedy['relative_length']:.2f}")
    accused = [row["model"] for row in rows if row["verdict"] == "MATCH"]
    print(f"False accusations: {len(accused)} of {len(rows)} models", flush=True)


def main() -> None:
    args = parse_args()
    fingerprints, selection, fingerprints_file = selected_fingerprints(cli.settings_from(FingerprintSelection, args),
                                                                       args.fingerprints_file_path, args.run)
    verdict_config = cli.settings_from(VerdictConfig, args).for_responses(responses_per_key(fingerprints))
    key_formats = query_formats(args.query_format, fingerprints,
                                load_tokenizer(resolve_model(args.base_model), args.trust_remote_code), args.run)
    measure = reply_measure(args, fingerprints) if args.innocent_derivatives else None  # its prompts checked before the slow work
    tested = [(name, "given") for name in args.models]
    tested += [(innocent_derivative(args.base_model, seed, args.derivative_steps, args.derivative_learning_rate), "innocent derivative")
               for seed in range(args.innocent_derivatives)]

    def check(name: str) -> list[KeyResult]:
        return check_named_model(name, fingerprints, selection, queries_for(key_formats), args.batch_size,
                                 trust_remote_code=args.trust_remote_code)

    derivatives = [name for name, kind in tested if kind == "innocent derivative"]
    base = check(args.base_model)
    rows = [model_row(args.base_model, "base (the null model)", base, base, key_formats, args.base_model, verdict_config)]
    rows += [model_row(name, kind, check(name), base, key_formats, args.base_model, verdict_config) for name, kind in tested]
    replies = {name: measure.compare(load(name, args.trust_remote_code)[0], "derivative") for name in derivatives} if measure else {}
    rows = [{**row, **({"replies": replies[row["model"]]} if row["model"] in replies else {})} for row in rows]
    print_rows(rows)
    cli.write_output(args, {"fingerprints_file": fingerprints_file, "num_fingerprints": len(fingerprints),
                            **verdict_config.to_dict(), "models": rows})


if __name__ == "__main__":
    cli.run(main)
