"""The sequential check: valid under optional stopping, and how few keys it reveals.

Simulated rates are compared with an exact computation (a dynamic programme over the match counts
of two formats, written here independently of oml.sequential's vectorised rule), so the numbers
asserted are the true ones, not what one random seed happened to give.
"""
import math

import numpy as np
import pytest
from scipy.stats import binom

from oml import OMLError
from oml.sequential import SequentialConfig, SequentialTest, sequential_outcomes, simulate

FORMATS = ("raw", "chat")
R, ALPHA = 0.05, 1e-6  # the default chance-rate floor and significance level
CONFIG = SequentialConfig()  # q = 0.9, beta = 1e-3, rounds of 4 keys


def exact(true_rate: float, chance_rate: float, alpha: float, config: SequentialConfig, planned: int) -> tuple[float, dict]:
    """P(MATCH) and the distribution of keys revealed, for two formats matching independently at
    `true_rate`: the joint law of the two match counts is carried round by round, and the mass of
    the states where the test decides is taken out."""
    q, beta, size = config.alternative_rate, config.no_match_error, config.round_size
    up, down = math.log(q / chance_rate), math.log((1 - q) / (1 - chance_rate))
    threshold = math.log(2 / alpha)
    counts = np.arange(planned + 1)
    state = np.zeros((planned + 1, planned + 1))
    state[0, 0] = 1.0
    match, keys, seen = 0.0, {}, 0
    while seen < planned:
        step = min(size, planned - seen)
        pmf = binom.pmf(np.arange(step + 1), step, true_rate)
        for axis in (0, 1):  # each format gains Binomial(step, true_rate) matches this round
            moved = np.zeros_like(state)
            for k, weight in enumerate(pmf):
                moved += weight * np.roll(state, k, axis=axis)  # counts never exceed `seen`, so nothing wraps
            state = moved
        seen += step
        log_lr = counts * up + (seen - counts) * down
        raw, chat = np.meshgrid(log_lr, log_lr, indexing="ij")
        best = np.maximum(raw, chat)
        matched = best >= threshold
        stop = matched | ((raw <= math.log(beta)) & (chat <= math.log(beta))) | (seen >= planned)
        stop |= best + (planned - seen) * up < threshold  # out of reach (the best format stays the best: same slope)
        match += state[matched].sum()
        keys[seen] = state[stop].sum()
        state[stop] = 0.0
    return match, keys


def median(distribution: dict) -> int:
    total = 0.0
    for keys, p in sorted(distribution.items()):
        total += p
        if total >= 0.5:
            return keys


def mean(distribution: dict) -> float:
    return sum(keys * p for keys, p in distribution.items())


# --- validity: the false-MATCH rate stays below alpha under optional stopping ---

@pytest.mark.parametrize("rate", [0.05, 0.2])
@pytest.mark.parametrize("round_size", [1, 4, 8])
def test_false_match_rate_is_below_alpha_by_simulation(rate, round_size):
    alpha, trials = 0.05, 20_000
    config = CONFIG.updated(round_size=round_size)
    result = simulate(rate, rate, alpha, config, 200, trials=trials, seed=round_size)
    assert result["match_rate"] <= alpha + 3 * math.sqrt(alpha * (1 - alpha) / trials)
    assert result["match_rate"] + result["no_match_rate"] == pytest.approx(1.0)  # every run decides
    exact_match, keys = exact(rate, rate, alpha, config, 200)
    assert exact_match <= alpha
    assert result["match_rate"] == pytest.approx(exact_match, abs=4 * math.sqrt(exact_match * (1 - exact_match) / trials) + 1e-4)
    assert result["median_keys"] == median(keys)


