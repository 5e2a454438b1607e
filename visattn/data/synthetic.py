"""A synthetic detection benchmark where every object's size and occlusion are known exactly.

Each image is a cluttered, textured background with objects of 8 classes (each its own shape and
texture, random colours) drawn back to front, so later objects hide earlier ones, plus class-less
occluders (bars and blobs) at random depths. Because every pixel's owner is known, each annotation
carries its visible mask, visible box and area, and the exact hidden fraction (``occlusion``) and
full (amodal) box. Sizes are skewed small, as in aerial and surveillance data.

The output is plain COCO (``images/`` + ``annotations/instances.json``) with two extra
per-annotation fields, ``occlusion`` (0..1) and ``amodal_bbox`` (COCO xywh), so any COCO tool reads it.

Large scenes: ``image_size`` is one side (square) or ``(width, height)`` in pixels (PIL's order and
the ``1536x1024`` of the command line), each side 32 to 8192, so a 2048 x 1536 aerial-like scene with
4-8 px objects is one setting: ``image_size=(2048, 1536), min_size=4, max_size_frac=0.1,
min_objects=40, max_objects=80``. Object sizes and occluders scale with the *shorter* side; a square
size gives exactly the images it always did.
"""
from __future__ import annotations

import contextlib
import math
import multiprocessing
import os
import shutil
import signal
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

from .._checks import check_bool, check_int, check_pathlike
from .._io import atomic_path, atomic_write_json
from .images import read_image, resolve_image

__all__ = ["CLASSES", "MAX_SIDE", "SynthConfig", "check_image_size", "generate_synthetic", "image_wh", "preview",
           "render_image"]

MAX_SIDE = 8192
CLASSES = ("disc", "square", "triangle", "star", "ring", "cross", "crescent", "hexagon")
_BACKGROUND, _OCCLUDER = -1, -2


