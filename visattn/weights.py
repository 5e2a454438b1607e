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
- the file's contents, by :func:`verify` and :func:`load_pretrained`: its size against the
  manifest, a readable safetensors header, only finite values, and tensors with the names, shapes
  and dtypes of the model its ``config`` builds (a :class:`WeightsError` naming the model, the file
  and the tensors);
- the manifest itself: every entry against the schema, a model name or key given twice is an error
  (JSON would silently keep the last), a sha256 is 64 lower-case hex digits;
- :func:`publish` refuses NaN / inf and values float16 cannot hold, and writes the file and the
  manifest entry together or not at all;
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

import torch
from torch import nn

from ._io import _file_mode

__all__ = [
    "ChecksumError",
    "DownloadError",
    "OfflineError",
    "WeightsError",
    "cache_dir",
    "download",
    "is_offline",
    "list_pretrained",
    "load_manifest",
    "load_pretrained",
    "manifest_path",
    "pretrained_info",
    "pretrained_state_dict",
    "publish",
    "sha256_file",
    "validate_entry",
    "verify",
]

WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"
NAME_RE = re.compile(r"^[a-z0-9]+_[a-z0-9-]+_[a-z0-9-]+\.[a-z0-9-]+$")
SHA_RE = re.compile(r"[0-9a-f]{64}")  # used with fullmatch: "$" would also match before a final newline
FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")
FP16_OVERFLOW = ("raise", "float32")
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


class WeightsError(ValueError):
    """Weights that must not be used as they are: NaN / inf values, values float16 cannot hold, a
    safetensors file that cannot be read (header too large, truncated, bad JSON), or tensors whose
    names, shapes or dtypes do not match the model the config builds. The message names the model
    (or checkpoint), the file and the tensors."""


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
    if not isinstance(sha256, str) or not SHA_RE.fullmatch(sha256.lower()):
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
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise ValueError(f"weights manifest: name {name!r} is not arch_backbone_attn.tag "
                         "(lower case, digits and '-' inside parts)")
    if not isinstance(entry, dict):
        _fail(name, f"must be an object, got {type(entry).__name__}")
    required = ("sha256", "file_size", "format", "num_params", "config", "metrics", "recipe", "license")
    missing = [k for k in required if k not in entry]
    if missing:
        _fail(name, f"missing field(s) {missing}")
    sha = entry["sha256"]
    if not isinstance(sha, str) or not SHA_RE.fullmatch(sha):  # compared as is with hexdigest()
        _fail(name, f"sha256 must be the full sha256 as 64 lower-case hex digits, got {sha!r}")
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
    if "dtype" in entry and not (isinstance(entry["dtype"], str)
                                 and all(d in FLOAT_DTYPES for d in entry["dtype"].split("+"))):
        _fail(name, f"dtype must be float dtype names joined by '+' ({', '.join(FLOAT_DTYPES)}), "
                    f"got {entry['dtype']!r}")


class _Object(dict):
    """A JSON object that remembers the keys it was given twice: ``(key, first, second)`` positions."""

    duplicates: list[tuple[str, int, int]]


def _object_pairs(pairs: list[tuple[str, Any]]) -> _Object:
    obj, first = _Object(), {}
    obj.duplicates = []
    for i, (key, value) in enumerate(pairs):
        if key in first:
            obj.duplicates.append((key, first[key], i))
        else:
            first[key] = i
        obj[key] = value
    return obj


def _check_duplicates(path: Path, text: str, data: Any, where: str = "") -> None:
    """Refuse a manifest that gives a model name (or any key) twice: JSON keeps the last silently."""
    if isinstance(data, _Object) and data.duplicates:
        key, i, j = data.duplicates[0]
        if where == "'models'":
            lines = [text.count("\n", 0, m.start()) + 1
                     for m in re.finditer(re.escape(json.dumps(key)) + r"\s*:", text)]
            at = f" (lines {lines[0]} and {lines[1]})" if len(lines) == 2 else ""
            raise ValueError(f"weights manifest {path}: duplicated model name {key!r}: entries {i + 1} and {j + 1} "
                             f"of 'models'{at}; JSON would keep only the last, so remove or rename one")
        raise ValueError(f"weights manifest {path}: {where or 'the top level'}: duplicated key {key!r} "
                         f"(positions {i + 1} and {j + 1}); JSON would keep only the last")
    if isinstance(data, dict):
        for key, value in data.items():
            if not where and key == "models":
                inner = "'models'"
            elif where == "'models'":
                inner = f"entry {key!r}"
            else:
                inner = f"{where}[{key!r}]"
            _check_duplicates(path, text, value, inner)
    elif isinstance(data, list):
        for k, value in enumerate(data):
            _check_duplicates(path, text, value, f"{where}[{k}]")