def test_false_match_rate_without_early_no_match_looks_200_times_and_stays_below_alpha():
    """With the futility stop switched off the test looks after every one of 200 keys: the hardest
    case for a fixed-sample threshold, still <= alpha by Ville's inequality."""
    alpha, trials = 0.05, 20_000
    config = CONFIG.updated(round_size=1, no_match_error=1e-300)
    result = simulate(0.2, 0.2, alpha, config, 200, trials=trials, seed=3)
    exact_match, _ = exact(0.2, 0.2, alpha, config, 200)
    assert 0.01 < exact_match <= alpha  # not vacuous: it comes within a factor of a few of alpha
    assert result["match_rate"] == pytest.approx(exact_match, abs=4 * math.sqrt(exact_match * (1 - exact_match) / trials))


def test_a_null_below_the_chance_rate_is_even_less_likely_to_match():
    match_at, _ = exact(0.05, 0.05, 0.05, CONFIG, 200)
    match_below, _ = exact(0.02, 0.05, 0.05, CONFIG, 200)
    assert match_below < match_at


# --- power and the keys revealed, at the real settings (r = 5%, alpha = 1e-6, two formats, rounds of 4) ---

def at_real_settings(rate: float) -> tuple[dict, float, dict]:
    """A model matching at `rate`, at the real settings: the simulated outcome, and the exact MATCH
    probability and distribution of keys revealed."""
    return (simulate(rate, R, ALPHA, CONFIG, 200, trials=10_000), *exact(rate, R, ALPHA, CONFIG, 200))


def test_a_perfect_model_matches_after_two_rounds():
    # 6 keys are needed (below); rounds of 4 reveal 8.
    result = simulate(1.0, R, ALPHA, CONFIG, 200)
    assert result == {"match_rate": 1.0, "no_match_rate": 0.0, "mean_keys": 8.0, "median_keys": 8.0, "p90_keys": 8.0}


def test_a_model_at_95_percent_matches_almost_always_after_two_rounds():
    result, match, keys = at_real_settings(0.95)
    # After 8 keys a format's ratio reaches 2/alpha with 7 or 8 matches (7 log 18 + log(0.1/0.95) = 17.98 >= log 2e6
    # = 14.51; 6 matches give 12.84), so the test stops at 8 keys unless both formats missed twice.
    by_eight = 1 - (1 - binom.sf(6, 8, 0.95)) ** 2
    assert keys[8] == pytest.approx(by_eight)
    assert by_eight == pytest.approx(0.99673, abs=1e-5)
    assert match > 1 - 1e-9 and result["match_rate"] == 1.0
    assert result["median_keys"] == 8.0 and result["p90_keys"] == 8.0
    assert mean(keys) == pytest.approx(8.0131, abs=1e-4)
    assert result["mean_keys"] == pytest.approx(mean(keys), abs=0.01)


def test_a_model_that_matches_nothing_is_cleared_after_one_round():
    # Each miss multiplies the ratio by 0.1/0.95: 4 misses give 1.2e-4 <= 1e-3 (3 give 1.2e-3, not yet).
    assert (0.1 / 0.95) ** 4 <= 1e-3 < (0.1 / 0.95) ** 3
    result = simulate(0.0, R, ALPHA, CONFIG, 200)
    assert result == {"match_rate": 0.0, "no_match_rate": 1.0, "mean_keys": 4.0, "median_keys": 4.0, "p90_keys": 4.0}


def test_an_innocent_model_at_2_percent_is_cleared_in_one_or_two_rounds():
    result, match, keys = at_real_settings(0.02)
    assert keys[4] == pytest.approx(0.98 ** 8)  # no match in either format in the first round
    assert match < 1e-9 and result["match_rate"] == 0.0
    assert result["median_keys"] == 4.0 and result["p90_keys"] == 8.0
    assert mean(keys) == pytest.approx(4.6004, abs=1e-4)
    assert result["mean_keys"] == pytest.approx(mean(keys), abs=0.03)


# --- exact small cases, one key at a time ---

