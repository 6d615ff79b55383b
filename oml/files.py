"""Reading and writing files so that bad input is reported clearly and output is never half-written."""
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from oml import OMLError


def read_json(path: str | Path, what: str) -> Any:
    """Parse a JSON file, turning a missing or malformed file into a one-line error."""
    path = Path(path)
    if not path.is_file():
        raise OMLError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise OMLError(f"{what} {path} is not valid JSON: {error}") from None


def check_writable(path: str | Path, overwrite: bool) -> None:
    """Refuse to replace an existing file unless asked to; checked before any slow work starts."""
    if Path(path).exists() and not overwrite:
        raise OMLError(f"{path} already exists; pass --overwrite to replace it")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write via a temporary file in the same folder and rename, so readers never see a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes private files; give the usual permissions
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def write_json_atomic(path: str | Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")
