"""Verify an evidence bundle (check_fingerprints.py --evidence) against a published commitment.

    python verify_evidence.py BUNDLE.json --root ROOT --count N --null_model BASE_MODEL
    python verify_evidence.py BUNDLE.json --root ROOT --count N --null_model BASE_MODEL --commitment commitment.json
    python verify_evidence.py BUNDLE.json --root ROOT --count N --null_model BASE_MODEL --api_base URL --api_model NAME

Needs no run folder and no secret: only the bundle and the root and count (and, where the owner
published it, commitment.json) the owner published with the model, e.g. on its model card.

The bundle only supplies data; the rules are the verifier's. The test (fixed or sequential), the
key formats and the sequential settings come from the published commitment.json's protocol
(--commitment), else from this script's flags (--test, --query_format, the sequential flags: by
default the checker's defaults); --alpha and --min_chance_rate can only make them stricter. It
checks that every revealed key is under the root at the committed position it claims, that the
positions are consecutive, that every request is exactly the one the checker builds for its key
and names the suspect, asks the null models (--null_model: the public base model; 'none': the
floor alone) the revealed keys itself, and recomputes the matches, the p-value and the verdict.
With --api_base it asks the live suspect the revealed keys again: one that disagrees with more
than --live_tolerance of the recorded answers does not verify.

The recorded answers are the owner's word. A witnessed check is the answer to that: the owner gives
a witness sealed keys (check_fingerprints.py --export_sealed), and the witness asks the suspect
itself and writes its own bundle, which anyone can verify as above:

    python verify_evidence.py --witness SEALED.json --root ROOT --count N --null_model BASE_MODEL \\
        --api_base URL --api_model NAME --output bundle.json

A domain watermark bundle (check_fingerprints.py --evidence on a domain_watermark run) is verified
against the run's published commitment.json alone (its public key checks the signatures of the
contexts the check counted; the private key is never needed, and no other green list is revealed):

    python verify_evidence.py BUNDLE.json --commitment commitment.json

Exit codes: 0 verified (witness: the check ran); 3 the bundle does not hold up (tampered, or
evidence that proves nothing); 2 bad input (not a bundle, a bad flag).
"""
import logging
from dataclasses import dataclass, replace

from oml import OMLError, cli
from oml.checking import Query, check_model
from oml.evidence import DEFAULT_TESTS, TESTS, NullResults, Protocol, Tampered, verify
from oml.files import check_writable, read_json, write_json_atomic
from oml.families import domain_watermark
from oml.fingerprints import responses_of
from oml.models import load
from oml.remote import ApiConfig, check_over_api
from oml.sequential import SequentialConfig
from oml.settings import POSITIVE_INT, UNIT_INTERVAL, Settings, setting
from oml.stats import VerdictConfig, format_p_value
from oml.tokenization import FORMAT_CHOICES, ResponseIds, encode, formats, has_chat_template
from oml.witness import requests_for, witnessed_check

logger = logging.getLogger("verify_evidence")
NOT_VERIFIED_EXIT_CODE = 3
MAX_BUNDLE_BYTES = 256 * 2**20


@dataclass(frozen=True)
class VerifierInputs(Settings):
    """What a verifier is given: the commitment the owner published with the model, the public null
    models, and the rules when the commitment does not record them."""
    root: str = setting(None, "The published commitment root (64 hex digits).", kind=str)
    count: int = setting(None, "The published number of committed fingerprints (the root alone does not fix it).",
                         POSITIVE_INT)
    commitment: str | None = setting(
        None, "The published commitment.json: its protocol decides the test, formats and sequential settings (its root "
              "and count must be --root and --count).", kind=str)
    null_model: tuple[str, ...] = setting(
        None, "Public models never fingerprinted (the base model), asked the revealed keys by this script to measure the "
              "chance rate: the bundle's null answers are never used. 'none': the floor alone.", kind=str, nargs="+")
    test: str | None = setting(
        None, "Without a commitment protocol: the test the verdict must come from (default: fixed for local weights, "
              "sequential for an API, as the checker does).", choices=TESTS, kind=str)
    query_format: str | None = setting(
        None, "Without a commitment protocol: the key formats the test must cover (default: every format the revealed "
              "keys were committed in).", choices=FORMAT_CHOICES, kind=str)
    witness: str | None = setting(
        None, "Instead of a bundle: sealed keys from the owner (check_fingerprints.py --export_sealed); ask the --api_base "
              "suspect them under this script's rules and write the witness's own bundle (--output).", kind=str)
    output: str | None = setting(None, "With --witness: write the witness's bundle here (atomically).", kind=str)
    overwrite: bool = setting(False, "Replace an existing --output.")
    live_tolerance: float = setting(
        0.1, "With --api_base: the share of revealed (key, format) pairs on which the live suspect may disagree with the "
             "recorded answers (a server's batching can change a few greedy answers); more does not verify.", UNIT_INTERVAL)


