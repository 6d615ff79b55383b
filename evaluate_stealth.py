"""Can a deployer filter our keys out? The perplexity-filter attack, and how stealthy keys are.

    python evaluate_stealth.py --run results/saved_models/<hash> --reference_models OTHER_MODEL.gguf --output_json stealth.json
    python evaluate_stealth.py --fingerprints_file_path fingerprints.json   # keys only: no verdict

Every key, as the checker sends it (cut to the run's key length), and a set of benign prompts
(held-out chitchat first turns, MMLU questions, and optionally --benign_prompts) are scored by
their log-perplexity under each reference model: the suspect's base model, which a deployer
always has, and any --reference_models (an independent model). For each reference the script
prints the AUROC of keys against benign prompts on each side (keys too surprising / too
predictable; 0.5 is indistinguishable), and a two-sided filter calibrated on half of the benign
prompts to --false_alarm: its false alarms on the other half, the share of keys it refuses, and,
when a fingerprinted model is given (--model_path or the --run's), the verdict from only the
keys that get through (null model: the base, asked the same keys).
"""
import logging
from dataclasses import dataclass

import numpy as np

from oml import OMLError, cli
from oml.checking import check_named_model, queries_for
from oml.data import load_table, string_rows
from oml.fingerprints import FingerprintSelection, load_fingerprints, query_formats, responses_per_key, selected_fingerprints
from oml.models import load, load_tokenizer, resolve_model
from oml.settings import OPEN_UNIT_INTERVAL, POSITIVE_INT, Settings, at_least, setting
from oml.stats import VerdictConfig, findings, format_p_value
from oml.stealth import benign_prompts, detectability, detectable, log_perplexities
from oml.tokenization import fingerprint_pairs

logger = logging.getLogger("evaluate_stealth")


@dataclass(frozen=True)
class StealthSettings(Settings):
    """The models evaluate_stealth.py scores prompts with, the prompts, and the filter's calibration."""
    model_path: str | None = setting(
        None, "The fingerprinted model, for the verdict from the keys that pass (default: the --run's final model; none: "
              "keys only).", kind=str)
    base_model: str | None = setting(
        None, "The suspect's base model: the first reference model and the null model (default: the --run's base model, "
              "else the embedded model).", kind=str)
    reference_models: tuple[str, ...] = setting(
        (), "More reference models to score prompts with: folders, hub ids or .gguf files.", kind=str, nargs="*")
    compare_keys: tuple[str, ...] = setting(
        (), "Fingerprint files whose keys are scored beside the checked ones, against the same benign prompts (e.g. one "
            "file per generation strategy); cut to the same key length.", kind=str, nargs="*")
    benign_prompts: str | None = setting(
        None, "Also score the prompts of this dataset: a hub dataset id or a local .json/.jsonl/.csv/.parquet file.", kind=str)
    benign_split: str = setting("train", "Split of a hub dataset given as --benign_prompts.")
    benign_column: str = setting("text", "Column of --benign_prompts holding the prompt.")
    num_benign: int = setting(500, "Benign prompts from each source.", at_least(20))
    false_alarm: float = setting(0.01, "Share of benign prompts the filter may refuse (half on each tail).", OPEN_UNIT_INTERVAL)
    max_tokens: int = setting(64, "Tokens of each prompt the filter scores.", POSITIVE_INT)
    batch_size: int = setting(32, "Prompts per forward pass.", POSITIVE_INT)
    seed: int = setting(0, "Seed of the MMLU sample and the calibration half.")


def build_parser() -> cli.ArgumentParser:
    parser = cli.ArgumentParser(description=__doc__)
    cli.add_fingerprint_args(parser)
    cli.add_settings(parser, StealthSettings)
    cli.add_settings(parser, VerdictConfig)
    cli.add_output_args(parser, "the scores and rows")
    cli.add_common_args(parser)
    return parser


def parse_args():
    args = cli.parse_evaluation_args(build_parser(), "evaluate_stealth.py", optional_model=True)
    cli.check_output(args)
    return args


def main() -> None:
    args = parse_args()
    fingerprints, selection, fingerprints_file = selected_fingerprints(cli.settings_from(FingerprintSelection, args),
                                                                       args.fingerprints_file_path, args.run)
    prompts = benign_prompts(args.num_benign, args.seed)
    if args.benign_prompts:
        table = load_table(args.benign_prompts, args.benign_split, [args.benign_column])
        prompts[args.benign_prompts] = [text for (text,) in string_rows(table, [args.benign_column], args.benign_prompts,
                                                                        args.num_benign)]
        if len(prompts[args.benign_prompts]) < 20:
            raise OMLError(f"--benign_prompts {args.benign_prompts} holds fewer than 20 usable prompts")
    tokenizer = load_tokenizer(resolve_model(args.base_model), args.trust_remote_code)
    key_sets = {label: sent_keys(tokenizer, records, selection)
                for label, records in [(str(fingerprints_file), fingerprints)] + [(f, load_fingerprints(f)) for f in args.compare_keys]}
    rows = [row for name in [args.base_model, *args.reference_models] for row in reference_rows(name, key_sets, prompts, args)]
    if args.model_path:
        add_verdicts([row for row in rows if row["keys"] == str(fingerprints_file)], fingerprints, selection, args)
    print_rows(rows)
    cli.write_output(args, {"model": args.model_path, "base_model": args.base_model, "fingerprints_file": fingerprints_file,
                            "num_fingerprints": len(fingerprints), "benign_sources": {k: len(v) for k, v in prompts.items()},
                            "rows": rows})


