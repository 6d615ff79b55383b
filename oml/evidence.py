"""Evidence a third party can check without trusting the owner: the bundle a check writes
(`check_fingerprints.py --evidence FILE`) and its verification (`verify_evidence.py`).

A bundle holds, for the keys the check revealed and only those: each committed record with its
salt and Merkle proof against the root published at fine-tuning time; the exact request sent
for every key and format and the suspect's raw answer; the names of the null models; and the
statistic, p-value and verdict with the settings they came from.

The bundle only supplies data; the verifier decides the rules (`Protocol`): the test (fixed or
sequential), the key formats and the statistical settings come from what the owner committed in
advance (`commitment.json`'s protocol) or from the verifier's own flags, never from the bundle,
so that an owner cannot pick them after seeing the answers. The verifier checks every proof, that
the revealed keys are consecutive committed positions (so they were not picked among many), that
every request is exactly the request the checker builds for its key, format and template, naming
the suspect (nothing added: no system message, prefill or logit bias that dictates the answer),
asks the null models the revealed keys itself (their answers in a bundle are never read), and
recomputes the matches, the p-value and the verdict.

What it cannot show: that the recorded answers are what the suspect said. They are the owner's
word; asking the live suspect again (`verify_evidence.py --api_base`) or a witnessed check, whose
requests the witness sends itself, is the answer to that. Nor that the owner did not run other
checks and keep their bundles.
"""
import math
import platform
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import datetime, timezone
from importlib import metadata
from typing import Callable

from oml import OMLError
from oml.checking import KeyResult, Query
from oml.commitment import committed_fields, leaf_hash, merkle_root, revealed_records, verify_revealed
from oml.fingerprints import responses_of
from oml.remote import ApiRequest, is_match, request_body
from oml.sequential import MATCH, NO_MATCH, SequentialConfig, SequentialTest
from oml.stats import VerdictConfig, findings

FORMAT = "oml-evidence/1"
# How an answer counts as the response, by the suspect's kind: an API reply starts with it (the server
# tokenizes the text itself, leading whitespace ignored, as oml.remote does); a local model's greedy
# tokens are it. A bundle cannot choose: the rule follows the suspect it names.
MATCH_RULES = {"api": "prefix", "local": "exact"}
TESTS = ("fixed", "sequential")
# The checker's tests by default: a local check asks every key at once, an API check goes in rounds.
DEFAULT_TESTS = {"local": "fixed", "api": "sequential"}
KEY_FORMATS = ("raw", "chat")
MAX_DEPTH = 16  # of a bundle's JSON nesting: a bundle is 4 levels deep; thousands would exhaust the stack


def answer_matches(answer: str, response: str, rule: str) -> bool:
    return is_match(answer, response) if rule == "prefix" else answer == response


def answers_record(answer: str, record: dict, rule: str) -> bool:
    """Whether `answer` is the committed record's response or one of its other responses: a key
    trained with several accepted responses is matched by a model that serves any of them."""
    return isinstance(answer, str) and any(answer_matches(answer, response, rule) for response in responses_of(record))


def judged(results: list[KeyResult], responses: dict[int, list[str]], rule: str) -> list[KeyResult]:
    """Null models' local results judged by the suspect's match rule (`responses`: each key's accepted
    responses as text, by result index). An API suspect is judged on the text of its reply, and an
    API gives nothing else, so its rule cannot be made as strict as the local token match; instead the
    null models' greedy text is judged by the same text rule, so that the chance rate measures what
    the suspect's rule counts (' A' answered as 'A' is a match for both, or for neither)."""
    if rule == "exact":
        return results
    return [replace(r, match=any(answer_matches(r.predicted, text, rule) for text in responses[r.index])) for r in results]


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