def load_manifest(path: str | os.PathLike | None = None) -> dict[str, dict]:
    """The manifest as ``{name: entry}``, every entry validated. A missing manifest is empty.

    A model name given twice (or any key given twice in an entry) is a ``ValueError`` naming it and
    both positions: JSON would silently keep the last one."""
    if path is not None and not isinstance(path, str | os.PathLike):
        raise TypeError(f"path must be a path (str or os.PathLike) or None, got {type(path).__name__}")
    path = Path(path) if path is not None else manifest_path()
    if not path.is_file():
        return {}
    try:
        text = path.read_text()
        data = json.loads(text, object_pairs_hook=_object_pairs)
    except ValueError as e:
        raise ValueError(f"weights manifest {path} is not valid JSON: {e}") from None
    models = data.get("models") if isinstance(data, dict) else None
    if not isinstance(models, dict):
        raise ValueError(f"weights manifest {path} must be {{'models': {{name: entry}}}}")  # noqa: TRY004
    _check_duplicates(path, text, data)
    for name, entry in models.items():
        validate_entry(name, entry)
    return json.loads(json.dumps(models))  # plain dicts


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


def _check_name_and_cache(name: Any, cache_dir: Any) -> None:
    if not isinstance(name, str):
        raise TypeError(f"name must be a published model's name (str), got {type(name).__name__} {name!r:.60}")
    if cache_dir is not None and (not isinstance(cache_dir, str | os.PathLike) or not os.fspath(cache_dir)):
        raise TypeError(f"cache_dir must be a folder path or None, got {type(cache_dir).__name__} {cache_dir!r:.60}")


def verify(name: str, *, cache_dir: str | os.PathLike | None = None) -> Path:
    """Check published model ``name`` (fetching its file if needed) and return the file's path.

    Checked: the file's full sha256 and size against the manifest, a readable safetensors file,
    only finite values, float tensors of the manifest's ``dtype``, and the names, shapes and dtype
    kinds (float / integer) of the tensors of the model its ``config`` builds (no ImageNet weights
    are fetched for that).

    Raises:
        ChecksumError: the sha256 or the size differs from the manifest.
        WeightsError: the contents cannot be used (the message names the model, file and tensors).
        ValueError: an unknown name; the config builds a model of another size.
    """
    _check_name_and_cache(name, cache_dir)
    path = weight_file(name, cache_dir=cache_dir)
    _checked_state(name, pretrained_info(name), path)
    return path


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


def _read_safetensors(path: Path, what: str) -> dict:
    """All tensors of a safetensors file (on the CPU); an unreadable file (header too large,
    truncated, bad JSON header, ...) is a :class:`WeightsError` naming ``what`` and the file."""
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as e:  # noqa: BLE001 - SafetensorError, OSError, ...: the same fault for the user
        raise WeightsError(f"{what}: {path} is not a readable safetensors file ({type(e).__name__}: {e}); "
                           "it must not be used: publish it again") from None


def _non_finite(state: dict) -> list[str]:
    return [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]


def _listed(keys: list[str], limit: int = 3) -> str:
    return ", ".join(keys[:limit]) + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")


def _dtype_mismatches(expected: dict, found: dict) -> list[str]:
    """Tensors stored as float where the model holds integers, or the other way round (loading
    would cast them silently), or as another integer type."""
    return [f"{k}: file {str(found[k].dtype).replace('torch.', '')}, model {str(v.dtype).replace('torch.', '')}"
            for k, v in expected.items() if k in found and (
                found[k].is_floating_point() != v.is_floating_point()
                or (not v.is_floating_point() and found[k].dtype != v.dtype))]


