"""Reading dataset images safely and exactly: where the file is, what its pixels are, which way up.

Three rules, each one function, used by every image lookup in visattn:

- :func:`resolve_image`: a COCO ``file_name`` is a relative path *inside* the image root. ``..``
  components, absolute paths (POSIX, Windows drive or UNC forms), backslashes, empty names and NUL
  bytes are refused with an error naming the entry. Subfolders (``train/0001.jpg``) are fine.
  Containment is checked on the *name*, which is what an annotation file controls; symbolic links
  that the owner of the root placed there (a subset folder made of links into a full copy, an
  ``images`` link to another disk) are followed, as the file system says.
- :func:`decode_image`: pixels in their real range. 8-bit images (``1``, ``L``, ``P``, ``RGB``,
  ``CMYK``, ``YCbCr``, ...) become ``(H, W, 3) uint8``; images with more than 8 bits (``I;16*``,
  ``I``, ``F``) become ``(H, W, 3) float32`` in 0..1, scaled by the container's bit depth (a
  16-bit PNG's 65535 is 1.0; 12-bit sensor data stored in 16 bits therefore looks dark, as it does
  in any viewer). Alpha is dropped (the stored colours are kept, not composited on a background).
  Pillow reads 16-bit-per-channel *colour* PNGs as 8-bit ``RGB`` (the high byte): the range is
  right, the extra precision is not kept.
- :func:`orient_image`: the decoded size is compared with the JSON's ``width``/``height``. The
  stored pixels are kept when their size matches (COCO's own convention: its width/height, and its
  boxes, are of the stored pixels even where EXIF says "rotate"); the EXIF-transposed image is used
  when only its size matches (annotations made in a viewer that applies EXIF); anything else is an
  error naming the image, its file and both sizes. Without ``width``/``height`` in the JSON the
  stored pixels are used, unless the file carries an EXIF orientation, which is then ambiguous and
  an error (add ``width``/``height`` to say which one the boxes are in).
"""
from __future__ import annotations

import os
from pathlib import Path, PurePosixPath, PureWindowsPath

import numpy as np
from PIL import Image, ImageOps

from .._checks import check_int, check_pathlike

__all__ = ["decode_image", "orient_image", "read_image", "read_upright", "resolve_image"]

_EXIF_ORIENTATION = 0x0112
_SWAPS_SIDES = (5, 6, 7, 8)  # EXIF orientations that rotate by 90 degrees (width <-> height)


def _entry(image_id, source) -> str:
    where = f"{source}: " if source else ""
    return f"{where}image id {image_id!r}" if image_id is not None else f"{where}image"


def resolve_image(root: str | os.PathLike, file_name: str, *, image_id: int | None = None,
                  source: str | os.PathLike | None = None) -> Path:
    """The path of ``file_name`` (a COCO image entry) under the image folder ``root``.

    ``file_name`` must be a non-empty relative path with ``/`` separators that stays inside
    ``root``; anything else is a ``ValueError`` (``TypeError`` for a non-string) naming
    ``image_id``, ``file_name`` and ``source`` (the annotation file, for the message). The file's
    existence is not checked here. See the module docstring for symbolic links.

    Example:
        >>> resolve_image("coco/images", "train/0001.jpg").as_posix()
        'coco/images/train/0001.jpg'
    """
    who = _entry(image_id, source)
    if not isinstance(file_name, str):
        raise TypeError(f"{who}: file_name must be a string, got {type(file_name).__name__} {file_name!r:.80}")
    if not isinstance(root, str | os.PathLike):
        raise TypeError(f"image root must be a path, got {type(root).__name__} {root!r:.80}")

    def refuse(why: str) -> None:
        raise ValueError(f"{who}: file_name {file_name!r:.200} {why}; it must be a relative path "
                         "inside the image folder (like 'train/0001.jpg')")

    if not file_name.strip():
        refuse("is empty")
    if "\x00" in file_name:
        refuse("contains a NUL byte")
    if "\\" in file_name:
        refuse("contains a backslash (a Windows separator here, a name character on POSIX: use '/')")
    windows = PureWindowsPath(file_name)
    if file_name.startswith("/") or windows.drive or windows.root:
        refuse("is an absolute path")
    parts = PurePosixPath(file_name).parts
    if ".." in parts:
        refuse("contains '..', which would leave the image folder")
    if not parts:
        refuse("names the image folder itself")
    return Path(root).joinpath(*parts)


def _gray_to_rgb(a: np.ndarray) -> np.ndarray:
    return np.repeat(a[..., None], 3, axis=2)