@dataclass(frozen=True)
class SynthConfig:
    """Knobs of the generator (defaults give the mix the evaluation is designed around).

    ``image_size`` is an int (a square image) or ``(width, height)``; a list is taken as a tuple and
    a pair with equal sides as that int, so a setting has one spelling (and one cache key).
    ``max_size_frac`` is relative to the shorter side.
    """

    image_size: int | tuple[int, int] = 256
    min_objects: int = 4
    max_objects: int = 14
    max_occluders: int = 3
    min_size: float = 5.0            # object diameter, pixels
    max_size_frac: float = 0.55      # largest diameter as a fraction of the image side
    small_frac: float = 0.35         # share of objects drawn at 5-16 px
    medium_small_frac: float = 0.3   # share drawn at 16-32 px; the rest 32 px and up
    cluster_frac: float = 0.5        # share of objects placed next to an earlier one (they overlap)
    max_occlusion: float = 0.95      # objects hidden more than this are dropped, not labelled

    def __post_init__(self) -> None:
        object.__setattr__(self, "image_size", check_image_size("image_size", self.image_size))
        check_int("min_objects", self.min_objects, minimum=0)
        check_int("max_objects", self.max_objects, minimum=self.min_objects)
        check_int("max_occluders", self.max_occluders, minimum=0)
        for name in ("min_size", "max_size_frac", "small_frac", "medium_small_frac", "cluster_frac",
                     "max_occlusion"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise TypeError(f"SynthConfig.{name} must be a finite number, got {value!r:.60}")
        if not 1.0 <= self.min_size < 16.0:
            raise ValueError(f"SynthConfig.min_size must be in [1, 16) pixels (the small bin), got {self.min_size}")
        for name in ("max_size_frac", "small_frac", "medium_small_frac", "cluster_frac", "max_occlusion"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"SynthConfig.{name} must be in [0, 1], got {getattr(self, name)}")
        if self.small_frac + self.medium_small_frac > 1.0:
            raise ValueError(f"SynthConfig.small_frac + medium_small_frac must be <= 1, got "
                             f"{self.small_frac} + {self.medium_small_frac}")


def check_image_size(name: str, value) -> int | tuple[int, int]:
    """``value`` as an int side or a ``(width, height)`` tuple, each 32 to :data:`MAX_SIDE`; a
    pair with equal sides becomes that int. ``TypeError``/``ValueError`` name ``name``."""
    if isinstance(value, list | tuple):
        if len(value) != 2:
            raise ValueError(f"{name} must be an int or (width, height), got {len(value)} values {value!r:.60}")
        w, h = (check_int(f"{name}[{i}]", v, minimum=32) for i, v in enumerate(value))
        value = w if w == h else (w, h)
    else:
        if isinstance(value, str):
            raise TypeError(f"{name} must be an int or a (width, height) pair, got str {value!r:.60}")
        value = check_int(name, value, minimum=32)
    if max(image_wh(value)) > MAX_SIDE:
        raise ValueError(f"{name} sides must be <= {MAX_SIDE}, got {value!r}")
    return value


def image_wh(image_size: int | tuple[int, int]) -> tuple[int, int]:
    """``(width, height)`` of an ``image_size`` (an int is a square)."""
    if isinstance(image_size, tuple):
        return int(image_size[0]), int(image_size[1])
    return int(image_size), int(image_size)


# --------------------------------------------------------------------------------------------------
# Shapes and textures on a local (u, v) frame where the object spans [-1, 1]


def _shape(cls: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    r2 = u * u + v * v
    if cls == 0:   # disc
        return r2 <= 1.0
    if cls == 1:   # square
        return np.maximum(np.abs(u), np.abs(v)) <= 0.8
    if cls == 2:   # triangle, pointing up
        return (v <= 0.6) & (1.732 * u - v <= 1.0) & (-1.732 * u - v <= 1.0)
    if cls == 3:   # five-pointed star
        theta = np.arctan2(v, u)
        return np.sqrt(r2) <= 0.45 + 0.55 * ((np.cos(5 * theta) + 1) / 2) ** 2
    if cls == 4:   # ring
        return (r2 <= 1.0) & (r2 >= 0.5 ** 2)
    if cls == 5:   # cross
        return ((np.abs(u) <= 0.32) & (np.abs(v) <= 1.0)) | ((np.abs(v) <= 0.32) & (np.abs(u) <= 1.0))
    if cls == 6:   # crescent
        return (r2 <= 1.0) & ((u - 0.45) ** 2 + v * v >= 0.75 ** 2)
    # hexagon
    av, au = np.abs(v), np.abs(u)
    return (av <= 0.866) & (au + av * 0.577 <= 1.0)


def _texture(cls: int, u: np.ndarray, v: np.ndarray, freq: float) -> np.ndarray:
    """Per-class pattern in [0, 1] that mixes the object's two colours."""
    if cls == 0:
        return np.zeros_like(u)                                   # plain
    if cls == 1:
        return (np.sin(freq * u) > 0).astype(np.float32)          # stripes
    if cls == 2:
        return ((np.floor(freq * u / 3) + np.floor(freq * v / 3)) % 2).astype(np.float32)  # checker
    if cls == 3:
        return np.clip(0.5 - 0.5 * v, 0, 1)                       # vertical gradient
    if cls == 4:
        return (np.sin(freq * np.arctan2(v, u)) > 0).astype(np.float32)  # radial spokes
    if cls == 5:
        return ((np.sin(freq * u) * np.sin(freq * v)) > 0.3).astype(np.float32)  # dots
    if cls == 6:
        return (np.sin(freq * (u + v)) > 0).astype(np.float32)  # diagonal stripes
    return (np.sin(freq * np.sqrt(u * u + v * v) * 2) > 0).astype(np.float32)  # concentric rings


def _background(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """Low-frequency colour noise + a random grating + unlabelled clutter strokes, float 0..255,
    ``(h, w, 3)``. A square size draws exactly what the one-side version did."""
    side = min(w, h)
    coarse = rng.integers(0, 256, (rng.integers(3, 9), rng.integers(3, 9), 3), dtype=np.uint8)
    img = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BILINEAR), dtype=np.float32)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    a = rng.uniform(0, math.pi)
    grating = np.sin((np.cos(a) * xx + np.sin(a) * yy) * rng.uniform(0.1, 0.6))
    img += grating[..., None] * rng.uniform(5, 30) * rng.choice([-1, 1], 3)
    img += rng.normal(0, rng.uniform(3, 12), (h, w, 1)).astype(np.float32)
    clutter = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(clutter)
    for _ in range(rng.integers(4, 12)):  # thin strokes and faint ellipses: texture, not objects
        x0, y0 = rng.uniform(0, (w, h))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        if rng.random() < 0.6:
            x1, y1 = x0 + rng.normal(0, w / 4), y0 + rng.normal(0, h / 4)
            draw.line([(x0, y0), (x1, y1)], fill=colour, width=int(rng.integers(1, 3)))
        else:
            r = rng.uniform(4, side / 6)
            draw.ellipse([x0 - r, y0 - r * 0.6, x0 + r, y0 + r * 0.6], outline=colour, width=1)
    return np.asarray(clutter, dtype=np.float32)


def _size(rng: np.random.Generator, cfg: SynthConfig, side: int) -> float:
    p = rng.random()
    if p < cfg.small_frac:
        return rng.uniform(cfg.min_size, 16.0)
    if p < cfg.small_frac + cfg.medium_small_frac:
        return rng.uniform(16.0, 32.0)
    top = max(33.0, cfg.max_size_frac * side)
    return math.exp(rng.uniform(math.log(32.0), math.log(top)))


# --------------------------------------------------------------------------------------------------
# One image


def render_image(index: int, seed: int, cfg: SynthConfig = SynthConfig()) -> tuple[np.ndarray, list[dict]]:
    """Render image ``index`` of the dataset ``seed``: ``(H, W, 3) uint8`` (``cfg.image_size`` is
    ``(W, H)`` or one side) and its objects.

    Each object dict has ``category`` (0-based class index), ``mask`` (visible, bool H x W),
    ``visible``/``full`` pixel counts and ``amodal`` box (x, y, w, h). Deterministic in
    ``(index, seed, cfg)``, independent of other images.
    """
    check_int("index", index, minimum=0)
    check_int("seed", seed, minimum=0)
    if not isinstance(cfg, SynthConfig):
        raise TypeError(f"cfg must be a SynthConfig, got {type(cfg).__name__}")
    rng = np.random.default_rng([seed, index])
    w, h = image_wh(cfg.image_size)
    side = min(w, h)
    img = _background(rng, w, h)
    owner = np.full((h, w), _BACKGROUND, dtype=np.int16)
    n_obj = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    n_occ = int(rng.integers(0, cfg.max_occluders + 1))
    # depth order: objects and occluders interleaved; later = nearer the camera
    layers = ["obj"] * n_obj + ["occ"] * n_occ
    rng.shuffle(layers)
    objects: list[dict] = []
    centres: list[tuple[float, float, float]] = []
    for kind in layers:
        if kind == "occ":
            _draw_occluder(rng, img, owner, w, h)
            continue
        cls = int(rng.integers(len(CLASSES)))
        d = _size(rng, cfg, side)
        half = d / 2
        if centres and rng.random() < cfg.cluster_frac:
            cx0, cy0, d0 = centres[int(rng.integers(len(centres)))]
            off = rng.uniform(0.3, 0.8) * (d0 + d) / 2
            ang = rng.uniform(0, 2 * math.pi)
            cx, cy = cx0 + off * math.cos(ang), cy0 + off * math.sin(ang)
        else:
            cx, cy = rng.uniform(0, (w, h))
        cx = float(np.clip(cx, half + 1, w - half - 1))
        cy = float(np.clip(cy, half + 1, h - half - 1))
        x0, y0 = max(int(cx - half) - 1, 0), max(int(cy - half) - 1, 0)
        x1, y1 = min(int(cx + half) + 2, w), min(int(cy + half) + 2, h)
        yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
        ang = rng.uniform(0, 2 * math.pi)
        dx, dy = (xx + 0.5 - cx) / half, (yy + 0.5 - cy) / half
        u = math.cos(ang) * dx + math.sin(ang) * dy
        v = -math.sin(ang) * dx + math.cos(ang) * dy
        shape = _shape(cls, u, v)
        if shape.sum() < 4:
            continue
        c1, c2 = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
        t = _texture(cls, u, v, rng.uniform(6, 10))[..., None]
        colour = c1 * (1 - t) + c2 * t + rng.normal(0, 4, shape.shape + (1,))
        win = img[y0:y1, x0:x1]
        win[shape] = colour[shape]
        owner[y0:y1, x0:x1][shape] = len(objects)
        ys, xs = np.nonzero(shape)
        objects.append({"category": cls, "window": (x0, y0, x1, y1), "full": int(shape.sum()),
                        "amodal": (x0 + int(xs.min()), y0 + int(ys.min()),
                                   int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1))})
        centres.append((cx, cy, d))
    out = []
    for k, obj in enumerate(objects):
        x0, y0, x1, y1 = obj["window"]
        visible = owner[y0:y1, x0:x1] == k
        n_vis = int(visible.sum())
        if n_vis == 0 or 1 - n_vis / obj["full"] > cfg.max_occlusion:
            continue
        mask = np.zeros((h, w), dtype=bool)
        mask[y0:y1, x0:x1] = visible
        out.append({"category": obj["category"], "mask": mask, "visible": n_vis,
                    "full": obj["full"], "amodal": obj["amodal"]})
    return np.clip(img, 0, 255).astype(np.uint8), out


