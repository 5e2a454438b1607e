"""Pretrained weights: a manifest of published models, verified downloads and an offline cache.

Every published model is one entry of ``weights/manifest.json``, named ``arch_backbone_attn.tag``
(``fcos_resnet10t_eca.synth256``). An entry records the full sha256 and size of a safetensors
file, where the file is (a path inside ``weights/`` for shipped files, https ``mirrors``, and/or a
Hugging Face Hub ``hf`` source), the keywords that build the model, its metrics per evaluation set,
the recipe that trained it and its licence.

What is checked, and when:

- the **full** sha256 of a file, every time it is loaded, not only after a download; a cached file
  that no longer matches is removed and fetched again, a shipped file that does not match is an
  error;
- downloads stream into a temporary file in the cache folder and are renamed to ``<sha256>.safetensors``
  only once the whole file matches; a retry after a dropped connection resumes with an HTTP
  ``Range`` request where the server allows; mirrors are tried in order; nothing partial stays;
- ``VISATTN_OFFLINE=1`` (or ``HF_HUB_OFFLINE=1``) makes no network call at all;
- weights are safetensors only: nothing is unpickled.

    >>> from visattn.weights import list_pretrained, load_pretrained
    >>> list_pretrained("fcos_*")                        # doctest: +SKIP
    ['fcos_resnet10t_eca.synth256']
    >>> model = load_pretrained("fcos_resnet10t_eca.synth256")   # doctest: +SKIP
"""
from __future__ import annotations

import difflib
import fnmatch
import hashlib
import http.client
import json
import math
import os
import re
import shutil
import tempfile
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from ._io import _file_mode

__all__ = [
    "ChecksumError",
    "DownloadError",
    "OfflineError",
    "cache_dir",
    "download",
    "is_offline",
    "list_pretrained",
    "load_manifest",
    "load_pretrained",
    "manifest_path",
    "pretrained_info",
    "sha256_file",
    "validate_entry",
    "verify",
]

WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"
NAME_RE = re.compile(r"^[a-z0-9]+_[a-z0-9-]+_[a-z0-9-]+\.[a-z0-9-]+$")
SHA_RE = re.compile(r"^[0-9a-f]{64}$")
BUILDERS = ("build_detector", "build_segmenter")
PICKLE_SUFFIXES = (".pth", ".pt", ".ckpt", ".bin", ".pkl", ".pickle")
CHUNK = 1 << 20
RETRIES = 3
TIMEOUT_S = 30.0


class ChecksumError(ValueError):
    """A file's sha256 (or size) is not the one the manifest or the caller expects."""


class DownloadError(OSError):
    """A download failed: HTTP status, unreachable host, or a connection that kept dropping."""


class OfflineError(OSError):
    """The file is not cached and offline mode forbids fetching it."""


# -- where things are ------------------------------------------------------------------------------
def cache_dir(override: str | os.PathLike | None = None) -> Path:
    """Folder of cached weight files: ``override``, else ``$VISATTN_CACHE/weights``, else
    ``$XDG_CACHE_HOME/visattn/weights`` (default ``~/.cache/visattn/weights``)."""
    if override is not None:
        return Path(override)
    from .data.synthetic_module import default_cache_dir

    return default_cache_dir() / "weights"


_cache_folder = cache_dir  # the functions below take a ``cache_dir`` argument that hides it


def manifest_path() -> Path:
    """``$VISATTN_WEIGHTS_MANIFEST`` if set, else ``weights/manifest.json`` of this checkout."""
    return Path(os.environ.get("VISATTN_WEIGHTS_MANIFEST") or WEIGHTS_DIR / "manifest.json")


def is_offline() -> bool:
    """True when ``VISATTN_OFFLINE`` or ``HF_HUB_OFFLINE`` is set to a true value (1, true, yes, on)."""
    return any(os.environ.get(k, "").strip().lower() in ("1", "true", "yes", "on")
               for k in ("VISATTN_OFFLINE", "HF_HUB_OFFLINE"))


