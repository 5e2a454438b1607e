"""Checkpoints visattn trusts: verified before they are loaded, written atomically, never with
non-finite weights.

``torch.load`` does not check the CRCs of the zip archive it reads, so a flipped byte in a
tensor loads silently as a wrong weight. :func:`verify_checkpoint` reads every member of the
archive against its CRC first, then loads with ``weights_only=True`` (no pickled code runs).
:class:`VerifiedCheckpointIO` is the Lightning plugin ``train.py`` installs: it verifies each
checkpoint Lightning loads (``--ckpt_path`` for ``fit``/``validate``/``test``/``predict``) and
writes each one to a temporary name, renamed into place when complete.

The other ways in run the same checks (see :class:`visattn.lit.detection.CheckedModule`):
``DetectionModule.load_from_checkpoint`` / ``SegmentationModule.load_from_checkpoint`` read the file
once and verify those bytes, and a plain ``Trainer(...).fit(ckpt_path=...)`` re-checks the file's
CRCs before the weights are applied. Every load refuses NaN / inf weights.

Checkpoints written by a module the training CLI built record how to rebuild the model
(``checkpoint["visattn_model"]``: the ``class_path`` / ``init_args`` of ``model.init_args.model``),
so ``load_from_checkpoint(path)`` needs no ``model=``; older ones are rebuilt from the run's
``config.yaml`` (see :func:`find_model_spec`).
"""
from __future__ import annotations

import copy
import importlib
import io
import os
import sys
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from torch import nn

from .._io import atomic_path

__all__ = ["MODEL_RECORD", "VerifiedCheckpointIO", "build_model_from_spec", "check_finite_state",
           "check_state_dict_matches", "find_model_spec", "model_spec_from_config", "read_checkpoint",
           "verify_checkpoint"]

#: The checkpoint key holding the model's ``{"class_path", "init_args"}`` (plain data).
MODEL_RECORD = "visattn_model"
#: Packages whose ``class_path`` a saved config may name even when not imported yet: their code is
#: what visattn runs anyway. Anything else must already be imported (as Lightning requires for the
#: ``_class_path`` of a module), so a saved file never makes visattn import new code.
TRUSTED_PACKAGES = ("visattn", "torch", "torchvision", "timm")


def _check_archive(file: Path | io.BytesIO, source: str | None = None) -> None:
    """Raise ``ValueError`` naming ``source`` (default: the path) if ``file`` is not a complete zip
    whose members match their CRCs."""
    source = repr(str(file)) if source is None else source
    try:
        with zipfile.ZipFile(file) as archive:
            bad = archive.testzip()  # reads every member and checks its CRC-32
    except zipfile.BadZipFile as e:
        raise ValueError(f"checkpoint {source} is truncated or not a torch zip archive ({e}); "
                         "it cannot be trusted, use an earlier checkpoint") from None
    except (EOFError, zipfile.LargeZipFile, NotImplementedError) as e:
        raise ValueError(f"checkpoint {source} is truncated or damaged ({type(e).__name__}: {e})") from None
    if bad is not None:
        raise ValueError(f"checkpoint {source} is corrupt: member {bad!r} fails its CRC check "
                         "(a damaged copy or disk); use an earlier checkpoint")


def _torch_load(file, source: str, map_location: Any, weights_only: bool):
    try:
        return torch.load(file, map_location=map_location, weights_only=weights_only)
    except Exception as e:  # noqa: BLE001 - any failure to read is the same user-facing fault
        raise ValueError(f"checkpoint {source} cannot be loaded: {type(e).__name__}: {e}") from None


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
    return _torch_load(path, repr(str(path)), map_location, weights_only)


def read_checkpoint(checkpoint_path: Any, weights_only: bool = True) -> tuple[bytes, dict, str, Path | None]:
    """Read a checkpoint once and verify those bytes as :func:`verify_checkpoint` does.

    Args:
        checkpoint_path: a local file (``str`` / ``os.PathLike``) or a binary file object. URLs
            (``s3://``, ``https://`` ...) are refused: download the file first, then load it.
        weights_only: as in :func:`verify_checkpoint`.

    Returns ``(bytes, checkpoint dict loaded on the CPU, source as quoted in messages, path or None)``;
    the bytes are what a second reader (Lightning) must be given, so nothing unverified is read.

    Raises:
        TypeError: ``checkpoint_path`` is neither a path nor a binary file object.
        FileNotFoundError: the file does not exist.
        ValueError: a URL; or the file is truncated, corrupt, holds pickled code (``weights_only``)
            or is not a dict with a ``state_dict``.
    """
    path = None
    if isinstance(checkpoint_path, str | os.PathLike):
        text = os.fspath(checkpoint_path)
        if not isinstance(text, str) or not text:
            raise TypeError(f"checkpoint_path must be a path or a binary file object, got {checkpoint_path!r:.60}")
        if not _is_local(text):
            raise ValueError(f"checkpoint_path {text!r} is not a local file: visattn verifies a checkpoint (zip "
                             "CRCs, weights_only) before loading it, so download it first and pass the local file")
        path = Path(text)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint {text!r} does not exist or is not a file")
        source, data = repr(text), path.read_bytes()
    elif callable(getattr(checkpoint_path, "read", None)):
        data = checkpoint_path.read()
        if not isinstance(data, bytes):
            raise TypeError(f"checkpoint_path: the file object must be opened in binary mode ('rb'), read() gave "
                            f"{type(data).__name__}")
        source = repr(str(getattr(checkpoint_path, "name", "<file object>")))
    else:
        raise TypeError(f"checkpoint_path must be a path (str or os.PathLike) or a binary file object, got "
                        f"{type(checkpoint_path).__name__} {checkpoint_path!r:.60}")
    _check_archive(io.BytesIO(data), source)
    checkpoint = _torch_load(io.BytesIO(data), source, "cpu", weights_only)
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), Mapping):
        raise ValueError(f"checkpoint {source} has no 'state_dict': it is not a Lightning checkpoint")  # noqa: TRY004
    return data, checkpoint, source, path


