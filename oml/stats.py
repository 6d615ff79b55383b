"""The statistics of a check: how likely is a suspect's match count by chance?

The chance rate is measured on null models (never fingerprinted) and, because a
measured rate of 0 of n is not evidence that the rate is 0, replaced by its one-sided
upper confidence bound (Clopper-Pearson). The p-value is the binomial tail
P(X >= m) for X ~ Binomial(n, that rate): conservative, as evidence should be.
"""
import math

import numpy as np
from scipy.special import logsumexp
from scipy.stats import beta, binom


def chance_rate_upper_bound(matches: int, trials: int, confidence: float = 0.95) -> float:
    """One-sided Clopper-Pearson upper bound of a rate observed as matches/trials."""
    if matches >= trials:
        return 1.0
    return float(beta.ppf(confidence, matches + 1, trials - matches))


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
