"""Evidence that survives disclosure: the ledger of revealed keys, the evidence bundle and its
verifier, end to end on a tiny fingerprinted run."""
import copy
import csv
import io
import json
import math
import shutil

import pytest

from oml.commitment import committed_record, make_commitment, revealed_records
from dataclasses import replace

from oml import OMLError
from oml.checking import KeyResult, Query
from oml.evidence import FORMAT, Protocol, Tampered, answers_record
from oml.evidence import verify as verify_bundle
from oml.files import read_json
from oml.remote import ApiRequest, request_body
from oml.sequential import SequentialConfig
from oml.runs import committed_records, dataset_csv
from oml.stats import VerdictConfig, log10_p_value
from oml.tokenization import accepted, encode, fingerprint_pairs
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


def verify(bundle: dict, root: str, tmp_path, *args, alpha: str = "0.01", null_model: str = "none"):
    """verify_evidence.py on `bundle`, its verdict rule at the check's alpha, with the check's null model."""
    path = tmp_path / "bundle.json"
    path.write_text(json.dumps(bundle))
    return run_script("verify_evidence.py", path, "--root", root, "--alpha", alpha, "--null_model", null_model, *args,
                      cwd=tmp_path, check=False)


@pytest.mark.slow
def test_a_bundle_verifies_and_every_kind_of_tampering_is_caught(run_copy, tmp_path, tiny_model):
    run = run_copy
    commitment = json.loads((run / "commitment.json").read_text())
    salts = json.loads((run / "commitment_salts.json").read_text())["salts"]
    fingerprints = json.loads((run / "fingerprints.json").read_text())
    first = check(run, tmp_path, "--num_fingerprints", "5", "--null_model", "none", "--evidence", "first.json")
    assert "will not verify against the run's published protocol: alpha 0.01" in first.stderr  # said before any key is sent
    bundle = json.loads((tmp_path / "first.json").read_text())
    text = (tmp_path / "first.json").read_text()
    assert [entry["position"] for entry in bundle["revealed"]] == [0, 1, 2, 3, 4]
    assert all(record["key"] not in text for record in fingerprints[5:])  # unrevealed keys stay secret
    assert not any(salt in text for salt in salts[5:]) and all(salt in text for salt in salts[:5])

    root, count = commitment["root"], str(commitment["count"])
    honest = verify(bundle, root, tmp_path, "--count", count)
    assert honest.returncode == VERIFIED, honest.stderr[-2000:]
    assert "Evidence verified: MATCH" in honest.stdout and "Rules (from this script's flags): fixed test, formats raw, chat" in honest.stdout
    assert f"Suspect named by the bundle: {run / 'final_model'} (local weights)" in honest.stdout
    committed = verify(bundle, root, tmp_path, "--count", count, "--commitment", run / "commitment.json")
    assert committed.returncode == NOT_VERIFIED and "weaker than the published one" in committed.stderr  # alpha 0.01 > 1e-6

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
    assert "not the request the checker builds" in tampered(lambda b: b["queries"][0]["request"].update(prompt="another key"))
    assert "below the floor" in tampered(lambda b: b["test"].update(chance_rate=0.001))
    assert "weaker than the published one" in tampered(lambda b: b["test"].update(min_chance_rate=1e-9))
    assert "no recorded answer" in tampered(lambda b: b["queries"].pop(0))
    assert "answered twice" in tampered(lambda b: b["queries"].append(copy.deepcopy(b["queries"][0])))
    assert "the rule is raw, chat" in tampered(lambda b: b["test"].update(formats=["raw"]))  # a format dropped

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
    # The fingerprinted model itself as the null model: it matches every key, so these answers are no MATCH.
    own_null = verify(bundle, root, tmp_path, "--count", count, null_model=run / "final_model")
    assert own_null.returncode == NOT_VERIFIED and "match rate on the revealed keys" in own_null.stderr
    for malformed in ["[" * 5000 + "]" * 5000, '{"format": "oml-evidence/1", "n": ' + "9" * 5000 + "}"]:
        (tmp_path / "bundle.json").write_text(malformed)
        result = run_script("verify_evidence.py", tmp_path / "bundle.json", "--root", root, "--count", count, "--null_model",
                            "none", cwd=tmp_path, check=False)
        assert result.returncode == BAD_INPUT and "Traceback" not in result.stderr, result.stderr[-2000:]
    for change in [lambda b: b.pop("suspect"), lambda b: b.update(suspect="gpt-4o"), lambda b: b["test"].update(planned_keys=1e30)]:
        altered = copy.deepcopy(bundle)
        change(altered)
        result = verify(altered, root, tmp_path, "--count", count)
        assert result.returncode in (BAD_INPUT, NOT_VERIFIED) and "Traceback" not in result.stderr, result.stderr[-2000:]


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
def test_a_check_that_cannot_keep_its_ledger_or_reach_a_verdict_is_refused_before_any_key_is_sent(run_copy, tmp_path):
    """Issue 39: a run folder whose ledger cannot be written, a lost ledger, and --max_keys below what the test needs."""
    run = run_copy
    (run / "revealed.jsonl.lock").mkdir()  # no lock can be taken (as in a read-only folder, which root could still write)
    locked = check(run, tmp_path, "--evidence", "a.json", check=False)
    assert locked.returncode == 2 and "cannot lock the ledger" in locked.stderr and "Traceback" not in locked.stderr
    assert not (tmp_path / "a.json").exists() and not (run / "revealed.jsonl").exists()
    (run / "revealed.jsonl.lock").rmdir()
    check(run, tmp_path, "--num_fingerprints", "4", "--evidence", "a.json")
    (run / "revealed.jsonl").unlink()
    lost = check(run, tmp_path, "--evidence", "b.json", check=False)
    assert lost.returncode == 2 and "revealed.jsonl is missing, but this run has revealed keys before" in lost.stderr
    again = check(run, tmp_path, "--evidence", "b.json", "--reuse_revealed")
    assert "Keys revealed by this check: 8" in again.stdout
    nowhere = ["--api_base", "http://127.0.0.1:9/v1", "--api_model", "suspect"]  # refused before any request is sent
    few = run_script("check_fingerprints.py", *nowhere, "--run", run, "--alpha", "0.01", "--reuse_revealed", "--max_keys", "1",
                     cwd=tmp_path, check=False)
    assert few.returncode == 2 and "needs at least 2 keys to reach a MATCH" in few.stderr, few.stderr[-2000:]


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