@dataclass(frozen=True)
class Protocol:
    """The rules a bundle's verdict must follow, decided before any answer is seen: by the owner at
    commit time (`commitment.json`'s "protocol") or by the verifier's flags, never by the bundle.
    `formats` None: every format the revealed keys were committed in; `tests`: the test per
    suspect kind (local weights, API)."""
    formats: tuple[str, ...] | None = None
    tests: dict = field(default_factory=lambda: dict(DEFAULT_TESTS))
    verdict: VerdictConfig = VerdictConfig()
    sequential: SequentialConfig = SequentialConfig()

    def to_dict(self) -> dict:
        return {"formats": list(self.formats) if self.formats else None, "tests": dict(self.tests),
                "verdict": self.verdict.to_dict(), "sequential": self.sequential.to_dict()}

    @classmethod
    def from_dict(cls, data: object, what: str) -> "Protocol":
        """A protocol as written by `to_dict`, checked (a bad one is an OMLError naming `what`)."""
        if not (isinstance(data, dict) and isinstance(data.get("tests"), dict) and isinstance(data.get("verdict", {}), dict)
                and isinstance(data.get("sequential", {}), dict)):
            raise OMLError(f"{what}: a protocol must be an object with the tests per suspect kind and its settings")
        formats = data.get("formats")
        if formats is not None and not (isinstance(formats, list) and formats and set(formats) <= set(KEY_FORMATS)
                                        and len(set(formats)) == len(formats)):
            raise OMLError(f"{what}: the protocol's formats must be a list of {' and '.join(KEY_FORMATS)}")
        if set(data["tests"]) != set(DEFAULT_TESTS) or not set(data["tests"].values()) <= set(TESTS):
            raise OMLError(f"{what}: the protocol's tests must name fixed or sequential for local and api suspects")
        return cls(tuple(formats) if formats else None, dict(data["tests"]),
                   VerdictConfig.from_dict(data.get("verdict", {}), what), SequentialConfig.from_dict(data.get("sequential", {}), what))

    def stricter(self, verdict: VerdictConfig) -> "Protocol":
        """This protocol with the stricter of its verdict rule and `verdict` (a verifier may always ask for more)."""
        return replace(self, verdict=VerdictConfig(alpha=min(self.verdict.alpha, verdict.alpha),
                                                   min_chance_rate=max(self.verdict.min_chance_rate, verdict.min_chance_rate)))


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

    @classmethod
    def from_dict(cls, data: object) -> "RecordedTest":
        """A bundle's test, its types and ranges checked (untrusted input: a bad one is an OMLError, a
        verdict that is neither MATCH nor NO MATCH is Tampered)."""
        if not isinstance(data, dict):
            raise OMLError("the bundle's test is not an object")
        test = cls(**{f.name: data.get(f.name) for f in fields(cls)})
        if test.verdict not in (MATCH, NO_MATCH):
            raise Tampered(f"the recorded verdict {str(test.verdict)[:40]!r} is neither {MATCH} nor {NO_MATCH}")
        numbers = {"alpha": (0, 1), "min_chance_rate": (0, 1), "chance_rate": (0, 1), "log10_p_value": (-math.inf, 0)}
        for name, (low, high) in numbers.items():
            value = getattr(test, name)
            if not (_number(value) and low <= value <= high):
                raise OMLError(f"the bundle's test.{name} must be a finite number in [{low}, {high}]")
        if not (isinstance(test.formats, list) and all(isinstance(f, str) for f in test.formats)
                and isinstance(test.matches, dict) and isinstance(test.kind, str)):
            raise OMLError("the bundle's test needs kind, formats (a list) and matches (an object)")
        if test.kind == "sequential" and not (isinstance(test.sequential, dict) and _count(test.planned_keys)):
            raise OMLError("the bundle's sequential test needs its settings and planned_keys (an integer >= 1)")
        if test.kind == "fixed" and (test.sequential, test.planned_keys) != (None, None):
            raise OMLError("the bundle's fixed test has sequential settings")
        return test


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def check_opens(commitment: dict, records: list[dict], salts: list[str]) -> None:
    """The run's records and salts give its committed root: keys revealed from them will verify."""
    if merkle_root([leaf_hash(r, s) for r, s in zip(records, salts)]).hex() != commitment["root"]:
        raise OMLError("the run's fingerprints, cut by today's tokenizer, no longer give its committed root: keys revealed "
                       "from them would not verify")