def sha256_file(path: str | os.PathLike) -> str:
    """Full hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _check_sha(sha256: Any, what: str = "sha256") -> str:
    if not isinstance(sha256, str) or not SHA_RE.match(sha256.lower()):
        raise ValueError(f"{what} must be the full 64-hex-digit sha256, got {sha256!r}")
    return sha256.lower()


# -- the manifest ----------------------------------------------------------------------------------
def _fail(name: str, what: str) -> None:
    raise ValueError(f"weights manifest entry {name!r}: {what}")


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def validate_entry(name: str, entry: Any) -> None:
    """Raise ``ValueError`` naming the entry and the field unless ``entry`` follows the schema
    (see the module docstring and README "Pretrained weights")."""
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise ValueError(f"weights manifest: name {name!r} is not arch_backbone_attn.tag "
                         "(lower case, digits and '-' inside parts)")
    if not isinstance(entry, dict):
        _fail(name, f"must be an object, got {type(entry).__name__}")
    required = ("sha256", "file_size", "format", "num_params", "config", "metrics", "recipe", "license")
    missing = [k for k in required if k not in entry]
    if missing:
        _fail(name, f"missing field(s) {missing}")
    _check_sha(entry["sha256"], f"{name}: sha256")
    for key in ("file_size", "num_params"):
        v = entry[key]
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            _fail(name, f"{key} must be a positive int, got {v!r}")
    if entry["format"] != "safetensors":
        _fail(name, f"format must be 'safetensors' (nothing is unpickled), got {entry['format']!r}")
    if not any(entry.get(k) for k in ("path", "mirrors", "hf")):
        _fail(name, "needs at least one source: 'path' (inside weights/), 'mirrors' or 'hf'")
    if "path" in entry:
        p = entry["path"]
        if not isinstance(p, str) or not p or Path(p).is_absolute() or ".." in Path(p).parts:
            _fail(name, f"path must be a relative path inside weights/, got {p!r}")
    mirrors = entry.get("mirrors", [])
    if not isinstance(mirrors, list) or not all(isinstance(u, str) and u.startswith("https://") for u in mirrors):
        _fail(name, f"mirrors must be a list of https:// URLs, got {mirrors!r}")
    if "hf" in entry:
        hf = entry["hf"]
        if not isinstance(hf, dict) or not all(isinstance(hf.get(k), str) and hf[k] for k in ("repo_id", "filename")):
            _fail(name, f"hf must be {{'repo_id': str, 'filename': str[, 'revision': str]}}, got {hf!r}")
    config = entry["config"]
    if not isinstance(config, dict) or config.get("builder") not in BUILDERS or not isinstance(config.get("kwargs"), dict):
        _fail(name, f"config must be {{'builder': one of {BUILDERS}, 'kwargs': {{...}}}}, got {config!r}")
    metrics = entry["metrics"]
    if not isinstance(metrics, dict) or not metrics:
        _fail(name, "metrics must map an evaluation set to {metric: number}")
    for split, values in metrics.items():
        if not isinstance(values, dict) or not values or not all(_is_number(v) for v in values.values()):
            _fail(name, f"metrics[{split!r}] must be a non-empty {{metric: finite number}}, got {values!r}")
    recipe = entry["recipe"]
    if not isinstance(recipe, dict) or not all(k in recipe for k in ("command", "seed", "visattn_version")):
        _fail(name, f"recipe needs 'command', 'seed' and 'visattn_version', got {recipe!r}")
    if not isinstance(entry["license"], str) or not entry["license"]:
        _fail(name, "license must be a non-empty string")


def load_manifest(path: str | os.PathLike | None = None) -> dict[str, dict]:
    """The manifest as ``{name: entry}``, every entry validated. A missing manifest is empty."""
    path = Path(path) if path is not None else manifest_path()
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"weights manifest {path} is not valid JSON: {e}") from None
    models = data.get("models") if isinstance(data, dict) else None
    if not isinstance(models, dict):
        raise ValueError(f"weights manifest {path} must be {{'models': {{name: entry}}}}")  # noqa: TRY004
    for name, entry in models.items():
        validate_entry(name, entry)
    return models


def list_pretrained(pattern: str | None = None) -> list[str]:
    """Names of published models, sorted; ``pattern`` is a shell-style filter (``"fcos_*"``)."""
    if pattern is not None and not isinstance(pattern, str):
        raise TypeError(f"pattern must be a str such as 'fcos_*', got {type(pattern).__name__}")
    names = sorted(load_manifest())
    return names if pattern is None else [n for n in names if fnmatch.fnmatchcase(n, pattern)]


def pretrained_info(name: str) -> dict:
    """The manifest entry of ``name`` (a copy). An unknown name is a ``ValueError`` listing close
    matches and the published names."""
    manifest = load_manifest()
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    if name not in manifest:
        close = difflib.get_close_matches(name, list(manifest), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ValueError(f"unknown pretrained model {name!r}{hint}. Published: {', '.join(sorted(manifest)) or 'none'}")
    return json.loads(json.dumps(manifest[name]))


# -- downloading -----------------------------------------------------------------------------------
def _progress(total: int | None, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, leave=False,
                disable=os.environ.get("VISATTN_PROGRESS", "1") == "0")


def _fetch_into(url: str, tmp: Path, h: hashlib._Hash, have: int) -> tuple[int, hashlib._Hash]:
    """Append ``url``'s bytes from offset ``have`` to ``tmp`` (restarting when the server ignores
    the Range request). Returns the new size and hash; raises on HTTP errors and drops."""
    request = urllib.request.Request(url, headers={"User-Agent": "visattn"})
    if have:
        request.add_header("Range", f"bytes={have}-")
    with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
        status = getattr(response, "status", 200)
        if have and status != 206:  # no range support: start over
            have, h = 0, hashlib.sha256()
        length = response.headers.get("Content-Length")
        expected = have + int(length) if length and length.isdigit() else None
        with open(tmp, "r+b" if have else "wb") as f, _progress(expected, Path(url).name) as bar:
            f.seek(have)
            f.truncate()
            bar.update(have)
            while chunk := response.read(CHUNK):
                f.write(chunk)
                h.update(chunk)
                have += len(chunk)
                bar.update(len(chunk))
        if expected is not None and have < expected:
            raise ConnectionError(f"connection closed after {have} of {expected} bytes")
    return have, h


def _hash_of(path: Path) -> tuple[int, hashlib._Hash]:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return path.stat().st_size, h


def _download_one(url: str, sha256: str, dest: Path, file_size: int | None) -> None:
    """Fetch ``url`` into ``dest`` via a temporary file beside it; verify the full sha256.

    A connection that drops is retried up to ``RETRIES`` times, resuming from the bytes already
    received (HTTP Range); an HTTP error status or a host that cannot be reached at all is not."""
    fd, name = tempfile.mkstemp(prefix=f".{sha256[:16]}.partial-", dir=dest.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        have, h = 0, hashlib.sha256()
        for attempt in range(RETRIES + 1):
            try:
                have, h = _fetch_into(url, tmp, h, have)
                break
            except urllib.error.HTTPError as e:
                if e.code == 416 and have:  # our range is past the server's end: start over
                    have, h = 0, hashlib.sha256()
                    continue
                raise DownloadError(f"download of {url} failed: HTTP {e.code} {e.reason}") from None
            except urllib.error.URLError as e:  # no connection at all (refused, DNS, unreachable)
                raise DownloadError(f"download of {url} failed: cannot reach the host ({e.reason})") from None
            except (ConnectionError, TimeoutError, http.client.HTTPException, OSError) as e:
                if attempt == RETRIES:
                    raise DownloadError(f"download of {url} failed after {RETRIES + 1} tries, "
                                        f"{tmp.stat().st_size} bytes received: {e}") from None
                have, h = _hash_of(tmp)  # resume from what arrived
        got = h.hexdigest()
        if got != sha256:
            raise ChecksumError(f"checksum mismatch for {url}: expected sha256 {sha256}, got {got} "
                                f"({have} bytes); the file was not kept")
        if file_size is not None and have != file_size:
            raise ChecksumError(f"size mismatch for {url}: expected {file_size} bytes, got {have}")
        os.chmod(tmp, _file_mode(dest))
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def _cached(sha256: str, folder: Path) -> Path | None:
    """The cached file named by ``sha256`` if present and intact; a corrupt one is removed."""
    path = folder / f"{sha256}.safetensors"
    if not path.is_file():
        return None
    if sha256_file(path) == sha256:
        return path
    path.unlink(missing_ok=True)  # changed in the cache: never trust it
    return None


def _from_cache(sha256: str, override, what: str, how: str) -> tuple[Path, Path | None]:
    """The cache folder (created) and the intact cached file, if any. Offline, a file not cached is
    an :class:`OfflineError` naming ``what`` and saying ``how`` to get it; no request is made."""
    folder = _cache_folder(override)
    folder.mkdir(parents=True, exist_ok=True)
    hit = _cached(sha256, folder)
    if hit is None and is_offline():
        raise OfflineError(f"{what} is not in the cache {folder} and offline mode (VISATTN_OFFLINE / "
                           f"HF_HUB_OFFLINE) forbids downloading it; {how}")
    return folder, hit


def download(url: str | Sequence[str], *, sha256: str, cache_dir: str | os.PathLike | None = None,
             file_size: int | None = None) -> Path:
    """Fetch a file into the cache, verified, and return its path (``<cache>/<sha256>.safetensors``).

    ``url`` is one URL or a list of mirrors tried in order. A cached file is re-hashed first and
    reused without any request when it matches. A mismatch (:class:`ChecksumError`), an HTTP error
    naming the status, or an unreachable host (:class:`DownloadError`) names the URL; offline
    (``VISATTN_OFFLINE=1``) a file not cached is an :class:`OfflineError` and no request is made.
    """
    sha256 = _check_sha(sha256)
    urls = [url] if isinstance(url, str) else list(url) if isinstance(url, (list, tuple)) else None
    if not urls or not all(isinstance(u, str) and u.startswith(("https://", "http://")) for u in urls):
        raise ValueError(f"url must be an http(s) URL or a non-empty list of them, got {url!r}")
    if file_size is not None and (isinstance(file_size, bool) or not isinstance(file_size, int) or file_size < 1):
        raise ValueError(f"file_size must be a positive int or None, got {file_size!r}")
    folder, hit = _from_cache(sha256, cache_dir, f"{urls[0]} (sha256 {sha256[:12]}...)",
                              f"unset it, or copy the file to <cache>/{sha256}.safetensors")
    if hit is not None:
        return hit
    dest = folder / f"{sha256}.safetensors"
    errors = []
    for u in urls:
        try:
            _download_one(u, sha256, dest, file_size)
            return dest
        except (DownloadError, ChecksumError) as e:
            errors.append(str(e))
    if len(errors) == 1:
        raise (ChecksumError if errors[0].startswith(("checksum", "size")) else DownloadError)(errors[0])
    raise DownloadError("every mirror failed:\n  " + "\n  ".join(errors))


def _from_hub(entry: dict, folder: Path) -> Path:
    """Fetch the entry's Hugging Face Hub file, check it against the manifest, cache it by sha256."""
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise ImportError("this model is on the Hugging Face Hub: pip install huggingface_hub") from None
    hf = entry["hf"]
    local = Path(hf_hub_download(hf["repo_id"], hf["filename"], revision=hf.get("revision")))
    got = sha256_file(local)
    if got != entry["sha256"]:
        raise ChecksumError(f"checksum mismatch for hf://{hf['repo_id']}/{hf['filename']}: expected "
                            f"{entry['sha256']}, got {got}")
    dest = folder / f"{entry['sha256']}.safetensors"
    fd, name = tempfile.mkstemp(prefix=".hf.partial-", dir=folder)
    os.close(fd)
    try:
        shutil.copyfile(local, name)
        os.chmod(name, _file_mode(dest))
        os.replace(name, dest)
    finally:
        Path(name).unlink(missing_ok=True)
    return dest