def build_parser() -> cli.ArgumentParser:
    parser = cli.ArgumentParser(description=__doc__)
    parser.add_argument("bundle", nargs="?", default=None, help="The evidence bundle (JSON) to verify.")
    cli.add_settings(parser, VerifierInputs)
    cli.add_settings(parser, VerdictConfig)
    cli.add_settings(parser, SequentialConfig)
    cli.add_settings(parser, ApiConfig)
    cli.add_common_args(parser)
    return parser


def parse_args():
    args = build_parser().parse_args()
    cli.single_process("verify_evidence.py")
    args.watermark = watermark_bundle(args.bundle) if args.bundle is not None and args.witness is None else None
    if args.watermark is not None:
        if args.commitment is None:
            raise OMLError("a domain watermark bundle is verified against the run's published commitment.json: give "
                           "--commitment")
        return args
    if (args.bundle is None) == (args.witness is None) or args.root is None or args.count is None or args.null_model is None:
        raise OMLError("give a bundle or --witness SEALED, --root and --count (as published) and --null_model (the public "
                       "base model, or none)")
    if args.witness is not None and args.api_base is None:
        raise OMLError("--witness asks the suspect itself: give --api_base URL and --api_model NAME")
    if args.output is not None:
        if args.witness is None:
            raise OMLError("--output is the witness's bundle: it needs --witness")
        check_writable(args.output, args.overwrite)
    if len(args.root) != 64 or any(c not in "0123456789abcdefABCDEF" for c in args.root):
        raise OMLError(f"--root must be 64 hex digits (a SHA-256 root), not {args.root!r}")
    if len(args.null_model) > 1 and "none" in (name.lower() for name in args.null_model):
        raise OMLError("--null_model none means no null model; it cannot be combined with models")
    if args.api_base is not None and not args.api_model:
        raise OMLError("--api_base needs --api_model (the model name the server serves)")
    if args.api_base is not None:
        cli.settings_from(ApiConfig, args)  # a bad URL or key variable is refused before any work
    return args


def watermark_bundle(path: str) -> dict | None:
    """The bundle, when it is a domain watermark bundle (None: a perinucleus bundle, read again later)."""
    data = read_json(path, "evidence bundle", MAX_BUNDLE_BYTES)
    return data if isinstance(data, dict) and data.get("format") == domain_watermark.BUNDLE_FORMAT else None