def _checked_state(name: str, entry: dict, path: Path) -> tuple[nn.Module, dict]:
    """Check a published file's contents against its entry; return the built model and the state."""
    from .lit.checkpoint import check_state_dict_matches

    what = f"published weights {name!r}"
    size = path.stat().st_size
    if size != entry["file_size"]:
        raise ChecksumError(f"{what}: the manifest's file_size is {entry['file_size']} but {path} has {size} bytes "
                            "(its sha256 matches, so the manifest entry is wrong)")
    state = _read_safetensors(path, what)
    bad = _non_finite(state)
    if bad:
        raise WeightsError(f"{what} ({path}): non-finite values in {_listed(bad)}; they must not be used: publish "
                           "again from a checkpoint without NaN / inf")
    declared = entry.get("dtype")
    if declared:
        off = [f"{k} is {str(v.dtype).replace('torch.', '')}" for k, v in state.items()
               if v.is_floating_point() and str(v.dtype).replace("torch.", "") not in declared.split("+")]
        if off:
            raise WeightsError(f"{what} ({path}): {_listed(off)} but the manifest says {declared}")
    model = build_from_config(entry["config"])
    n = sum(p.numel() for p in model.parameters())
    if n != entry["num_params"]:
        raise ValueError(f"{name!r}: the built model has {n:,} parameters but the manifest says "
                         f"{entry['num_params']:,}; the config does not match the weights")
    expected = model.state_dict()
    try:
        check_state_dict_matches(expected, state, f"{str(path)!r} of {name!r}", what="weights file")
    except ValueError as e:
        raise WeightsError(str(e)) from None
    wrong = _dtype_mismatches(expected, state)
    if wrong:
        raise WeightsError(f"{what} ({path}): dtype mismatch ({len(wrong)}): {_listed(wrong, 5)}; loading would "
                           "cast them silently")
    return model, state


def pretrained_state_dict(name: str, *, cache_dir: str | os.PathLike | None = None) -> dict:
    """The verified ``state_dict`` of published model ``name`` (on the CPU, as stored: fp16 files
    give fp16 tensors), after every check of :func:`verify`; for loading into a model built
    elsewhere (``train.py --weights``)."""
    _check_name_and_cache(name, cache_dir)
    path = weight_file(name, cache_dir=cache_dir)
    return _checked_state(name, pretrained_info(name), path)[1]


def load_pretrained(name: str, *, cache_dir: str | os.PathLike | None = None,
                    map_location: Any = "cpu") -> nn.Module:
    """Build published model ``name`` and load its verified weights (strictly; fp16 files are cast
    to the model's float32). Returns the model in ``eval()`` mode.

    The file is checked as :func:`verify` checks it (sha256, size, readable, finite, tensors that
    match the config) before anything is loaded; an unusable file is a :class:`WeightsError`.
    A ``.pth`` / ``.pt`` / ``.ckpt`` file is refused: those are pickles, which run code when
    loaded; turn a checkpoint of your own into safetensors with ``visattn weights publish``.
    """
    if isinstance(name, os.PathLike) or (isinstance(name, str) and name.lower().endswith(PICKLE_SUFFIXES)):
        raise ValueError(f"{str(name)!r}: visattn loads only published safetensors weights by name, never pickled "
                         "checkpoints (they can run code when loaded). Convert your checkpoint with "
                         "`visattn weights publish CKPT --name NAME`, then load it by NAME")
    _check_name_and_cache(name, cache_dir)
    if not isinstance(map_location, str | torch.device):
        raise TypeError(f"map_location must be a device (str or torch.device), got {type(map_location).__name__}")
    entry = pretrained_info(name)
    path = weight_file(name, cache_dir=cache_dir)
    model, state = _checked_state(name, entry, path)
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
    """The model's tensors from a Lightning checkpoint of your own (``model.`` prefix removed),
    verified (zip CRCs, ``weights_only=True``) and finite (else :class:`WeightsError` naming the
    tensors); what ``publish``, ``visattn predict --ckpt`` and ``visattn explain --ckpt`` load."""
    from .lit.checkpoint import verify_checkpoint

    ckpt = verify_checkpoint(checkpoint)  # zip CRCs, then weights_only=True
    state = ckpt.get("state_dict") if isinstance(ckpt, dict) else None
    if not isinstance(state, dict) or not state:
        raise ValueError(f"{checkpoint}: no 'state_dict' in it; is it a Lightning checkpoint?")
    inner = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
    state = inner or state
    other = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if other:
        raise ValueError(f"{checkpoint}: the state_dict holds non-tensor entries ({_listed(other)}); "
                         "safetensors stores tensors only")
    bad = _non_finite(state)
    if bad:
        raise WeightsError(f"checkpoint {checkpoint}: non-finite values in {_listed(bad)} (the run diverged); refusing "
                           "to publish or load it: use an earlier checkpoint")
    return state