def _draw_occluder(rng: np.random.Generator, img: np.ndarray, owner: np.ndarray, w: int, h: int) -> None:
    """A class-less bar or blob, marked in ``owner`` so it hides what is behind it; sizes follow
    the shorter side."""
    size = min(w, h)
    layer = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(layer)
    cx, cy = rng.uniform(0, (w, h))
    if rng.random() < 0.5:  # bar
        length, width = rng.uniform(0.2, 0.7) * size, rng.uniform(3, 12)
        a = rng.uniform(0, math.pi)
        dx, dy = math.cos(a) * length / 2, math.sin(a) * length / 2
        draw.line([(cx - dx, cy - dy), (cx + dx, cy + dy)], fill=255, width=int(width))
    else:  # blob
        rx, ry = rng.uniform(6, max(6.0, size / 7), 2)  # small images: radius 6
        draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=255)
    m = np.asarray(layer) > 0
    img[m] = rng.integers(0, 256, 3) + rng.normal(0, 6, (int(m.sum()), 1))
    owner[m] = _OCCLUDER


# --------------------------------------------------------------------------------------------------
# The dataset


def _annotations(objects: list[dict], image_id: int) -> list[dict]:
    anns = []
    for obj in objects:
        rle = mask_utils.encode(np.asfortranarray(obj["mask"].astype(np.uint8)))
        x, y, w, h = (round(b) for b in mask_utils.toBbox(rle))
        anns.append({
            "image_id": image_id,
            "category_id": obj["category"] + 1,
            "bbox": [x, y, w, h],
            "area": obj["visible"],
            "segmentation": {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")},
            "iscrowd": 0,
            "occlusion": round(1.0 - obj["visible"] / obj["full"], 4),
            "amodal_bbox": list(obj["amodal"]),
        })
    return anns


def _render_and_save(args: tuple[int, int, SynthConfig, str]) -> tuple[int, list[dict]]:
    index, seed, cfg, image_dir = args
    img, objects = render_image(index, seed, cfg)
    with atomic_path(os.path.join(image_dir, f"{index:06d}.png")) as tmp:
        Image.fromarray(img).save(tmp, format="PNG", compress_level=1)
    return index, _annotations(objects, index + 1)


def _exit_with_parent(parent: int) -> None:
    """Worker initializer: die with the parent, even when it is killed with SIGKILL (Linux: the
    kernel's parent-death signal; elsewhere a thread that watches the parent id)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle: it ends the pool
    if sys.platform.startswith("linux"):
        try:
            import ctypes
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def _iter_rendered(jobs: list, workers: int) -> Iterator[tuple[int, list[dict]]]:
    """Render ``jobs`` in order; with ``workers > 1`` in a process pool that is terminated (not
    waited for) when the consumer stops early, on an exception, Ctrl-C or SIGTERM."""
    if workers <= 1:
        yield from map(_render_and_save, jobs)
        return
    pool = multiprocessing.Pool(workers, initializer=_exit_with_parent, initargs=(os.getpid(),))
    try:
        yield from pool.imap(_render_and_save, jobs, chunksize=max(1, min(8, len(jobs) // (4 * workers))))
        pool.close()
    finally:
        pool.terminate()
        pool.join()


@contextlib.contextmanager
def _sigterm_as_exit() -> Iterator[None]:
    """Turn SIGTERM into ``SystemExit`` while generating, so clean-up runs (the pool is terminated,
    the staging folder removed). Only where nobody else handles SIGTERM and on the main thread."""
    main = threading.current_thread() is threading.main_thread()
    if not main or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return

    def handler(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def _clean_stale_staging(out: Path) -> None:
    """Remove staging folders of ``out`` left by runs that were killed (their process is gone)."""
    prefix = f".{out.name}.partial-"
    if not out.parent.is_dir():
        return
    for entry in out.parent.iterdir():
        if not entry.name.startswith(prefix):
            continue
        pid = entry.name[len(prefix):].split("-")[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            shutil.rmtree(entry, ignore_errors=True)


@contextlib.contextmanager
def locked(folder: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``folder`` (created if needed) so concurrent writers take turns;
    POSIX ``flock`` on the folder itself (no lock file); elsewhere no lock."""
    folder.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # Windows
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _swap_in(stage: Path, out: Path) -> None:
    """Move the complete set in ``stage`` to ``out``. ``instances.json`` leaves first and comes
    back last, so at every instant ``out`` holds the old complete set, no annotations (nothing
    loads), or the new complete set. The old files go to ``stage`` and are removed with it."""
    out.mkdir(parents=True, exist_ok=True)
    old_json = out / "annotations" / "instances.json"
    if old_json.exists():
        os.replace(old_json, stage / "old-instances.json")
    if (out / "images").exists():
        os.replace(out / "images", stage / "old-images")
    os.replace(stage / "images", out / "images")
    (out / "annotations").mkdir(exist_ok=True)
    os.replace(stage / "annotations" / "instances.json", old_json)


def generate_synthetic(out_dir: str | os.PathLike, *, num_images: int, image_size: int | tuple[int, int] = 256,
                       seed: int = 0, workers: int = 1, progress: bool = False,
                       **config) -> Path:
    """Write a synthetic small/occluded-object dataset in COCO format and return ``out_dir``.

    Layout: ``out_dir/images/000000.png ...`` and ``out_dir/annotations/instances.json``. Every
    annotation has the COCO fields (``bbox`` = visible box, ``segmentation`` = visible mask as RLE,
    ``area`` = visible pixels, ``iscrowd`` = 0) plus ``occlusion`` (hidden fraction, exact from the
    masks) and ``amodal_bbox`` (the whole object's box). Objects hidden more than
    ``max_occlusion`` (0.95) are dropped. The same ``seed`` gives byte-identical JSON and images,
    whatever ``workers`` is. Extra keywords are :class:`SynthConfig` fields. ``image_size`` is one
    side or ``(width, height)`` (e.g. ``(1536, 1024)`` for a large landscape scene).

    The whole set is written to a staging folder beside ``out_dir``
    (``.<name>.partial-<pid>``) and swapped in when complete: ``out_dir/images`` is replaced
    as a whole and ``instances.json`` is moved in last, so a run that is interrupted, killed or
    out of disk leaves the previous complete set or no ``instances.json`` (nothing that loads), never
    new images beside old annotations. Other files in ``out_dir`` are left alone. Worker processes
    end with the run, also when it is killed; a later run removes stale staging folders of the
    same ``out_dir``.

    Example:
        >>> root = generate_synthetic("data/synth", num_images=500, image_size=256, seed=0)
    """
    check_pathlike("out_dir", out_dir)
    check_int("num_images", num_images, minimum=1)
    image_size = check_image_size("image_size", image_size)
    check_int("seed", seed, minimum=0)
    check_int("workers", workers, minimum=1)
    check_bool("progress", progress)
    unknown = set(config) - set(SynthConfig.__dataclass_fields__)
    if unknown:
        raise TypeError(f"generate_synthetic got unknown option(s) {sorted(unknown)}; "
                        f"valid: {sorted(SynthConfig.__dataclass_fields__)}")
    cfg = SynthConfig(image_size=image_size, **config)
    out = Path(out_dir).absolute()
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"out_dir exists and is not a folder: {out}")
    out.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale_staging(out)
    stage = out.parent / f".{out.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        with _sigterm_as_exit():
            _write_set(stage, cfg, num_images=num_images, seed=seed, workers=workers, progress=progress)
            with locked(out):
                _swap_in(stage, out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return Path(out_dir)


def _write_set(stage: Path, cfg: SynthConfig, *, num_images: int, seed: int, workers: int,
               progress: bool) -> None:
    """Render every image into ``stage/images`` and write ``stage/annotations/instances.json``."""
    image_dir = stage / "images"
    image_dir.mkdir(parents=True)
    jobs = [(i, seed, cfg, str(image_dir)) for i in range(num_images)]
    rendered = _iter_rendered(jobs, workers)
    results = rendered
    if progress:
        from tqdm import tqdm
        results = tqdm(rendered, total=num_images, desc="synth", unit="img")
    images, annotations = [], []
    width, height = image_wh(cfg.image_size)
    with contextlib.closing(rendered):  # ends the pool at once if anything below fails
        for index, anns in results:
            images.append({"id": index + 1, "file_name": f"{index:06d}.png", "width": width,
                           "height": height})
            annotations.extend(anns)
    for i, ann in enumerate(annotations, start=1):
        ann["id"] = i
    dataset = {
        "info": {"description": "visattn synthetic small/occluded objects", "seed": seed,
                 "num_images": num_images, "config": asdict(cfg)},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i + 1, "name": n, "supercategory": "shape"} for i, n in enumerate(CLASSES)],
    }
    atomic_write_json(stage / "annotations" / "instances.json", dataset, separators=(",", ":"))


