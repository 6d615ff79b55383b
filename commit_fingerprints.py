"""Give a fine-tuning run made before commitments existed its fingerprint commitment.

    python commit_fingerprints.py --run results/saved_models/<hash>

Writes the run's commitment.json (public: a SHA-256 Merkle root over its fingerprints as
trained, and their count) and commitment_salts.json (private: one random salt per
fingerprint), as finetune_multigpu.py does for every new run, and prints the root to publish
with the model. commitment.json also records the test a check will use (formats, verdict rule,
sequential settings: the defaults), which a verifier reads from it. A commitment made after the
model was published proves less than one made at fine-tuning time: only that the keys were fixed
from now on. An existing commitment is never replaced (publishing a second root would undo what
the first proves).
"""
from oml import OMLError, cli
from oml.commitment import write_commitment
from oml.evidence import Protocol
from oml.pipeline import run_records
from oml.families import PERINUCLEUS, family_of_run
from oml.runs import load_run
from oml.tokenization import formats


def build_parser() -> cli.ArgumentParser:
    parser = cli.ArgumentParser(description=__doc__)
    cli.add_run_arg(parser, required=True)
    cli.add_common_args(parser)
    return parser


def main() -> None:
    args = build_parser().parse_args()
    cli.single_process("commit_fingerprints.py")
    if family_of_run(args.run) != PERINUCLEUS:
        raise OMLError(f"run {args.run} is a {family_of_run(args.run)} run: fine-tuning wrote its commitment.json")
    run = load_run(args.run)
    commitment = write_commitment(run.directory, run_records(run, args.trust_remote_code),
                                  protocol=Protocol(formats(run.training.key_format)).to_dict())
    print(f"Fingerprint commitment (publish it with the model): sha256 Merkle root {commitment['root']} over "
          f"{commitment['count']} fingerprints", flush=True)


if __name__ == "__main__":
    cli.run(main)