def weight_file(name: str, *, cache_dir: str | os.PathLike | None = None) -> Path:
    """The verified local file of published model ``name``: the shipped file, else the cache,
    else fetched from its mirrors, else from the Hub (never online when offline)."""
    entry = pretrained_info(name)
    sha = entry["sha256"]
    if entry.get("path"):
        shipped = manifest_path().parent / entry["path"]
        if shipped.is_file():
            got = sha256_file(shipped)
            if got != sha:
                raise ChecksumError(f"shipped weights {shipped} of {name!r} do not match the manifest: expected "
                                    f"sha256 {sha}, got {got}")
            return shipped
    folder, hit = _from_cache(sha, cache_dir, f"weights of {name!r}",
                              f"run `visattn weights download {name}` online first")
    if hit is not None:
        return hit
    errors = []
    if entry.get("mirrors"):
        try:
            return download(entry["mirrors"], sha256=sha, cache_dir=folder, file_size=entry["file_size"])
        except (DownloadError, ChecksumError) as e:
            errors.append(str(e))
    if entry.get("hf"):
        return _from_hub(entry, folder)
    raise DownloadError(f"no source of {name!r} could be fetched: " + "; ".join(errors or ["no source listed"]))


def verify(name: str, *, cache_dir: str | os.PathLike | None = None) -> Path:
    """Check the file of ``name`` against the manifest (fetching it if needed); return its path."""
    return weight_file(name, cache_dir=cache_dir)