def make_bundle(commitment: dict, records: list[dict], salts: list[str], positions: list[int], suspect: dict,
                queries: list[dict], null_models: list[str], test: RecordedTest) -> dict:
    """The evidence bundle of one check. `positions`: the committed positions revealed (in the order asked);
    `queries`: per key and format, {"position", "format", "template", "request", "answer", "error"};
    `null_models`: the names of the null models the check used (a verifier asks them itself);
    `test`: the statistic's settings and outcome. Nothing about unrevealed keys goes in."""
    check_opens(commitment, records, salts)
    return bundle_of(commitment, revealed_records(records, salts, positions), suspect, queries, null_models, test)


def bundle_of(commitment: dict, revealed: list[dict], suspect: dict, queries: list[dict], null_models: list[str],
              test: RecordedTest) -> dict:
    """A bundle from keys already revealed with their proofs (`revealed_records` entries): the owner's
    check's, or a witness's sealed ones."""
    return {
        "format": FORMAT,
        "created": datetime.now(timezone.utc).isoformat(),
        "versions": versions(),
        "commitment": {name: commitment[name] for name in ("root", "count", "hash", "tree", "leaf_encoding") if name in commitment},
        "suspect": suspect,
        "match_rule": MATCH_RULES[suspect["kind"]],
        "revealed": revealed,
        "queries": queries,
        "null_models": [{"model": name} for name in null_models],
        "test": test.to_dict(),
    }


class Tampered(Exception):
    """A bundle that does not hold up: a proof, a request, a count or a verdict does not check out."""


# The null models' local results on the revealed records (by committed position) in the given formats, by model name.
NullResults = Callable[[dict[int, dict], tuple[str, ...]], dict[str, list[KeyResult]]]


def verify(bundle: dict, root: str, count: int, protocol: Protocol = Protocol(), null_results: NullResults | None = None) -> dict:
    """Check a bundle against the published `root` and `count` (the root alone does not fix the
    number of leaves) under `protocol`: the bundle's test must be the one the protocol names for its
    suspect, with the protocol's formats and sequential settings, and a verdict rule at least as
    strict. `null_results` asks the null models the revealed keys (called once the bundle's structure
    holds, since loading models is slow; None: no null model, the floor alone). Returns what was
    recomputed; raises Tampered with the first thing that does not check out, OMLError for a file that
    is not a bundle at all."""
    try:
        return _verify(bundle, root, count, protocol, null_results)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as error:
        raise OMLError(f"not an evidence bundle of this version ({type(error).__name__}: {str(error)[:200]})") from None