def test_all_matches_reach_match_after_ceil_log_2_over_alpha_over_log_q_over_r_keys():
    needed = math.ceil(math.log(2 / ALPHA) / math.log(0.9 / R))
    # By hand: each matched key multiplies the ratio by 0.9/0.05 = 18; 18^5 = 1,889,568 < 2/alpha = 2,000,000 <= 18^6.
    assert 18 ** 5 < 2 / ALPHA <= 18 ** 6 and needed == 6
    test = SequentialTest(R, ALPHA, FORMATS, CONFIG.updated(round_size=1), planned_keys=200)
    for key in range(1, needed + 1):
        assert test.decision() is None
        test.add_key({"raw": True, "chat": True})
    assert test.decision() == "MATCH" and test.keys_seen == needed
    assert test.log10_p_value == pytest.approx(math.log10(2 / 18 ** 6))
    # One format needs one key fewer: 1/alpha = 10^6 <= 18^5.
    single = SequentialTest(R, ALPHA, ("raw",), CONFIG, planned_keys=200)
    for _ in range(5):
        single.update("raw", True)
    assert single.decision() == "MATCH" and single.keys_seen == 5


def test_unanswered_keys_are_skipped():
    test = SequentialTest(R, ALPHA, FORMATS, CONFIG, planned_keys=200)
    for answers in [{"raw": True, "chat": None}, {"raw": None, "chat": None}, {"raw": False}, {"raw": None, "chat": True}]:
        test.add_key(answers)
    assert test.keys_seen == 4  # asked, so revealed, answered or not
    log_lr = test.log_likelihood_ratios()
    assert log_lr["raw"] == pytest.approx(math.log(18) + math.log(0.1 / 0.95))
    assert log_lr["chat"] == pytest.approx(math.log(18))
    summary = test.summary()
    assert [(f["matches"], f["answered"], f["unanswered"]) for f in summary["formats"]] == [(1, 2, 2), (1, 1, 3)]
    # Unanswered keys carry no evidence, but they use up the plan: with 10 planned keys, 5 silent ones
    # leave 5, and 18^5 < 2/alpha, so a MATCH is out of reach.
    silent = SequentialTest(R, ALPHA, FORMATS, CONFIG, planned_keys=10)
    for _ in range(4):
        silent.add_key({"raw": None, "chat": None})
        assert silent.decision() is None
    silent.add_key({})
    assert silent.decision() == "NO MATCH" and silent.keys_seen == 5
    assert silent.summary()["reason"] == "MATCH threshold out of reach with the remaining planned keys"
    assert silent.log10_p_value == 0.0


def test_no_match_when_every_format_falls_to_beta_and_not_before():
    test = SequentialTest(R, ALPHA, FORMATS, CONFIG, planned_keys=200)
    for _ in range(3):
        test.add_key({"raw": False, "chat": False})
    assert test.decision() is None
    test.add_key({"raw": False, "chat": True})  # chat is now above beta: keep asking
    assert test.decision() is None
    test.add_key({"raw": False, "chat": False})
    assert test.decision() is None
    for _ in range(3):
        test.add_key({"raw": False, "chat": False})
    assert test.decision() == "NO MATCH"
    assert test.summary()["reason"] == "every likelihood ratio fell to the NO MATCH threshold"


def test_no_match_once_the_threshold_is_out_of_reach():
    # 8 planned keys, futility off: after k misses the best is 8-k matches, k log(0.1/0.95) + (8-k) log 18 >= log 2e6 needs k <= 1.
    config = CONFIG.updated(no_match_error=1e-300)
    test = SequentialTest(R, ALPHA, FORMATS, config, planned_keys=8)
    test.add_key({"raw": False, "chat": False})
    assert test.decision() is None
    test.add_key({"raw": False, "chat": False})
    assert test.decision() == "NO MATCH"
    assert test.summary()["reason"] == "MATCH threshold out of reach with the remaining planned keys"
    assert test.next_round() == 0


def test_max_keys_caps_the_plan_and_the_plan_always_decides():
    test = SequentialTest(0.3, 0.01, FORMATS, CONFIG.updated(max_keys=6, no_match_error=1e-300), planned_keys=200)
    assert test.planned_keys == 6 and test.next_round() == 4
    for _ in range(4):
        test.add_key({"raw": True, "chat": False})
    assert test.next_round() == 2
    for _ in range(2):
        test.add_key({"raw": False, "chat": True})
    assert test.decision() == "NO MATCH" and test.summary()["reason"] == "planned keys used up"
    with pytest.raises(OMLError, match="planned keys"):
        test.update("raw", True)


