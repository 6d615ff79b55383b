"""Evidence that survives disclosure: the ledger of revealed keys, the evidence bundle and its
verifier, end to end on a tiny fingerprinted run."""
import copy
import json
import math
import shutil

import pytest

from oml.stats import log10_p_value
from tests.conftest import run_script

VERIFIED, NOT_VERIFIED, BAD_INPUT = 0, 3, 2


@pytest.fixture
def run_copy(fingerprinted_tiny_model, tmp_path):
    """A private copy of the fingerprinted run (its ledger is written by these tests)."""
    model_dir, _ = fingerprinted_tiny_model
    run = tmp_path / "run"
    shutil.copytree(model_dir.parent, run, ignore=shutil.ignore_patterns("revealed.jsonl*"))
    return run


def check(run, tmp_path, *args, check=True):
    return run_script("check_fingerprints.py", "--model_path", run / "final_model", "--run", run, "--alpha", "0.01", *args,
                      cwd=tmp_path, check=check)


def verify(bundle: dict, root: str, tmp_path, *args, alpha: str = "0.01"):
    """verify_evidence.py on `bundle`, its verdict rule at the check's alpha."""
    path = tmp_path / "bundle.json"
    path.write_text(json.dumps(bundle))
    return run_script("verify_evidence.py", path, "--root", root, "--alpha", alpha, *args, cwd=tmp_path, check=False)


@pytest.mark.slow
def test_a_bundle_verifies_and_every_kind_of_tampering_is_caught(run_copy, tmp_path, tiny_model):
    run = run_copy
    commitment = json.loads((run / "commitment.json").read_text())
    salts = json.loads((run / "commitment_salts.json").read_text())["salts"]
    fingerprints = json.loads((run / "fingerprints.json").read_text())
    check(run, tmp_path, "--num_fingerprints", "5", "--null_model", "none", "--evidence", "first.json")
    bundle = json.loads((tmp_path / "first.json").read_text())
    text = (tmp_path / "first.json").read_text()
    assert [entry["position"] for entry in bundle["revealed"]] == [0, 1, 2, 3, 4]
    assert all(record["key"] not in text for record in fingerprints[5:])  # unrevealed keys stay secret
    assert not any(salt in text for salt in salts[5:]) and all(salt in text for salt in salts[:5])

    root, count = commitment["root"], str(commitment["count"])
    honest = verify(bundle, root, tmp_path, "--count", count, "--base_model", tiny_model)
    assert honest.returncode == VERIFIED, honest.stderr[-2000:]
    assert "Evidence verified: MATCH" in honest.stdout and "none of the revealed responses" in honest.stdout

    def tampered(change) -> str:
        altered = copy.deepcopy(bundle)
        change(altered)
        result = verify(altered, root, tmp_path, "--count", count)
        assert result.returncode == NOT_VERIFIED and "Traceback" not in result.stderr, result.stderr[-2000:]
        return result.stderr.strip().splitlines()[-1]

    assert "not under the root" in tampered(lambda b: b["revealed"][1]["record"].update(response=" other"))
    assert "not under the root" in tampered(lambda b: b["revealed"][2].update(position=7))
    assert "not what the answers give" in tampered(lambda b: [q.update(answer=" nope") for q in b["queries"][:3]])
    assert "not what the answers give" in tampered(lambda b: b["queries"][-1].update(answer=" nope"))  # one chat answer
    assert "not what the answers give" in tampered(lambda b: b["test"].update(verdict="NO MATCH"))
    assert "consecutive" in tampered(lambda b: b["revealed"].pop(2))
    assert "does not ask the committed key" in tampered(lambda b: b["queries"][0]["request"].update(prompt="another key"))
    assert "below the floor" in tampered(lambda b: b["test"].update(chance_rate=0.001))
    assert "weaker than the published one" in tampered(lambda b: b["test"].update(min_chance_rate=1e-9))
    assert "no recorded answer" in tampered(lambda b: b["queries"].pop(0))
    assert "answered twice" in tampered(lambda b: b["queries"].append(copy.deepcopy(b["queries"][0])))
    assert "not a committed format of the test" in tampered(lambda b: b["test"].update(formats=["raw"]))

    def hide_misses(b: dict) -> None:
        """Keys 2-4 recorded as errors (as if they had been misses), the p-value of 2/2 recorded."""
        for q in b["queries"]:
            if q["position"] >= 2:
                q.update(answer="", error="connection failed")
        b["test"].update(matches={f: {"matched": 2, "answered": 2} for f in ("raw", "chat")},
                         log10_p_value=log10_p_value(2, 2, 0.05) + math.log10(2), verdict="MATCH")
    assert "leaving out 6 unanswered requests" in tampered(hide_misses)
    strict = verify(bundle, root, tmp_path, "--count", count, alpha="1e-6")  # the published default alpha
    assert strict.returncode == NOT_VERIFIED and "weaker than the published one" in strict.stderr
    assert "published count" in verify(bundle, root, tmp_path, "--count", "9").stderr
    wrong_root = verify(bundle, "0" * 64, tmp_path, "--count", count)
    assert wrong_root.returncode == NOT_VERIFIED and "not the published root" in wrong_root.stderr
    not_a_bundle = verify({"format": "something else"}, root, tmp_path, "--count", count)
    assert not_a_bundle.returncode == BAD_INPUT and "not an evidence bundle" in not_a_bundle.stderr


