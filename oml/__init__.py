"""OML fingerprinting: prove that a published language model is yours.

The Python API (see `oml.pipeline` and README.md, "Python API"): `generate_fingerprints`,
`fingerprint_model` and `check_suspect`, with their settings `GenerationConfig`,
`FingerprintSelection`, `TrainingConfig`, `CheckConfig`, `VerdictConfig`, `SequentialConfig` and `ApiConfig`;
the results are a `Run` and a `CheckReport` of `KeyResult`s (keys asked as `Query`s).

Each module holds one concept: the fingerprint file format and selection (`fingerprints`),
typed settings (`settings`), model loading (`models`), tokenisation and loss masking
(`tokenization`), fingerprint generation (`generation`), fine-tuning (`training/`: settings,
dataset and replay, loss and trainer, callbacks, weight algebra, backend), the run folder
(`runs`), its commitment (`commitment`) and ledger of revealed keys (`ledger`), checking
(`checking`) and the decodings it plays (`decoding`), suspects behind an API (`remote`), the
statistics of a check (`stats`) and its sequential form (`sequential`), evidence bundles (`evidence`) and witnessed checks
(`witness`), the domain watermark family's core (`watermark`: green lists, the watermarked teacher, scoring and its
sequential check; not yet reachable from the scripts), benign evaluation data (`data`),
attacks (`attacks`), utility measures (`utility`), generated replies and the reply measure (`replies`), process ranks (`distributed`) and the
command-line plumbing (`cli`).
"""
import importlib


class OMLError(Exception):
    """A problem with the user's input: reported as one line, exit code 2, no traceback."""


# The API, imported on first use: `import oml` stays light, and the modules below import OMLError from here.
_API = {"generate_fingerprints": "oml.generation", "GenerationConfig": "oml.generation",
        "fingerprint_model": "oml.pipeline", "check_suspect": "oml.pipeline", "CheckReport": "oml.pipeline",
        "FingerprintSelection": "oml.fingerprints", "TrainingConfig": "oml.training.config", "VerdictConfig": "oml.stats",
        "ApiConfig": "oml.remote", "SequentialConfig": "oml.sequential", "Run": "oml.runs", "load_run": "oml.runs",
        "KeyResult": "oml.checking", "Query": "oml.checking", "CheckInterrupted": "oml.pipeline", "CheckConfig": "oml.pipeline"}
__all__ = ["OMLError", *_API]


def __getattr__(name: str):
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'oml' has no attribute {name!r}")