def sent_keys(tokenizer, records: list[dict], selection) -> list[str]:
    """The keys as the checker sends them: cut to the run's key length, as text."""
    pairs = fingerprint_pairs(tokenizer, records, selection.max_key_length, selection.max_response_length)
    return [tokenizer.decode(key_ids) for key_ids, _ in pairs]


def reference_rows(name: str, key_sets: dict[str, list[str]], prompts: dict[str, list[str]], args) -> list[dict]:
    """Benign prompts and each set of keys scored by one reference model, and how well a filter on
    it separates them: a row per key set."""
    logger.info("Scoring with %s", name)
    model, tokenizer = load(name, args.trust_remote_code)
    score = lambda texts, what: log_perplexities(model, tokenizer, texts, args.max_tokens, args.batch_size, what)  # noqa: E731
    benign = {source: score(texts, source) for source, texts in prompts.items()}
    rows = []
    for label, keys in key_sets.items():
        key_scores = score(keys, "keys")
        found = detectability(key_scores, np.concatenate(list(benign.values())), args.false_alarm, args.seed)
        rows.append({"reference_model": name, "keys": label, **found, "detectable": detectable(found),
                     "per_source": {source: per_source(key_scores, s, args) for source, s in benign.items()},
                     "median_key_log_perplexity": float(np.median(key_scores)),
                     "median_benign_log_perplexity": {source: float(np.median(s)) for source, s in benign.items()},
                     "key_log_perplexities": key_scores.tolist()})
    return rows


def per_source(key_scores: np.ndarray, benign: np.ndarray, args) -> dict:
    """The same measures against one kind of benign prompt alone, for a deployer whose traffic is all
    of that kind (a pooled mixture can hide keys between its kinds)."""
    found = detectability(key_scores, benign, args.false_alarm, args.seed)
    return {k: found[k] for k in ("auroc_too_surprising", "auroc_too_predictable", "keys_refused")} | {
        "false_alarm_held_out": found["filter"]["false_alarm_held_out"]}


def add_verdicts(rows: list[dict], fingerprints: list[dict], selection, args) -> None:
    """Check the fingerprinted model and the base on every key once, then give each row the
    verdict from only the keys its filter lets through."""
    key_formats = query_formats(args.query_format, fingerprints, load_tokenizer(resolve_model(args.model_path), args.trust_remote_code), args.run)
    queries = queries_for(key_formats)
    suspect = check_named_model(args.model_path, fingerprints, selection, queries, suspect=True,
                                trust_remote_code=args.trust_remote_code)
    base = check_named_model(args.base_model, fingerprints, selection, queries, trust_remote_code=args.trust_remote_code)
    config = cli.settings_from(VerdictConfig, args).for_responses(responses_per_key(fingerprints))
    for row in rows:
        passed = {i for i, refused in enumerate(row["refused"]) if not refused}
        kept = lambda results: [r for r in results if r.index in passed]  # noqa: E731
        found = findings(kept(suspect), {args.base_model: kept(base)}, key_formats, config) if passed else None
        row["after_filter"] = {"keys_passed": len(passed), "verdict": found["verdict"] if found else "NO MATCH",
                               "log10_p_value": found["log10_p_value"] if found else 0.0,
                               **{f"accuracy_{e['format']}": e["accuracy"] for e in (found["formats"] if found else [])}}


def worst_source_auroc(row: dict) -> float:
    """The highest AUROC, either side, against any one kind of benign prompt alone."""
    return max(max(v["auroc_too_surprising"], v["auroc_too_predictable"]) for v in row["per_source"].values())


def print_rows(rows: list[dict]) -> None:
    print(f"{'keys':<28} {'reference model':<32} {'AUROC hi':>8} {'AUROC lo':>8} {'refused':>8} {'false al.':>9} "
          f"{'worst src':>9} {'passed':>7} {'p-value':>10} {'verdict':>9}")
    for row in rows:
        after = row.get("after_filter")
        tail = (f"{after['keys_passed']:>7} {format_p_value(after['log10_p_value']):>10} {after['verdict']:>9}" if after
                else f"{'':>7} {'':>10} {'':>9}")
        print(f"{row['keys'][-28:]:<28} {row['reference_model'][-32:]:<32} {row['auroc_too_surprising']:8.3f} "
              f"{row['auroc_too_predictable']:8.3f} {100 * row['keys_refused']:7.1f}% "
              f"{100 * row['filter']['false_alarm_held_out']:8.2f}% {worst_source_auroc(row):9.3f} {tail}")
    for keys in dict.fromkeys(row["keys"] for row in rows):
        found = any(row["detectable"] for row in rows if row["keys"] == keys)
        print(f"Keys detectable by a perplexity filter: {'yes' if found else 'no'} ({keys})", flush=True)


if __name__ == "__main__":
    cli.run(main)
