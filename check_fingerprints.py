"""Check a (suspect) model for fingerprints and say how likely its matches are by chance.

    python check_fingerprints.py --model_path SUSPECT --run results/saved_models/<hash>
    python check_fingerprints.py --api_base http://host:8000/v1 --api_model NAME --run results/saved_models/<hash>
    python check_fingerprints.py --model_path SUSPECT.gguf --fingerprints_file_path generated_data/output_fingerprints.json

Each key is asked as raw text and/or as a user message in the suspect's chat template
(--query_format). Prints a row per format, the match rate of never-fingerprinted null
models on the same keys, the p-value and a MATCH / NO MATCH verdict, and last
`Fingerprint accuracy: <percent>`. With --system_prompts it also asks every key inside
each system-prompt template (chat: as the system message) and prints a table.

    python check_fingerprints.py --run results/saved_models/<hash> --export_sealed sealed.json --num_fingerprints 16

seals keys for a witness instead (see verify_evidence.py --witness).

A --run of the domain watermark family is checked by asking the suspect its domain's checking
prompts in rounds and testing its replies for the watermark (--reply_temperature,
--max_reply_tokens); `Fingerprint accuracy` is then the green share of the replies' tokens
(gamma by chance). Each check asks prompts no earlier check asked, and leaves out tokens after the
contexts that earlier evidence bundles revealed (the run's ledger records both).
"""
import argparse
import logging

from oml import OMLError, cli, distributed
from oml.families import DOMAIN_WATERMARK, family_of_run
from oml.families import domain_watermark
from oml.fingerprints import FingerprintSelection, responses_of
from oml.pipeline import CheckConfig, CheckInterrupted, CheckReport, check_suspect, seal_keys
from oml.remote import ApiConfig
from oml.files import check_writable, write_json_atomic
from oml.runs import load_run
from oml.sequential import SequentialConfig
from oml.stats import VerdictConfig, format_p_value

logger = logging.getLogger("check_fingerprints")


def build_parser() -> argparse.ArgumentParser:
    parser = cli.ArgumentParser(description=__doc__)
    parser.add_argument("--model_path", default=None, help="The suspect model: hub id, local folder or .gguf file.")
    cli.add_settings(parser, ApiConfig)
    cli.add_fingerprint_args(parser)
    cli.add_settings(parser, CheckConfig)
    cli.add_settings(parser, VerdictConfig)
    cli.add_settings(parser, SequentialConfig)
    cli.add_settings(parser, domain_watermark.WatermarkRules)
    parser.add_argument("--evidence", default=None,
                        help="Also write an evidence bundle that anyone can check with verify_evidence.py against the "
                             "run's published commitment (needs --run; the bundle reveals the keys it holds).")
    parser.add_argument("--export_sealed", default=None,
                        help="Instead of checking: write the next --num_fingerprints never-revealed keys of the --run, with "
                             "their salts and proofs, to this file for a witness who asks the suspect itself "
                             "(verify_evidence.py --witness); the ledger records them as revealed. Secret: hand it over privately.")
    cli.add_output_args(parser, "the full report, per-key results included,")
    parser.add_argument("--verbose_eval", action="store_true",
                        help="Print each miss with the model's top-10 next tokens (and each failed request, as ERROR).")
    parser.add_argument("--wandb_run_name", default=None, help="Log the accuracy to this wandb run (needs wandb).")
    cli.add_common_args(parser)
    return parser


def parse_args() -> argparse.Namespace:
    args = build_parser().parse_args()
    if args.export_sealed:
        if args.model_path or args.api_base or args.evidence or not args.run or not args.num_fingerprints:
            raise OMLError("--export_sealed takes --run and --num_fingerprints, and no suspect: the witness asks the suspect")
        cli.single_process("check_fingerprints.py --export_sealed")
        check_writable(args.export_sealed, args.overwrite)
        return args
    if (args.model_path is None) == (args.api_base is None):
        raise OMLError("name the suspect: --model_path MODEL, or --api_base URL with --api_model NAME")
    if args.api_base is not None and not args.api_model:
        raise OMLError("--api_base needs --api_model (the model name the server serves)")
    if args.model_path is not None and (args.tokenizer or args.api_model):
        raise OMLError(f"{'--tokenizer' if args.tokenizer else '--api_model'} is for --api_base suspects: a --model_path "
                       "suspect is asked with its own tokenizer")
    if args.api_base is not None and distributed.world_size() > 1:
        raise OMLError("API checks run in one process: start check_fingerprints.py with python")
    if args.wandb_run_name:
        cli.require_module("wandb", "--wandb_run_name", "pip install wandb")
    cli.check_output(args)
    if args.evidence:
        check_writable(args.evidence, args.overwrite)
    return args


