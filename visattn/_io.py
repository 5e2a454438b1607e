"""Atomic file writes: every file visattn writes goes to a temporary name in the same folder and is
renamed into place only when complete, so a crash, a kill or a full disk leaves either the old file
or the new one, never a truncated one (``os.replace`` is atomic on POSIX and Windows within one
file system).
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["atomic_path", "atomic_write_bytes", "atomic_write_json", "atomic_write_text", "read_json"]


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on normal exit it is fsynced and renamed to ``path``,
    on an exception it is removed and ``path`` is left as it was.

    ``suffix`` (default: ``path``'s own) keeps writers that pick a format from the file name (PIL,
    matplotlib) working. Parent folders are created.

    Example:
        >>> with atomic_path("out/plot.png") as tmp:   # doctest: +SKIP
        ...     fig.savefig(tmp)
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{final.name}.tmp-", suffix=final.suffix if suffix is None else suffix,
                                dir=final.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, _file_mode(final))
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def _file_mode(final: Path) -> int:
    """The mode the finished file gets: the old file's, else what ``open()`` would give (0o666
    less the umask). ``mkstemp`` makes its file 0o600, which would hide it from other users."""
    try:
        return final.stat().st_mode & 0o7777
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_path`); returns ``path``."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_path`); returns ``path``."""
    return atomic_write_bytes(path, text.encode(encoding))


def atomic_write_json(path: str | os.PathLike, obj: Any, **dumps_kwargs: Any) -> Path:
    """Serialise ``obj`` with :func:`json.dumps` and write it atomically; returns ``path``."""
    return atomic_write_text(path, json.dumps(obj, **dumps_kwargs))


def read_json(path: str | os.PathLike, what: str) -> Any:
    """The parsed JSON file ``path``: a missing file is a ``FileNotFoundError`` ("``what`` not
    found: path"), a file that is not valid JSON (or not UTF-8) a ``ValueError`` naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