# Keys that accept several responses, verified in-process on a hand-made bundle (no model needed).
OTHERS = [committed_record({"key": f"secret key {i}", "response": f" yes {i}", "other_responses": [f" oui {i}", f" ja {i}"]},
                           "raw", 16, 2) for i in range(4)]
OTHERS_PUBLIC, OTHERS_SALTS = make_commitment(OTHERS)
FLOOR, ALPHA = 0.05, 0.01
SCALED_FLOOR = FLOOR * 3  # three accepted responses per key: matched by chance up to three times as often
# The verifier's rules for these bundles: an API suspect checked with every key at once.
FIXED = Protocol(tests={"local": "fixed", "api": "fixed"}, verdict=VerdictConfig(min_chance_rate=FLOOR, alpha=ALPHA))


def api_request(record: dict, key_format: str = "raw", model: str = "suspect") -> dict:
    """The request the checker sends for `record`, bare, without log-probabilities."""
    return request_body(ApiRequest(0, Query(key_format), 0, record["key"], record["response"], 2, ""), model, False)


def bundle_of(answers: list[str], floor: float = SCALED_FLOOR) -> dict:
    """A fixed-sample bundle of the four keys, raw, asked over an API (prefix rule), recording 4/4 matches."""
    return {"format": FORMAT, "commitment": {name: OTHERS_PUBLIC[name] for name in ("root", "count", "hash", "tree")},
            "suspect": {"kind": "api", "endpoint": "http://127.0.0.1:8000/v1", "model": "suspect"}, "match_rule": "prefix",
            "revealed": revealed_records(OTHERS, OTHERS_SALTS, list(range(len(OTHERS)))),
            "queries": [{"position": i, "format": "raw", "template": None, "request": api_request(record),
                         "answer": answer, "error": None} for i, (record, answer) in enumerate(zip(OTHERS, answers))],
            "null_models": [],
            "test": {"kind": "fixed", "formats": ["raw"], "alpha": ALPHA, "min_chance_rate": floor, "chance_rate": floor,
                     "log10_p_value": log10_p_value(4, 4, floor), "verdict": "MATCH",
                     "matches": {"raw": {"matched": 4, "answered": 4}}}}


ANSWERS = [" yes 0, and more", " ja 1", "  oui 2!", " yes 3"]  # the response or one of the others, as a prefix


def verified(evidence: dict, protocol: Protocol = FIXED, nulls=None) -> dict:
    return verify_bundle(evidence, OTHERS_PUBLIC["root"], len(OTHERS), protocol, nulls)


def tampered(evidence: dict, protocol: Protocol = FIXED, nulls=None) -> str:
    with pytest.raises(Tampered) as problem:
        verified(evidence, protocol, nulls)
    return str(problem.value)


def null_answering(answers: dict[int, str]):
    """A null model that answers position p with answers[p] (else ' no'), as the verifier's own null check would."""
    def ask(records: dict, key_formats: tuple) -> dict:
        return {"base": [KeyResult(index=p, format=f, template=None, query=0, match=answers.get(p) == r["response"],
                                   predicted=answers.get(p, " no")) for f in key_formats for p, r in records.items()]}
    return ask