def check_state_dict_matches(expected: Mapping[str, torch.Tensor], found: Mapping[str, Any], source: str,
                             limit: int = 5, what: str = "checkpoint") -> None:
    """Raise ``ValueError`` if ``found`` (a checkpoint's ``state_dict``) does not have exactly the keys
    and shapes of ``expected`` (the model being built); the message names ``source`` and the first
    ``limit`` missing, unexpected and mismatching keys: a checkpoint from another config. ``what``
    names the kind of file in the message (``"checkpoint"``, ``"weights file"``)."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    shapes = [f"{k}: {what} {tuple(found[k].shape)}, model {tuple(v.shape)}" for k, v in expected.items()
              if k in found and isinstance(found[k], torch.Tensor) and tuple(found[k].shape) != tuple(v.shape)]
    problems = []
    for kind, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
        if items:
            more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
            problems.append(f"{kind} ({len(items)}): {', '.join(items[:limit])}{more}")
    if problems:
        raise ValueError(f"{what} {source} does not match the model being built (a {what} from "
                         f"another config?): {'; '.join(problems)}")


def check_finite_state(state: Mapping[str, Any], source: str, action: str = "write") -> None:
    """Raise ``FloatingPointError`` naming ``source`` and the first tensors holding NaN or inf;
    ``action`` (``"write"`` or ``"load"``) says what is refused."""
    bad = [k for k, v in state.items()
           if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        more = f" (+{len(bad) - 3} more)" if len(bad) > 3 else ""
        hint = ("the weights diverged; lower the learning rate or add warm-up" if action == "write" else
                "the run that wrote it had diverged; use an earlier checkpoint")
        raise FloatingPointError(f"refusing to {action} {source}: non-finite values in {', '.join(bad[:3])}{more} "
                                 f"({hint})")


# -- rebuilding the model a checkpoint was trained with --------------------------------------------
def _is_plain(value: Any) -> bool:
    """Plain data (what ``torch.load(weights_only=True)`` and YAML both hold)."""
    if value is None or isinstance(value, bool | int | float | str):
        return True
    if isinstance(value, list | tuple):
        return all(_is_plain(v) for v in value)
    return isinstance(value, dict) and all(isinstance(k, str) and _is_plain(v) for k, v in value.items())


def _as_spec(value: Any) -> dict | None:
    """``{"class_path": str, "init_args": dict}`` from a config's model entry, or None."""
    if isinstance(value, str) and value:
        return {"class_path": value, "init_args": {}}
    if isinstance(value, dict) and isinstance(value.get("class_path"), str) and _is_plain(value) \
            and isinstance(value.get("init_args") or {}, dict):
        return {"class_path": value["class_path"], "init_args": dict(value.get("init_args") or {})}
    return None