@pytest.mark.slow
def test_later_checks_draw_only_keys_never_revealed(run_copy, tmp_path):
    run = run_copy
    first = check(run, tmp_path, "--num_fingerprints", "5", "--evidence", "a.json")
    assert "never revealed and still usable: 0" in first.stdout  # of the 5 selected
    second = check(run, tmp_path, "--evidence", "b.json")
    assert [e["position"] for e in json.loads((tmp_path / "b.json").read_text())["revealed"]] == [5, 6, 7]
    assert "Keys revealed by this check: 3; never revealed and still usable: 0" in second.stdout
    spent = check(run, tmp_path, "--evidence", "c.json", check=False)
    assert spent.returncode == 2 and "revealed by earlier checks" in spent.stderr and not (tmp_path / "c.json").exists()
    again = check(run, tmp_path, "--evidence", "c.json", "--reuse_revealed")
    assert "Keys revealed by this check: 8" in again.stdout
    ledger = [json.loads(line) for line in (run / "revealed.jsonl").read_text().splitlines()]
    assert [len(entry["positions"]) for entry in ledger] == [5, 3, 8]
    assert all(set(entry) == {"time", "suspect", "positions", "formats", "check"} for entry in ledger)
    plain = check(run, tmp_path)  # a local check without a bundle reveals nothing: every key, no ledger entry
    assert "Keys revealed by this check" not in plain.stdout
    assert len((run / "revealed.jsonl").read_text().splitlines()) == 3


@pytest.mark.slow
def test_a_run_made_before_commitments_can_be_given_one(run_copy, tmp_path):
    run = run_copy
    old = json.loads((run / "commitment.json").read_text())
    (run / "commitment.json").unlink()
    (run / "commitment_salts.json").unlink()
    refused = check(run, tmp_path, "--evidence", "e.json", check=False)
    assert refused.returncode == 2 and "commit_fingerprints.py" in refused.stderr
    made = run_script("commit_fingerprints.py", "--run", run, cwd=tmp_path)
    new = json.loads((run / "commitment.json").read_text())
    assert new["count"] == old["count"] == 8 and new["root"] != old["root"]  # fresh salts
    assert new["root"] in made.stdout
    again = run_script("commit_fingerprints.py", "--run", run, cwd=tmp_path, check=False)
    assert again.returncode == 2 and json.loads((run / "commitment.json").read_text()) == new