def _verify(bundle: dict, root: str, count: int, protocol: Protocol, null_results: NullResults | None) -> dict:
    if not isinstance(bundle, dict) or bundle.get("format") != FORMAT:
        raise OMLError(f"not an evidence bundle ({FORMAT!r} expected)")
    check_depth(bundle)
    commitment = bundle["commitment"]
    if (commitment["hash"], commitment["tree"]) != ("sha256", "RFC 6962"):
        raise Tampered(f"the bundle's commitment is not a sha256 RFC 6962 tree (hash {str(commitment['hash'])[:20]!r}, "
                       f"tree {str(commitment['tree'])[:20]!r})")
    if str(commitment["root"]).lower() != root.lower():
        raise Tampered(f"the bundle's root {str(commitment['root'])[:64]} is not the published root {root}")
    if commitment["count"] != count:
        raise Tampered(f"the bundle claims {str(commitment['count'])[:20]} committed fingerprints, the published count is {count}")
    suspect = check_suspect(bundle["suspect"])
    rule = MATCH_RULES[suspect["kind"]]
    if bundle["match_rule"] != rule:
        raise Tampered(f"a {suspect['kind']} suspect is judged by the {rule!r} rule, not {str(bundle['match_rule'])[:20]!r}")
    records = check_revealed(bundle["revealed"], count, root)
    test = RecordedTest.from_dict(bundle["test"])
    key_formats = protocol.formats or committed_formats(records)
    # Keys that accept k responses are matched by chance up to k times as often: the floor scales as the check's did.
    verdict_config = protocol.verdict.for_responses(max(len(responses_of(r)) for r in records.values()))
    check_rule(test, protocol.tests[suspect["kind"]], key_formats, verdict_config, protocol.sequential, count - min(records))
    suspect_matches = check_queries(bundle["queries"], records, suspect, key_formats)
    nulls = null_results(records, key_formats) if null_results else {}
    responses = {position: responses_of(record) for position, record in records.items()}
    null_matches = {name: {(r.index, r.format): bool(r.match) for r in judged(results, responses, rule) if r.template is None}
                    for name, results in nulls.items()}
    found = recompute_test(test, suspect_matches, null_matches, list(records), protocol.sequential)
    if found["verdict"] == MATCH:
        unanswered = [key for key, matched in suspect_matches.items() if matched is None]
        strict = recompute_test(test, {key: bool(m) for key, m in suspect_matches.items()}, null_matches,
                                list(records), protocol.sequential, recorded=False)
        if strict["verdict"] != MATCH:
            raise Tampered(f"the MATCH rests on leaving out {len(unanswered)} unanswered requests: counted as misses, "
                           "the answers do not reach it")
    return {**found, "suspect": suspect, "kind": test.kind, "formats": list(key_formats), "answers": suspect_matches,
            "null_models": {name: f"{sum(m.values())}/{len(m)}" for name, m in null_matches.items()}}


def check_depth(data: object) -> None:
    """Refuse JSON nested deeper than a bundle ever is (checked without recursion)."""
    level = [data]
    for _ in range(MAX_DEPTH):
        level = [child for item in level for child in (item.values() if isinstance(item, dict) else item)
                 if isinstance(child, (dict, list))]
        if not level:
            return
    raise OMLError(f"not an evidence bundle: nested deeper than {MAX_DEPTH} levels")


def check_suspect(suspect: object) -> dict:
    """The suspect the bundle names: local weights or a model behind an API, with its name."""
    if not (isinstance(suspect, dict) and suspect.get("kind") in MATCH_RULES and isinstance(suspect.get("model"), str)
            and suspect["model"] and (suspect["kind"] == "local" or isinstance(suspect.get("endpoint"), str))):
        raise OMLError("the bundle's suspect must be an object naming its kind (local or api), its model and, for an API, "
                       "its endpoint")
    return suspect


def committed_formats(records: dict[int, dict]) -> tuple[str, ...]:
    """Every format the revealed keys were committed in: what a check asks by default."""
    committed = {record["key_format"] for record in records.values()}
    return tuple(f for f in KEY_FORMATS if any(c in (f, "both") for c in committed))


def check_rule(test: RecordedTest, kind: str, key_formats: tuple[str, ...], verdict_config: VerdictConfig,
               sequential_config: SequentialConfig, most_keys: int) -> None:
    """The bundle's test is the protocol's: its kind and formats, its sequential settings, and a
    verdict rule at least as strict (an alpha no larger, a floor no lower)."""
    if test.kind != kind:
        raise Tampered(f"the bundle's test is {str(test.kind)[:20]!r}; the rule for this suspect is a {kind} test")
    if tuple(test.formats) != key_formats:
        raise Tampered(f"the bundle tests the formats {', '.join(map(str, test.formats)) or 'none'}; the rule is "
                       f"{', '.join(key_formats)}")
    if test.alpha > verdict_config.alpha or test.min_chance_rate < verdict_config.min_chance_rate:
        raise Tampered(f"the bundle's verdict rule (alpha {test.alpha:g}, floor {test.min_chance_rate:g}) is weaker than "
                       f"the published one (alpha {verdict_config.alpha:g}, floor {verdict_config.min_chance_rate:g})")
    if kind == "sequential":
        given = SequentialConfig.from_dict(test.sequential, "the bundle's sequential settings")
        if given != sequential_config:
            raise Tampered(f"the sequential check ran with {given.to_dict()}, not the published {sequential_config.to_dict()}")
        if test.planned_keys > most_keys:
            raise Tampered(f"the check claims {test.planned_keys} planned keys; only {most_keys} committed keys follow its first")