def decode_image(im: Image.Image, *, name: str = "image") -> np.ndarray:
    """``(H, W, 3)`` pixels of ``im`` in their real range: ``uint8`` for 8-bit images, ``float32``
    in 0..1 for deeper ones (see the module docstring); ``name`` is used in error messages.

    ``I`` (32-bit integer) images are read as 16-bit data (what PNG and TIFF readers produce) and
    must lie in 0..65535; ``F`` (float) images must be finite and in 0..1. Either outside its
    range is an ``OSError`` naming the file, not a guess.
    """
    if not isinstance(im, Image.Image):
        raise TypeError(f"decode_image: im must be a PIL.Image.Image, got {type(im).__name__}")
    mode = im.mode
    if mode.startswith("I;16"):  # I;16, I;16L, I;16B, I;16N: unsigned 16-bit grey
        return _gray_to_rgb(np.asarray(im).astype(np.float32) / 65535.0)
    if mode == "I":
        a = np.asarray(im)
        lo, hi = (int(a.min()), int(a.max())) if a.size else (0, 0)
        if lo < 0 or hi > 65535:
            raise OSError(f"cannot read {name}: 32-bit integer image with values {lo}..{hi}, outside the "
                          "16-bit range 0..65535 that visattn reads such images as")
        return _gray_to_rgb(a.astype(np.float32) / 65535.0)
    if mode == "F":
        a = np.asarray(im, dtype=np.float32)
        if a.size and (not np.isfinite(a).all() or a.min() < 0.0 or a.max() > 1.0):
            raise OSError(f"cannot read {name}: float image with values {np.nanmin(a):g}..{np.nanmax(a):g} "
                          "(or not finite); float images must be in 0..1")
        return _gray_to_rgb(np.ascontiguousarray(a))
    if mode in ("1", "L", "LA", "La", "PA"):
        return _gray_to_rgb(np.asarray(im.convert("L")))
    if mode == "P":  # palette; with transparency via RGBA, whose alpha is then dropped
        return np.asarray(im.convert("RGBA" if "transparency" in im.info else "RGB"))[..., :3].copy()
    if mode == "RGB":
        return np.asarray(im).copy()
    try:
        return np.asarray(im.convert("RGB")).copy()
    except (ValueError, OSError) as e:
        raise OSError(f"cannot read {name}: image mode {mode!r} has no conversion to RGB ({e})") from None


def orient_image(im: Image.Image, width: int | None, height: int | None, *, image_id: int | None = None,
                 path: str | os.PathLike | None = None) -> Image.Image:
    """``im`` the way up its annotations were made, checked against the JSON's ``width``/``height``
    (``None`` when the JSON has none); the rule is in the module docstring. A size that matches
    neither the stored nor the EXIF-transposed pixels is a ``ValueError`` naming the image, its
    file and both sizes.
    """
    who = f"{_entry(image_id, None)} ({path})" if path is not None else _entry(image_id, None)
    raw = im.size  # (W, H)
    try:
        orientation = int(im.getexif().get(_EXIF_ORIENTATION, 1) or 1)
    except (ValueError, TypeError, OSError):  # an unreadable EXIF block orients nothing
        orientation = 1
    rotated = orientation in range(2, 9)
    turned = (raw[1], raw[0]) if orientation in _SWAPS_SIDES else raw
    if width is None or height is None:
        if rotated:
            raise ValueError(f"{who}: the file has EXIF orientation {orientation} and its JSON entry has no "
                             "width/height, so it is unknown whether the boxes are in the stored or the "
                             f"rotated pixels; add width and height (stored: {raw[0]}x{raw[1]})")
        return im
    want = (width, height)
    if raw == want:
        return im
    if rotated and turned == want:
        return ImageOps.exif_transpose(im)
    extra = f", {turned[0]}x{turned[1]} after its EXIF orientation {orientation}" if turned != raw else ""
    raise ValueError(f"{who}: the JSON says width x height = {width}x{height} but the file is "
                     f"{raw[0]}x{raw[1]}{extra}; its boxes would be dropped or misplaced")


def read_image(path: str | os.PathLike, *, width: int | None = None, height: int | None = None,
               image_id: int | None = None) -> np.ndarray:
    """Open, orient (:func:`orient_image`) and decode (:func:`decode_image`) one image file.

    A missing file is a ``FileNotFoundError`` and an unreadable one an ``OSError``, both naming it.
    """
    check_pathlike("path", path)
    check_int("width", width, minimum=1, optional=True)
    check_int("height", height, minimum=1, optional=True)
    path = Path(path)
    return _read(path, lambda im: orient_image(im, width, height, image_id=image_id, path=path))


def read_upright(path: str | os.PathLike) -> np.ndarray:
    """Open and decode an image file that has no annotations, turned the way its EXIF orientation
    says, as a viewer shows it (``PIL.ImageOps.exif_transpose``; an unreadable EXIF block orients
    nothing). Errors as :func:`read_image`'s."""
    check_pathlike("path", path)

    def upright(im: Image.Image) -> Image.Image:
        try:
            return ImageOps.exif_transpose(im)
        except (ValueError, TypeError, OSError):
            return im

    return _read(Path(path), upright)


def _read(path: Path, orient) -> np.ndarray:
    """``decode_image(orient(PIL image))`` of ``path``, with errors naming the file."""
    try:
        with Image.open(path) as im:
            return decode_image(orient(im), name=str(path))
    except FileNotFoundError:
        raise FileNotFoundError(f"image file not found: {path}") from None
    except Image.DecompressionBombError as e:
        raise OSError(f"cannot read image {path}: {e}") from None
    except OSError as e:
        if str(path) in str(e):
            raise
        raise OSError(f"cannot read image {path}: {e}") from None
