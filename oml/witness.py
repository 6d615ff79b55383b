"""A witnessed check: a verdict that rests on answers the owner never touched.

An owner-made bundle's answers are the owner's word. Instead the owner hands a witness sealed
keys (`check_fingerprints.py --export_sealed`: the next unrevealed keys with their salts and
proofs, recorded in the run's ledger as revealed to the witness), and the witness checks the
proofs against the published root, asks the suspect itself under its own rules and null models,
and writes its own bundle, which anyone can verify like any other (`verify_evidence.py`): its
requests are the checker's, and its answers are what the suspect told the witness.
"""
from oml import OMLError
from oml.checking import KeyResult, Query
from oml.evidence import MATCH_RULES, NullResults, Protocol, bundle_of, check_revealed, committed_formats, judged
from oml.fingerprints import responses_of
from oml.pipeline import SEALED_FORMAT, recorded_test, sequential_check, sequential_findings
from oml.remote import ApiConfig, ApiRequest, base_url_of, check_over_api, shown_url
from oml.stats import findings


class SealedKeys:
    """The sealed keys' positions handed out in committed order, a round at a time, as a check's
    `Disclosure` does (the owner's ledger recorded them all when sealing)."""

    def __init__(self, positions: list[int]):
        self.candidates, self.sent = positions, []

    def reserve(self, count: int, key_formats: tuple[str, ...]) -> list[int]:
        chosen = self.candidates[len(self.sent):][:count]
        self.sent += chosen
        return chosen


def requests_for(records: dict[int, dict], positions: list[int], key_formats: tuple[str, ...]) -> list[ApiRequest]:
    """The checker's requests for the records (by committed position) at `positions`, every format, bare:
    each as many tokens as the committed response length (which bounds the reply), accepting the
    record's other responses too."""
    requests = []
    for q, key_format in enumerate(key_formats):
        for position in positions:
            record = records[position]
            response, *others = responses_of(record)
            requests.append(ApiRequest(position, Query(key_format), q, record["key"], response, record["response_length"],
                                       response, tuple(others)))
    return requests


def witnessed_check(sealed: dict, root: str, count: int, suspect: ApiConfig, protocol: Protocol,
                    null_results: NullResults | None) -> dict:
    """Ask `suspect` the sealed keys under `protocol` (its test for API suspects) and return the witness's
    bundle. Raises Tampered when a sealed key is not under the published root."""
    if not isinstance(sealed, dict) or sealed.get("format") != SEALED_FORMAT:
        raise OMLError(f"not a file of sealed keys ({SEALED_FORMAT!r} expected)")
    records = check_revealed(sealed.get("revealed"), count, root)
    key_formats = protocol.formats or committed_formats(records)
    verdict = protocol.verdict.for_responses(max(len(responses_of(r)) for r in records.values()))
    responses = {position: responses_of(record) for position, record in records.items()}
    nulls = {name: judged(results, responses, MATCH_RULES["api"])
             for name, results in (null_results(records, key_formats) if null_results else {}).items()}

    def ask(positions: list[int], require_an_answer: bool = True) -> list[KeyResult]:
        return check_over_api(suspect, requests_for(records, positions, key_formats), require_an_answer=require_an_answer)

    keys = SealedKeys(list(records))
    sequential = protocol.sequential if protocol.tests["api"] == "sequential" else None
    if sequential is not None:
        results, test, interrupted = sequential_check(ask, keys, key_formats, nulls, verdict, sequential)
        if interrupted:
            raise KeyboardInterrupt
        found = {**sequential_findings(test, results, nulls, key_formats), "sequential": test.summary()}
    else:
        results = ask(keys.reserve(len(records), key_formats))
        found = findings(results, nulls, key_formats, verdict)
    queries = [{"position": r.index, "format": r.format, "template": None, "request": r.request, "answer": r.predicted,
                "error": r.error} for r in results]
    about = {"kind": "api", "endpoint": shown_url(base_url_of(suspect.api_base)), "model": suspect.api_model}
    commitment = {"root": root.lower(), "count": count, "hash": "sha256", "tree": "RFC 6962"}
    revealed = [entry for entry in sealed["revealed"] if entry["position"] in keys.sent]
    return bundle_of(commitment, revealed, about, queries, list(nulls), recorded_test(found, key_formats, verdict, sequential))
