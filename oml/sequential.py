"""A sequential check: ask a suspect as few keys as the evidence allows.

Every key sent to a suspect's server is revealed to its operator, who can then teach the model to
stop answering it. A fixed-sample check (oml.stats) sends all its keys; this one sends them in
rounds and stops as soon as the answers decide, while keeping the verdict's false-MATCH rate
below `alpha` whatever the moment it stops.

The test. An innocent model is assumed to match each key independently with probability at most
the chance rate `r` (oml.stats, fixed before any key is sent: computed locally from the null
models on all candidate keys); a fingerprinted model matches at rate `q` (`--alternative_rate`).
Per key format f the likelihood ratio of the answers so far is

    LR_f = prod over answered keys of (q / r)^x * ((1 - q) / (1 - r))^(1 - x),   x = 1 if matched.

- MATCH when max_f LR_f >= F / alpha (F formats). If the suspect's true rate is at most r, each
  LR_f is a non-negative supermartingale with mean <= 1, so by Ville's inequality
  P(LR_f ever >= F / alpha) <= alpha / F, and over the F formats (Bonferroni) the false-MATCH rate
  is <= alpha at any stopping time: after any round, after an early NO MATCH, at a cap.
- NO MATCH as soon as every LR_f <= beta (`--no_match_error`): for a model of rate >= q each
  1 / LR_f is a supermartingale with mean <= 1, so this stops a fingerprinted model too early with
  probability <= beta per format. Also NO MATCH when the planned keys are used up, or when even
  matching every remaining planned key could not reach the MATCH threshold.
- The anytime-valid p-value min(1, F / max_f LR_f) is <= alpha exactly when the decision is MATCH.

Likelihood ratios are computed from the counts of matched and unmatched answers (in natural
logs, reported as log10), so the class and the vectorised simulation agree to the last bit.
Unanswered keys (None: a failed API request) carry no evidence and are skipped.
"""
import math
from dataclasses import dataclass

import numpy as np

from oml import OMLError
from oml.settings import OPEN_UNIT_INTERVAL, POSITIVE_INT, Settings, setting

MATCH, NO_MATCH = "MATCH", "NO MATCH"
_CONTINUE, _MATCH, _NO_MATCH = 0, 1, 2  # decision codes of the vectorised rule
_NAMES = {_CONTINUE: None, _MATCH: MATCH, _NO_MATCH: NO_MATCH}
_LN10 = math.log(10)


@dataclass(frozen=True)
class SequentialConfig(Settings):
    """How a sequential check decides when to stop sending keys."""
    alternative_rate: float = setting(
        0.9, "Sequential check: the match rate assumed of a fingerprinted model; the evidence of each answer is weighed "
             "against the chance rate with it (must exceed the chance rate).", OPEN_UNIT_INTERVAL)
    no_match_error: float = setting(
        1e-3, "Sequential check: stop with NO MATCH once every key format's likelihood ratio falls to this value "
              "(the chance of so stopping a fingerprinted model too early, per format).", OPEN_UNIT_INTERVAL)
    round_size: int = setting(4, "Sequential check: keys sent per round (each round's requests go out together).", POSITIVE_INT)
    max_keys: int | None = setting(None, "Sequential check: the most keys to reveal (default: all available).", POSITIVE_INT)


@dataclass(frozen=True)
class _Rule:
    """The constants of the decision rule, computed once so that every caller uses the same floats."""
    num_formats: int
    planned: int
    log_match: float  # log(q / r): evidence of a matched answer
    log_miss: float  # log((1 - q) / (1 - r)): evidence of an unmatched answer (negative)
    log_formats: float  # log(F): the Bonferroni factor
    log10_alpha: float
    log_beta: float

    def log10_p(self, max_log_lr):
        """log10 of min(1, F / max_f LR_f); works on floats and arrays alike."""
        return np.minimum(0.0, (self.log_formats - max_log_lr) / _LN10)

    def log_lr(self, matches, misses):
        """Natural log of the likelihood ratio from counts (not a running sum, so every caller gets the same float)."""
        return matches * self.log_match + misses * self.log_miss

    def keys_to_match(self) -> int:
        """The fewest keys that reach MATCH, every one matched in one format (as `decide` judges)."""
        keys = max(1, math.floor((self.log_formats / _LN10 - self.log10_alpha) * _LN10 / self.log_match))
        while self.log10_p(keys * self.log_match) > self.log10_alpha:
            keys += 1
        return keys

    def decide(self, matches: np.ndarray, misses: np.ndarray, attempts: np.ndarray) -> np.ndarray:
        """Decision codes from per-format counts (arrays shaped (..., formats)): answered keys that
        matched or not, and keys attempted (answered or not) per format."""
        log_lr = self.log_lr(matches, misses)
        best = log_lr.max(axis=-1)
        match = self.log10_p(best) <= self.log10_alpha
        futile = (log_lr <= self.log_beta).all(axis=-1)
        exhausted = attempts.min(axis=-1) >= self.planned
        # The best the remaining planned keys could do: each one matched, in the format that gains most.
        reachable = self.log10_p((log_lr + (self.planned - attempts) * self.log_match).max(axis=-1)) <= self.log10_alpha
        return np.where(match, _MATCH, np.where(futile | exhausted | ~reachable, _NO_MATCH, _CONTINUE))