def _read_config(config: str | os.PathLike) -> dict:
    import yaml

    try:
        data = yaml.safe_load(Path(config).read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise ValueError(f"config {str(config)!r} cannot be read as YAML ({type(e).__name__}: {e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        raise ValueError(f"config {str(config)!r} is not a training config (no 'model' entry)")  # noqa: TRY004
    return data


def model_spec_from_config(config: str | os.PathLike) -> dict:
    """The model's ``{"class_path", "init_args"}`` from a training run's ``config.yaml`` (what
    LightningCLI writes beside the checkpoints: ``model.init_args.model``). ``ValueError`` naming the
    file if it has none."""
    spec = _as_spec((_read_config(config)["model"].get("init_args") or {}).get("model"))
    if spec is None:
        raise ValueError(f"config {str(config)!r} has no model.init_args.model with a class_path (the "
                         "detector / segmenter the LightningModule wraps)")
    return spec


def _plain_equal(a: Any, b: Any) -> bool:
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_plain_equal(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_plain_equal(a[k], b[k]) for k in a)
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    return type(a) is type(b) and a == b or (isinstance(a, int | float) and isinstance(b, int | float) and a == b)


def _config_differences(config: str | os.PathLike, checkpoint: Mapping[str, Any]) -> list[str]:
    """Where a ``config.yaml``'s LightningModule settings differ from the checkpoint's hyper-parameters."""
    module = _read_config(config)["model"]
    init = module.get("init_args") or {}
    hparams = checkpoint.get("hyper_parameters") or {}
    diffs = []
    if hparams.get("_class_path") not in (None, module.get("class_path")):
        diffs.append(f"class_path: checkpoint {hparams['_class_path']!r}, config {module.get('class_path')!r}")
    for key, value in hparams.items():
        if not key.startswith("_") and key not in ("model", "slicing") and key in init \
                and not _plain_equal(value, init[key]):
            diffs.append(f"{key}: checkpoint {value!r:.80}, config {init[key]!r:.80}")
    return diffs


def find_model_spec(checkpoint: Mapping[str, Any], source: str, path: Path | None = None,
                    config: str | os.PathLike | None = None) -> tuple[dict | None, str, list[Path]]:
    """How to rebuild the model of ``checkpoint``: ``(spec, where it came from, config files looked for)``.

    In order: ``config`` (a run's ``config.yaml``, given by the caller); the checkpoint's own record
    (:data:`MODEL_RECORD`, written by this visattn); the ``config.yaml`` LightningCLI wrote beside
    the checkpoint (``<log dir>/config.yaml`` for ``<log dir>/checkpoints/*.ckpt``, or the checkpoint's
    own folder), accepted only if its LightningModule settings equal the checkpoint's saved
    hyper-parameters (else ``ValueError`` naming the differences: the config of another run). The
    spec is None when none of these exists."""
    if config is not None:
        return model_spec_from_config(config), f"config {str(config)!r}", []
    record = _as_spec(checkpoint.get(MODEL_RECORD))
    if record is not None:
        return record, f"checkpoint {source}", []
    candidates = [] if path is None else [path.parent.parent / "config.yaml", path.parent / "config.yaml"]
    for candidate in candidates:
        if candidate.is_file():
            diffs = _config_differences(candidate, checkpoint)
            if diffs:
                raise ValueError(f"{candidate} is not the config of the run that wrote checkpoint {source}: "
                                 f"{'; '.join(diffs[:3])}. Pass config= (that run's config.yaml) or model= "
                                 "(the built model)")
            return model_spec_from_config(candidate), f"config {str(candidate)!r}", candidates
    return None, "", candidates


def _class_paths(value: Any) -> list[str]:
    if isinstance(value, dict):
        own = [value["class_path"]] if isinstance(value.get("class_path"), str) else []
        return own + [p for v in value.values() for p in _class_paths(v)]
    if isinstance(value, list | tuple):
        return [p for v in value for p in _class_paths(v)]
    return []


def _resolve(class_path: str, origin: str) -> None:
    """Make sure ``class_path`` names something already imported (or in a trusted package)."""
    module, _, name = class_path.rpartition(".")
    if module.split(".")[0] in TRUSTED_PACKAGES and module not in sys.modules:
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise ValueError(f"{origin}: class_path {class_path!r} cannot be imported ({e})") from None
    if not callable(getattr(sys.modules.get(module), name, None)):
        raise ValueError(  # noqa: TRY004 - a fault of the saved file, not of an argument's type
            f"{origin}: the model's class_path {class_path!r} is not an imported class or function; a saved "
            f"file never makes visattn import code. If you trust it, import {module or name} first, or pass "
            "model= (the built model)")


def build_model_from_spec(spec: Mapping[str, Any], origin: str) -> nn.Module:
    """Build the ``nn.Module`` that ``spec`` (``{"class_path", "init_args"}``, as in a LightningCLI
    config) describes, the way the training CLI built it (jsonargparse), without ImageNet weights
    (``pretrained_backbone=False``: the checkpoint's weights replace them, and nothing is
    downloaded). Every ``class_path`` in it must already be imported, or be in
    :data:`TRUSTED_PACKAGES`. ``ValueError`` naming ``origin`` if it cannot be built."""
    from jsonargparse import ArgumentParser

    spec = _as_spec(copy.deepcopy(dict(spec)))
    if spec is None:
        raise ValueError(f"{origin}: the model entry must be {{'class_path': str, 'init_args': {{...}}}} of plain data")
    for class_path in _class_paths(spec):
        _resolve(class_path, origin)
    if spec["init_args"].get("pretrained_backbone"):
        spec["init_args"]["pretrained_backbone"] = False
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--model", type=nn.Module)
    try:
        model = parser.instantiate_classes(parser.parse_object({"model": spec})).model
    except Exception as e:  # noqa: BLE001 - jsonargparse's and the builder's errors alike
        raise ValueError(f"cannot rebuild the model from {origin} ({spec['class_path']}): {type(e).__name__}: "
                         f"{' '.join(str(e).split())[:300]}; pass model= (the built model)") from None
    if not isinstance(model, nn.Module):
        raise ValueError(f"{origin}: {spec['class_path']} built a {type(model).__name__}, not a torch.nn.Module")  # noqa: TRY004
    return model


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
