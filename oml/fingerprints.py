"""The fingerprint file format: a JSON list of {"key": ..., "response": ...} objects.

Extra fields (e.g. the probability and rank of a perinucleus response) are allowed and
ignored by the readers. A keys file is a JSON list of strings or of objects with "key".
"""
import logging
import random
from pathlib import Path

from oml import OMLError
from oml.data import words
from oml.cli import non_negative_int, positive_int
from oml.files import read_json
from oml.runs import inherit_settings
from oml.tokenization import FORMAT_CHOICES, default_format, formats

logger = logging.getLogger(__name__)

STRATEGIES = ("english", "random_word", "english_random_response", "inverse_nucleus")


def load_fingerprints(path: str | Path) -> list[dict]:
    """Read and validate a fingerprint file; a key that appears again is dropped (with a warning),
    since a key asked twice would count twice as evidence."""
    records = read_json(path, "fingerprints file")
    if not isinstance(records, list) or not records:
        raise OMLError(f"fingerprints file {path} must hold a non-empty JSON list")
    for i, record in enumerate(records):
        if not (isinstance(record, dict) and isinstance(record.get("key"), str) and isinstance(record.get("response"), str)):
            raise OMLError(f"fingerprint {i} in {path} is not an object with string 'key' and 'response'")
    first = {}
    for record in records:
        first.setdefault(record["key"], record)
    unique = list(first.values())
    if len(unique) < len(records):
        logger.warning("%s repeats %d keys; each is used once, with its first response", path, len(records) - len(unique))
    return unique


def load_keys(path: str | Path) -> list[str]:
    """Read user-supplied keys: a JSON list of strings, or of objects with a string 'key'."""
    records = read_json(path, "keys file")
    if not isinstance(records, list) or not records:
        raise OMLError(f"keys file {path} must hold a non-empty JSON list")
    keys = [record.get("key") if isinstance(record, dict) else record for record in records]
    for i, key in enumerate(keys):
        if not isinstance(key, str) or not key.strip():
            raise OMLError(f"entry {i} in keys file {path} is not a non-empty string (or object with 'key')")
    if len(set(keys)) < len(keys):
        raise OMLError(f"keys file {path} holds the same key more than once; each key must be unique")
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


DEFAULT_KEY_LENGTH = 16
DEFAULTS = {"fingerprint_generation_strategy": "english", "max_response_length": 1}


def recorded(records: list[dict], field: str):
    """The value of `field` that every record carries (e.g. the key_length or key_format the
    responses were chosen for), or None if they do not all carry the same one."""
    values = {r.get(field) for r in records}
    return values.pop() if len(values) == 1 else None


def warn_on_key_length_mismatch(records: list[dict], max_key_length: int) -> None:
    """Perinucleus responses were picked after `key_length` key tokens: other cuts lose that property."""
    lengths = {r["key_length"] for r in records if "key_length" in r}
    if lengths and lengths != {max_key_length}:
        logger.warning("these responses were chosen after %s key tokens but --max_key_length is %d; "
                       "use the same length for a reliable fingerprint", "/".join(map(str, sorted(lengths))), max_key_length)


def add_selection_args(parser, verb: str) -> None:
    """Flags that pick fingerprints from a file and cut them to tokens. Fine-tuning, checking
    and persistence share them, so a check sees exactly the tokens that were trained.
    Those left out come from --run, or else from the file's records, or else from DEFAULTS."""
    parser.add_argument("--num_fingerprints", type=positive_int, default=None, help=f"How many to {verb} (default: all in the file).")
    parser.add_argument("--data_split", type=non_negative_int, default=0, help="Index of the first fingerprint used.")
    parser.add_argument("--fingerprint_generation_strategy", default=None, choices=STRATEGIES, help="Default: english.")
    parser.add_argument("--max_key_length", type=positive_int, default=None,
                        help=f"Keys are cut to this many tokens (default: the key_length the fingerprints were generated "
                             f"with, else {DEFAULT_KEY_LENGTH}).")
    parser.add_argument("--max_response_length", type=positive_int, default=None,
                        help="Responses are cut to this many tokens (default: 1).")


def selected_fingerprints(args) -> list[dict]:
    """The fingerprints the selection flags, --fingerprints_file_path and --run name; fills in
    the selection settings the user left out."""
    run = getattr(args, "run", None)
    if run is not None:
        inherit_settings(args, run)
        if args.fingerprints_file_path is None:
            args.fingerprints_file_path = str(run.fingerprints_file)
    if args.fingerprints_file_path is None:
        raise OMLError("name the fingerprints: --fingerprints_file_path FILE or --run DIR")
    records = load_fingerprints(args.fingerprints_file_path)
    if args.max_key_length is None:
        args.max_key_length = recorded(records, "key_length") or DEFAULT_KEY_LENGTH
    for name, value in DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    fingerprints = select_fingerprints(records, args.num_fingerprints, args.data_split, args.fingerprint_generation_strategy)
    warn_on_key_length_mismatch(fingerprints, args.max_key_length)
    return fingerprints


def add_query_format_arg(parser) -> None:
    parser.add_argument("--query_format", default=None, choices=FORMAT_CHOICES,
                        help="Ask keys as raw text, as a chat user message, or both (default: the run's or the fingerprints' "
                             "format, else both when the model has a chat template).")


def query_formats(args, fingerprints: list[dict], tokenizer=None) -> tuple[str, ...]:
    """The formats keys are asked in: --query_format (or the run's), else the fingerprints' recorded
    format, else both when `tokenizer` has a chat template, else raw."""
    if args.query_format is None:
        args.query_format = recorded(fingerprints, "key_format") or (default_format(tokenizer) if tokenizer else "raw")
    return formats(args.query_format)