def _rule(chance_rate: float, alpha: float, key_formats: tuple[str, ...], config: SequentialConfig, planned_keys: int) -> _Rule:
    """The decision rule's constants, after checking that the test can be run at all."""
    if not isinstance(config, SequentialConfig):
        raise OMLError(f"config must be a SequentialConfig, not {config!r}")
    if not 0 < chance_rate < 1:
        raise OMLError(f"The chance rate must be strictly between 0 and 1, not {chance_rate!r}: "
                       "at 0 a single match would be infinite evidence, at 1 no answer is evidence.")
    if not 0 < alpha < 1:
        raise OMLError(f"alpha must be strictly between 0 and 1, not {alpha!r}")
    q = config.alternative_rate
    if q <= chance_rate:
        raise OMLError(f"The alternative rate {q} is not above the chance rate {chance_rate:.4g}: the sequential test cannot "
                       "separate a fingerprinted model from an innocent one (raise --alternative_rate).")
    if not key_formats or len(set(key_formats)) != len(key_formats):
        raise OMLError(f"key_formats must be a non-empty tuple of distinct names, not {key_formats!r}")
    if isinstance(planned_keys, bool) or not isinstance(planned_keys, int) or planned_keys < 1:
        raise OMLError(f"planned_keys must be an integer >= 1 (the keys available to send), not {planned_keys!r}")
    planned = min(planned_keys, config.max_keys) if config.max_keys is not None else planned_keys
    return _Rule(num_formats=len(key_formats), planned=planned, log_match=math.log(q / chance_rate),
                 log_miss=math.log1p(-q) - math.log1p(-chance_rate), log_formats=math.log(len(key_formats)),
                 log10_alpha=math.log10(alpha), log_beta=math.log(config.no_match_error))