def verify_watermark(args) -> None:
    """A domain watermark bundle against the published commitment.json: what was verified, on stdout."""
    public = domain_watermark.read_commitment(args.commitment)
    try:
        found = domain_watermark.verify_bundle(args.watermark, public, args.trust_remote_code)
    except Tampered as problem:
        cli.fail(f"NOT VERIFIED: {problem}", NOT_VERIFIED_EXIT_CODE)
    suspect = found["suspect"]
    where = f" at {suspect['endpoint']}" if suspect["kind"] == "api" else ""
    print(f"Suspect named by the bundle: {suspect['model']} ({'API' if suspect['kind'] == 'api' else 'local weights'}{where})")
    print(f"Signatures: {found['revealed']} contexts' green lists, each signed by the committed public key (sha256 "
          f"{public['public_key_sha256']}); gamma {public['gamma']:g}, delta {public['delta']:g}, context width "
          f"{public['context_width']}; no private key needed, no other list revealed")
    print(f"Prompts: {found['replies_asked']} of the {public['test_prompts']} committed checking prompts, in committed "
          f"order; every request is the checker's (temperature {found['rules']['reply_temperature']:g}, at most "
          f"{found['rules']['max_reply_tokens']} tokens)")
    chosen = found["selection"]
    counted = f"class {chosen['context_class']} of {chosen['classes']}" if chosen["context_class"] is not None else "every class"
    print(f"Contexts counted: {counted} (a public hash of each context), less {len(chosen['revealed_before'])} the bundle "
          f"says earlier bundles revealed: {found['excluded_tokens']} of {found['tokens'] + found['excluded_tokens']} scored "
          f"tokens left out. Which class and which contexts are the owner's choice: check that the class is the first "
          f"no earlier published bundle used, and that each left-out context is in an earlier published bundle")
    print(f"Recomputed: {found['counted']} of {found['replies']} replies counted; green {found['green']} of {found['pairs']} "
          f"unique pairs = {found['green'] / max(found['pairs'], 1):.3f}, z {found['z']:.2f}; anytime-valid p-value "
          f"{format_p_value(found['log10_p_value'])}; verdict {found['decision']} (as recorded)")
    print(f"Evidence verified: {found['decision']} for {suspect['model']}", flush=True)


def protocol_of(args) -> tuple[Protocol, str]:
    """The rules this verification applies, and where they come from: the published commitment's
    protocol when it records one (--alpha and --min_chance_rate may only make it stricter), else the flags."""
    verdict = cli.settings_from(VerdictConfig, args)
    flags = Protocol(formats(args.query_format) if args.query_format else None,
                     dict.fromkeys(DEFAULT_TESTS, args.test) if args.test else dict(DEFAULT_TESTS),
                     verdict, cli.settings_from(SequentialConfig, args))
    if args.commitment is None:
        return flags, "this script's flags"
    public = read_json(args.commitment, "commitment file", MAX_BUNDLE_BYTES)
    if not isinstance(public, dict) or str(public.get("root")).lower() != args.root.lower() or public.get("count") != args.count:
        raise OMLError(f"{args.commitment} is not the commitment of root {args.root} over {args.count} fingerprints")
    if "protocol" not in public:
        return flags, f"this script's flags ({args.commitment} records no protocol)"
    if args.test or args.query_format:
        raise OMLError(f"{args.commitment} records the test and formats: leave out --test and --query_format")
    return Protocol.from_dict(public["protocol"], args.commitment).stricter(verdict), args.commitment


def revealed_pairs(tokenizer, records: list[dict]) -> list[tuple[list[int], list[int]]]:
    """The revealed records as the (key ids, response ids) pairs a check asks, each response carrying
    the record's other responses (`ResponseIds`), so a model that serves any of them matches. Every
    response was cut to the committed response_length, as fine-tuning cut them."""
    pairs = []
    for r in records:
        response_ids, *others = [encode(tokenizer, response)[:r["response_length"]] for response in responses_of(r)]
        pairs.append((encode(tokenizer, r["key"])[:r["key_length"]], ResponseIds(response_ids, others) if others else response_ids))
    return pairs


def null_results(names: tuple[str, ...], trust_remote_code: bool) -> NullResults | None:
    """Asks each null model the revealed keys, bare, in the test's formats (chat only where the model has
    a chat template, as the checker does); results indexed by committed position."""
    if names[0].lower() == "none":
        return None
    asked: dict = {}  # the last keys asked, kept: a witness's bundle is verified on (some of) the keys it asked

    def ask(records: dict[int, dict], key_formats: tuple[str, ...]) -> dict:
        if asked.get("formats") != key_formats or not set(records) <= asked["positions"]:
            positions, found = list(records), {}
            for name in names:
                model, tokenizer = load(name, trust_remote_code)
                queries = [Query(f) for f in key_formats if f == "raw" or has_chat_template(tokenizer)]
                results = check_model(model, tokenizer, revealed_pairs(tokenizer, list(records.values())), queries, 64,
                                      description=f"null model {name}")
                found[name] = [replace(r, index=positions[r.index]) for r in results]
            asked.update(formats=key_formats, positions=set(records), found=found)
        return {name: [r for r in results if r.index in records] for name, results in asked["found"].items()}
    return ask


