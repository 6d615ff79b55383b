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

import numpy as np

from oml import OMLError, cli
from oml.checking import check_named_model, queries_for
from oml.data import load_table, string_rows
from oml.fingerprints import FingerprintSelection, load_fingerprints, query_formats, responses_per_key, selected_fingerprints
from oml.models import load, load_tokenizer, resolve_model
from oml.stats import VerdictConfig, evidence, format_p_value
from oml.stealth import benign_prompts, detectability, detectable, log_perplexities
from oml.tokenization import fingerprint_pairs

logger = logging.getLogger("evaluate_stealth")


def parse_args():
    parser = cli.ArgumentParser(description=__doc__)
    parser.add_argument("--model_path", dest="fingerprinted_model", default=None,
                        help="The fingerprinted model, for the verdict from the keys that pass (default: the --run's final "
                             "model; none: keys only).")
    cli.add_fingerprint_args(parser)
    parser.add_argument("--base_model", default=None,
                        help="The suspect's base model: the first reference model and the null model (default: the --run's "
                             "base model, else the embedded model).")
    parser.add_argument("--reference_models", nargs="*", default=[],
                        help="More reference models to score prompts with: folders, hub ids or .gguf files.")
    parser.add_argument("--compare_keys", nargs="*", default=[],
                        help="Fingerprint files whose keys are scored beside the checked ones, against the same benign "
                             "prompts (e.g. one file per generation strategy); cut to the same key length.")
    parser.add_argument("--benign_prompts", default=None,
                        help="Also score the prompts of this dataset: a hub dataset id or a local .json/.jsonl/.csv/.parquet file.")
    parser.add_argument("--benign_split", default="train", help="Split of a hub dataset given as --benign_prompts.")
    parser.add_argument("--benign_column", default="text", help="Column of --benign_prompts holding the prompt.")
    parser.add_argument("--num_benign", type=cli.at_least(20), default=500, help="Benign prompts from each source.")
    parser.add_argument("--false_alarm", type=cli.open_unit_interval, default=0.01,
                        help="Share of benign prompts the filter may refuse (half on each tail).")
    parser.add_argument("--max_tokens", type=cli.positive_int, default=64, help="Tokens of each prompt the filter scores.")
    parser.add_argument("--batch_size", type=cli.positive_int, default=32, help="Prompts per forward pass.")
    cli.add_settings(parser, VerdictConfig)
    parser.add_argument("--seed", type=int, default=0, help="Seed of the MMLU sample and the calibration half.")
    cli.add_output_args(parser, "the scores and rows")
    args = cli.parse_evaluation_args(parser, "evaluate_stealth.py")
    args.fingerprinted_model = args.fingerprinted_model or (str(args.run.final_model) if args.run else None)
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
    if args.fingerprinted_model:
        add_verdicts([row for row in rows if row["keys"] == str(fingerprints_file)], fingerprints, selection, args)
    print_rows(rows)
    cli.write_output(args, {"model": args.fingerprinted_model, "base_model": args.base_model, "fingerprints_file": fingerprints_file,
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
    key_formats = query_formats(args.query_format, fingerprints, load_tokenizer(resolve_model(args.fingerprinted_model), args.trust_remote_code), args.run)
    queries = queries_for(key_formats)
    suspect = check_named_model(args.fingerprinted_model, fingerprints, selection, queries, suspect=True,
                                trust_remote_code=args.trust_remote_code)
    base = check_named_model(args.base_model, fingerprints, selection, queries, trust_remote_code=args.trust_remote_code)
    config = cli.settings_from(VerdictConfig, args).for_responses(responses_per_key(fingerprints))
    for row in rows:
        passed = {i for i, refused in enumerate(row["refused"]) if not refused}
        kept = lambda results: [r for r in results if r.index in passed]  # noqa: E731
        found = evidence(kept(suspect), {args.base_model: kept(base)}, key_formats, config) if passed else None
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
