"""The fingerprint file format: a JSON list of {"key": ..., "response": ...} objects.

Extra fields (e.g. the probability and rank of a perinucleus response) are allowed and
ignored by the readers. A keys file is a JSON list of strings or of objects with "key".
"""
import logging
import random
from pathlib import Path

from oml import OMLError
from oml.data import words
from oml.files import read_json

logger = logging.getLogger(__name__)

STRATEGIES = ("english", "random_word", "english_random_response", "inverse_nucleus")


def load_fingerprints(path: str | Path) -> list[dict]:
    """Read and validate a fingerprint file."""
    records = read_json(path, "fingerprints file")
    if not isinstance(records, list) or not records:
        raise OMLError(f"fingerprints file {path} must hold a non-empty JSON list")
    for i, record in enumerate(records):
        if not (isinstance(record, dict) and isinstance(record.get("key"), str) and isinstance(record.get("response"), str)):
            raise OMLError(f"fingerprint {i} in {path} is not an object with string 'key' and 'response'")
    return records


def load_keys(path: str | Path) -> list[str]:
    """Read user-supplied keys: a JSON list of strings, or of objects with a string 'key'."""
    records = read_json(path, "keys file")
    if not isinstance(records, list) or not records:
        raise OMLError(f"keys file {path} must hold a non-empty JSON list")
    keys = [record.get("key") if isinstance(record, dict) else record for record in records]
    for i, key in enumerate(keys):
        if not isinstance(key, str) or not key.strip():
            raise OMLError(f"entry {i} in keys file {path} is not a non-empty string (or object with 'key')")
    return keys


def random_word_response(key: str) -> str:
    """The `english_random_response` strategy's response: one random word, derived from the key.

    Deriving it from the key (not from a seed flag) means fine-tuning and checking always agree.
    """
    return random.Random(f"english_random_response:{key}").choice(words())


def select_fingerprints(records: list[dict], num_fingerprints: int | None, data_split: int, strategy: str) -> list[dict]:
    """The fingerprints a run uses: `num_fingerprints` from offset `data_split` (all when None)."""
    if strategy not in STRATEGIES:
        raise OMLError(f"unknown fingerprint strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    if data_split < 0:
        raise OMLError("--data_split must be >= 0")
    available = len(records) - data_split
    if num_fingerprints is None:
        num_fingerprints = available
    if num_fingerprints < 1:
        raise OMLError("--num_fingerprints must be >= 1 (and --data_split must leave some fingerprints)")
    if num_fingerprints > available:
        raise OMLError(f"asked for {num_fingerprints} fingerprints from offset {data_split}, but the file holds only {len(records)}")
    selected = [dict(r) for r in records[data_split:data_split + num_fingerprints]]
    if strategy == "english_random_response":
        for record in selected:
            record["response"] = random_word_response(record["key"])
    return selected


def warn_on_key_length_mismatch(records: list[dict], max_key_length: int) -> None:
    """Perinucleus responses were picked after `key_length` key tokens: other cuts lose that property."""
    lengths = {r["key_length"] for r in records if "key_length" in r}
    if lengths and lengths != {max_key_length}:
        logger.warning("these perinucleus responses were chosen after %s key tokens but --max_key_length is %d; "
                       "use the same length for a reliable fingerprint", "/".join(map(str, sorted(lengths))), max_key_length)


def add_selection_args(parser, verb: str) -> None:
    """Flags that pick fingerprints from a file and cut them to tokens. Fine-tuning, checking
    and persistence share them, so a check sees exactly the tokens that were trained."""
    parser.add_argument("--num_fingerprints", type=int, default=None, help=f"How many to {verb} (default: all in the file).")
    parser.add_argument("--data_split", type=int, default=0, help="Index of the first fingerprint used.")
    parser.add_argument("--fingerprint_generation_strategy", default="english", choices=STRATEGIES)
    parser.add_argument("--max_key_length", type=int, default=16, help="Keys are cut to this many tokens.")
    parser.add_argument("--max_response_length", type=int, default=1, help="Responses are cut to this many tokens.")


def selected_fingerprints(args) -> list[dict]:
    """The fingerprints that the selection flags (and --fingerprints_file_path) name."""
    fingerprints = select_fingerprints(load_fingerprints(args.fingerprints_file_path), args.num_fingerprints,
                                       args.data_split, args.fingerprint_generation_strategy)
    warn_on_key_length_mismatch(fingerprints, args.max_key_length)
    return fingerprints