def check_revealed(revealed: list[dict], count: int, root: str) -> dict[int, dict]:
    """Every revealed record under the root at its position, the positions consecutive; each record as
    committed (a field added beside the committed ones is dropped: it is not under the root)."""
    if not isinstance(revealed, list) or not revealed:
        raise Tampered("the bundle reveals no key")
    for entry in revealed:
        if not verify_revealed(entry, count, root):
            raise Tampered(f"the record at position {str(entry.get('position'))[:20]} is not under the root (altered key, "
                           "response, salt or proof, or a wrong position or count)")
    positions = [entry["position"] for entry in revealed]
    expected = list(range(positions[0], positions[0] + len(positions)))
    if positions != expected:
        raise Tampered(f"the revealed positions {positions[:5]}... are not the consecutive committed positions "
                       f"{expected[0]}..{expected[-1]}")
    return {entry["position"]: committed_fields(entry["record"]) for entry in revealed}


def check_queries(queries: list[dict], records: dict[int, dict], suspect: dict,
                  key_formats: tuple[str, ...]) -> dict[tuple[int, str], bool | None]:
    """Every request is the one the checker builds for a revealed key, and every revealed key was
    asked bare exactly once in every format of the test; the matches of the bare keys, from the
    answers (None: the request got no answer, which is not counted)."""
    rule = MATCH_RULES[suspect["kind"]]
    matches = {}
    for query in queries:
        position, key_format, template = query["position"], query["format"], query["template"]
        record = records.get(position) if isinstance(position, int) else None
        if record is None:
            raise Tampered(f"a request asks position {str(position)[:20]}, which the bundle does not reveal")
        if key_format not in key_formats or record["key_format"] not in (key_format, "both"):
            raise Tampered(f"position {position} was asked as {str(key_format)[:20]!r}, not a committed format of the test")
        if template is not None and not (isinstance(template, str) and "{}" in template):
            raise Tampered(f"position {position} was asked inside a template that does not hold the key")
        unsent = query["error"] is not None and query["request"] is None
        if not unsent:
            check_request(query["request"], record, Query(key_format, template), suspect, position)
        if template is None:
            key = (position, key_format)
            if key in matches:
                raise Tampered(f"position {position} is answered twice as {key_format!r}")
            matches[key] = None if query["error"] is not None else answers_record(query["answer"], record, rule)
    missing = {(p, f) for p in records for f in key_formats} - set(matches)
    if missing:
        raise Tampered(f"{len(missing)} revealed (key, format) pairs have no recorded answer, e.g. position "
                       f"{min(missing)[0]} as {min(missing)[1]!r}")
    return matches


