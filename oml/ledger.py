"""The ledger of revealed keys: which fingerprints of a run have already been sent to a suspect.

A check sends fingerprint keys to a suspect, and from then on the suspect's operator knows
those keys and can filter them. A later check is only worth something if it asks keys never
asked before, so every check records here which keys it is about to reveal, and draws only
keys that no earlier check revealed.

The ledger is `run_dir/revealed.jsonl`, one JSON object per line:

    {"time": ISO-8601 UTC, "suspect": str, "positions": [int, ...], "formats": [str, ...], "check": str}

`positions` index the run's fingerprints in their committed order; `check` is an id shared
by all entries of one check. Entries never hold key or response text: the ledger may be
copied and shared less carefully than the keys themselves.

A domain watermark run keeps the same ledger: its `positions` are the checking prompts asked
(a later check asks others), and an entry written when an evidence bundle is made also has
`contexts`, the token-id contexts whose green-list signatures the bundle reveals (a later check
leaves them out of its test; oml.families.domain_watermark).

The first reservation also leaves `revealed.jsonl.started`: a run folder that has revealed keys
knows it, so a ledger deleted or lost later is refused (`check_kept`) instead of silently letting
a check reveal the same keys again.

The file is append-only. Two checks may run at once against one run folder, so reserving is
atomic: an exclusive `flock` on `revealed.jsonl.lock` is held while the ledger is read, the
positions are chosen and one line is appended (a single `os.write` on an O_APPEND descriptor,
then fsync). Keys are recorded before they are sent: a crash in between wastes keys but can
never hide a revealed one. Linux (or any POSIX system with `fcntl.flock`) only.
"""
import contextlib
import fcntl
import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator, Sequence

from oml import OMLError

LEDGER_NAME = "revealed.jsonl"
LOCK_SUFFIX = ".lock"
STARTED_SUFFIX = ".started"
# Every field an entry has, and the only ones written: nothing here may identify a key's text.
FIELDS = ("time", "suspect", "positions", "formats", "check")


def ledger_path(run_dir: str | Path) -> Path:
    """Where the run's ledger lives (it may not exist yet: then nothing has been revealed)."""
    return Path(run_dir) / LEDGER_NAME


def lock_path(run_dir: str | Path) -> Path:
    """The lock file beside the ledger. A separate file, so that locking never touches the
    ledger itself and the ledger can stay strictly append-only."""
    return Path(run_dir) / (LEDGER_NAME + LOCK_SUFFIX)


def started_path(run_dir: str | Path) -> Path:
    """The marker that this run has revealed keys before (made with its first ledger entry)."""
    return Path(run_dir) / (LEDGER_NAME + STARTED_SUFFIX)


def check_kept(run_dir: str | Path) -> None:
    """Refuse a run that revealed keys before but has lost its ledger: which keys are known to
    suspects is then unknown, and drawing from the start would reveal them again as if new."""
    if started_path(run_dir).exists() and not ledger_path(run_dir).exists():
        raise OMLError(f"{ledger_path(run_dir)} is missing, but this run has revealed keys before ({started_path(run_dir).name}): "
                       "restore the ledger, or pass --reuse_revealed to check with keys that suspects may know")


