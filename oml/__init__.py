"""Shared building blocks of the OML fingerprinting scripts.

Each module holds one concept: the fingerprint file format (`fingerprints`), model
loading (`models`), tokenisation and loss masking (`tokenization`), fingerprint
generation (`generation`), fine-tuning helpers (`training`), checking (`checking`),
the statistics of a check (`stats`), benign evaluation data (`data`), process ranks
(`distributed`) and the command-line plumbing (`cli`).
"""


class OMLError(Exception):
    """A problem with the user's input: reported as one line, exit code 2, no traceback."""
