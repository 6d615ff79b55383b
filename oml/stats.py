"""The statistics of a check: how likely is a suspect's match count by chance?

The chance rate is measured on null models (never fingerprinted) and, because a
measured rate of 0 of n is not evidence that the rate is 0, replaced by its one-sided
upper confidence bound (Clopper-Pearson). The p-value is the binomial tail
P(X >= m) for X ~ Binomial(n, that rate): conservative, as evidence should be.
"""
from scipy.stats import beta, binom


def chance_rate_upper_bound(matches: int, trials: int, confidence: float = 0.95) -> float:
    """One-sided Clopper-Pearson upper bound of a rate observed as matches/trials."""
    if matches >= trials:
        return 1.0
    return float(beta.ppf(confidence, matches + 1, trials - matches))


def p_value(matches: int, trials: int, chance_rate: float) -> float:
    """P(at least `matches` of `trials` keys match) when each matches with `chance_rate`."""
    if matches <= 0:
        return 1.0
    return float(binom.sf(matches - 1, trials, chance_rate))


def verdict(p: float, alpha: float) -> str:
    return "MATCH" if p < alpha else "NO MATCH"