def check_request(request: object, record: dict, query: Query, suspect: dict, position: int) -> None:
    """The recorded request is exactly one the checker builds for the committed key, asked this way: for
    local weights the text (`Query.request_text`); for an API the whole body (`oml.remote.request_body`),
    with or without log-probabilities (a server may refuse them), naming the suspect's model, and with
    `max_tokens` at most the committed response length (the owner's tokenizer, which the verifier need
    not have, counts it exactly; fewer tokens can only make a match harder). Anything added or changed,
    such as a system message, an assistant prefill or a logit bias, is Tampered."""
    if suspect["kind"] == "local":
        if request != query.request_text(record["key"]):
            raise Tampered(f"the request for position {position} ({query.key_format}) is not the request the checker "
                           "builds for its committed key")
        return
    if not isinstance(request, dict):
        raise Tampered(f"the request for position {position} is not a request body")
    if request.get("model") != suspect["model"]:
        raise Tampered(f"the request for position {position} names the model {str(request.get('model'))[:100]!r}, not "
                       f"the suspect {suspect['model']!r}")
    max_tokens = request.get("max_tokens")
    asked = ApiRequest(position, query, 0, record["key"], record["response"], max_tokens, "")
    if not (_count(max_tokens) and max_tokens <= record["response_length"]
            and any(request == request_body(asked, suspect["model"], logprobs) for logprobs in (True, False))):
        raise Tampered(f"the request for position {position} ({query.key_format}) is not the request the checker builds "
                       "for its committed key (a field added or changed)")


def recompute_test(test: RecordedTest, suspect: dict[tuple[int, str], bool | None], nulls: dict[str, dict],
                   positions: list[int], sequential_config: SequentialConfig, recorded: bool = True) -> dict:
    """The verdict from the recorded answers and the verifier's null models, under the bundle's alpha
    and floor (at least as strict as the protocol's); it must be the one recorded. A fixed-sample check
    is recomputed whole; a sequential one replays its keys in order, at the chance rate it fixed
    beforehand, which must be at least the floor and the null models' rate on the revealed keys."""
    formats = tuple(test.formats)
    verdict_config = VerdictConfig(min_chance_rate=test.min_chance_rate, alpha=test.alpha)
    rate = test.chance_rate
    for name, answers in nulls.items():
        if answers and rate < sum(answers.values()) / len(answers):
            raise Tampered(f"the chance rate {rate:g} is below null model {name}'s match rate on the revealed keys")
    if rate < verdict_config.min_chance_rate:
        raise Tampered(f"the chance rate {rate:g} is below the floor {verdict_config.min_chance_rate:g}")
    if test.kind == "fixed":
        def results(matches: dict) -> list[KeyResult]:
            return [KeyResult(index=p, format=f, template=None, query=0, match=m, token_accuracy=float(bool(m)),
                              error=None if m is not None else "no answer") for (p, f), m in matches.items()]
        found = findings(results(suspect), {name: results(answers) for name, answers in nulls.items()}, formats, verdict_config)
        log10_p, decided = found["log10_p_value"], found["verdict"]
    else:
        try:
            sequential = SequentialTest(rate, verdict_config.alpha, formats, sequential_config, test.planned_keys)
        except OMLError as error:
            raise Tampered(f"the sequential test cannot run as recorded: {error}") from None
        if sequential.replay([{f: suspect.get((p, f)) for f in formats} for p in positions]) < len(positions):
            raise Tampered("the check went on revealing keys after its verdict was reached")
        log10_p, decided = sequential.log10_p_value, sequential.decision()
    if not recorded:  # a recount under other assumptions: nothing to compare with
        return {"keys": len(positions), "log10_p_value": log10_p, "verdict": decided}
    if decided != test.verdict or not math.isclose(log10_p, test.log10_p_value, rel_tol=1e-6, abs_tol=1e-9):
        raise Tampered(f"the recorded verdict {test.verdict} (log10 p {test.log10_p_value:.4g}) is not what the answers "
                       f"give: {decided} (log10 p {log10_p:.4g})")
    matches = {f: {"matched": sum(bool(v) for (_, g), v in suspect.items() if g == f),
                   "answered": sum(v is not None for (_, g), v in suspect.items() if g == f)} for f in formats}
    if matches != test.matches:
        raise Tampered(f"the recorded matches {str(test.matches)[:200]} are not what the answers give: {matches}")
    return {"keys": len(positions), "matches": matches, "log10_p_value": log10_p, "verdict": decided}