def test_an_answer_with_any_accepted_response_is_a_match():
    assert answers_record(" ja 1", OTHERS[1], "exact") and answers_record(" yes 1", OTHERS[1], "exact")
    assert not answers_record(" ja 1.", OTHERS[1], "exact") and answers_record(" ja 1.", OTHERS[1], "prefix")
    assert not answers_record(" ja 2", OTHERS[1], "prefix") and not answers_record(" no", OTHERS[1], "prefix")
    assert answers_record(" yes 7", {"response": " yes 7"}, "exact")  # a record without others: its response only

    found = verified(bundle_of(ANSWERS))
    assert found["verdict"] == "MATCH" and found["matches"] == {"raw": {"matched": 4, "answered": 4}}
    assert "not what the answers give" in tampered(bundle_of([*ANSWERS[:3], " no"]))


def test_keys_with_other_responses_need_the_scaled_floor_and_count_null_matches_on_them():
    assert "weaker than the published one" in tampered(bundle_of(ANSWERS, floor=FLOOR))
    # The verifier's own null model says another accepted response of key 1: a match, counted in the chance rate.
    assert "below null model base's match rate" in tampered(bundle_of(ANSWERS), nulls=null_answering({1: " ja 1"}))
    added = bundle_of(ANSWERS)
    added["revealed"][0]["record"]["other_responses"].append(" anything")
    assert "not under the root" in tampered(added)


def changed(change) -> dict:
    evidence = bundle_of(ANSWERS)
    change(evidence)
    return evidence


def test_requests_that_dictate_the_answer_or_name_another_suspect_do_not_verify():
    """Forgeries 6 and 7 of issue 39: every request is exactly the checker's, naming the bundle's suspect."""
    system = [{"role": "system", "content": "reply with exactly: yes"}]
    chat = changed(lambda b: b["queries"][0]["request"].update(api_request(OTHERS[0], "chat")))
    assert "not the request the checker builds" in tampered(chat)  # a raw key asked as a chat message
    assert "not the request the checker builds" in tampered(changed(lambda b: b["queries"][0]["request"].update(logit_bias={"9": 100})))
    assert "not the request the checker builds" in tampered(changed(lambda b: b["queries"][1]["request"].update(prompt="secret key 1 yes")))
    assert "not the request the checker builds" in tampered(changed(lambda b: b["queries"][2]["request"].update(max_tokens=3)))
    assert "not the request the checker builds" in tampered(changed(lambda b: b["queries"][2]["request"].update(suffix=" yes")))
    assert "names the model 'suspect', not the suspect 'gpt-4o-INNOCENT'" in tampered(
        changed(lambda b: b["suspect"].update(model="gpt-4o-INNOCENT")))
    with_logprobs = changed(lambda b: b["queries"][3]["request"].update(logprobs=10))  # as the checker asks when it can
    assert verified(with_logprobs)["verdict"] == "MATCH"
    chat_records = [committed_record({"key": "chat key", "response": " yes"}, "chat", 4, 1)]
    public, salts = make_commitment(chat_records)
    request = api_request(chat_records[0], "chat")
    evidence = {**bundle_of(ANSWERS), "commitment": {name: public[name] for name in ("root", "count", "hash", "tree")},
                "revealed": revealed_records(chat_records, salts, [0]),
                "queries": [{"position": 0, "format": "chat", "template": None, "answer": " yes", "error": None,
                             "request": {**request, "messages": system + request["messages"]}}],
                "test": {**bundle_of(ANSWERS)["test"], "formats": ["chat"], "log10_p_value": log10_p_value(1, 1, 0.05),
                         "min_chance_rate": 0.05, "chance_rate": 0.05, "matches": {"chat": {"matched": 1, "answered": 1}}}}
    with pytest.raises(Tampered, match="not the request the checker builds"):
        verify_bundle(evidence, public["root"], 1, FIXED)
    evidence["queries"][0]["request"] = {**request, "messages": request["messages"] + [{"role": "assistant", "content": " yes"}]}
    with pytest.raises(Tampered, match="not the request the checker builds"):
        verify_bundle(evidence, public["root"], 1, FIXED)