def _check_text(name: str, value: Any, *, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not isinstance(value, str) or not value.strip():
        kind = "None or a non-empty str" if optional else "a non-empty str"
        raise (TypeError if not isinstance(value, str) else ValueError)(
            f"{name} must be {kind}, got {type(value).__name__} {value!r:.60}")


def _to_fp16(state: dict, checkpoint: Path, overflow: str) -> dict:
    """Float tensors as float16; a tensor with values float16 cannot hold (|x| > 65504, which would
    become inf) is refused, or kept in float32 with ``overflow="float32"``."""
    out, too_big = {}, []
    for k, v in state.items():
        if not v.is_floating_point():
            out[k] = v
            continue
        half = v.half()
        if bool(torch.isfinite(half).all()):
            out[k] = half
            continue
        too_big.append(f"{k} (max abs {v.abs().max().item():.4g})")
        out[k] = v.float()
    if too_big and overflow == "raise":
        raise WeightsError(f"refusing to publish {checkpoint}: values too large for float16 (max 65504) in "
                           f"{_listed(too_big)}; cast to float16 they would become inf. Keep every tensor in float32 "
                           "with fp16=False (`--fp32`), or only these with fp16_overflow='float32'")
    return out


def publish(checkpoint: str | os.PathLike, *, name: str, config: str | os.PathLike, report: str | os.PathLike,
            command: str, seed: int, fp16: bool = True, fp16_overflow: str = "raise",
            metrics_set: str = "synthetic-val", eval_command: str | None = None, recipe_config: str | None = None,
            license: str = "Apache-2.0", notes: str | None = None, manifest: str | os.PathLike | None = None) -> dict:
    """Turn a training checkpoint into a shipped safetensors file and its manifest entry.

    Args:
        checkpoint: a Lightning ``.ckpt`` of your own run (read with ``weights_only=True``).
        name: ``arch_backbone_attn.tag``; the file becomes ``weights/<name>.safetensors``.
        config: the run's ``config.yaml`` (LightningCLI writes it into the log folder); its
            ``model.init_args.model`` gives the builder keywords.
        report: a ``report.json`` written by ``train.py validate`` (or ``visattn eval``); its
            numbers become ``metrics[metrics_set]``. Validate the *published* weights
            (``train.py validate --weights NAME``) and publish again to record their own numbers.
        command, seed: how the run was made (the recipe; a non-empty str and an int >= 0).
        fp16: store floats as half precision (default), else as float32.
        fp16_overflow: a tensor holding values float16 cannot represent (|x| > 65504) is refused
            (``"raise"``, default: cast, it would hold inf) or kept in float32 (``"float32"``; the
            entry's ``dtype`` is then ``"float16+float32"``).
        eval_command: the command that wrote ``report`` (kept per evaluation set in the recipe).
        recipe_config: the config file of the recipe (e.g. ``configs/quickstart.yaml``).

    Publishing the same weights again (same sha256) with another ``metrics_set`` adds that set's
    numbers to the entry and keeps the others; new weights start a new entry.

    The file goes beside the manifest (``weights/``). Returns the entry. Everything is checked
    before anything is written, and the file and the manifest are replaced together: on any failure
    both are left as they were and no temporary file stays.

    Raises:
        WeightsError: the checkpoint holds NaN / inf, or values float16 cannot hold (naming the
            tensors and their largest magnitude).
        ValueError / TypeError: a bad argument (named); a checkpoint whose keys, shapes or dtypes do
            not fit the model ``config`` builds (naming them).
    """
    from . import __version__
    from ._io import atomic_write_json
    from .lit.checkpoint import check_state_dict_matches

    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise ValueError(f"name {name!r} is not arch_backbone_attn.tag (e.g. fcos_resnet10t_eca.synth256)")
    for arg, value in (("checkpoint", checkpoint), ("config", config), ("report", report)):
        if not isinstance(value, str | os.PathLike) or not os.fspath(value):
            raise TypeError(f"{arg} must be a file path, got {type(value).__name__} {value!r:.60}")
    if manifest is not None and (not isinstance(manifest, str | os.PathLike) or not os.fspath(manifest)):
        raise TypeError(f"manifest must be a file path or None, got {type(manifest).__name__} {manifest!r:.60}")
    _check_text("command", command)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int >= 0, got {type(seed).__name__} {seed!r:.60}")
    if seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed}")
    if not isinstance(fp16, bool):
        raise TypeError(f"fp16 must be True or False, got {type(fp16).__name__} {fp16!r:.60}")
    if fp16_overflow not in FP16_OVERFLOW:
        raise ValueError(f"fp16_overflow must be one of {', '.join(map(repr, FP16_OVERFLOW))}, got {fp16_overflow!r}")
    _check_text("metrics_set", metrics_set)
    _check_text("license", license)
    for arg, value in (("eval_command", eval_command), ("recipe_config", recipe_config), ("notes", notes)):
        _check_text(arg, value, optional=True)
    checkpoint, config, report = Path(checkpoint), Path(config), Path(report)
    for arg, p in (("checkpoint", checkpoint), ("config", config), ("report", report)):
        if not p.is_file():
            raise FileNotFoundError(f"{arg} {str(p)!r} does not exist")
    try:
        result = json.loads(report.read_text())["result"]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{report}: not a visattn report.json with a 'result' ({e})") from None
    manifest = Path(manifest) if manifest is not None else manifest_path()
    models = load_manifest(manifest)  # a broken manifest is an error before anything is written
    model_config = _model_config(config)
    state = _state_dict_from_checkpoint(checkpoint)  # verified and finite
    model = build_from_config(model_config)
    expected = model.state_dict()
    check_state_dict_matches(expected, state, repr(str(checkpoint)))
    wrong = _dtype_mismatches(expected, state)
    if wrong:
        raise ValueError(f"{checkpoint} does not match the model {config} builds: dtype mismatch {_listed(wrong, 5)}")
    if fp16:
        state = _to_fp16(state, checkpoint, fp16_overflow)
    state = {k: v.contiguous() for k, v in state.items()}
    dtypes = sorted({str(v.dtype).replace("torch.", "") for v in state.values() if v.is_floating_point()},
                    key=FLOAT_DTYPES.index)
    target = manifest.parent / f"{name}.safetensors"
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_beside(target)
    backup = None
    try:
        # one metadata key only: safetensors stores metadata in a hash map, so several keys come out
        # in a random order and the same weights would get a different sha256 each time
        from safetensors.torch import save_file

        save_file(state, str(tmp), metadata={"format": "pt"})
        entry = {
            "sha256": sha256_file(tmp), "file_size": tmp.stat().st_size, "format": "safetensors",
            "path": target.name, "num_params": sum(p.numel() for p in model.parameters()),
            "dtype": "+".join(dtypes) or "float32",
            "config": model_config, "metrics": {metrics_set: metrics_from_report(result)},
            "recipe": {"command": command, "seed": seed, "visattn_version": __version__,
                       "torch_version": torch.__version__, **({"notes": notes} if notes else {})},
            "license": license,
        }
        old = models.get(name)
        if old is not None and old["sha256"] == entry["sha256"]:  # same weights: add this evaluation set
            entry["metrics"] = {**old["metrics"], **entry["metrics"]}
            entry["recipe"] = {**old["recipe"], **entry["recipe"]}
        if eval_command:
            entry["recipe"].setdefault("evaluations", {})[metrics_set] = eval_command
        if recipe_config:
            entry["recipe"]["config"] = recipe_config
        validate_entry(name, entry)
        new_models = {"models": dict(sorted({**models, name: entry}.items()))}
        # commit: the file, then the manifest; if the manifest cannot be written, the old file is put back
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, _file_mode(target))
        if target.exists():
            backup = _temp_beside(target)
            shutil.copy2(target, backup)
        os.replace(tmp, target)
        try:
            atomic_write_json(manifest, new_models, indent=1)
        except BaseException:
            if backup is not None:
                os.replace(backup, target)
            else:
                target.unlink(missing_ok=True)
            raise
    finally:
        tmp.unlink(missing_ok=True)
        if backup is not None:
            backup.unlink(missing_ok=True)
    return entry


def _temp_beside(target: Path) -> Path:
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.tmp-", suffix=target.suffix, dir=target.parent)
    os.close(fd)
    return Path(name)


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