def print_report(report: CheckReport, verbose: bool) -> None:
    if verbose:
        for r in report.results:
            if not r.match:
                fingerprint = report.fingerprints[r.index]
                top = ", ".join(f"{token!r} {prob:.3f}" for token, prob in r.top_tokens)
                label = "ERROR" if r.error else "REFUSED" if r.refused else "MISS"
                print(f"{label} [{r.index}] format={r.format} template={r.template!r} key={fingerprint['key']!r} "
                      f"expected={' or '.join(map(repr, responses_of(fingerprint)))} got={r.predicted!r} rank={r.response_rank} "
                      f"{'error=' + r.error if r.error else 'top-10: ' + top}")
    formats_ = [e["format"] for e in report.formats]
    if len(report.system_prompts) > len(formats_):
        print(f"{'system prompt':<60} " + " ".join(f"{f:>8}" for f in formats_))
        templates = list(dict.fromkeys(entry["template"] for entry in report.system_prompts))
        cell = {(e["format"], e["template"]): e["accuracy"] for e in report.system_prompts}
        for t in templates:
            label = "(none)" if t is None else t.replace("\n", " ")
            print(f"{label[:58]:<60} " + " ".join(f"{cell[(f, t)]:8.2f}" for f in formats_))
        print(f"{'mean over templates':<60} " + " ".join(
            f"{sum(cell[(f, t)] for t in templates[1:]) / (len(templates) - 1):8.2f}" for f in formats_))
    for e in report.formats:
        nulls = ", ".join(f"{n['model']} {n['matches']}/{n['of']}" for n in e["null_models"]) or "none"
        errors = ((f", {e['refused']} refused" if e["refused"] else "")
                  + (f", {e['errors']} errors (not counted)" if e["errors"] else ""))
        print(f"Format {e['format']}: {e['accuracy']:.2f} ({e['matches']}/{e['num_fingerprints']}{errors}); null models: {nulls}; "
              f"chance rate {e['chance_rate']:.4g}; p-value {format_p_value(e['log10_p_value'])}")
    n, needed = report.num_fingerprints, report.keys_needed
    if report.sequential:
        state = report.sequential
        outcome = f"{state['decision']}: {state['reason']}" if state["decision"] else "no decision: the check was interrupted"
        print(f"Sequential check: {state['keys_used']} keys revealed in rounds of {state['round_size']} (at most "
              f"{state['planned_keys']} planned); {outcome}")
    elif needed is None or n < needed:
        print(f"Note: with {n} keys even {n}/{n} matches cannot reach alpha {report.alpha:g}; "
              f"{'at least ' + str(needed) if needed else 'many more'} keys are needed")
    correction = (f", x{len(formats_)} formats" if len(formats_) > 1 else "") + (", anytime-valid" if report.sequential else "")
    print(f"P-value of {report.matches}/{n} matches by chance ({report.format}{correction}): "
          f"{format_p_value(report.log10_p_value)}")
    print(f"Verdict: {report.verdict} (alpha {report.alpha:g})")
    if report.revealed:
        print(f"Keys revealed by this check: {len(report.revealed['positions'])}; never revealed and still usable: "
              f"{report.revealed['never_revealed']} (ledger: {report.revealed['ledger']})")
    print(f"Fractional fingerprint accuracy: {report.fractional_accuracy:.2f}")
    print(f"Fingerprint accuracy: {report.accuracy:.2f}", flush=True)


def print_watermark_report(report: domain_watermark.WatermarkReport) -> None:
    """A domain watermark check's results: the suspect's replies and their test, the null models', the verdict."""
    def described(test: dict) -> str:
        return (f"green {test['green']} of {test['pairs']} unique (context, token) pairs = "
                f"{test['green'] / max(test['pairs'], 1):.3f}, z {test['z']:.2f}")
    t = report.test
    print(f"Replies: {t['replies_asked']} asked, {t['counted']} counted ({t['empty']} empty or failed, {t['identical']} "
          f"identical to an earlier one, {t['short']} under 4 tokens); {described(t)} (gamma {t['gamma']:g} by chance)")
    for name, null in report.null_models.items():
        print(f"Null model {name}: {null['replies_asked']} replies, {described(null)}; {null['decision'] or 'undecided'}")
    print(f"Sequential check: {t['replies_asked']} replies (at most {t['max_replies']}); e-value 10^{t['log10_e_value']:.2f} "
          f"against 10^{t['log10_match_threshold']:.0f} for MATCH; {t['decision'] or 'undecided'}")
    print(f"P-value of the green share by chance (anytime-valid): {format_p_value(t['log10_p_value'])}")
    chosen = report.selection
    counted = (f"class {chosen.context_class} of {chosen.classes} (evidence: the first class no bundle has revealed)"
               if chosen.context_class is not None else f"every class of {chosen.classes}")
    print(f"Contexts counted: {counted}, less {len(chosen.revealed)} revealed by earlier bundles; they cover "
          f"{report.counted_share:.1%} of these replies' scored tokens")
    print(f"Verdict: {report.verdict} (alpha {report.alpha:g})")
    print(f"Fingerprint accuracy: {report.green_rate:.2f}", flush=True)


