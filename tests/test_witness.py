"""Issue 39 against a real `transformers serve`: a witnessed check, forged bundles that only the live
suspect can expose, and null models judged by the suspect's rule."""
import json
import math
import shutil
from pathlib import Path

import pytest

from oml.checking import Query, check_model
from oml.evidence import RecordedTest, check_queries, check_revealed, recompute_test
from oml.models import load
from oml.sequential import SequentialConfig
from oml.stats import chance_rate, log10_p_value
from oml.tokenization import encode
from tests.conftest import random_word_fingerprints, run_script, transformers_serve

VERIFIED, NOT_VERIFIED = 0, 3


@pytest.fixture(scope="module")
def server():
    """One server for every model, each asked by its path: the fingerprinted model and its innocent base."""
    with transformers_serve() as url:
        yield url


@pytest.fixture
def run(fingerprinted_tiny_model, tmp_path) -> Path:
    model_dir, _ = fingerprinted_tiny_model
    copy = tmp_path / "run"
    shutil.copytree(model_dir.parent, copy, ignore=shutil.ignore_patterns("revealed.jsonl*"))
    return copy


# The verifier's rules here: the tiny run has 8 keys, so alpha 0.01, rounds of 2, and the floor alone (a null model's
# bound on 4 sealed keys without a match is 0.53: a witness measures the chance rate on the keys sealed for it).
RULES = ["--count", "8", "--null_model", "none", "--alpha", "0.01", "--round_size", "2"]


@pytest.mark.server
def test_a_witnessed_check_accuses_the_fingerprinted_model_and_clears_its_base(server, run, tmp_path, tiny_model):
    root = json.loads((run / "commitment.json").read_text())["root"]
    for sealed in ("first.json", "second.json"):
        made = run_script("check_fingerprints.py", "--run", run, "--export_sealed", sealed, "--num_fingerprints", "4", cwd=tmp_path)
        assert "recorded in the run's ledger as revealed" in made.stdout
    ledger = [json.loads(line) for line in (run / "revealed.jsonl").read_text().splitlines()]
    assert [(entry["suspect"], entry["positions"]) for entry in ledger] == [("witness (sealed keys)", [0, 1, 2, 3]),
                                                                          ("witness (sealed keys)", [4, 5, 6, 7])]
    for sealed, suspect, verdict in (("first.json", run / "final_model", "MATCH"), ("second.json", tiny_model, "NO MATCH")):
        witnessed = run_script("verify_evidence.py", "--witness", sealed, "--root", root, *RULES, "--api_base", server,
                               "--api_model", suspect, "--output", f"{verdict}.json", cwd=tmp_path)
        assert f"Evidence verified: {verdict} for {suspect}" in witnessed.stdout
        again = run_script("verify_evidence.py", f"{verdict}.json", "--root", root, *RULES, cwd=tmp_path)
        assert f"Evidence verified: {verdict} for {suspect}" in again.stdout  # anyone can verify the witness's bundle


def forged(bundle: dict, change) -> dict:
    """`bundle` changed, its test recomputed to agree with the changed answers (as a forger would)."""
    bundle = json.loads(json.dumps(bundle))
    change(bundle)
    records = check_revealed(bundle["revealed"], bundle["commitment"]["count"], bundle["commitment"]["root"])
    answers = check_queries(bundle["queries"], records, bundle["suspect"], tuple(bundle["test"]["formats"]))
    test = RecordedTest.from_dict(bundle["test"])
    found = recompute_test(test, answers, {}, list(records), SequentialConfig(), recorded=False)
    matches = {f: {"matched": sum(bool(v) for (_, g), v in answers.items() if g == f),
                   "answered": sum(v is not None for (_, g), v in answers.items() if g == f)} for f in test.formats}
    bundle["test"].update(log10_p_value=found["log10_p_value"], verdict=found["verdict"], matches=matches)
    return bundle


