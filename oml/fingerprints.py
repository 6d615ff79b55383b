"""The fingerprint file format: a JSON list of {"key": ..., "response": ...} objects.

A record may also hold "other_responses", a list of more answers that count as the key's
response (`--responses_per_key`): a suspect that serves any of them matches. Other extra
fields (e.g. the probability and rank of a perinucleus response) are allowed and ignored by
the readers. A keys file is a JSON list of strings or of objects with "key".
"""
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from oml import OMLError
from oml.data import words
from oml.files import read_json
from oml.settings import NON_NEGATIVE_INT, POSITIVE_INT, Settings, setting
from oml.tokenization import default_format, formats

logger = logging.getLogger(__name__)

STRATEGIES = ("english", "random_word", "english_random_response", "inverse_nucleus")


def load_fingerprints(path: str | Path) -> list[dict]:
    """Read and validate a fingerprint file (see `valid_fingerprints`)."""
    return valid_fingerprints(read_json(path, "fingerprints file"), path)


def valid_fingerprints(records, path: str | Path) -> list[dict]:
    """Fingerprint records checked for their shape; a key that appears again is dropped (with a
    warning), since a key asked twice would count twice as evidence. `path` names them in messages."""
    if not isinstance(records, list) or not records:
        raise OMLError(f"fingerprints file {path} must hold a non-empty JSON list")
    for i, record in enumerate(records):
        if not (isinstance(record, dict) and isinstance(record.get("key"), str) and isinstance(record.get("response"), str)):
            raise OMLError(f"fingerprint {i} in {path} is not an object with string 'key' and 'response'")
        others = record.get("other_responses", [])
        if not (isinstance(others, list) and all(isinstance(other, str) for other in others)):
            raise OMLError(f"fingerprint {i} in {path}: 'other_responses' must be a list of strings")
        if len(set(responses_of(record))) < len(responses_of(record)):
            raise OMLError(f"fingerprint {i} in {path} lists the same response twice")
    first = {}
    for record in records:
        first.setdefault(record["key"], record)
    unique = list(first.values())
    if len(unique) < len(records):
        logger.warning("%s repeats %d keys; each is used once, with its first response", path, len(records) - len(unique))
    return unique


def responses_of(record: dict) -> list[str]:
    """Every answer that counts as `record`'s response: its response, then its other responses."""
    return [record["response"], *record.get("other_responses", [])]


def responses_per_key(fingerprints: list[dict]) -> int:
    """The most responses any of `fingerprints` accepts (1 for ordinary fingerprints)."""
    return max(len(responses_of(record)) for record in fingerprints)


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
            record.pop("other_responses", None)
    return selected


DEFAULT_KEY_LENGTH = 16
DEFAULT_STRATEGY, DEFAULT_RESPONSE_LENGTH = "english", 1


@dataclass(frozen=True)
class FingerprintSelection(Settings):
    """Which fingerprints of a file are used and how they are cut to tokens. Fine-tuning, checking
    and the evaluations share it, so a check sees exactly the tokens that were trained. Fields left
    None are filled by `resolved`: from the run, else from the file's records, else the defaults."""
    num_fingerprints: int | None = setting(None, "How many fingerprints to use (default: all in the file).", POSITIVE_INT)
    data_split: int = setting(0, "Index of the first fingerprint used.", NON_NEGATIVE_INT)
    fingerprint_generation_strategy: str | None = setting(
        None, f"Default: what the records say (perinucleus records: inverse_nucleus), else {DEFAULT_STRATEGY}.",
        choices=STRATEGIES)
    max_key_length: int | None = setting(
        None, f"Keys are cut to this many tokens (default: the key_length the fingerprints were generated with, else "
              f"{DEFAULT_KEY_LENGTH}).", POSITIVE_INT)
    max_response_length: int | None = setting(
        None, f"Responses are cut to this many tokens (default: {DEFAULT_RESPONSE_LENGTH}).", POSITIVE_INT)

    def resolved(self, records: list[dict], run_config: dict | None = None) -> "FingerprintSelection":
        """Every field filled in: what was given, else what the run used (a given value that differs
        is kept, with a warning), else what the records carry, else the defaults. A strategy given that
        contradicts what the records say is refused."""
        said = recorded_strategy(records)
        if said is not None and self.fingerprint_generation_strategy not in (None, said):
            raise OMLError(f"--fingerprint_generation_strategy {self.fingerprint_generation_strategy} contradicts the "
                           f"fingerprints, which are {said} fingerprints (leave the flag out: it is read from them)")
        selection = self
        if run_config is not None:
            recorded_run = FingerprintSelection.from_dict(run_config, "the run's config.json")
            selection = self.updated(**{name: inherited(getattr(self, name), getattr(recorded_run, name), name)
                                        for name in INHERITED_FIELDS})
        return selection.updated(
            max_key_length=selection.max_key_length or recorded(records, "key_length") or DEFAULT_KEY_LENGTH,
            max_response_length=selection.max_response_length or DEFAULT_RESPONSE_LENGTH,
            fingerprint_generation_strategy=selection.fingerprint_generation_strategy or said or DEFAULT_STRATEGY)

    def select(self, records: list[dict]) -> list[dict]:
        """The records this (resolved) selection uses, cut-length warnings included."""
        fingerprints = select_fingerprints(records, self.num_fingerprints, self.data_split, self.fingerprint_generation_strategy)
        warn_on_key_length_mismatch(fingerprints, self.max_key_length)
        return fingerprints