def test_bad_settings_and_inputs_are_refused():
    with pytest.raises(OMLError, match="cannot separate"):
        SequentialTest(0.9, ALPHA, FORMATS, CONFIG, planned_keys=10)
    with pytest.raises(OMLError, match="cannot separate"):
        SequentialTest(0.6, ALPHA, FORMATS, CONFIG.updated(alternative_rate=0.5), planned_keys=10)
    with pytest.raises(OMLError, match="chance rate"):
        SequentialTest(0.0, ALPHA, FORMATS, CONFIG, planned_keys=10)
    with pytest.raises(OMLError, match="planned_keys"):
        SequentialTest(R, ALPHA, FORMATS, CONFIG, planned_keys=0)
    for bad in [{"alternative_rate": 1.0}, {"no_match_error": 0.0}, {"round_size": 0}, {"max_keys": 0}, {"round_size": 2.5}]:
        with pytest.raises(OMLError):
            SequentialConfig(**bad)
    test = SequentialTest(R, ALPHA, FORMATS, CONFIG, planned_keys=10)
    with pytest.raises(OMLError, match="Unknown key format"):
        test.update("json", True)
    with pytest.raises(OMLError, match="Unknown key format"):
        test.add_key({"json": True})


# --- the anytime p-value, and the class against the vectorised rule ---

def test_anytime_p_value_is_below_alpha_exactly_when_the_decision_is_match():
    rng = np.random.default_rng(0)
    seen = set()
    for trial in range(250):
        rate = rng.choice([0.0, 0.05, 0.3, 0.6, 0.9, 1.0])
        alpha = float(rng.choice([1e-6, 1e-3, 0.05]))
        test = SequentialTest(R, alpha, FORMATS, CONFIG.updated(round_size=1, no_match_error=1e-300), planned_keys=60)
        while test.next_round():
            test.add_key({f: None if rng.random() < 0.1 else bool(rng.random() < rate) for f in FORMATS})
            log10_lr = max(test.log_likelihood_ratios().values()) / math.log(10)
            assert test.log10_p_value == pytest.approx(min(0.0, math.log10(2) - log10_lr))
            assert (test.log10_p_value <= math.log10(alpha)) == (test.decision() == "MATCH")
            seen.add(test.decision())
    assert seen == {None, "MATCH", "NO MATCH"}


def test_the_vectorised_rule_agrees_with_the_class_key_by_key():
    rng = np.random.default_rng(1)
    config = CONFIG.updated(round_size=3)
    matched = rng.random((300, 30, 2)) < rng.choice([0.1, 0.5, 0.8], size=(300, 1, 1))
    decisions, keys = sequential_outcomes(matched, 0.2, 1e-3, FORMATS, config)
    assert set(decisions) == {1, 2}
    for row, decision, used in zip(matched, decisions, keys):
        test = SequentialTest(0.2, 1e-3, FORMATS, config, planned_keys=30)
        while (size := test.next_round()):
            for answers in row[test.keys_seen:test.keys_seen + size]:
                test.add_key(dict(zip(FORMATS, map(bool, answers))))
        assert (test.decision(), test.keys_seen) == ({1: "MATCH", 2: "NO MATCH"}[decision], used)


def test_summary_reports_thresholds_and_decision():
    test = SequentialTest(R, ALPHA, FORMATS, CONFIG, planned_keys=200)
    for _ in range(8):
        test.add_key({"raw": True, "chat": False})
    summary = test.summary()
    assert summary["decision"] == "MATCH" and summary["keys_used"] == 8
    assert summary["log10_match_threshold"] == pytest.approx(math.log10(2e6))
    assert summary["log10_no_match_threshold"] == pytest.approx(-3)
    assert summary["formats"][0]["log10_likelihood_ratio"] == pytest.approx(8 * math.log10(18))
    assert summary["log10_p_value"] == pytest.approx(math.log10(2) - 8 * math.log10(18))
