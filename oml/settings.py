"""Typed settings: each setting's type, default, allowed values and help text, declared once.

Every group of settings (fine-tuning, fingerprint selection, generation, the verdict) is a
dataclass whose fields are declared with `setting()`. The same declaration serves the
command line (oml.cli builds each flag from it, with the same spelling, default and help),
the Python API (a value given in code is validated when the dataclass is made) and a run's
recorded config.json (read back through the same validation, so a hand-edited file with
`max_key_length: -3` is refused rather than silently used).
"""
import math
from dataclasses import MISSING, dataclass, field, fields, replace
from typing import Any, Callable

from oml import OMLError


@dataclass(frozen=True)
class Bound:
    """A numeric setting's kind and range, with the words that describe it in errors."""
    kind: type
    test: Callable[[float], bool]
    text: str

    def problem(self, value: Any) -> str | None:
        """Why `value` does not satisfy the bound (None when it does). Integers pass as floats,
        booleans and non-integral floats never pass as integers, NaN and infinities never pass."""
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not number or (self.kind is int and not isinstance(value, int)) or not math.isfinite(value) or not self.test(value):
            return f"is not {self.text}"
        return None


POSITIVE_INT = Bound(int, lambda v: v >= 1, "an integer >= 1")
NON_NEGATIVE_INT = Bound(int, lambda v: v >= 0, "an integer >= 0")
POSITIVE_FLOAT = Bound(float, lambda v: v > 0, "a finite number > 0")
NON_NEGATIVE_FLOAT = Bound(float, lambda v: v >= 0, "a finite number >= 0")
UNIT_INTERVAL = Bound(float, lambda v: 0 <= v <= 1, "between 0 and 1")
PROBABILITY = Bound(float, lambda v: 0 < v <= 1, "a probability in (0, 1]")
OPEN_UNIT_INTERVAL = Bound(float, lambda v: 0 < v < 1, "strictly between 0 and 1")
BELOW_ONE = Bound(float, lambda v: 0 <= v < 1, "at least 0 and below 1")


def at_least(minimum: int) -> Bound:
    return Bound(int, lambda v: v >= minimum, f"an integer >= {minimum}")


def at_least_float(minimum: float) -> Bound:
    return Bound(float, lambda v: v >= minimum, f"a finite number >= {minimum:g}")


def setting(default: Any, help: str, bound: Bound | None = None, choices: tuple | None = None, kind: type | None = None,
            nargs: str | None = None, positional: bool = False) -> Any:
    """A dataclass field with what the command line and validation need. `kind` is the type of a
    non-numeric value (default: the default's type); `nargs="+"` makes a tuple of values ("*": one
    that may be empty). A `default` of MISSING makes the setting required: a required flag, or with
    `positional` an argument given without a flag name."""
    given = default is not None and default is not MISSING
    return field(default=default, metadata={"help": help, "bound": bound, "choices": choices,
                                             "kind": kind or (type(default) if given and bound is None else None),
                                             "nargs": nargs, "positional": positional})


def check_value(name: str, value: Any, metadata: dict) -> Any:
    """`value` validated against its field's declaration (converted where lossless: an int to a
    float, a list to a tuple); None always passes, meaning "decided later" or "not given"."""
    if value is None:
        return None
    if metadata.get("nargs"):
        if not isinstance(value, (list, tuple)) or (not value and metadata["nargs"] == "+"):
            raise OMLError(f"{name} must be a {'non-empty ' if metadata['nargs'] == '+' else ''}list, not {value!r}")
        return tuple(check_value(name, item, {**metadata, "nargs": None}) for item in value)
    bound, choices, kind = metadata.get("bound"), metadata.get("choices"), metadata.get("kind")
    if bound is not None:
        problem = bound.problem(value)
        if problem:
            raise OMLError(f"{name} {value!r} {problem}")
        return bound.kind(value)
    if choices is not None and value not in choices:
        raise OMLError(f"{name} {value!r} is not one of {', '.join(map(repr, choices))}")
    if kind is not None and not isinstance(value, kind):
        raise OMLError(f"{name} must be a {kind.__name__}, not {value!r}")
    return value


class Settings:
    """Base of the settings dataclasses: every field is validated when an instance is made."""

    def __post_init__(self) -> None:
        for f in fields(self):
            object.__setattr__(self, f.name, check_value(f.name, getattr(self, f.name), f.metadata))

    def to_dict(self) -> dict:
        """Field values by name (tuples as lists, as JSON has them)."""
        return {f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v for f in fields(self)}

    @classmethod
    def from_dict(cls, values: dict, what: str):
        """An instance from the fields of `values` that belong to this class (others are ignored:
        a run's config.json holds several groups); a bad value is one line naming `what`."""
        try:
            return cls(**{f.name: values[f.name] for f in fields(cls) if f.name in values})
        except OMLError as error:
            raise OMLError(f"{what}: {error}") from None

    def updated(self, **changes):
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)