INHERITED_FIELDS = ("fingerprint_generation_strategy", "max_key_length", "max_response_length")


def inherited(given, recorded_value, flag: str):
    """A setting a check takes from the run that made the model: the given value, else the recorded
    one; a given value that differs from the run's is kept, with a warning."""
    if given is None:
        return recorded_value
    if recorded_value is not None and given != recorded_value:
        logger.warning("--%s %s differs from the %s the run was fine-tuned with; the check may not see what was trained",
                       flag, given, recorded_value)
    return given


def recorded(records: list[dict], field: str):
    """The value of `field` that every record carries (e.g. the key_length or key_format the
    responses were chosen for), or None if they do not all carry the same one."""
    values = {r.get(field) for r in records}
    return values.pop() if len(values) == 1 else None


def recorded_strategy(records: list[dict]) -> str | None:
    """The strategy the records say they were made with, None where they do not say: perinucleus
    responses carry their rank under the model that chose them (`response_rank`); English and
    random-word records carry nothing that tells them apart."""
    return "inverse_nucleus" if all("response_rank" in r for r in records) else None


def warn_on_key_length_mismatch(records: list[dict], max_key_length: int) -> None:
    """Perinucleus responses were picked after `key_length` key tokens: other cuts lose that property."""
    lengths = {r["key_length"] for r in records if "key_length" in r}
    if lengths and lengths != {max_key_length}:
        logger.warning("these responses were chosen after %s key tokens but --max_key_length is %d; "
                       "use the same length for a reliable fingerprint", "/".join(map(str, sorted(lengths))), max_key_length)


IN_MEMORY = "(fingerprints given in Python)"


class Selected(NamedTuple):
    """The fingerprints a command uses, the fully resolved selection, and the file they came from."""
    fingerprints: list[dict]
    selection: FingerprintSelection
    file: str


def selected_fingerprints(selection: FingerprintSelection, fingerprints_file: str | Path | list[dict] | None,
                          run=None) -> Selected:
    """The fingerprints that `selection` names in `fingerprints_file` (or a list of records given in
    Python), or in the run's own file when none is given (a different file than the run's is used as
    asked, with a warning)."""
    if isinstance(fingerprints_file, list):
        records = valid_fingerprints(fingerprints_file, IN_MEMORY)
        selection = selection.resolved(records, run.config if run is not None else None)
        return Selected(selection.select(records), selection, IN_MEMORY)
    if run is not None:
        if fingerprints_file is None:
            fingerprints_file = str(run.fingerprints_file)
        elif Path(fingerprints_file).resolve() != run.fingerprints_file.resolve():
            logger.warning("--fingerprints_file_path %s is not the fingerprints of --run %s; checking the given file",
                           fingerprints_file, run.directory)
    if fingerprints_file is None:
        raise OMLError("name the fingerprints: --fingerprints_file_path FILE or --run DIR")
    records = load_fingerprints(fingerprints_file)
    selection = selection.resolved(records, run.config if run is not None else None)
    return Selected(selection.select(records), selection, str(fingerprints_file))


def query_formats(query_format: str | None, fingerprints: list[dict], tokenizer=None, run=None) -> tuple[str, ...]:
    """The formats keys are asked in: `query_format` (or the format the run trained), else the
    fingerprints' recorded format, else both when `tokenizer` has a chat template, else raw."""
    if run is not None:
        query_format = inherited(query_format, run.training.key_format, "query_format")
    choice = query_format or recorded(fingerprints, "key_format") or (default_format(tokenizer) if tokenizer else "raw")
    return formats(choice)
