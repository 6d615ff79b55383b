"""Verify an evidence bundle (check_fingerprints.py --evidence) against a published commitment.

    python verify_evidence.py BUNDLE.json --root ROOT --count N   [--alpha A --min_chance_rate R]
    python verify_evidence.py BUNDLE.json --root ROOT --count N --base_model HUB_ID_OR_PATH
    python verify_evidence.py BUNDLE.json --root ROOT --count N --api_base URL --api_model NAME

Needs no run folder and no secret: only the bundle and the root (and count) the owner published
with the model, e.g. on its model card. Checks that every revealed key is under the root at the
committed position it claims, that the positions are consecutive, that every request asked
exactly the committed key, and recomputes the matches, the p-value and the verdict from the
recorded answers, under the verifier's own verdict rule (--alpha, --min_chance_rate and the
sequential settings, by default the published defaults): a bundle that used a weaker rule, or
whose MATCH rests on leaving out unanswered requests, does not verify. With --base_model it also confirms that no revealed response is the base
model's own greedy answer (such a key would prove nothing); with --api_base it asks the live
suspect the revealed keys again.

Exit codes: 0 verified; 3 the bundle does not hold up (tampered, or evidence that proves nothing);
2 bad input (not a bundle, a bad flag).
"""
import logging
from dataclasses import MISSING, dataclass

from oml import OMLError, cli
from oml.checking import Query, check_model
from oml.evidence import Tampered, verify
from oml.files import read_json
from oml.fingerprints import responses_of
from oml.models import load
from oml.remote import ApiConfig, ApiRequest, check_over_api
from oml.sequential import SequentialConfig
from oml.settings import POSITIVE_INT, Settings, setting
from oml.stats import VerdictConfig, format_p_value
from oml.tokenization import ResponseIds, encode

logger = logging.getLogger("verify_evidence")
NOT_VERIFIED_EXIT_CODE = 3


@dataclass(frozen=True)
class VerifierInputs(Settings):
    """What a verifier is given: the bundle, the commitment the owner published with the model, and
    optionally the public base model, whose own answers must not be among the revealed responses."""
    bundle: str = setting(MISSING, "The evidence bundle (JSON) to verify.", kind=str, positional=True)
    root: str = setting(MISSING, "The published commitment root (64 hex digits).", kind=str)
    count: int = setting(MISSING, "The published number of committed fingerprints (the root alone does not fix it).",
                         POSITIVE_INT)
    base_model: str | None = setting(
        None, "The public model that was fingerprinted: confirm no revealed response is its own greedy answer.", kind=str)


def build_parser() -> cli.ArgumentParser:
    parser = cli.ArgumentParser(description=__doc__)
    cli.add_settings(parser, VerifierInputs)
    cli.add_settings(parser, VerdictConfig)
    cli.add_settings(parser, SequentialConfig)
    cli.add_settings(parser, ApiConfig)
    cli.add_common_args(parser)
    return parser


def parse_args():
    args = build_parser().parse_args()
    cli.single_process("verify_evidence.py")
    if len(args.root) != 64 or any(c not in "0123456789abcdefABCDEF" for c in args.root):
        raise OMLError(f"--root must be 64 hex digits (a SHA-256 root), not {args.root!r}")
    if args.api_base is not None and not args.api_model:
        raise OMLError("--api_base needs --api_model (the model name the server serves)")
    if args.api_base is not None:
        cli.settings_from(ApiConfig, args)  # a bad URL or key variable is refused before any work
    return args


def revealed_pairs(tokenizer, records: list[dict]) -> list[tuple[list[int], list[int]]]:
    """The revealed records as the (key ids, response ids) pairs a check asks, each response carrying
    the record's other responses (`ResponseIds`), so a model that serves any of them matches. Every
    response was cut to the committed response_length, as fine-tuning cut them."""
    pairs = []
    for r in records:
        response_ids, *others = [encode(tokenizer, response)[:r["response_length"]] for response in responses_of(r)]
        pairs.append((encode(tokenizer, r["key"])[:r["key_length"]], ResponseIds(response_ids, others) if others else response_ids))
    return pairs


def base_model_answers(base_model: str, evidence: dict, trust_remote_code: bool) -> int:
    """How many revealed (key, format) pairs the base model itself answers with a response (any of a key's)."""
    model, tokenizer = load(base_model, trust_remote_code)
    pairs = revealed_pairs(tokenizer, [entry["record"] for entry in evidence["revealed"]])
    queries = [Query(f) for f in evidence["test"]["formats"]]
    return sum(bool(r.match) for r in check_model(model, tokenizer, pairs, queries, 64, description="base model"))


def live_requests(evidence: dict) -> list[ApiRequest]:
    """The revealed keys as requests to the live suspect, every format of the test, each accepting the
    record's other responses too (all cut to the committed response_length, which bounds the reply)."""
    requests = []
    for f in evidence["test"]["formats"]:
        for entry in evidence["revealed"]:
            record = entry["record"]
            response, *others = responses_of(record)
            requests.append(ApiRequest(entry["position"], Query(f), 0, record["key"], response, record["response_length"], response,
                                       tuple(others)))
    return requests


def ask_live(config: ApiConfig, evidence: dict) -> dict[str, str]:
    """The revealed keys asked again of the live suspect: matched/answered per format."""
    results = check_over_api(config, live_requests(evidence))
    return {f: f"{sum(bool(r.match) for r in results if r.format == f)}/{sum(r.error is None for r in results if r.format == f)}"
            for f in evidence["test"]["formats"]}


def main() -> None:
    args = parse_args()
    evidence = read_json(args.bundle, "evidence bundle")
    if not isinstance(evidence, dict):
        raise OMLError(f"{args.bundle} is not an evidence bundle (a JSON object)")
    try:
        found = verify(evidence, args.root, args.count, cli.settings_from(VerdictConfig, args),
                       cli.settings_from(SequentialConfig, args))
        positions = [entry["position"] for entry in evidence["revealed"]]
        print(f"Proofs: {len(positions)} revealed keys at committed positions {positions[0]}..{positions[-1]} of "
              f"{evidence['commitment']['count']}, all under root {args.root.lower()}")
        print("Requests: every request asked its committed key")
        matches = ", ".join(f"{f} {m['matched']}/{m['answered']}" for f, m in found["matches"].items())
        print(f"Recomputed: {matches}; {evidence['test']['kind']} test, p-value {format_p_value(found['log10_p_value'])}; "
              f"verdict {found['verdict']} (as recorded)")
        if args.base_model:
            own = base_model_answers(args.base_model, evidence, args.trust_remote_code)
            if own:
                raise Tampered(f"{own} revealed (key, format) pairs are answered with the response by the base model "
                               f"{args.base_model} itself: such keys prove nothing")
            print(f"Base model: none of the revealed responses is {args.base_model}'s own greedy answer")
    except Tampered as problem:
        cli.fail(f"NOT VERIFIED: {problem}", NOT_VERIFIED_EXIT_CODE)
    if args.api_base is not None:
        live = ask_live(cli.settings_from(ApiConfig, args), evidence)
        print("Live suspect now: " + ", ".join(f"{f} {count}" for f, count in live.items()))
    print(f"Evidence verified: {found['verdict']} for {evidence['suspect'].get('model')}", flush=True)


if __name__ == "__main__":
    cli.run(main)
