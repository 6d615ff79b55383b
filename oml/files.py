"""Reading and writing files so that bad input is reported clearly and output is never half-written or lost.

Outputs are checked before the work that produces them (so a long run cannot end in a
write error that could have been foreseen), written to a temporary file and renamed into
place, and, unless --overwrite was given, never replace a file that appeared meanwhile.
"""
import json
import logging
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

from oml import OMLError

logger = logging.getLogger(__name__)


def check_readable(path: str | Path, what: str) -> None:
    """A missing, unreadable or non-regular input file as a one-line error, before it is parsed."""
    path = Path(path)
    if not path.is_file():
        raise OMLError(f"{what} not found: {path}" if not path.exists() else f"{what} {path} is not a file")
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as error:
        raise OMLError(f"cannot read {what} {path}: {error.strerror or error}") from None


def read_text(path: str | Path, what: str) -> str:
    """A text file's contents, with a missing, unreadable or non-UTF-8 file as a one-line error."""
    check_readable(path, what)
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise OMLError(f"{what} {path} is not UTF-8 text: {error}") from None


def read_json(path: str | Path, what: str, max_bytes: int | None = None) -> Any:
    """Parse a JSON file, turning a missing, unreadable, malformed or (beyond `max_bytes`) oversized file
    into a one-line error; nesting that exhausts the parser's stack and integers too long to convert
    (Python refuses over 4,300 digits) are malformed too."""
    if max_bytes is not None:
        check_readable(path, what)
        if Path(path).stat().st_size > max_bytes:
            raise OMLError(f"{what} {path} is larger than {max_bytes // 2**20} MiB")
    text = read_text(path, what)
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as error:  # JSONDecodeError is a ValueError
        raise OMLError(f"{what} {path} is not valid JSON: {str(error)[:200]}") from None


def check_writable(path: str | Path, overwrite: bool) -> None:
    """Refuse, before any slow work starts, an output that exists (without --overwrite), is a
    folder, or lies where nothing can be created (under a file, in a read-only folder)."""
    path = Path(path)
    if path.is_dir():
        raise OMLError(f"{path} is a folder, not a file")
    if path.exists() and not overwrite:
        raise OMLError(f"{path} already exists; pass --overwrite to replace it")
    check_creatable_dir(path.parent)


def check_creatable_dir(directory: str | Path) -> None:
    """The folder exists and takes new files, or can be created: probed by creating a file in
    its nearest existing ancestor (permission bits alone say nothing for root or read-only mounts)."""
    directory = Path(directory).absolute()
    existing = directory
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise OMLError(f"cannot create {directory}: {existing} is a file")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        raise OMLError(f"cannot write in {existing}: {error.strerror or error}") from None


def built_once(target: Path, build: Callable[[Path], None]) -> Path:
    """A cache folder made by `build(folder)` once: built in a temporary folder beside it and renamed
    into place, so processes that start together never see (or leave) a half-built folder; when two
    build it at once, the first rename wins and the other's copy is dropped."""
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        build(tmp)
        os.rename(tmp, target)
    except OSError:
        if not target.is_dir():
            raise
        logger.info("Another process built %s first", target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomically(path: str | Path, write: Callable[[str], None], overwrite: bool = True) -> None:
    """`write(tmp)` writes the whole file at a temporary path in the same folder, which is then
    renamed into place, so readers never see a partial file. Without `overwrite` the rename is
    exclusive (a hard link, which fails if the name exists): two runs writing the same report
    cannot silently replace each other's."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
    except OSError as error:
        raise OMLError(f"cannot write {path}: {error.strerror or error}") from None
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes private files; give the usual permissions
        write(tmp)
        if overwrite:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)
    except FileExistsError:
        raise OMLError(f"{path} appeared while this ran and was kept; pass --overwrite to replace it") from None
    except OSError as error:
        raise OMLError(f"cannot write {path}: {error.strerror or error}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text_atomic(path: str | Path, text: str, overwrite: bool = True) -> None:
    write_atomically(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"), overwrite)


def strict_json(obj: Any) -> Any:
    """`obj` with NaN and infinities as null: strict JSON readers reject them."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {key: strict_json(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(value) for value in obj]
    return obj


def json_text(obj: Any) -> str:
    return json.dumps(strict_json(obj), indent=2, ensure_ascii=False, allow_nan=False) + "\n"


def write_json_atomic(path: str | Path, obj: Any, overwrite: bool = True) -> None:
    write_text_atomic(path, json_text(obj), overwrite)