def preview(root: str | os.PathLike, out_png: str | os.PathLike, *, num_images: int = 8,
            columns: int = 4) -> Path:
    """Draw the first ``num_images`` images of a dataset with boxes coloured by occlusion
    (green: none <= 0.1, orange: partial <= 0.5, red: heavy), tiled into one PNG written
    atomically. Images are looked up with :func:`~visattn.data.resolve_image` and read like the
    data module reads them (deeper than 8 bits: scaled to 8 for display)."""
    from .coco import load_coco

    check_pathlike("root", root)
    check_pathlike("out_png", out_png)
    check_int("num_images", num_images, minimum=1)
    check_int("columns", columns, minimum=1)
    root = Path(root)
    ann_path = root / "annotations" / "instances.json"
    data = load_coco(ann_path)
    by_image: dict[int, list[dict]] = {}
    for ann in data["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann)
    tiles = []
    for info in sorted(data["images"], key=lambda im: im["id"])[:num_images]:
        path = resolve_image(root / "images", info["file_name"], image_id=info["id"], source=ann_path)
        pixels = read_image(path, width=info.get("width"), height=info.get("height"), image_id=info["id"])
        if pixels.dtype != np.uint8:
            pixels = np.round(pixels * 255.0).astype(np.uint8)
        im = Image.fromarray(pixels)
        draw = ImageDraw.Draw(im)
        for ann in by_image.get(info["id"], []):
            occ = ann.get("occlusion", 0.0)
            colour = (0, 220, 0) if occ <= 0.1 else (255, 160, 0) if occ <= 0.5 else (255, 0, 0)
            x, y, w, h = ann["bbox"]
            draw.rectangle([x, y, x + w - 1, y + h - 1], outline=colour)
        tiles.append(im)
    if not tiles:
        raise ValueError(f"{root} has no images to preview")
    w, h = max(t.width for t in tiles), max(t.height for t in tiles)
    rows = math.ceil(len(tiles) / columns)
    sheet = Image.new("RGB", (w * min(columns, len(tiles)), h * rows), (255, 255, 255))
    for i, t in enumerate(tiles):
        sheet.paste(t, ((i % columns) * w, (i // columns) * h))
    out_png = Path(out_png)
    with atomic_path(out_png) as tmp:
        sheet.save(tmp, format=Image.registered_extensions().get(out_png.suffix.lower(), "PNG"))
    return out_png