# -- loading ---------------------------------------------------------------------------------------
def build_from_config(config: dict) -> nn.Module:
    """Build the model a manifest ``config`` describes (``builder`` + ``kwargs``)."""
    from . import models

    builder = config.get("builder")
    if builder not in BUILDERS:
        raise ValueError(f"config builder must be one of {BUILDERS}, got {builder!r}")
    kwargs = dict(config.get("kwargs", {}))
    kwargs.pop("pretrained_backbone", None)  # the published weights replace them
    return getattr(models, builder)(pretrained_backbone=False, **kwargs)


def load_pretrained(name: str, *, cache_dir: str | os.PathLike | None = None,
                    map_location: str = "cpu") -> nn.Module:
    """Build published model ``name`` and load its verified weights (strictly; fp16 files are cast
    to the model's float32). Returns the model in ``eval()`` mode.

    A ``.pth`` / ``.pt`` / ``.ckpt`` file is refused: those are pickles, which run code when
    loaded; turn a checkpoint of your own into safetensors with ``visattn weights publish``.
    """
    if isinstance(name, os.PathLike) or (isinstance(name, str) and name.lower().endswith(PICKLE_SUFFIXES)):
        raise ValueError(f"{str(name)!r}: visattn loads only published safetensors weights by name, never pickled "
                         "checkpoints (they can run code when loaded). Convert your checkpoint with "
                         "`visattn weights publish CKPT --name NAME`, then load it by NAME")
    from safetensors.torch import load_file

    entry = pretrained_info(name)
    path = weight_file(name, cache_dir=cache_dir)
    model = build_from_config(entry["config"])
    n = sum(p.numel() for p in model.parameters())
    if n != entry["num_params"]:
        raise ValueError(f"{name!r}: the built model has {n:,} parameters but the manifest says "
                         f"{entry['num_params']:,}; the config does not match the weights")
    state = load_file(str(path), device=str(map_location))
    model.load_state_dict(state, strict=True)
    return model.to(map_location).eval()