def ask_live(config: ApiConfig, evidence: dict, recorded: dict, tolerance: float) -> str:
    """The revealed keys asked again of the live suspect: matched/answered per format. Tampered when it
    disagrees with more than `tolerance` of the recorded answers that both have."""
    records = {entry["position"]: entry["record"] for entry in evidence["revealed"]}
    results = check_over_api(config, requests_for(records, list(records), tuple(evidence["test"]["formats"])))
    both = [(r, recorded[(r.index, r.format)]) for r in results if r.error is None and recorded.get((r.index, r.format)) is not None]
    disagree = sum(bool(r.match) != was for r, was in both)
    if disagree > tolerance * len(both):
        raise Tampered(f"the live suspect disagrees with {disagree} of {len(both)} recorded answers (tolerance "
                       f"{tolerance:g}): the recorded answers are not what it says")
    return ", ".join(f"{f} {sum(bool(r.match) for r in results if r.format == f)}/{sum(r.error is None for r in results if r.format == f)}"
                     for f in evidence["test"]["formats"]) + f"; {disagree} of {len(both)} disagree with the recorded answers"


def report(found: dict, evidence: dict, args, source: str) -> None:
    """What was verified, on stdout."""
    suspect, positions = found["suspect"], [entry["position"] for entry in evidence["revealed"]]
    where = f" at {suspect['endpoint']}" if suspect["kind"] == "api" else ""
    print(f"Suspect named by the bundle: {suspect['model']} ({'API' if suspect['kind'] == 'api' else 'local weights'}{where})")
    print(f"Proofs: {len(positions)} revealed keys at committed positions {positions[0]}..{positions[-1]} of "
          f"{args.count}, all under root {args.root.lower()}")
    print("Requests: every request is the checker's request for its committed key" +
          (f", naming {suspect['model']}" if suspect["kind"] == "api" else ""))
    print(f"Rules (from {source}): {found['kind']} test, formats {', '.join(found['formats'])}")
    nulls = ", ".join(f"{name} {share}" for name, share in found["null_models"].items()) or "none (the floor alone)"
    matches = ", ".join(f"{f} {m['matched']}/{m['answered']}" for f, m in found["matches"].items())
    print(f"Recomputed: {matches}; null models {nulls}; p-value {format_p_value(found['log10_p_value'])}; "
          f"verdict {found['verdict']} (as recorded)")


def main() -> None:
    args = parse_args()
    if args.watermark is not None:
        verify_watermark(args)
        return
    protocol, source = protocol_of(args)
    nulls = null_results(args.null_model, args.trust_remote_code)
    try:
        if args.witness is not None:
            sealed = read_json(args.witness, "sealed keys", MAX_BUNDLE_BYTES)
            evidence = witnessed_check(sealed, args.root, args.count, cli.settings_from(ApiConfig, args), protocol, nulls)
        else:
            evidence = read_json(args.bundle, "evidence bundle", MAX_BUNDLE_BYTES)
        found = verify(evidence, args.root, args.count, protocol, nulls)
        report(found, evidence, args, source)
        if args.output is not None:  # --output needs --witness
            write_json_atomic(args.output, evidence, args.overwrite)
            print(f"Witness's bundle: {args.output} (its answers are the ones the suspect gave this witness)")
        if args.witness is None and args.api_base is not None:  # an owner's bundle: ask its suspect again
            if args.api_model != found["suspect"]["model"]:
                raise OMLError(f"the bundle's suspect is {found['suspect']['model']!r}: --api_model must name it")
            live = ask_live(cli.settings_from(ApiConfig, args), evidence, found["answers"], args.live_tolerance)
            print(f"Live suspect now: {live}")
    except Tampered as problem:
        cli.fail(f"NOT VERIFIED: {problem}", NOT_VERIFIED_EXIT_CODE)
    print(f"Evidence verified: {found['verdict']} for {found['suspect']['model']}", flush=True)


if __name__ == "__main__":
    cli.run(main)
