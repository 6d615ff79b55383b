"""The perplexity-filter attack: calibration, AUROC, scoring, and evaluate_stealth.py end to end."""
import json

import numpy as np
import pytest
import torch

from oml.models import load
from oml.stealth import PerplexityFilter, auroc, detectability, detectable, document_start, log_perplexities
from tests.conftest import run_script


@pytest.mark.parametrize("false_alarm", [0.01, 0.05, 0.2])
def test_filter_refuses_the_asked_share_of_fresh_benign_scores(false_alarm):
    rng = np.random.default_rng(0)
    band = PerplexityFilter.calibrated(rng.lognormal(1.5, 0.4, 20_000), false_alarm)
    fresh = rng.lognormal(1.5, 0.4, 200_000)
    assert abs(band.refuses(fresh).mean() - false_alarm) < 0.15 * false_alarm + 0.001
    # Half on each tail: a two-sided filter catches keys that are too predictable as well as too surprising.
    assert abs((fresh < band.low).mean() - (fresh > band.high).mean()) < 0.15 * false_alarm + 0.001


def test_filter_calibration_never_exceeds_the_asked_rate_on_its_own_scores():
    scores = np.random.default_rng(1).normal(size=401)
    band = PerplexityFilter.calibrated(scores, 0.01)
    assert band.refuses(scores).mean() <= 0.01


def test_auroc_sides_and_detectability():
    rng = np.random.default_rng(2)
    benign = rng.normal(3.0, 1.0, 2000)
    assert abs(auroc(rng.normal(3.0, 1.0, 500), benign) - 0.5) < 0.05  # indistinguishable
    too_predictable = rng.normal(0.0, 0.3, 200)
    found = detectability(too_predictable, benign, 0.01)
    assert found["auroc_too_predictable"] > 0.95 and found["auroc_too_surprising"] < 0.05
    assert found["keys_too_predictable"] > 0.5 and found["keys_too_surprising"] == 0
    assert abs(found["filter"]["false_alarm_held_out"] - 0.01) < 0.01
    assert detectable(found)
    assert not detectable(detectability(rng.normal(3.0, 1.0, 500), benign, 0.01))


def test_log_perplexity_scores_every_token_and_ignores_padding(tiny_model):
    model, tokenizer = load(str(tiny_model), dtype=torch.float32)
    texts = ["hello there, how are you today?", "a", "zebra quantum marmalade " * 5]
    together = log_perplexities(model, tokenizer, texts, batch_size=3)
    alone = np.array([log_perplexities(model, tokenizer, [t], batch_size=1)[0] for t in texts])
    np.testing.assert_allclose(together, alone, rtol=1e-4)  # padding and batch order change nothing
    ids = document_start(tokenizer) + tokenizer("a", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1]
    expected = -torch.log_softmax(logits, -1)[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].mean()
    assert together[1] == pytest.approx(float(expected), rel=1e-4)


@pytest.mark.slow
def test_stealth_script_on_a_fingerprinted_tiny_model(fingerprinted_tiny_model, tiny_model, tmp_path):
    model, fingerprints = fingerprinted_tiny_model
    report = tmp_path / "stealth.json"
    result = run_script("evaluate_stealth.py", "--model_path", model, "--fingerprints_file_path", fingerprints,
                        "--base_model", tiny_model, "--num_benign", "40", "--false_alarm", "0.05", "--output_json", report,
                        cwd=tmp_path)
    assert "Keys detectable by a perplexity filter:" in result.stdout
    row = json.loads(report.read_text())["rows"][0]
    assert row["auroc_too_surprising"] + row["auroc_too_predictable"] == pytest.approx(1.0)
    assert len(row["refused"]) == 8 and len(row["key_log_perplexities"]) == 8
    assert set(row["per_source"]) == {"chitchat first turns", "MMLU questions"}
    after = row["after_filter"]
    assert after["keys_passed"] == 8 - sum(row["refused"])
    assert after["verdict"] in ("MATCH", "NO MATCH")
    again = run_script("evaluate_stealth.py", "--fingerprints_file_path", fingerprints, "--base_model", tiny_model,
                       "--num_benign", "40", "--output_json", report, cwd=tmp_path, check=False)
    assert again.returncode == 2 and again.stderr.strip().startswith("error:") and "--overwrite" in again.stderr