class SequentialTest:
    """The state of one sequential check: answers so far, per key format, and the decision they allow.

    Feed it one key at a time with `add_key({"raw": True, "chat": None})` (or one answer at a time
    with `update`), ask `next_round()` how many keys to send next, and stop when `decision()` is
    not None. Answers that arrive after a decision within the same round may still be added: the
    false-MATCH bound holds at any stopping time, so looking again after them is safe.
    """

    def __init__(self, chance_rate: float, alpha: float, key_formats: tuple[str, ...], config: SequentialConfig,
                 planned_keys: int):
        self.key_formats = tuple(key_formats)
        self.chance_rate, self.alpha, self.config = chance_rate, alpha, config
        self._rule = _rule(chance_rate, alpha, self.key_formats, config, planned_keys)
        self._matches = dict.fromkeys(self.key_formats, 0)
        self._answered = dict.fromkeys(self.key_formats, 0)
        self._attempted = dict.fromkeys(self.key_formats, 0)

    @property
    def planned_keys(self) -> int:
        """The most keys this test will reveal: the available keys, capped by `max_keys`."""
        return self._rule.planned

    @property
    def keys_to_match(self) -> int:
        """The fewest keys with which this test can reach MATCH (all matched): with fewer planned it never can."""
        return self._rule.keys_to_match()

    def check_enough_keys(self) -> None:
        """Refuse, before any key is sent, a test whose planned keys cannot reach MATCH even if all match."""
        if self._rule.planned < self.keys_to_match:
            raise OMLError(f"the sequential check needs at least {self.keys_to_match} keys to reach a MATCH (alpha "
                           f"{self.alpha:g}, chance rate {self.chance_rate:.4g}) but would reveal at most {self._rule.planned} "
                           "(--max_keys, or the keys left unrevealed): raise --max_keys, or use a run with more keys")

    def update(self, key_format: str, matched: bool | None) -> None:
        """Record one answer to a key in `key_format`: matched or not, or None when it was not answered
        (a failed request carries no evidence either way, so it is counted as attempted only)."""
        if key_format not in self._attempted:
            raise OMLError(f"Unknown key format {key_format!r}; this test has {', '.join(self.key_formats)}")
        if self._attempted[key_format] >= self._rule.planned:
            raise OMLError(f"All {self._rule.planned} planned keys were already asked in format {key_format!r}")
        self._attempted[key_format] += 1
        if matched is not None:
            self._answered[key_format] += 1
            self._matches[key_format] += bool(matched)

    def add_key(self, answers: dict[str, bool | None]) -> None:
        """Record one key's answers, by format; a format missing from `answers` counts as unanswered."""
        unknown = set(answers) - set(self.key_formats)
        if unknown:
            raise OMLError(f"Unknown key format(s) {', '.join(sorted(unknown))}; this test has {', '.join(self.key_formats)}")
        for key_format in self.key_formats:
            self.update(key_format, answers.get(key_format))

    def replay(self, answers: list[dict[str, bool | None]]) -> int:
        """Feed recorded answers (per key, by format) a round at a time, as a check sends them, until
        they run out or the test decides; returns how many keys were taken (fewer than given: the
        check went on after its verdict)."""
        taken = 0
        while taken < len(answers) and self.next_round():
            for key in answers[taken:taken + self.next_round()]:
                self.add_key(key)
            taken = self.keys_seen
        return taken

    @property
    def keys_seen(self) -> int:
        """Keys asked in every format (answered or not): the keys revealed to the suspect's operator."""
        return min(self._attempted.values())

    def _counts(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        matches = np.array([self._matches[f] for f in self.key_formats])
        misses = np.array([self._answered[f] - self._matches[f] for f in self.key_formats])
        return matches, misses, np.array([self._attempted[f] for f in self.key_formats])

    def log_likelihood_ratios(self) -> dict[str, float]:
        """Natural log of each format's likelihood ratio (rate q against rate r) of the answers so far."""
        return {f: float(self._rule.log_lr(self._matches[f], self._answered[f] - self._matches[f])) for f in self.key_formats}

    def decision(self) -> str | None:
        """"MATCH", "NO MATCH", or None while the evidence does not yet decide (never None once the
        planned keys are used up)."""
        return _NAMES[int(self._rule.decide(*self._counts()))]

    def next_round(self) -> int:
        """How many keys to send in the next round: 0 once decided, else a round, or what is left of the plan."""
        if self.decision() is not None:
            return 0
        return min(self.config.round_size, self._rule.planned - self.keys_seen)

    @property
    def log10_p_value(self) -> float:
        """log10 of the anytime-valid p-value min(1, F / max_f LR_f): valid under optional stopping
        (a log, as in oml.stats, since strong evidence goes below the float range)."""
        return float(self._rule.log10_p(max(self.log_likelihood_ratios().values())))

    def _reason(self, decision: str | None) -> str | None:
        if decision is None:
            return None
        if decision == MATCH:
            return "likelihood ratio reached the MATCH threshold"
        if all(v <= self._rule.log_beta for v in self.log_likelihood_ratios().values()):
            return "every likelihood ratio fell to the NO MATCH threshold"
        if self.keys_seen >= self._rule.planned:
            return "planned keys used up"
        return "MATCH threshold out of reach with the remaining planned keys"

    def summary(self) -> dict:
        """The state of the test for a report: per format counts and log10 likelihood ratio, the
        thresholds, the decision and why, the keys used and the anytime p-value."""
        rule, log_lr, decision = self._rule, self.log_likelihood_ratios(), self.decision()
        return {"formats": [{"format": f, "matches": self._matches[f], "answered": self._answered[f],
                             "unanswered": self._attempted[f] - self._answered[f], "log10_likelihood_ratio": log_lr[f] / _LN10}
                            for f in self.key_formats],
                "chance_rate": self.chance_rate, "alternative_rate": self.config.alternative_rate, "alpha": self.alpha,
                "log10_match_threshold": (rule.log_formats / _LN10) - rule.log10_alpha,
                "log10_no_match_threshold": rule.log_beta / _LN10,
                "decision": decision, "reason": self._reason(decision), "keys_used": self.keys_seen,
                "planned_keys": rule.planned, "round_size": self.config.round_size,
                "log10_p_value": self.log10_p_value}


def _round_ends(planned: int, round_size: int) -> np.ndarray:
    """Keys seen after each round; the last round may be short."""
    return np.minimum(np.arange(round_size, planned + round_size, round_size), planned)


def _outcomes(trials: int, ends: np.ndarray, rule: _Rule, draw) -> tuple[np.ndarray, np.ndarray]:
    """Decisions and keys revealed of `trials` runs of the test, round by round: `draw(trials_left, round)`
    gives each undecided trial's matches in that round, per format. Decided trials drop out, so the
    cost follows the keys actually used rather than the planned maximum."""
    decisions, keys = np.zeros(trials, dtype=np.int64), np.zeros(trials, dtype=np.int64)
    matches = np.zeros((trials, rule.num_formats), dtype=np.int64)
    left = np.arange(trials)
    for index, end in enumerate(ends):
        matches[left] += draw(left, index)
        seen = np.full((len(left), rule.num_formats), end)
        codes = rule.decide(matches[left], seen - matches[left], seen)
        done = codes != _CONTINUE  # the last round always decides
        decisions[left[done]], keys[left[done]] = codes[done], end
        left = left[~done]
        if not len(left):
            break
    return decisions, keys


def sequential_outcomes(matched: np.ndarray, chance_rate: float, alpha: float, key_formats: tuple[str, ...],
                        config: SequentialConfig) -> tuple[np.ndarray, np.ndarray]:
    """Decisions and keys revealed of the sequential test run on each row of `matched`, a boolean array
    shaped (trials, planned keys, formats) of every key's answers (all answered). The decision is
    looked at after each round of `round_size` keys, as `SequentialTest` is used; returns
    (decisions: 1 MATCH / 2 NO MATCH, keys revealed) per trial."""
    trials, planned, formats = matched.shape
    rule = _rule(chance_rate, alpha, tuple(key_formats), config, planned)
    if formats != rule.num_formats:
        raise OMLError(f"matched has {formats} formats, key_formats {len(key_formats)}")
    ends = _round_ends(rule.planned, config.round_size)
    cumulative = np.cumsum(matched[:, :rule.planned], axis=1, dtype=np.int64)[:, ends - 1]
    round_matches = np.diff(cumulative, axis=1, prepend=0)
    return _outcomes(trials, ends, rule, lambda left, index: round_matches[left, index])


def simulate(true_rate: float, chance_rate: float, alpha: float, config: SequentialConfig, planned_keys: int,
             key_formats: tuple[str, ...] = ("raw", "chat"), trials: int = 10000, seed: int = 0) -> dict:
    """Monte-Carlo of the sequential test against a suspect that matches every key, in every format
    independently, with probability `true_rate`: how often it ends in MATCH and how many keys it
    reveals (mean, median, 90th percentile). At a true rate <= the chance rate the MATCH rate is
    the false-MATCH rate (<= alpha); at a fingerprinted model's rate it is the power.

    Only the decision after each round matters, so each round's matches are drawn at once as a
    binomial count, and only for the trials still undecided (the same distribution as
    `sequential_outcomes` on per-key draws, much faster)."""
    if not 0 <= true_rate <= 1:
        raise OMLError(f"true_rate must be between 0 and 1, not {true_rate!r}")
    rule = _rule(chance_rate, alpha, tuple(key_formats), config, planned_keys)
    ends = _round_ends(rule.planned, config.round_size)
    sizes = np.diff(ends, prepend=0)
    rng = np.random.default_rng(seed)
    decisions, keys = _outcomes(trials, ends, rule,
                                lambda left, index: rng.binomial(sizes[index], true_rate, size=(len(left), rule.num_formats)))
    return {"match_rate": float(np.mean(decisions == _MATCH)), "no_match_rate": float(np.mean(decisions == _NO_MATCH)),
            "mean_keys": float(keys.mean()), "median_keys": float(np.median(keys)), "p90_keys": float(np.percentile(keys, 90))}