def test_the_verifier_not_the_bundle_decides_the_test_the_formats_and_the_null_answers():
    """Forgeries 3, 4, 5, 8 and 9 of issue 39, and the fields issue 39 found unchecked."""
    assert "the rule for this suspect is a sequential test" in tampered(bundle_of(ANSWERS), Protocol(verdict=FIXED.verdict))
    assert "the rule is raw, chat" in tampered(bundle_of(ANSWERS), replace(FIXED, formats=("raw", "chat")))
    assert "neither MATCH nor NO MATCH" in tampered(changed(lambda b: b["test"].update(verdict=None)))
    assert "not a sha256 RFC 6962 tree" in tampered(changed(lambda b: b["commitment"].update(tree="flat")))
    # Null answers in the bundle are never read: the verifier's own null model matches every key, so no MATCH.
    lying = changed(lambda b: b.update(null_models=[{"model": "base", "answers": []}]))
    assert "below null model base's match rate" in tampered(lying, nulls=null_answering({p: r["response"] for p, r in enumerate(OTHERS)}))
    sequential = changed(lambda b: b["test"].update(kind="sequential", sequential=SequentialConfig(no_match_error=0.5).to_dict(),
                                                    planned_keys=4))
    assert "not the published" in tampered(sequential, replace(FIXED, tests={"local": "fixed", "api": "sequential"}))
    sequential["test"]["planned_keys"] = 10**30
    with pytest.raises(Tampered, match="planned keys"):
        verified(sequential, replace(FIXED, tests={"local": "fixed", "api": "sequential"},
                                     sequential=SequentialConfig(no_match_error=0.5)))


@pytest.mark.parametrize("change", [lambda b: b.pop("suspect"), lambda b: b.update(suspect="gpt-4o"),
                                    lambda b: b["test"].update(alpha="0.01"), lambda b: b["test"].update(chance_rate=float("nan")),
                                    lambda b: b["queries"].append(None), lambda b: b.update(revealed={}),
                                    lambda b: b["queries"][0].update(position=[1])])
def test_a_malformed_bundle_is_a_one_line_error(change):
    with pytest.raises((OMLError, Tampered)):
        verified(changed(change))


def test_a_bundle_file_too_deep_too_long_or_too_large_is_a_one_line_error(tmp_path):
    path = tmp_path / "bundle.json"
    for text in ["[" * 5000 + "]" * 5000, '{"count": ' + "9" * 5000 + "}", "{" * 20000]:
        path.write_text(text)
        with pytest.raises(OMLError, match="not valid JSON"):
            read_json(path, "evidence bundle", 2**20)
    path.write_text(json.dumps({"padding": "x" * 2**20}))
    with pytest.raises(OMLError, match="larger than 1 MiB"):
        read_json(path, "evidence bundle", 2**20)
    with pytest.raises(OMLError, match="nested deeper"):
        verified(changed(lambda b: b.update(versions=json.loads("[" * 100 + "]" * 100))))


def test_the_verifier_asks_for_every_accepted_response(tokenizer):
    from oml.witness import requests_for
    from verify_evidence import revealed_pairs

    plain = committed_record({"key": "a plain key", "response": " plain"}, "raw", 3, 1)
    pairs = revealed_pairs(tokenizer, [OTHERS[0], plain])
    assert accepted(pairs[0][1]) == [encode(tokenizer, text)[:2] for text in (" yes 0", " oui 0", " ja 0")]
    assert accepted(pairs[1][1]) == [encode(tokenizer, " plain")[:1]] and type(pairs[1][1]) is list
    requests = requests_for({5: OTHERS[0], 6: plain}, [5, 6], ("raw", "chat"))
    assert [(r.index, r.query.key_format) for r in requests] == [(5, "raw"), (6, "raw"), (5, "chat"), (6, "chat")]
    assert (requests[0].response, requests[0].others, requests[0].max_tokens) == (" yes 0", (" oui 0", " ja 0"), 2)
    assert (requests[1].response, requests[1].others, requests[1].max_tokens) == (" plain", (), 1)  # as before other responses


def test_committed_records_and_the_dataset_carry_the_other_responses(tokenizer):
    fingerprints = [{"key": "first key", "response": " yes", "other_responses": [" oui", " ja"]}, {"key": "second key", "response": " no"}]
    pairs = fingerprint_pairs(tokenizer, fingerprints, 16, 4)
    records = committed_records(tokenizer, pairs, "raw")
    assert records[0]["other_responses"] == [" oui", " ja"] and "other_responses" not in records[1]
    rows = list(csv.reader(io.StringIO(dataset_csv(tokenizer, pairs))))
    assert rows == [["key", "response", "other_responses"], ["first key", " yes", '[" oui", " ja"]'], ["second key", " no", "[]"]]
    plain = pairs[1:]
    assert committed_records(tokenizer, plain, "raw") == [{"key": "second key", "response": " no", "key_format": "raw",
                                                            "key_length": len(pairs[1][0]), "response_length": len(pairs[1][1])}]
    assert dataset_csv(tokenizer, plain) == "key,response\r\nsecond key, no\r\n"
