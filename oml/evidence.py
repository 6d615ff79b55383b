"""Evidence a third party can check without trusting the owner: the bundle a check writes
(`check_fingerprints.py --evidence FILE`) and its verification (`verify_evidence.py`).

A bundle holds, for the keys the check revealed and only those: each committed record with its
salt and Merkle proof against the root published at fine-tuning time; the exact request sent
for every key and format and the suspect's raw answer; the null models' answers; and the
statistic, p-value and verdict with the settings they came from. The verifier needs the
published root and count and nothing secret: it checks every proof, that the revealed keys are
the consecutive committed positions the bundle claims (so they were not picked after the fact
among many), that every request asked exactly the committed key, and it recomputes the
matches, the p-value and the verdict from the recorded answers.

What it cannot show: that the owner did not run other checks and keep their bundles, and (for
a sequential check) the null models' rate on keys that stay secret; it checks that the chance
rate used is at least the published floor and at least the null models' rate on the revealed
keys. Each published bundle is honest about its own keys.
"""
import math
import platform
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from importlib import metadata

from oml import OMLError
from oml.checking import KeyResult
from oml.remote import is_match
from oml.commitment import committed_fields, leaf_hash, merkle_root, revealed_records, verify_revealed
from oml.fingerprints import responses_of
from oml.sequential import SequentialConfig, SequentialTest
from oml.stats import VerdictConfig, findings

FORMAT = "oml-evidence/1"
# How an answer counts as the response: an API reply starts with it (the server tokenizes the text
# itself, leading whitespace ignored, as oml.remote does); a local model's greedy tokens decode to it.
MATCH_RULES = ("prefix", "exact")


def answer_matches(answer: str, response: str, rule: str) -> bool:
    return is_match(answer, response) if rule == "prefix" else answer == response


def answers_record(answer: str, record: dict, rule: str) -> bool:
    """Whether `answer` is the committed record's response or one of its other responses: a key
    trained with several accepted responses is matched by a model that serves any of them."""
    return any(answer_matches(answer, response, rule) for response in responses_of(record))