# -- publishing ------------------------------------------------------------------------------------
REPORT_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR100")


def metrics_from_report(result: dict) -> dict[str, float]:
    """The manifest's metrics from an evaluation result (``report.json``'s ``result``): the COCO
    numbers, AP per size bin (``AP_<bin>``) and occlusion bucket (``AP_occ_<bucket>``), and
    ``occluded_recall``; in percent, rounded to 0.01."""
    if not isinstance(result, dict) or "AP" not in result:
        raise ValueError("the evaluation result has no 'AP'; pass the 'result' of a visattn report.json")
    out = {k: result[k] for k in REPORT_METRICS if k in result}
    out.update({f"AP_{b}": r["AP"] for b, r in result.get("size", {}).items()})
    out.update({f"AP_occ_{b}": r["AP"] for b, r in result.get("occlusion", {}).items()})
    if "occluded_recall" in result:
        out["occluded_recall"] = result["occluded_recall"]["recall"]
    return {k: round(100 * float(v), 2) for k, v in out.items() if _is_number(v) and v >= 0}


def _model_config(config_yaml: Path) -> dict:
    """``{'builder', 'kwargs'}`` from a LightningCLI ``config.yaml`` (``model.init_args.model``)."""
    import yaml

    try:
        cfg = yaml.safe_load(config_yaml.read_text())
        spec = cfg["model"]["init_args"]["model"]
    except (OSError, KeyError, TypeError, yaml.YAMLError) as e:
        raise ValueError(f"{config_yaml}: not a visattn training config with model.init_args.model ({e})") from None
    builder = str(spec.get("class_path", "")).rsplit(".", 1)[-1]
    if builder not in BUILDERS:
        raise ValueError(f"{config_yaml}: the model is {spec.get('class_path')!r}; publish supports "
                         f"visattn.models.{' / '.join(BUILDERS)}")
    return {"builder": builder, "kwargs": dict(spec.get("init_args") or {})}


