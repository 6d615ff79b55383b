"""Fine-tune fingerprints into a model.

    python finetune_multigpu.py --fingerprints_file_path generated_data/output_fingerprints.json
    deepspeed --num_gpus 8 finetune_multigpu.py --model_path mistralai/Mistral-7B-v0.3 --deepspeed_stage 3

The model is saved to results/saved_models/<config_hash>/final_model/; the last line on
stdout is `Config hash of the final model: <hash>`. A domain watermark secret
(generate_finetuning_data.py --key_response_strategy domain_watermark) is fine-tuned the same way,
with the --watermark_* flags; the fingerprint selection flags are for perinucleus fingerprints.
"""
import argparse
import logging

from oml import OMLError, cli, distributed
from oml.families import DOMAIN_WATERMARK, family_of_file
from oml.families import domain_watermark
from oml.files import write_text_atomic
from oml.fingerprints import FingerprintSelection
from oml.models import MODEL_FAMILIES
from oml.pipeline import fingerprint_model
from oml.runs import Run
from oml.training.config import TrainingConfig

logger = logging.getLogger("finetune_multigpu")


def build_parser() -> cli.ArgumentParser:
    parser = cli.ArgumentParser(description=__doc__)
    parser.add_argument("--model_path", default=None,
                        help="Hub id, local folder or .gguf file of the model to fingerprint (default: the embedded SmolLM2-135M-Instruct).")
    parser.add_argument("--model_family", default=None, choices=sorted(MODEL_FAMILIES),
                        help="With --model_size, names a hub model (used when --model_path is not given).")
    parser.add_argument("--model_size", default="7B", help="With --model_family: the size in the hub model's name.")
    parser.add_argument("--fingerprints_file_path", default="generated_data/output_fingerprints.json",
                        help="The fingerprints (generate_finetuning_data.py's output).")
    cli.add_settings(parser, FingerprintSelection)
    cli.add_settings(parser, TrainingConfig)
    cli.add_settings(parser, domain_watermark.WatermarkTraining)
    parser.add_argument("--results_dir", default="results", help="The run goes to RESULTS_DIR/saved_models/<config hash>/.")
    parser.add_argument("--report_to", default="none", help="Trackers for the Trainer, e.g. wandb or tensorboard.")
    parser.add_argument("--wandb_run_name", default=None, help="Run name shown by the tracker (implies --report_to wandb).")
    cli.add_common_args(parser)
    return parser


def parse_args() -> tuple[argparse.Namespace, FingerprintSelection, TrainingConfig]:
    args = build_parser().parse_args()
    if args.wandb_run_name and args.report_to == "none":
        args.report_to = "wandb"
    check_trackers(args.report_to)
    return args, cli.settings_from(FingerprintSelection, args), cli.settings_from(TrainingConfig, args)


def check_trackers(report_to: str) -> None:
    """Unknown or uninstalled trackers are refused before any work (not after loading the model)."""
    from transformers.integrations import INTEGRATION_TO_CALLBACK, get_available_reporting_integrations

    for name in (n.strip() for n in report_to.split(",")):
        if name in ("none", "all"):
            continue
        if name not in INTEGRATION_TO_CALLBACK:
            raise OMLError(f"unknown tracker {name!r} in --report_to; choose from {', '.join(sorted(INTEGRATION_TO_CALLBACK))}")
        if name not in get_available_reporting_integrations():
            raise OMLError(f"--report_to {name} needs the {name} package: pip install {name}")


def record_current_hash(run_hash: str) -> None:
    """current_config_hash.txt, as the original scripts wrote it; a failure to write it only warns."""
    try:
        write_text_atomic("current_config_hash.txt", run_hash + "\n")
    except OMLError as error:
        logger.warning("%s (the hash is printed above)", error)


def print_commitment(run: Run) -> None:
    """The root to publish with the model: it proves later that the keys revealed in a check were fixed now."""
    if family_of_file(run.directory / "config.json") == DOMAIN_WATERMARK:
        public = domain_watermark.read_commitment(run.directory / domain_watermark.COMMITMENT_FILE)
        print(f"Watermark commitment (publish {run.directory / domain_watermark.COMMITMENT_FILE} with the model): its public "
              f"key's sha256 {public['public_key_sha256']}", flush=True)
        return
    commitment = run.commitment
    if commitment is None:
        logger.warning("run %s has no fingerprint commitment (made before commitments): python commit_fingerprints.py "
                       "--run %s", run.directory.name, run.directory)
        return
    print(f"Fingerprint commitment (publish it with the model, e.g. on its model card): sha256 Merkle root "
          f"{commitment['root']} over {commitment['count']} fingerprints", flush=True)


def main() -> None:
    args, selection, training = parse_args()
    if family_of_file(args.fingerprints_file_path) == DOMAIN_WATERMARK:
        run = domain_watermark.fingerprint_model(
            args.fingerprints_file_path, args.model_path, training, cli.settings_from(domain_watermark.WatermarkTraining, args),
            results_dir=args.results_dir,
            model_family=args.model_family, model_size=args.model_size, report_to=args.report_to, run_name=args.wandb_run_name,
            trust_remote_code=args.trust_remote_code)
    else:
        run = fingerprint_model(args.fingerprints_file_path, args.model_path, selection, training, results_dir=args.results_dir,
                                model_family=args.model_family, model_size=args.model_size, report_to=args.report_to,
                                run_name=args.wandb_run_name, trust_remote_code=args.trust_remote_code)
    if distributed.is_main_process():
        print_commitment(run)
        print(f"Config hash of the final model: {run.directory.name}", flush=True)
        record_current_hash(run.directory.name)
    distributed.finish()


if __name__ == "__main__":
    cli.run(main)
