"""The fingerprint families, side by side. Each family is one module with the same four steps:
a secret made by generate_finetuning_data.py, fine-tuning by finetune_multigpu.py, a check by
check_fingerprints.py, and evidence that verify_evidence.py recomputes.

- perinucleus (`oml.pipeline`): secret (key, response) pairs, each key answered by one
  memorised token; the commitment is a Merkle root, and a check reveals only the keys it asks.
- domain_watermark (`oml.families.domain_watermark`): the model watermarks its replies to
  ordinary prompts of one domain (`oml.watermark`); the commitment is the hash of the key.

The scripts ask `family_of_file` or `family_of_run` which family a secret or a run belongs to,
and hand it to that family's module: a third family is one more module and one more name here.
"""
from pathlib import Path

from oml import OMLError
from oml.files import read_json

PERINUCLEUS = "perinucleus"
DOMAIN_WATERMARK = "domain_watermark"
FAMILIES = (PERINUCLEUS, DOMAIN_WATERMARK)


def family_of(data: object) -> str:
    """The family of a secret file's or a run configuration's contents: a JSON object names its
    family; a perinucleus fingerprints file is a list (and older runs name none)."""
    if isinstance(data, dict) and data.get("family") in FAMILIES:
        return data["family"]
    return PERINUCLEUS


def family_of_file(path: str | Path | None) -> str:
    """The family of a fingerprints (secret) file; a missing or unreadable file is left to the
    family's own reader, which says what is wrong with it."""
    if path is None or not Path(path).is_file():
        return PERINUCLEUS
    try:
        return family_of(read_json(path, "fingerprints file"))
    except OMLError:  # the perinucleus reader says what is wrong with it
        return PERINUCLEUS


def family_of_run(directory: str | Path | None) -> str:
    """The family of a run folder, from its config.json."""
    if directory is None or not (Path(directory) / "config.json").is_file():
        return PERINUCLEUS
    try:
        return family_of(read_json(Path(directory) / "config.json", "run configuration"))
    except OMLError:  # load_run says what is wrong with it
        return PERINUCLEUS