def versions() -> dict:
    """The software that made the bundle: enough to rerun the check the same way."""
    import torch
    import transformers

    try:
        oml_version = metadata.version("oml-fingerprinting")
    except metadata.PackageNotFoundError:
        oml_version = "unknown (not installed)"
    return {"oml": oml_version, "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__}


@dataclass
class RecordedTest:
    """A bundle's `test`: the statistical test of the check, the settings its verdict came from and
    its outcome, which the verifier recomputes from the recorded answers."""
    kind: str  # "fixed" (every key asked at once) or "sequential"
    formats: list[str]  # the key formats tested
    alpha: float
    min_chance_rate: float  # the floor of the chance rate
    chance_rate: float  # the rate the p-value was computed with
    log10_p_value: float
    verdict: str
    matches: dict[str, dict]  # per format: {"matched": int, "answered": int}
    sequential: dict | None = None  # sequential only: its SequentialConfig
    planned_keys: int | None = None  # sequential only: the most keys it could reveal

    def to_dict(self) -> dict:
        """The JSON object (a fixed test has no sequential fields)."""
        return {name: value for name, value in asdict(self).items()
                if value is not None or name not in ("sequential", "planned_keys")}


def make_bundle(commitment: dict, records: list[dict], salts: list[str], positions: list[int], suspect: dict, match_rule: str,
                queries: list[dict], nulls: dict[str, list[KeyResult]], test: RecordedTest) -> dict:
    """The evidence bundle of one check. `positions`: the committed positions revealed (in the order asked);
    `queries`: per key and format, {"position", "format", "template", "request", "answer", "error"};
    `nulls`: each null model's results, indexed by committed position (only revealed ones are kept);
    `test`: the statistic's settings and outcome. Nothing about unrevealed keys goes in."""
    if merkle_root([leaf_hash(r, s) for r, s in zip(records, salts)]).hex() != commitment["root"]:
        raise OMLError("the run's fingerprints, cut by today's tokenizer, no longer give its committed root: a bundle "
                       "built from them would not verify")
    kept = set(positions)
    return {
        "format": FORMAT,
        "created": datetime.now(timezone.utc).isoformat(),
        "versions": versions(),
        "commitment": {name: commitment[name] for name in ("root", "count", "hash", "tree", "leaf_encoding")},
        "suspect": suspect,
        "match_rule": match_rule,
        "revealed": revealed_records(records, salts, positions),
        "queries": queries,
        "null_models": [{"model": name, "answers": [{"position": r.index, "format": r.format, "answer": r.predicted}
                                                    for r in results if r.index in kept and r.template is None]}
                        for name, results in nulls.items()],
        "test": test.to_dict(),
    }


class Tampered(Exception):
    """A bundle that does not hold up: a proof, a request, a count or a verdict does not check out."""


def verify(bundle: dict, root: str, count: int, verdict_config: VerdictConfig = VerdictConfig(),
           sequential_config: SequentialConfig = SequentialConfig()) -> dict:
    """Check a bundle against the published `root` and `count` (the root alone does not fix the
    number of leaves), under the verifier's own verdict rule: the bundle's must be at least as
    strict (an alpha no larger, a floor no lower) and a sequential check's decision settings the
    published ones (`sequential_config`), so that an owner cannot pick them after seeing the
    answers. Returns what was recomputed; raises Tampered with the first thing that does not check
    out, OMLError for a file that is not a bundle at all."""
    try:
        return _verify(bundle, root, count, verdict_config, sequential_config)
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise OMLError(f"not an evidence bundle of this version ({type(error).__name__}: {error})") from None


def _verify(bundle: dict, root: str, count: int, verdict_config: VerdictConfig, sequential_config: SequentialConfig) -> dict:
    if bundle.get("format") != FORMAT:
        raise OMLError(f"not an evidence bundle ({FORMAT!r} expected, got {bundle.get('format')!r})")
    commitment = bundle["commitment"]
    if commitment["root"].lower() != root.lower():
        raise Tampered(f"the bundle's root {commitment['root']} is not the published root {root}")
    if commitment["count"] != count:
        raise Tampered(f"the bundle claims {commitment['count']} committed fingerprints, the published count is {count}")
    records = check_revealed(bundle["revealed"], count, root)
    # Keys that accept k responses are matched by chance up to k times as often: the floor scales as the check's did.
    check_rule(bundle["test"], verdict_config.for_responses(max(len(responses_of(r)) for r in records.values())),
               sequential_config)
    suspect_matches = check_queries(bundle["queries"], records, bundle["match_rule"], tuple(bundle["test"]["formats"]))
    null_matches = {null["model"]: {(a["position"], a["format"]): answers_record(a["answer"], records[a["position"]], "exact")
                                    for a in null["answers"] if a["position"] in records}
                    for null in bundle["null_models"]}
    found = recompute_test(bundle["test"], suspect_matches, null_matches, list(records))
    if found["verdict"] == "MATCH":
        unanswered = [key for key, matched in suspect_matches.items() if matched is None]
        strict = recompute_test(bundle["test"], {key: bool(m) for key, m in suspect_matches.items()}, null_matches,
                                list(records), recorded=False)
        if strict["verdict"] != "MATCH":
            raise Tampered(f"the MATCH rests on leaving out {len(unanswered)} unanswered requests: counted as misses, "
                           "the answers do not reach it")
    return found


def check_rule(test: dict, verdict_config: VerdictConfig, sequential_config: SequentialConfig) -> None:
    """The bundle's statistical settings are at least as strict as the verifier's."""
    if test["alpha"] > verdict_config.alpha or test["min_chance_rate"] < verdict_config.min_chance_rate:
        raise Tampered(f"the bundle's verdict rule (alpha {test['alpha']:g}, floor {test['min_chance_rate']:g}) is weaker than "
                       f"the published one (alpha {verdict_config.alpha:g}, floor {verdict_config.min_chance_rate:g})")
    if test["kind"] == "sequential":
        given = SequentialConfig(**test["sequential"])
        if (given.alternative_rate, given.round_size) != (sequential_config.alternative_rate, sequential_config.round_size):
            raise Tampered(f"the sequential check ran with alternative rate {given.alternative_rate:g} and rounds of "
                           f"{given.round_size}, not the published {sequential_config.alternative_rate:g} and "
                           f"{sequential_config.round_size}")
    elif test["kind"] != "fixed":
        raise Tampered(f"unknown kind of test {test['kind']!r}")


def check_revealed(revealed: list[dict], count: int, root: str) -> dict[int, dict]:
    """Every revealed record under the root at its position, the positions consecutive; each record as
    committed (a field added beside the committed ones is dropped: it is not under the root)."""
    if not revealed:
        raise Tampered("the bundle reveals no key")
    positions = [entry["position"] for entry in revealed]
    for entry in revealed:
        if not verify_revealed(entry, count, root):
            raise Tampered(f"the record at position {entry['position']} is not under the root (altered key, response, "
                           "salt or proof, or a wrong position or count)")
    expected = list(range(positions[0], positions[0] + len(positions)))
    if positions != expected:
        raise Tampered(f"the revealed positions {positions[:5]}... are not the consecutive committed positions "
                       f"{expected[0]}..{expected[-1]}")
    return {entry["position"]: committed_fields(entry["record"]) for entry in revealed}


def check_queries(queries: list[dict], records: dict[int, dict], rule: str,
                  key_formats: tuple[str, ...]) -> dict[tuple[int, str], bool | None]:
    """Every request asked a revealed key as committed, and every revealed key was asked bare exactly
    once in every format of the test; the matches of the bare keys, from the answers (None: the
    request got no answer, which is not counted)."""
    if rule not in MATCH_RULES:
        raise Tampered(f"unknown match rule {rule!r}")
    matches = {}
    for query in queries:
        record = records.get(query["position"])
        if record is None:
            raise Tampered(f"a request asks position {query['position']}, which the bundle does not reveal")
        if query["format"] not in key_formats or record["key_format"] not in (query["format"], "both"):
            raise Tampered(f"position {query['position']} was asked as {query['format']!r}, not a committed format of the test")
        unsent = query["error"] is not None and query["request"] is None
        if not unsent and not asks_committed_key(query, record["key"]):
            raise Tampered(f"the request for position {query['position']} does not ask the committed key")
        if query["template"] is None:
            key = (query["position"], query["format"])
            if key in matches:
                raise Tampered(f"position {key[0]} is answered twice as {key[1]!r}")
            matches[key] = None if query["error"] is not None else answers_record(query["answer"], record, rule)
    missing = {(p, f) for p in records for f in key_formats} - set(matches)
    if missing:
        raise Tampered(f"{len(missing)} revealed (key, format) pairs have no recorded answer, e.g. position "
                       f"{min(missing)[0]} as {min(missing)[1]!r}")
    return matches


def asks_committed_key(query: dict, key: str) -> bool:
    """Whether the recorded request holds exactly the committed key: as the prompt (inside its system
    prompt template, if any) for raw keys, as the only user message for chat keys."""
    request, template = query["request"], query["template"]
    if query["format"] == "raw":
        return request.get("prompt") == (template.replace("{}", key) if template else key)
    return [m.get("content") for m in request.get("messages", []) if m.get("role") == "user"] == [key]


def recompute_test(test: dict, suspect: dict[tuple[int, str], bool | None], nulls: dict[str, dict], positions: list[int],
                   recorded: bool = True) -> dict:
    """The verdict from the recorded answers, under the settings the bundle names; it must be the one
    recorded. A fixed-sample check is recomputed whole (its null models saw exactly the revealed keys);
    a sequential one replays its keys in order, at the chance rate it fixed beforehand, which must be at
    least the floor and the null models' rate on the revealed keys."""
    formats = tuple(test["formats"])
    verdict_config = VerdictConfig(min_chance_rate=test["min_chance_rate"], alpha=test["alpha"])
    rate = test["chance_rate"]
    for name, answers in nulls.items():
        if answers and rate < sum(answers.values()) / len(answers):
            raise Tampered(f"the chance rate {rate:g} is below null model {name}'s match rate on the revealed keys")
    if rate < verdict_config.min_chance_rate:
        raise Tampered(f"the chance rate {rate:g} is below the floor {verdict_config.min_chance_rate:g}")
    if test["kind"] == "fixed":
        def results(matches: dict) -> list[KeyResult]:
            return [KeyResult(index=p, format=f, template=None, query=0, match=m, token_accuracy=float(bool(m)),
                              error=None if m is not None else "no answer") for (p, f), m in matches.items()]
        found = findings(results(suspect), {name: results(answers) for name, answers in nulls.items()}, formats, verdict_config)
        log10_p, decided = found["log10_p_value"], found["verdict"]
    else:
        sequential = SequentialTest(rate, verdict_config.alpha, formats, SequentialConfig(**test["sequential"]),
                                    test["planned_keys"])
        if sequential.replay([{f: suspect.get((p, f)) for f in formats} for p in positions]) < len(positions):
            raise Tampered("the check went on revealing keys after its verdict was reached")
        log10_p, decided = sequential.log10_p_value, sequential.decision()
    if not recorded:  # a recount under other assumptions: nothing to compare with
        return {"keys": len(positions), "log10_p_value": log10_p, "verdict": decided}
    if decided != test["verdict"] or not math.isclose(log10_p, test["log10_p_value"], rel_tol=1e-6, abs_tol=1e-9):
        raise Tampered(f"the recorded verdict {test['verdict']} (log10 p {test['log10_p_value']:.4g}) is not what the answers "
                       f"give: {decided} (log10 p {log10_p:.4g})")
    matches = {f: {"matched": sum(bool(v) for (_, g), v in suspect.items() if g == f),
                   "answered": sum(v is not None for (_, g), v in suspect.items() if g == f)} for f in formats}
    if matches != test["matches"]:
        raise Tampered(f"the recorded matches {test['matches']} are not what the answers give: {matches}")
    return {"keys": len(positions), "matches": matches, "log10_p_value": log10_p, "verdict": decided}