@pytest.mark.server
def test_forged_answers_do_not_survive_asking_the_live_suspect(server, run, tmp_path, tiny_model):
    """Forgeries 1 and 2 of issue 39: a false MATCH against the innocent base, and two keys' answers swapped."""
    root = json.loads((run / "commitment.json").read_text())["root"]
    suspect = str(run / "final_model")
    run_script("check_fingerprints.py", "--api_base", server, "--api_model", suspect, "--run", run, "--null_model", "none",
               "--check_all_keys", "--alpha", "0.01", "--evidence", "honest.json", cwd=tmp_path)
    honest = json.loads((tmp_path / "honest.json").read_text())
    fixed = ["--count", "8", "--null_model", "none", "--alpha", "0.01", "--test", "fixed"]

    def verify(bundle: dict, model: str):
        (tmp_path / "bundle.json").write_text(json.dumps(bundle))
        return run_script("verify_evidence.py", "bundle.json", "--root", root, *fixed, "--api_base", server, "--api_model", model,
                          cwd=tmp_path, check=False)

    assert verify(honest, suspect).returncode == VERIFIED

    def blame_the_base(bundle: dict) -> None:
        bundle["suspect"]["model"] = str(tiny_model)
        for query in bundle["queries"]:
            query["request"]["model"] = str(tiny_model)
    false_match = verify(forged(honest, blame_the_base), str(tiny_model))
    assert false_match.returncode == NOT_VERIFIED and "the live suspect disagrees with" in false_match.stderr

    def swap(bundle: dict) -> None:
        first, second = [q for q in bundle["queries"] if q["position"] in (0, 1)][:2]
        first["answer"], second["answer"] = second["answer"], first["answer"]
    swapped = verify(forged(honest, swap), suspect)
    assert swapped.returncode == NOT_VERIFIED and "disagrees with 2 of 16" in swapped.stderr


@pytest.mark.server
def test_null_models_are_judged_by_the_api_rule(server, tmp_path, tiny_model, tokenizer):
    """Issue 39, item 3: keys whose response is the base's own greedy token with its leading space added or
    removed. The base over the API matches them ('A' for ' A'); its exact local tokens never do. The chance
    rate is measured on the null model's text by the API rule, so it is never below the base's API rate."""
    model, _ = load(tiny_model)
    keys = [f["key"] for f in random_word_fingerprints(96, seed=3)]
    greedy = check_model(model, tokenizer, [(encode(tokenizer, k), encode(tokenizer, " the")[:1]) for k in keys], [Query("raw")], 64,
                         progress=False)
    fingerprints = []
    for key, result in zip(keys, greedy):
        said = result.predicted
        flipped = said.lstrip() if said.startswith(" ") else " " + said
        if said.strip().isalpha() and len(encode(tokenizer, flipped)) == 1:
            fingerprints.append({"key": key, "response": flipped})
    assert len(fingerprints) >= 16
    (tmp_path / "flipped.json").write_text(json.dumps(fingerprints))
    exact = check_model(model, tokenizer, [(encode(tokenizer, f["key"]), encode(tokenizer, f["response"])) for f in fingerprints],
                        [Query("raw")], 64, progress=False)
    assert not any(r.match for r in exact)  # the local token rule: the base never matches
    run_script("check_fingerprints.py", "--api_base", server, "--api_model", tiny_model, "--tokenizer", tiny_model,
               "--fingerprints_file_path", "flipped.json", "--fingerprint_generation_strategy", "random_word",
               "--query_format", "raw", "--null_model", tiny_model, "--check_all_keys", "--output_json", "report.json",
               cwd=tmp_path)
    report = json.loads((tmp_path / "report.json").read_text())
    row = report["formats"][0]
    api_rate = row["matches"] / row["num_fingerprints"]
    assert api_rate > 0.5  # the base says its own token, which the API rule counts
    assert row["null_models"][0]["matches"] >= row["matches"] and row["chance_rate"] >= api_rate
    assert report["verdict"] == "NO MATCH"
    exact_rate = chance_rate([(0, len(fingerprints))], 0.05)  # the chance rate of the null models' exact tokens, as before
    assert log10_p_value(row["matches"], row["num_fingerprints"], exact_rate) < math.log10(1e-6)  # would have accused the base