@contextlib.contextmanager
def _exclusive_lock(run_dir: str | Path) -> Iterator[None]:
    """Hold the run's ledger lock against every other process reserving keys in this run folder."""
    if not Path(run_dir).is_dir():
        raise OMLError(f"run folder not found: {run_dir}")
    try:
        fd = os.open(lock_path(run_dir), os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as error:
        raise OMLError(f"cannot lock the ledger of {run_dir}: {error.strerror or error}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the last descriptor releases the lock


@contextlib.contextmanager
def _shared_lock(run_dir: str | Path) -> Iterator[None]:
    """Wait out a reservation in progress, so that a reader never sees a line half-written.

    Readers do not create the lock file: reading a ledger must work in a folder one cannot
    write to. Without a lock file no reservation has started, so there is nothing to wait for."""
    try:
        fd = os.open(lock_path(run_dir), os.O_RDONLY)
    except OSError:
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)


def _is_int_list(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)


def _is_str_list(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _problem(entry: object) -> str | None:
    """What is wrong with one parsed line, or None if it is a valid entry."""
    if not isinstance(entry, dict):
        return "not a JSON object"
    missing = [field for field in FIELDS if field not in entry]
    if missing:
        return f"missing {', '.join(missing)}"
    if not all(isinstance(entry[field], str) for field in ("time", "suspect", "check")):
        return "time, suspect and check must be strings"
    if not _is_int_list(entry["positions"]):
        return "positions must be a list of non-negative integers"
    if not _is_str_list(entry["formats"]):
        return "formats must be a list of strings"
    if "contexts" in entry and not (isinstance(entry["contexts"], list) and all(_is_int_list(c) for c in entry["contexts"])):
        return "contexts must be a list of lists of token ids"
    return None


def _parse(data: bytes, path: Path) -> list[dict]:
    """Every entry of the ledger's contents; a bad line is a one-line error naming file and line,
    because a ledger one cannot read is a ledger whose revealed keys one cannot avoid."""
    result = []
    for number, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            entry = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise OMLError(f"{path}, line {number}: malformed ledger entry ({error})") from None
        problem = _problem(entry)
        if problem:
            raise OMLError(f"{path}, line {number}: malformed ledger entry ({problem})")
        result.append(entry)
    return result


def _read_bytes(path: Path) -> bytes:
    """The ledger's raw contents; a missing ledger reads as empty (nothing revealed)."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return b""
    except OSError as error:
        raise OMLError(f"cannot read ledger {path}: {error.strerror or error}") from None


def entries(run_dir: str | Path) -> list[dict]:
    """Every entry of the run's ledger, oldest first (an empty list if there is no ledger)."""
    path = ledger_path(run_dir)
    with _shared_lock(run_dir):
        data = _read_bytes(path)
    return _parse(data, path)


def _positions(ledger: list[dict]) -> set[int]:
    return {position for entry in ledger for position in entry["positions"]}


def revealed(run_dir: str | Path) -> set[int]:
    """The positions of every key ever sent (or about to be sent) to any suspect (a lost ledger is refused)."""
    check_kept(run_dir)
    return _positions(entries(run_dir))


def revealed_contexts(run_dir: str | Path) -> set[tuple[int, ...]]:
    """The watermark contexts whose signatures any evidence bundle of the run has revealed."""
    check_kept(run_dir)
    return {tuple(context) for entry in entries(run_dir) for context in entry.get("contexts", [])}


def unrevealed(run_dir: str | Path, candidates: Sequence[int]) -> list[int]:
    """The `candidates` (positions in committed order) a later check may draw: those after the last key
    ever revealed, so that a check's keys are consecutive committed positions (a gap left by an earlier
    check of a narrower selection stays unused)."""
    frontier = max(revealed(run_dir), default=-1)
    return [position for position in candidates if position > frontier]


def remaining(run_dir: str | Path, candidates: Sequence[int]) -> int:
    """How many of `candidates` a later check may still draw (see `unrevealed`)."""
    return len(unrevealed(run_dir, candidates))


def choose(taken: set[int], count: int, candidates: Sequence[int], reuse: bool = False) -> list[int]:
    """The positions a check draws: the first `count` of `candidates` (positions in committed order)
    not in `taken`, or with `reuse` the first `count` regardless (a deliberate re-check with keys
    already known)."""
    return [p for p in candidates if reuse or p not in taken][:count]


def make_entry(suspect: str, positions: list[int], formats: list[str], check: str,
               contexts: Sequence[Sequence[int]] | None = None) -> dict:
    """One ledger line, built from the whitelisted fields only so that no key text can slip in."""
    entry = {"time": datetime.now(timezone.utc).isoformat(), "suspect": suspect, "positions": list(positions),
             "formats": list(formats), "check": check}
    return entry if contexts is None else {**entry, "contexts": [[int(t) for t in c] for c in contexts]}


def _fsync_dir(directory: Path) -> None:
    """Make a newly created ledger's name durable, not only its contents."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _append(path: Path, line: bytes) -> None:
    """Append one line with one write and make it durable before any key is sent. O_APPEND puts
    the line at the end even if something else appended meanwhile; one write keeps it whole."""
    created = not path.exists()
    if created:  # the marker first: a ledger never exists without it
        os.close(os.open(started_path(path.parent), os.O_WRONLY | os.O_CREAT, 0o666))
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        written = os.write(fd, line)
        if written != len(line):
            raise OMLError(f"could not record revealed keys in {path}: short write ({written} of {len(line)} bytes)")
        os.fsync(fd)
    finally:
        os.close(fd)
    if created:
        _fsync_dir(path.parent)


def _check_arguments(count: int, suspect: str, formats: list[str], check: str) -> None:
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise ValueError(f"count must be a non-negative integer, not {count!r}")
    if not isinstance(suspect, str) or not suspect:
        raise ValueError("suspect must be a non-empty string")
    if not isinstance(check, str) or not check:
        raise ValueError("check must be a non-empty string")
    if isinstance(formats, str) or not _is_str_list(list(formats)):
        raise ValueError("formats must be a list of strings")


def reserve(run_dir: str | Path, count: int, suspect: str, formats: list[str], check: str, candidates: Sequence[int],
            reuse: bool = False) -> list[int]:
    """Reserve and record up to `count` keys for one check, before any of them is sent.

    Under the exclusive lock: read the ledger, take the first `count` of `candidates` (positions
    in committed order) never revealed (or, with `reuse`, the first `count` positions regardless), append one entry
    and fsync. Fewer than `count` are returned when fewer remain, possibly none; nothing is
    recorded then. Two processes reserving at once never get the same key."""
    _check_arguments(count, suspect, formats, check)
    path = ledger_path(run_dir)
    with _exclusive_lock(run_dir):
        if not reuse:
            check_kept(run_dir)
        data = _read_bytes(path)
        positions = choose(_positions(_parse(data, path)), count, candidates, reuse)
        if positions:
            _append_entry(path, data, make_entry(suspect, positions, list(formats), check))
    return positions


def record_contexts(run_dir: str | Path, suspect: str, check: str, contexts: Sequence[Sequence[int]]) -> None:
    """Record the watermark contexts an evidence bundle is about to reveal, before it is written."""
    _check_arguments(0, suspect, [], check)
    path = ledger_path(run_dir)
    with _exclusive_lock(run_dir):
        _append_entry(path, _read_bytes(path), make_entry(suspect, [], [], check, contexts))


def _append_entry(path: Path, data: bytes, entry: dict) -> None:
    """Append one entry to a ledger whose current contents are `data` (under the exclusive lock)."""
    line = json.dumps(entry, ensure_ascii=True) + "\n"
    # A last line without its newline (a write cut short by a crash) must not swallow this one.
    if data and not data.endswith(b"\n"):
        line = "\n" + line
    _append(path, line.encode("ascii"))