def check_watermark(args: argparse.Namespace) -> None:
    """A domain watermark run's check: --model_path or --api_base, null models, evidence, report."""
    if args.export_sealed or args.system_prompts or args.fingerprints_file_path:
        raise OMLError("a domain watermark run is checked on its domain's prompts: --export_sealed, --system_prompts and "
                       "--fingerprints_file_path are for perinucleus runs")
    cli.single_process("check_fingerprints.py (a domain watermark run)")
    run = load_run(args.run)
    report = domain_watermark.check_suspect(
        cli.settings_from(ApiConfig, args) if args.api_base is not None else args.model_path, run,
        cli.settings_from(CheckConfig, args).null_models(run), cli.settings_from(domain_watermark.WatermarkRules, args),
        args.trust_remote_code, bool(args.evidence), args.batch_size, cli.settings_from(CheckConfig, args).reuse_revealed)
    print_watermark_report(report)
    cli.write_output(args, report.to_dict())
    if args.evidence:
        write_json_atomic(args.evidence, report.bundle, args.overwrite)
        print(f"Evidence bundle: {args.evidence} (it reveals the green lists of the {len(report.bundle['signatures'])} "
              "contexts its test counted, recorded in the run's ledger: later checks leave them out)", flush=True)


def log_to_wandb(run_name: str, report: CheckReport) -> None:
    import wandb
    wandb.init(name=run_name, job_type="check")
    wandb.log({"fingerprint_accuracy": report.accuracy, "fractional_accuracy": report.fractional_accuracy})
    wandb.finish()


def save_partial(args: argparse.Namespace, report: CheckReport) -> None:
    """An interrupted check's results, printed and saved, marked partial (the exit code is then 130)."""
    print_report(report, args.verbose_eval)
    answered = sum(r.error is None for r in report.results)
    print(f"Check interrupted: the results above are partial ({answered} of {len(report.results)} requests answered)",
          flush=True)
    cli.write_output(args, report.to_dict())
    if args.evidence:
        logger.warning("no evidence bundle is written for an interrupted check")


def export_sealed(args: argparse.Namespace) -> None:
    """Seal keys for a witness, and say which."""
    sealed = seal_keys(load_run(args.run), args.num_fingerprints, args.trust_remote_code)
    write_json_atomic(args.export_sealed, sealed, args.overwrite)
    positions = [entry["position"] for entry in sealed["revealed"]]
    print(f"Sealed {len(positions)} keys (committed positions {positions[0]}..{positions[-1]}) for a witness: "
          f"{args.export_sealed}; recorded in the run's ledger as revealed", flush=True)


def main() -> None:
    args = parse_args()
    if family_of_run(args.run) == DOMAIN_WATERMARK:
        check_watermark(args)
        return
    if args.export_sealed:
        export_sealed(args)
        return
    try:
        report = check_suspect(cli.settings_from(ApiConfig, args) if args.api_base is not None else args.model_path,
                               fingerprints_file=args.fingerprints_file_path, run=load_run(args.run) if args.run else None,
                               selection=cli.settings_from(FingerprintSelection, args), query_format=args.query_format,
                               config=cli.settings_from(CheckConfig, args), verdict=cli.settings_from(VerdictConfig, args),
                               sequential=cli.settings_from(SequentialConfig, args), trust_remote_code=args.trust_remote_code,
                               bundle=bool(args.evidence))
    except CheckInterrupted as stop:
        save_partial(args, stop.report)
        raise
    if distributed.is_main_process():
        print_report(report, args.verbose_eval)
        cli.write_output(args, report.to_dict())
        if args.evidence:
            write_json_atomic(args.evidence, report.bundle, args.overwrite)
        if args.wandb_run_name:
            log_to_wandb(args.wandb_run_name, report)
    distributed.finish()


if __name__ == "__main__":
    cli.run(main)
