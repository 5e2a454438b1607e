"""Checkpoints visattn trusts: verified before they are loaded, written atomically, never with
non-finite weights.

``torch.load`` does not check the CRCs of the zip archive it reads, so a flipped byte in a
tensor loads silently as a wrong weight. :func:`verify_checkpoint` reads every member of the
archive against its CRC first, then loads with ``weights_only=True`` (no pickled code runs).
:class:`VerifiedCheckpointIO` is the Lightning plugin ``train.py`` installs: it verifies each
checkpoint Lightning loads (``--ckpt_path`` for ``fit``/``validate``/``test``/``predict``) and
writes each one to a temporary name, renamed into place when complete.
"""
from __future__ import annotations

import os
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from .._io import atomic_path

__all__ = ["VerifiedCheckpointIO", "check_finite_state", "check_state_dict_matches", "verify_checkpoint"]


def _check_archive(path: Path) -> None:
    """Raise ``ValueError`` naming ``path`` if it is not a complete zip whose members match their CRCs."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()  # reads every member and checks its CRC-32
    except zipfile.BadZipFile as e:
        raise ValueError(f"checkpoint {str(path)!r} is truncated or not a torch zip archive ({e}); "
                         "it cannot be trusted, use an earlier checkpoint") from None
    except (EOFError, zipfile.LargeZipFile, NotImplementedError) as e:
        raise ValueError(f"checkpoint {str(path)!r} is truncated or damaged ({type(e).__name__}: {e})") from None
    if bad is not None:
        raise ValueError(f"checkpoint {str(path)!r} is corrupt: member {bad!r} fails its CRC check "
                         "(a damaged copy or disk); use an earlier checkpoint")


def verify_checkpoint(path: str | os.PathLike, map_location: Any = "cpu", weights_only: bool = True) -> dict:
    """Check a checkpoint file and load it.

    Args:
        path: a ``.ckpt`` / ``.pt`` written by ``torch.save`` (a zip archive, torch >= 1.6).
        map_location: passed to :func:`torch.load`.
        weights_only: load with ``weights_only=True`` (default): tensors and plain containers only.

    Returns the loaded object (a dict for Lightning checkpoints).

    Raises:
        FileNotFoundError: ``path`` does not exist or is not a file.
        ValueError: the file is truncated, is not a zip archive, a member fails its CRC check, or
            ``torch.load`` cannot read it; the message names the file and the fault.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist or is not a file")
    _check_archive(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=weights_only)
    except Exception as e:  # noqa: BLE001 - any failure to read is the same user-facing fault
        raise ValueError(f"checkpoint {str(path)!r} cannot be loaded: {type(e).__name__}: {e}") from None


def check_state_dict_matches(expected: Mapping[str, torch.Tensor], found: Mapping[str, Any], source: str,
                             limit: int = 5) -> None:
    """Raise ``ValueError`` if ``found`` (a checkpoint's ``state_dict``) does not have exactly the keys
    and shapes of ``expected`` (the model being built); the message names ``source`` and the first
    ``limit`` missing, unexpected and mismatching keys: a checkpoint from another config."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    shapes = [f"{k}: checkpoint {tuple(found[k].shape)}, model {tuple(v.shape)}" for k, v in expected.items()
              if k in found and isinstance(found[k], torch.Tensor) and tuple(found[k].shape) != tuple(v.shape)]
    problems = []
    for what, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
        if items:
            more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
            problems.append(f"{what} ({len(items)}): {', '.join(items[:limit])}{more}")
    if problems:
        raise ValueError(f"checkpoint {source} does not match the model being built (a checkpoint from "
                         f"another config?): {'; '.join(problems)}")


def check_finite_state(state: Mapping[str, Any], source: str) -> None:
    """Raise ``FloatingPointError`` naming ``source`` and the first tensors holding NaN or inf."""
    bad = [k for k, v in state.items()
           if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        more = f" (+{len(bad) - 3} more)" if len(bad) > 3 else ""
        raise FloatingPointError(f"refusing to write {source}: non-finite values in {', '.join(bad[:3])}{more} "
                                 "(the weights diverged; lower the learning rate or add warm-up)")


def _is_local(path: str | os.PathLike) -> bool:
    return "://" not in str(path)


class VerifiedCheckpointIO(TorchCheckpointIO):
    """Lightning ``CheckpointIO``: :func:`verify_checkpoint` on every local file it loads; saves go
    to a temporary name renamed into place (``os.replace``) and refuse non-finite weights. Remote
    (``s3://`` ...) paths and sharded checkpoint folders fall back to Lightning's own behaviour.

    Args:
        preloaded: ``(resolved path, checkpoint dict)`` already verified and loaded (by the CLI);
            returned once instead of reading that file again.
    """

    def __init__(self, preloaded: tuple[Path, dict] | None = None) -> None:
        super().__init__()
        self._preloaded = preloaded

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if isinstance(checkpoint.get("state_dict"), Mapping):
            check_finite_state(checkpoint["state_dict"], f"checkpoint {str(path)!r}")
        if storage_options is not None or not _is_local(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        with atomic_path(path) as tmp:
            torch.save(checkpoint, tmp)
        return None

    def load_checkpoint(self, path, map_location: Callable | Any = "cpu",
                        weights_only: bool | None = None) -> dict[str, Any]:
        if self._preloaded is not None and _is_local(path) and Path(path).resolve() == self._preloaded[0]:
            checkpoint, self._preloaded = self._preloaded[1], None
            return checkpoint
        if not _is_local(path) or Path(path).is_dir():
            return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        return verify_checkpoint(path, map_location=map_location,
                                 weights_only=True if weights_only is None else weights_only)
