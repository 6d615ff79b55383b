"""The statistics of a check: how likely is a suspect's match count if the suspect is not ours?

A model that is not derived from ours still matches a key now and then: its greedy answer
happens to be our response. The verdict assumes that such a model matches each key
independently with probability at most `r`, the chance rate, and computes the p-value
P(X >= m) for X ~ Binomial(n, r). The chance rate must hold for every innocent model, not
only the ones measured, so it is the largest of:

- each null model's one-sided 95% upper confidence bound (Clopper-Pearson) on its own match
  rate on the same keys (the largest, not the pooled rate: the suspect may resemble the
  worst of them, and a null that matches nothing is not evidence of a zero rate);
- a floor, `--min_chance_rate` (default 5%; times k for keys that accept k responses, see
  `VerdictConfig.for_responses`). For perinucleus fingerprints the untouched base
  model matches nothing by construction (each response lies outside its nucleus), so base-only
  nulls would let the rate shrink towards 0 as keys are added, and unrelated models that
  match 0.5-1% of the keys would be accused at a few thousand keys. Measured innocent models
  (derivatives of the base and other families) match 0-2% (docs/benchmarks.md); the floor
  leaves room for models not measured and for matches that are not independent.
"""
import math
from dataclasses import dataclass

import numpy as np
from scipy.special import logsumexp
from scipy.stats import beta, binom

from oml.checking import KeyResult, accuracy
from oml.settings import OPEN_UNIT_INTERVAL, UNIT_INTERVAL, Settings, setting

DEFAULT_MIN_CHANCE_RATE = 0.05


@dataclass(frozen=True)
class VerdictConfig(Settings):
    """What a verdict assumes of innocent models and how sure it must be."""
    min_chance_rate: float = setting(
        DEFAULT_MIN_CHANCE_RATE, "Floor of the chance rate: the share of keys any model not derived from ours is assumed "
                                 "able to match (see docs/guide.md, 'The verdict').", UNIT_INTERVAL)
    alpha: float = setting(1e-6, "Significance level of the verdict.", OPEN_UNIT_INTERVAL)

    def for_responses(self, responses_per_key: int) -> "VerdictConfig":
        """The rule for keys that accept up to `responses_per_key` responses: the floor is a chance
        rate per response, and a model that says each by chance with that rate says one of k at most
        k times as often (a union bound)."""
        return self.updated(min_chance_rate=min(1.0, self.min_chance_rate * responses_per_key))


def chance_rate_upper_bound(matches: int, trials: int, confidence: float = 0.95) -> float:
    """One-sided Clopper-Pearson upper bound of a rate observed as matches/trials."""
    if matches >= trials:
        return 1.0
    return float(beta.ppf(confidence, matches + 1, trials - matches))


def chance_rate(null_counts: list[tuple[int, int]], floor: float) -> float:
    """The chance rate assumed for an innocent model: the floor, or a null model's upper bound if higher."""
    return max([floor] + [chance_rate_upper_bound(m, n) for m, n in null_counts])


def null_chance_rate(nulls: dict[str, list[KeyResult]], key_formats: tuple[str, ...], floor: float) -> float:
    """The chance rate the null models' bare answers give, over every format (each null model's upper
    bound in each format it was asked, or the floor if higher): fixed before a sequential check."""
    counts = [(sum(bool(r.match) for r in bare), len(bare)) for null in nulls.values() for f in key_formats
              if (bare := [r for r in null if r.format == f and r.template is None])]
    return chance_rate(counts, floor)


def log10_p_value(matches: int, trials: int, chance_rate: float) -> float:
    """log10 of P(at least `matches` of `trials` keys match) when each matches with `chance_rate`.

    Computed as a log-sum of the binomial terms: with hundreds of matched keys the p-value
    itself is far below the smallest float (1e-308) and would print as 0.
    """
    if matches <= 0:
        return 0.0
    if chance_rate <= 0.0:
        return -math.inf
    if chance_rate >= 1.0:
        return 0.0
    terms = binom.logpmf(np.arange(matches, trials + 1), trials, chance_rate)
    return min(0.0, float(logsumexp(terms)) / math.log(10))


def format_p_value(log10_p: float) -> str:
    """A p-value given by its log10, in the usual 1.23e-45 notation at any magnitude."""
    if log10_p > -300:
        return f"{10 ** log10_p:.3g}"
    exponent = math.floor(log10_p)
    return f"{10 ** (log10_p - exponent):.3g}e{exponent}"


def verdict(log10_p: float, alpha: float) -> str:
    return "MATCH" if log10_p < math.log10(alpha) else "NO MATCH"


def keys_needed(alpha: float, floor: float, num_null_models: int, limit: int = 100_000) -> int | None:
    """The fewest keys with which a perfect score (every key matched, no null match) reaches `alpha`:
    with fewer, even 100% cannot give a MATCH. None if not within `limit` keys."""
    for n in range(1, limit + 1):
        rate = chance_rate([(0, n)] * num_null_models, floor)
        if verdict(log10_p_value(n, n, rate), alpha) == "MATCH":
            return n
    return None


def format_findings(key_format: str, bare: list[KeyResult], null_bare: dict[str, list[KeyResult]], floor: float) -> dict:
    """Accuracy, null-model matches, chance rate and p-value of one key format, from per-key check
    results of bare keys (results with an `error`, such as failed API requests, are not counted; refusals
    are counted as misses, and apart)."""
    answered = [r for r in bare if r.error is None]
    exact, fractional = accuracy(answered)
    matches, n = sum(bool(r.match) for r in answered), len(answered)
    nulls = [{"model": name, "matches": sum(bool(r.match) for r in results), "of": len(results), "accuracy": accuracy(results)[0]}
             for name, results in null_bare.items() if results]
    rate = chance_rate([(entry["matches"], entry["of"]) for entry in nulls], floor)
    return {"format": key_format, "accuracy": exact, "fractional_accuracy": fractional, "matches": matches,
            "num_fingerprints": n, "errors": len(bare) - n, "refused": sum(r.refused for r in answered), "null_models": nulls,
            "chance_rate": rate, "log10_p_value": log10_p_value(matches, n, rate)}


def findings(results: list[KeyResult], nulls: dict[str, list[KeyResult]], key_formats: tuple[str, ...],
             verdict_config: VerdictConfig) -> dict:
    """What a check found: per format (bare keys), and the verdict. It rests on the format with
    the smallest p-value, corrected for having looked at several (Bonferroni: times the number of formats)."""
    def bare(rows: list[KeyResult], key_format: str) -> list[KeyResult]:
        return [r for r in rows if r.format == key_format and r.template is None]

    floor, alpha = verdict_config.min_chance_rate, verdict_config.alpha
    per_format = [format_findings(f, bare(results, f), {name: bare(null, f) for name, null in nulls.items()}, floor)
                  for f in key_formats]
    best = min(per_format, key=lambda e: e["log10_p_value"])
    log10_p = min(0.0, best["log10_p_value"] + math.log10(len(per_format)))
    return {**{k: best[k] for k in ("format", "num_fingerprints", "accuracy", "fractional_accuracy", "matches", "null_models",
                                     "chance_rate")},
            "formats": per_format, "log10_p_value": log10_p, "p_value": 10 ** log10_p, "verdict": verdict(log10_p, alpha)}
