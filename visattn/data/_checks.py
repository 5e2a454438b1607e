"""Argument checks shared by the data entry points; each error names the argument and what it wants."""
from __future__ import annotations

import os


def check_int(name: str, value, *, minimum: int, optional: bool = False) -> int | None:
    """``value`` as an int ``>= minimum`` (``None`` allowed when ``optional``); bools are refused."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        kind = "None or an int" if optional else "an int"
        raise TypeError(f"{name} must be {kind} >= {minimum}, got {type(value).__name__} {value!r:.60}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {type(value).__name__} {value!r:.60}")
    return value


def check_pathlike(name: str, value, *, optional: bool = False):
    """``value`` is a ``str`` or ``os.PathLike`` (non-empty), or ``None`` when ``optional``."""
    if value is None and optional:
        return None
    if not isinstance(value, str | os.PathLike) or not os.fspath(value):
        raise TypeError(f"{name} must be a non-empty path (str or os.PathLike), got "
                        f"{type(value).__name__} {value!r:.60}")
    return value
