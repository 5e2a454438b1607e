"""Argument checks shared by every public entry point (data, evaluation, training, CLI helpers):
each error names the argument and says what it wants. Booleans are never accepted as numbers.
The block constructors use their own variants in ``layers/_base.py``, whose messages also name the
block."""
from __future__ import annotations

import math
import numbers
import os
from collections.abc import Sequence

import numpy as np

__all__ = ["MAX_IMAGE_SIDE", "check_bool", "check_choice", "check_int", "check_pathlike", "check_real", "is_int",
           "is_real"]

#: The largest image side (pixels) an argument may ask for: a detector's ``min_size``/``max_size``
#: (one 8192 x 8192 RGB float image is 0.8 GB before any feature map), as
#: :data:`visattn.data.synthetic.MAX_SIDE` for generated images.
MAX_IMAGE_SIDE = 8192


def is_int(v) -> bool:
    """An integer (Python or numpy), not a bool."""
    return isinstance(v, numbers.Integral) and not isinstance(v, bool | np.bool_)


def is_real(v) -> bool:
    """A real number (Python or numpy), not a bool; may be NaN or infinite."""
    return isinstance(v, numbers.Real) and not isinstance(v, bool | np.bool_)


def check_int(name: str, value, minimum: int, *, optional: bool = False) -> int | None:
    """``value`` as an int ``>= minimum`` (``None`` allowed when ``optional``); ``TypeError`` for
    a non-int (bools included), ``ValueError`` below ``minimum``."""
    if value is None and optional:
        return None
    if not is_int(value):
        kind = "None or an int" if optional else "an int"
        raise TypeError(f"{name} must be {kind} >= {minimum}, got {type(value).__name__} {value!r:.60}")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value}")
    return int(value)


def check_bool(name: str, value) -> bool:
    """``value`` as a bool (``True``/``False`` or a numpy bool); anything else is a ``TypeError``."""
    if not isinstance(value, bool | np.bool_):
        raise TypeError(f"{name} must be True or False, got {type(value).__name__} {value!r:.60}")
    return bool(value)


def check_choice(name: str, value, choices: Sequence[str]) -> str:
    """``value`` if it is one of ``choices``; else ``ValueError`` (``TypeError`` if not a str)."""
    listed = ", ".join(map(repr, choices))
    if not isinstance(value, str):
        raise TypeError(f"{name} must be one of {listed}, got {type(value).__name__} {value!r:.60}")
    if value not in choices:
        raise ValueError(f"{name} must be one of {listed}, got {value!r}")
    return value


def check_real(name: str, value, lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False) -> float:
    """``value`` as a float if it is a finite number in the interval; else an error naming ``name``."""
    span = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    if not is_real(value):
        raise TypeError(f"{name} must be a finite number in {span}, got {type(value).__name__} {value!r:.60}")
    inside = (lo < value if lo_open else lo <= value) and (value < hi if hi_open else value <= hi)
    if not (math.isfinite(value) and inside):
        raise ValueError(f"{name} must be a finite number in {span}, got {value!r}")
    return float(value)


def check_pathlike(name: str, value, *, optional: bool = False):
    """``value`` is a ``str`` or ``os.PathLike`` (non-empty), or ``None`` when ``optional``."""
    if value is None and optional:
        return None
    if not isinstance(value, str | os.PathLike) or not os.fspath(value):
        raise TypeError(f"{name} must be a non-empty path (str or os.PathLike), got "
                        f"{type(value).__name__} {value!r:.60}")
    return value
