"""Checks of the counts and sizes users pass: a clear error instead of a silent truncation.

``int(2.5)`` is 2 and ``int(True)`` is 1, so a constructor that calls ``int()`` on what it is given turns a
mistyped lookahead, table size or embedding dimension into another valid one without a word.
"""

from __future__ import annotations

import argparse
import math
import numbers
import os
from pathlib import Path

__all__ = ["integer", "non_negative", "output_file", "require_counts", "require_positive"]


def integer(name: str, value: object, minimum: int | None = None) -> int:
    """``value`` as an ``int``; a ValueError naming ``name`` when it is not an integer (a float, even 3.0,
    or a bool; numpy integers are fine) or is below ``minimum``."""
    bad = isinstance(value, bool) or not isinstance(value, numbers.Integral)
    if bad or (minimum is not None and int(value) < minimum):  # type: ignore[call-overload]
        bound = "" if minimum is None else f" >= {minimum}"
        raise ValueError(f"{name} must be an integer{bound}, got {value!r}")
    return int(value)  # type: ignore[call-overload]


def non_negative(name: str, value: object) -> float:
    """``value`` as a finite ``float`` >= 0; a ValueError naming ``name`` otherwise."""
    real = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if not (real and math.isfinite(value) and value >= 0):  # type: ignore[arg-type, operator]
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)  # type: ignore[arg-type]


def output_file(flag: str, path: str | os.PathLike[str] | None) -> None:
    """Refuse, before any work, an output file ``path`` (given as ``flag``) that cannot be written: a
    directory, or a path under an existing file. Missing parent folders are fine (they are created)."""
    if path is None:
        return
    p = Path(path)
    if p.is_dir():
        raise ValueError(f"{flag} {p}: is a directory; give the name of a file to write")
    existing = next((a for a in p.parents if a.exists()), None)
    if existing is not None and not existing.is_dir():
        raise ValueError(f"{flag} {p}: {existing} is a file, so no folder can be made there")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def require_counts(args: argparse.Namespace, *flags: str, minimum: int = 1) -> None:
    """A ValueError naming the first of ``flags`` (attribute names of ``args``) below ``minimum``."""
    for name in flags:
        value = getattr(args, name)
        if value < minimum:
            raise ValueError(f"{_flag(name)} must be >= {minimum}, got {value}")


def require_positive(args: argparse.Namespace, *flags: str) -> None:
    """A ValueError naming the first of ``flags`` that is not a finite number > 0 (NaN and inf fail)."""
    for name in flags:
        value = getattr(args, name)
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{_flag(name)} must be a finite number > 0, got {value}")