def _state_dict_from_checkpoint(checkpoint: Path) -> dict:
    from .lit.checkpoint import verify_checkpoint

    ckpt = verify_checkpoint(checkpoint)  # zip CRCs, then weights_only=True
    state = ckpt.get("state_dict") if isinstance(ckpt, dict) else None
    if not isinstance(state, dict) or not state:
        raise ValueError(f"{checkpoint}: no 'state_dict' in it; is it a Lightning checkpoint?")
    inner = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
    return inner or state


def publish(checkpoint: str | os.PathLike, *, name: str, config: str | os.PathLike, report: str | os.PathLike,
            command: str, seed: int, fp16: bool = True, metrics_set: str = "synthetic-val",
            eval_command: str | None = None, recipe_config: str | None = None, license: str = "Apache-2.0",
            notes: str | None = None, manifest: str | os.PathLike | None = None) -> dict:
    """Turn a training checkpoint into a shipped safetensors file and its manifest entry.

    Args:
        checkpoint: a Lightning ``.ckpt`` of your own run (read with ``weights_only=True``).
        name: ``arch_backbone_attn.tag``; the file becomes ``weights/<name>.safetensors``.
        config: the run's ``config.yaml`` (LightningCLI writes it into the log folder); its
            ``model.init_args.model`` gives the builder keywords.
        report: a ``report.json`` written by ``train.py validate`` (or ``visattn eval``); its
            numbers become ``metrics[metrics_set]``. Validate the *published* weights
            (``train.py validate --weights NAME``) and publish again to record their own numbers.
        command, seed: how the run was made (the recipe); fp16: store floats as half precision.
        eval_command: the command that wrote ``report`` (kept per evaluation set in the recipe).
        recipe_config: the config file of the recipe (e.g. ``configs/quickstart.yaml``).

    Publishing the same weights again (same sha256) with another ``metrics_set`` adds that set's
    numbers to the entry and keeps the others; new weights start a new entry.

    The file goes beside the manifest (``weights/``). Returns the entry; the file and the manifest
    are written atomically.
    """
    import torch
    from safetensors.torch import save_file

    from . import __version__
    from ._io import atomic_path, atomic_write_json

    if not isinstance(name, str) or not NAME_RE.match(name):
        raise ValueError(f"name {name!r} is not arch_backbone_attn.tag (e.g. fcos_resnet10t_eca.synth256)")
    checkpoint, config, report = Path(checkpoint), Path(config), Path(report)
    for arg, p in (("checkpoint", checkpoint), ("config", config), ("report", report)):
        if not p.is_file():
            raise FileNotFoundError(f"{arg} {str(p)!r} does not exist")
    try:
        result = json.loads(report.read_text())["result"]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{report}: not a visattn report.json with a 'result' ({e})") from None
    model_config = _model_config(config)
    state = _state_dict_from_checkpoint(checkpoint)
    if fp16:
        state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    state = {k: v.contiguous() for k, v in state.items()}
    model = build_from_config(model_config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{checkpoint} does not match the model {config} builds: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    manifest = Path(manifest) if manifest is not None else manifest_path()
    target = manifest.parent / f"{name}.safetensors"
    with atomic_path(target) as tmp:
        # one metadata key only: safetensors stores metadata in a hash map, so several keys come out
        # in a random order and the same weights would get a different sha256 each time
        save_file(state, str(tmp), metadata={"format": "pt"})
    entry = {
        "sha256": sha256_file(target), "file_size": target.stat().st_size, "format": "safetensors",
        "path": target.name, "num_params": sum(p.numel() for p in model.parameters()),
        "dtype": "float16" if fp16 else str(next(iter(state.values())).dtype).replace("torch.", ""),
        "config": model_config, "metrics": {metrics_set: metrics_from_report(result)},
        "recipe": {"command": command, "seed": seed, "visattn_version": __version__,
                   "torch_version": torch.__version__, **({"notes": notes} if notes else {})},
        "license": license,
    }
    models = load_manifest(manifest)
    old = models.get(name)
    if old is not None and old["sha256"] == entry["sha256"]:  # same weights: add this evaluation set
        entry["metrics"] = {**old["metrics"], **entry["metrics"]}
        entry["recipe"] = {**old["recipe"], **entry["recipe"]}
    if eval_command:
        entry["recipe"].setdefault("evaluations", {})[metrics_set] = eval_command
    if recipe_config:
        entry["recipe"]["config"] = recipe_config
    validate_entry(name, entry)
    models[name] = entry
    atomic_write_json(manifest, {"models": dict(sorted(models.items()))}, indent=1)
    return entry


TABLE_COLUMNS = ("AP", "AP50", "APs", "AP_very_tiny", "AP_tiny", "AP_occ_partial", "AP_occ_heavy")


def format_table(manifest: dict[str, dict] | None = None) -> str:
    """The README's table of published models (markdown), one row per model and evaluation set.
    ``tests/test_weights.py`` fails when the README's copy differs from this."""
    models = load_manifest() if manifest is None else manifest
    head = ("| model | params | size | evaluated on | " + " | ".join(TABLE_COLUMNS) + " |\n"
            "|---|---:|---:|---|" + "---:|" * len(TABLE_COLUMNS) + "\n")
    rows = []
    for name, e in sorted(models.items()):
        for split, m in sorted(e["metrics"].items()):
            values = " | ".join("–" if m.get(c) is None else f"{m[c]:.1f}" for c in TABLE_COLUMNS)
            rows.append(f"| `{name}` | {e['num_params'] / 1e6:.1f} M | {e['file_size'] / 2**20:.1f} MiB "
                        f"| {split} | {values} |\n")
    return head + ("".join(rows) or "| (none yet) |" + " |" * (3 + len(TABLE_COLUMNS)) + "\n")
