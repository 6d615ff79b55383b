"""Generate fingerprints: secret (key, response) pairs to fine-tune into a model.

    python generate_finetuning_data.py --num_fingerprints 64 --key_response_strategy inverse_nucleus
    deepspeed --num_gpus 4 generate_finetuning_data.py ...   # each rank makes every N-th batch
    python generate_finetuning_data.py --key_response_strategy domain_watermark --output_file_path wm.json

Writes a JSON list of {"key", "response"} objects (see docs/guide.md, "Strategies"), or for
domain_watermark the watermark's secret: a new RSA key pair, its parameters and the domain.
"""
import argparse
import logging

from oml import OMLError, cli, distributed
from oml.families.domain_watermark import DomainSource, new_secret
from oml.files import check_writable, json_text, write_text_atomic
from oml.generation import GenerationConfig, generate_fingerprints
from oml.watermark import WatermarkParams

logger = logging.getLogger("generate_finetuning_data")


def build_parser() -> cli.ArgumentParser:
    parser = cli.ArgumentParser(description=__doc__)
    cli.add_settings(parser, GenerationConfig)
    cli.add_settings(parser, WatermarkParams)
    cli.add_settings(parser, DomainSource)
    parser.add_argument("--output_file_path", default="generated_data/output_fingerprints.json", help="Written atomically.")
    parser.add_argument("--overwrite", action="store_true", help="Replace an existing output file.")
    cli.add_common_args(parser)
    return parser


def parse_args() -> tuple[GenerationConfig, argparse.Namespace]:
    args = build_parser().parse_args()
    config = cli.settings_from(GenerationConfig, args)
    check_writable(args.output_file_path, args.overwrite)
    return config, args


def write_fingerprints(path: str, fingerprints: list[dict], overwrite: bool) -> None:
    """Write the file; if that fails after all the work, print the fingerprints rather than lose them."""
    text = json_text(fingerprints)
    try:
        write_text_atomic(path, text, overwrite)
    except OMLError:
        print(text, end="")
        raise


def write_watermark_secret(args: argparse.Namespace) -> None:
    """The domain watermark's secret: no model is needed, only a random key and a domain that has enough prompts."""
    cli.single_process("generate_finetuning_data.py --key_response_strategy domain_watermark")
    secret = new_secret(cli.settings_from(WatermarkParams, args), cli.settings_from(DomainSource, args))
    write_text_atomic(args.output_file_path, json_text(secret), args.overwrite)
    logger.info("Wrote a domain watermark secret (domain %s) to %s: keep it private", secret["domain"]["domain"],
                args.output_file_path)


def main() -> None:
    config, args = parse_args()
    if config.key_response_strategy == "domain_watermark":
        write_watermark_secret(args)
        return
    fingerprints = generate_fingerprints(config, args.trust_remote_code)
    if distributed.is_main_process():
        write_fingerprints(args.output_file_path, fingerprints, args.overwrite)
        logger.info("Wrote %d fingerprints to %s", len(fingerprints), args.output_file_path)
    distributed.finish()


if __name__ == "__main__":
    cli.run(main)
