"""Sliced (tiled) inference for small objects in large images.

Slicing Aided Hyper Inference (SAHI): Akyon, Altinuc and Temizel, "Slicing Aided Hyper Inference and
Fine-tuning for Small Object Detection", ICIP 2022, https://arxiv.org/abs/2202.06934. A large image
is cut into overlapping tiles that the detector sees at their own resolution (a 6 px object stays
6 px instead of shrinking to 1 px when a 2048 px image is resized to the detector's 512), an
optional full-image pass adds the large objects, and the predictions are merged back into one set.

What differs from SAHI's own implementation:

- **Batched tiles**: tiles go through the detector ``batch_size`` at a time as one list (one
  forward per batch); SAHI's torchvision wrapper runs them one by one.
- **Tiles at their own resolution**: a torchvision detector resizes every input to its
  ``min_size``/``max_size``; with ``resize="native"`` (default) the detector's transform is set to
  the tile's size for the tile pass and restored afterwards (also on an error), so tiles are never
  rescaled. The full-image pass uses the detector's own setting (the whole image at the size the
  model was trained for).
- **Occlusion-safe merging** (``occlusion_safe=True``, default): merging is for one object seen by
  two tiles (or a tile and the full image), never for two objects that one tile saw side by side,
  one hiding the other. So (1) two boxes from the same tile (or both from the full image) never
  merge or suppress each other: the detector's own NMS already decided they are two objects;
  (2) a merged group holds at most one box per tile, the best-matching one; (3) two boxes from
  different sources may match only if one of them is cut by a seam (an edge of its tile inside the
  image, within ``seam_margin`` pixels) or each lies inside the other's tile (an object in the
  overlap both tiles saw); (4) only a view cut by a seam grows the merged box (the union of the
  parts of an object split between tiles); a second whole view of an object already kept is
  absorbed without enlarging it (as NMS would). ``occlusion_safe=False`` is SAHI's rule exactly (every same-class pair
  above the threshold merges), which fuses neighbouring occluded objects (sahi#560).

Merge rules (per class, as SAHI defines them; ``match`` is ``"iou"`` or ``"ios"``, intersection
over the smaller box, and a pair matches when its value is ``>= threshold``; candidates are taken
in descending score, ties broken by the box's ``x1, y1, x2, y2``):

- ``"nms"``: each kept box suppresses its matches (without occlusion safety and with ``"iou"``
  this is :func:`torchvision.ops.batched_nms`, which suppresses ``> threshold``);
- ``"greedy_nmm"``: each kept box absorbs its matches among the boxes not yet taken;
- ``"nmm"``: like ``greedy_nmm``, but a box that was absorbed passes its own matches on to its keeper
  (transitive merging);

and for the two merging rules, the absorbed boxes are merged one by one into the keeper while they
still match the growing box: box = union, score = maximum, mask = pixel-wise maximum.
"""
from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import batched_nms, box_iou

from ._checks import check_bool, check_choice, check_int, check_real

__all__ = ["IMAGE_SUFFIXES", "MATCHES", "MERGES", "RESIZES", "SlicingConfig", "load_detector", "merge_predictions",
           "predict_folder", "predict_images", "sliced_predict", "tile_starts", "tile_windows"]

MERGES = ("nms", "nmm", "greedy_nmm")
MATCHES = ("iou", "ios")
RESIZES = ("native", "model")


# --------------------------------------------------------------------------------------------------
# Arguments


def _check_size(name: str, value) -> tuple[int, int]:
    """An int side or ``(width, height)`` -> ``(width, height)``, each >= 1."""
    if isinstance(value, list | tuple):
        if len(value) != 2:
            raise ValueError(f"{name} must be an int or (width, height), got {len(value)} values {value!r:.60}")
        w, h = (check_int(f"{name}[{i}]", v, 1) for i, v in enumerate(value))
        return w, h
    side = check_int(name, value, 1)
    return side, side


@dataclass(frozen=True)
class SlicingConfig:
    """Settings of :func:`sliced_predict`, as one value (``DetectionModule(slicing=...)``, configs).

    ``slice_size`` is one side or ``(width, height)``; see :func:`sliced_predict` for the rest.
    Checked on creation (an error names the field).

    Example:
        >>> cfg = SlicingConfig(slice_size=256, overlap=0.2, merge="greedy_nmm", match="ios")
        >>> out = sliced_predict(model, image, **cfg.kwargs())
    """

    slice_size: int | tuple[int, int] = 512
    overlap: float = 0.2
    full_image: bool = True
    merge: str = "nms"
    match: str = "iou"
    threshold: float = 0.5
    batch_size: int = 8
    occlusion_safe: bool = True
    resize: str = "native"
    score_threshold: float = 0.0
    max_detections: int | None = 100
    seam_margin: float = 2.0

    def __post_init__(self) -> None:
        size = self.slice_size
        if isinstance(size, list):
            object.__setattr__(self, "slice_size", tuple(size))
        _check_size("slice_size", self.slice_size)
        check_real("overlap", self.overlap, 0.0, 1.0, hi_open=True)
        check_bool("full_image", self.full_image)
        check_choice("merge", self.merge, MERGES)
        check_choice("match", self.match, MATCHES)
        check_real("threshold", self.threshold, 0.0, 1.0, lo_open=True)
        check_int("batch_size", self.batch_size, 1)
        check_bool("occlusion_safe", self.occlusion_safe)
        check_choice("resize", self.resize, RESIZES)
        check_real("score_threshold", self.score_threshold, 0.0, 1.0, hi_open=True)
        check_int("max_detections", self.max_detections, 1, optional=True)
        check_real("seam_margin", self.seam_margin, 0.0, math.inf, hi_open=True)

    @classmethod
    def coerce(cls, value, name: str = "slicing") -> SlicingConfig | None:
        """``None``, a :class:`SlicingConfig`, or a dict of its fields (unknown keys named)."""
        if value is None or isinstance(value, cls):
            return value
        if isinstance(value, dict):
            unknown = sorted(map(repr, set(value) - set(cls.__dataclass_fields__)))
            if unknown:
                raise ValueError(f"{name}: unknown setting(s) {unknown}; valid: {sorted(cls.__dataclass_fields__)}")
            return cls(**value)
        raise TypeError(f"{name} must be None, a SlicingConfig or a dict of its settings, got {type(value).__name__}")

    def kwargs(self) -> dict:
        """The keyword arguments of :func:`sliced_predict`."""
        return asdict(self)


# --------------------------------------------------------------------------------------------------
# Tiles


def tile_starts(length: int, tile: int, overlap: float) -> list[int]:
    """Start offsets of tiles of size ``tile`` along a side of ``length`` pixels.

    Consecutive tiles overlap by ``int(overlap * tile)`` pixels (SAHI's grid); the last tile is
    shifted back so it ends at the edge: every tile lies inside the image, none is padded. A side
    no longer than a tile has one tile at 0 (it is then the whole side, see :func:`tile_windows`).
    """
    check_int("length", length, 1)
    check_int("tile", tile, 1)
    check_real("overlap", overlap, 0.0, 1.0, hi_open=True)
    if length <= tile:
        return [0]
    step = max(1, tile - int(overlap * tile))
    starts = list(range(0, length - tile, step))
    return [*starts, length - tile]


def tile_windows(width: int, height: int, slice_size: int | tuple[int, int],
                 overlap: float = 0.2) -> list[tuple[int, int, int, int]]:
    """The tiles of a ``width`` x ``height`` image as ``(x0, y0, x1, y1)`` pixel windows, row by row.

    Every window is ``slice_size`` (one side or ``(width, height)``), or the whole side where the
    image is smaller; together they cover every pixel, and each lies inside the image.

    Example:
        >>> tile_windows(600, 300, 256, 0.2)[:3]
        [(0, 0, 256, 256), (205, 0, 461, 256), (344, 0, 600, 256)]
    """
    check_int("width", width, 1)
    check_int("height", height, 1)
    tw, th = _check_size("slice_size", slice_size)
    xs, ys = tile_starts(width, tw, overlap), tile_starts(height, th, overlap)
    return [(x, y, min(x + tw, width), min(y + th, height)) for y in ys for x in xs]


# --------------------------------------------------------------------------------------------------
# Merging


def _score_order(boxes: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """Indices by descending score, ties by ``x1, y1, x2, y2`` ascending (SAHI's order)."""
    keys = np.stack([boxes[:, 3].numpy(), boxes[:, 2].numpy(), boxes[:, 1].numpy(), boxes[:, 0].numpy(),
                     -scores.numpy()])
    return torch.from_numpy(np.lexsort(keys).astype(np.int64))


def _match_matrix(a: torch.Tensor, b: torch.Tensor, match: str) -> torch.Tensor:
    """(n, m) IoU or intersection over the smaller box; 0 where the denominator is 0."""
    if match == "iou":
        return box_iou(a, b).nan_to_num(0.0)
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])  # (n, m, 2)
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(dim=2)  # (n, m)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    smaller = torch.minimum(area_a[:, None], area_b[None, :])
    return torch.where(smaller > 0, inter / smaller.clamp(min=1e-12), torch.zeros_like(inter))


def _seam_pairs(boxes: torch.Tensor, sources: torch.Tensor, windows: torch.Tensor, image_wh: tuple[int, int],
                margin: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ok, cut)``: (n, n) bool, the pairs the occlusion-safe rule lets match (different sources;
    a box cut by a seam of its tile, or each box inside the other's tile), and (n,) bool, the boxes
    cut by a seam of their tile."""
    w, h = image_wh
    win = windows[sources]  # (n, 4) the tile each box came from
    # a seam is a tile edge inside the image; a box within `margin` of one is a cut view
    cut = (((boxes[:, 0] <= win[:, 0] + margin) & (win[:, 0] > 0))
           | ((boxes[:, 1] <= win[:, 1] + margin) & (win[:, 1] > 0))
           | ((boxes[:, 2] >= win[:, 2] - margin) & (win[:, 2] < w))
           | ((boxes[:, 3] >= win[:, 3] - margin) & (win[:, 3] < h)))  # (n,)
    # inside[i, j]: box i lies inside the tile of box j
    inside = ((boxes[:, None, 0] >= win[None, :, 0] - margin) & (boxes[:, None, 1] >= win[None, :, 1] - margin)
              & (boxes[:, None, 2] <= win[None, :, 2] + margin) & (boxes[:, None, 3] <= win[None, :, 3] + margin))
    other = sources[:, None] != sources[None, :]
    return other & (cut[:, None] | cut[None, :] | (inside & inside.T)), cut


def _groups_greedy(m: np.ndarray, ok: np.ndarray | None, src: np.ndarray | None, threshold: float
                   ) -> dict[int, list[int]]:
    """Greedy grouping over boxes already in score order (index = rank): each box not yet taken
    keeps itself and takes its matches among the later ones not yet taken. With ``ok`` (occlusion
    safe): only allowed pairs, at most one box per source, best match first."""
    n = m.shape[0]
    taken = np.zeros(n, dtype=bool)
    groups: dict[int, list[int]] = {}
    for i in range(n):
        if taken[i]:
            continue
        taken[i] = True
        cand = ~taken & (m[i] >= threshold)
        cand[: i + 1] = False
        if ok is not None:
            cand &= ok[i]
        idx = np.flatnonzero(cand)
        if ok is not None and len(idx):
            # best match first (ties: higher score), one per source, never the keeper's source
            seen, chosen = {int(src[i])}, []
            for j in idx[np.lexsort((idx, -m[i, idx]))]:
                if int(src[j]) not in seen:
                    seen.add(int(src[j]))
                    chosen.append(int(j))
            idx = np.array(sorted(chosen), dtype=np.int64)
        taken[idx] = True
        groups[i] = idx.tolist()
    return groups


def _groups_transitive(m: np.ndarray, ok: np.ndarray | None, src: np.ndarray | None, threshold: float
                       ) -> dict[int, list[int]]:
    """SAHI's non-greedy NMM over boxes in score order: a box absorbed into a keeper hands its own
    matches (lower-ranked, not yet assigned) to that keeper. With ``ok``: only allowed pairs, and a
    group never takes a second box of a source it holds."""
    n = m.shape[0]
    keeper = [-1] * n
    groups: dict[int, list[int]] = {}
    sources: dict[int, set[int]] = {}
    for i in range(n):
        if keeper[i] < 0:
            keeper[i] = i
            groups[i] = []
            sources[i] = {int(src[i])} if src is not None else set()
        k = keeper[i]
        cand = m[i] >= threshold
        cand[: i + 1] = False
        if ok is not None:
            cand &= ok[i]
        for j in np.flatnonzero(cand).tolist():
            if keeper[j] >= 0:
                continue
            if ok is not None:
                if int(src[j]) in sources[k]:
                    continue
                sources[k].add(int(src[j]))
            keeper[j] = k
            groups[k].append(j)
    return groups


def _pair_match(a: list[float], b: list[float], match: str) -> float:
    """IoU or IoS of two xyxy boxes (plain floats; 0 for empty boxes)."""
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    inter = max(iw, 0.0) * max(ih, 0.0)
    area_a, area_b = (a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1])
    denom = area_a + area_b - inter if match == "iou" else min(area_a, area_b)
    return inter / denom if denom > 0 else 0.0


def merge_predictions(boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, *, merge: str = "greedy_nmm",
                      match: str = "ios", threshold: float = 0.5, sources: torch.Tensor | None = None,
                      windows: torch.Tensor | None = None, image_size: tuple[int, int] | None = None,
                      occlusion_safe: bool = False, seam_margin: float = 2.0) -> list[tuple[int, list[int]]]:
    """Merge overlapping same-class predictions (see the module docstring for the rules).

    Args:
        boxes: ``(N, 4)`` xyxy in image pixels; scores ``(N,)``; labels ``(N,)`` int.
        merge / match / threshold: the rule, ``"nms"``, ``"nmm"`` or ``"greedy_nmm"``; ``"iou"`` or
            ``"ios"``; a pair matches at ``>= threshold``.
        sources: ``(N,)`` int, which window each box came from (index into ``windows``); needed
            with ``occlusion_safe``.
        windows: ``(S, 4)`` xyxy of every source (a tile, or the whole image for a full pass).
        image_size: ``(width, height)``, to tell seams (tile edges inside the image) from borders.
        occlusion_safe: the occlusion-safe rule; ``False`` is SAHI's.
        seam_margin: how close (pixels) to a seam a box's edge must be to count as cut by it.

    Returns:
        ``[(keeper, merged), ...]``: the index of each output box's keeper and the indices merged
        into it (in merge order; empty for ``"nms"``), by descending score of the keeper. The output
        box is the union of the keeper and ``merged``, its score the highest of them.
    """
    check_choice("merge", merge, MERGES)
    check_choice("match", match, MATCHES)
    check_real("threshold", threshold, 0.0, 1.0, lo_open=True)
    check_bool("occlusion_safe", occlusion_safe)
    n = boxes.shape[0]
    if boxes.ndim != 2 or boxes.shape[1] != 4 or scores.shape != (n,) or labels.shape != (n,):
        raise ValueError(f"boxes must be (N, 4) with scores and labels (N,), got {tuple(boxes.shape)}, "
                         f"{tuple(scores.shape)}, {tuple(labels.shape)}")
    check_real("seam_margin", seam_margin, 0.0, math.inf, hi_open=True)
    if occlusion_safe:
        if sources is None or windows is None or image_size is None:
            raise ValueError("occlusion_safe needs sources, windows and image_size")
        sources, windows = torch.as_tensor(sources), torch.as_tensor(windows, dtype=torch.float32)
        if windows.ndim != 2 or windows.shape[1] != 4:
            raise ValueError(f"windows must be (S, 4) xyxy, got {tuple(windows.shape)}")
        if sources.shape != (n,) or sources.is_floating_point():
            raise ValueError(f"sources must be (N,) ints (one per box), got {tuple(sources.shape)} {sources.dtype}")
        if n and not (0 <= int(sources.min()) and int(sources.max()) < len(windows)):
            raise ValueError(f"sources must index windows (0..{len(windows) - 1}), got "
                             f"{int(sources.min())}..{int(sources.max())}")
        image_size = _check_size("image_size", tuple(image_size) if isinstance(image_size, list) else image_size)
    if n == 0:
        return []
    boxes, scores, labels = boxes.detach().float().cpu(), scores.detach().float().cpu(), labels.detach().cpu()
    if merge == "nms" and match == "iou" and not occlusion_safe:
        keep = batched_nms(boxes, scores, labels, threshold)
        return [(i, []) for i in _sorted(keep, boxes, scores)]
    ok_all = src_all = cut = None
    if occlusion_safe:
        sources = sources.detach().cpu().long()
        ok_all, cut = _seam_pairs(boxes, sources, windows.detach().cpu().float(), image_size, seam_margin)
        ok_all, cut, src_all = ok_all.numpy(), cut.tolist(), sources.numpy()
    out: list[tuple[int, list[int]]] = []
    for label in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == label).flatten()
        idx = idx[_score_order(boxes[idx], scores[idx])]  # rank -> input index
        b = boxes[idx]
        m = _match_matrix(b, b, match).numpy()  # (k, k)
        idx_np = idx.numpy()
        ok = ok_all[np.ix_(idx_np, idx_np)] if ok_all is not None else None
        src = src_all[idx_np] if src_all is not None else None
        grouping = _groups_transitive if merge == "nmm" else _groups_greedy
        rows = b.tolist()
        for keep, members in grouping(m, ok, src, threshold).items():
            if merge == "nms":
                out.append((int(idx_np[keep]), []))
                continue
            # SAHI: merge one by one while each still matches the growing box. Occlusion safe: only
            # a view cut by a seam grows the box; a second whole view of the object is absorbed
            cur, merged = list(rows[keep]), []
            for j in members:
                grows = cut is None or cut[idx_np[keep]] or cut[idx_np[j]]
                # a whole second view that matches is absorbed: it scores no higher than the keeper
                if grows and _pair_match(cur, rows[j], match) >= threshold:
                    cur = [min(cur[0], rows[j][0]), min(cur[1], rows[j][1]), max(cur[2], rows[j][2]),
                           max(cur[3], rows[j][3])]
                    merged.append(int(idx_np[j]))
            out.append((int(idx_np[keep]), merged))
    keepers = torch.tensor([k for k, _ in out], dtype=torch.long)
    rank = {int(k): r for r, k in enumerate(_sorted(keepers, boxes, scores))}
    return sorted(out, key=lambda km: rank[km[0]])


def _sorted(keep: torch.Tensor, boxes: torch.Tensor, scores: torch.Tensor) -> list[int]:
    return keep[_score_order(boxes[keep], scores[keep])].tolist()


# --------------------------------------------------------------------------------------------------
# Sliced prediction


#: Limits of one image's tiling: more tiles than this, or tiles covering the image more than
#: ``MAX_COVERAGE`` times over (an overlap near 1), is refused rather than run for hours.
MAX_TILES = 1_000_000
MAX_COVERAGE = 64.0


def _transforms(detector) -> list:
    """The resizing transforms of a torchvision-style detector: its own ``transform`` (``min_size``
    and ``max_size``), else every :class:`GeneralizedRCNNTransform` inside it (a wrapper such as
    ``DetectionModule`` holds the detector as a submodule)."""
    t = getattr(detector, "transform", None)
    if hasattr(t, "min_size") and hasattr(t, "max_size"):
        return [t]
    if isinstance(detector, nn.Module):
        return [m for m in detector.modules() if isinstance(m, GeneralizedRCNNTransform)]
    return []


@contextlib.contextmanager
def _tile_resolution(detector, size_wh: tuple[int, int], enabled: bool) -> Iterator[None]:
    """Set a torchvision detector's resizing transform(s) (its own or, for a wrapper such as
    ``DetectionModule``, every one inside it) to keep inputs of ``size_wh`` at their size; restore
    them afterwards, also on an error. A detector without one gets its tiles as they are."""
    found = _transforms(detector) if enabled else []
    old = [(t.min_size, t.max_size) for t in found]
    for t in found:
        t.min_size, t.max_size = (min(size_wh),), max(size_wh)  # scale = 1 for a (w, h) input
    try:
        yield
    finally:
        for t, (lo, hi) in zip(found, old, strict=True):
            t.min_size, t.max_size = lo, hi


def _resized_is_empty(detector, height: int, width: int) -> bool:
    """Whether the detector's own resize would shrink a ``height x width`` image to 0 pixels on a
    side (a very thin image), as torchvision computes it."""
    for t in _transforms(detector):
        scale = min(float(t.min_size[-1]) / min(height, width), float(t.max_size) / max(height, width))
        if math.floor(height * scale) < 1 or math.floor(width * scale) < 1:
            return True
    return False


_TOLERANCE = 1e-3  # rounding slack on the 0..1 pixel range


def _input_dtype(detector) -> torch.dtype:
    """The floating dtype of the detector's parameters (float32 for a plain callable)."""
    if isinstance(detector, nn.Module):
        for p in detector.parameters():
            if p.is_floating_point():
                return p.dtype
    return torch.float32


def _as_image(image, name: str = "image", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(3, H, W)`` in 0..1 as ``dtype`` from a tensor or an ``(H, W, 3)`` numpy array (uint8 /
    uint16 scaled by their range, float taken as 0..1). Non-finite pixels, a float image outside
    0..1 (e.g. 0..255) and other integer types are errors naming ``name``."""
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"{name} as a numpy array must be (H, W, 3), got {image.shape}")
        t = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
        if image.dtype in (np.uint8, np.uint16):
            return t.float().div(255.0 if image.dtype == np.uint8 else 65535.0)
        if not np.issubdtype(image.dtype, np.floating):
            raise TypeError(f"{name} as a numpy array must be uint8, uint16 or float in 0..1, got {image.dtype}")
        image = t
    elif not isinstance(image, torch.Tensor):
        raise TypeError(f"{name} must be a (3, H, W) float tensor in 0..1 or an (H, W, 3) numpy array, "
                        f"got {type(image).__name__}")
    if image.ndim != 3 or image.shape[0] != 3 or not image.is_floating_point():
        raise ValueError(f"{name} must be a (3, H, W) float tensor, got {tuple(image.shape)} {image.dtype}")
    image = image.float()
    if image.numel():
        if not bool(torch.isfinite(image).all()):
            raise ValueError(f"{name} has non-finite (NaN or infinite) pixels")
        low, high = float(image.min()), float(image.max())
        if low < -_TOLERANCE or high > 1 + _TOLERANCE:
            hint = " (it looks like 0..255: divide by 255)" if high <= 255 + _TOLERANCE and low >= 0 else ""
            raise ValueError(f"{name} pixels must be in 0..1, got {low:g}..{high:g}{hint}")
    return image.to(dtype)


def _check_output(out, size_wh: tuple[int, int], has_masks: bool) -> dict:
    """One detector output in torchvision's format, checked (an error names what is wrong), with
    its boxes clipped to its ``(w, h)`` input; a mask-less empty output of a mask model gets
    empty masks."""
    where = "the detector's output"
    if not isinstance(out, dict):
        raise TypeError(f"{where} must be a dict (boxes, scores, labels[, masks]), got {type(out).__name__}")
    for key in ("boxes", "scores", "labels"):
        if not isinstance(out.get(key), torch.Tensor):
            raise TypeError(f"{where} needs {key!r} as a tensor, got {type(out.get(key)).__name__}")
    boxes, scores, labels = out["boxes"].detach(), out["scores"].detach(), out["labels"].detach()
    n = boxes.shape[0] if boxes.ndim else -1
    if boxes.shape != (n, 4) or scores.shape != (n,) or labels.shape != (n,):
        raise ValueError(f"{where}: boxes must be (N, 4) with scores and labels (N,), got "
                         f"{tuple(boxes.shape)}, {tuple(scores.shape)}, {tuple(labels.shape)}")
    if labels.is_floating_point() and not bool((labels == labels.round()).all()):
        raise ValueError(f"{where}: labels must be whole numbers, got {labels[labels != labels.round()][:3].tolist()}")
    w, h = size_wh
    checked = {"boxes": torch.stack([boxes[:, 0].clamp(0, w), boxes[:, 1].clamp(0, h), boxes[:, 2].clamp(0, w),
                                     boxes[:, 3].clamp(0, h)], 1) if n else boxes.reshape(0, 4),
               "scores": scores, "labels": labels}
    if has_masks:
        masks = out.get("masks")
        if masks is None and n == 0:
            masks = torch.zeros((0, 1, h, w))
        if not isinstance(masks, torch.Tensor) or masks.shape != (n, 1, h, w):
            got = tuple(masks.shape) if isinstance(masks, torch.Tensor) else type(masks).__name__
            raise ValueError(f"{where}: masks must be (N, 1, H, W) = {(n, 1, h, w)} for its {w}x{h} input "
                             f"(as torchvision's Mask R-CNN returns them), got {got}")
        checked["masks"] = masks.detach()
    return checked


def _run(detector: Callable, images: list[torch.Tensor]) -> list[dict]:
    outputs = detector(images)
    if not isinstance(outputs, list | tuple) or len(outputs) != len(images):
        raise TypeError(f"the detector must return one dict per input image (torchvision's format), got "
                        f"{type(outputs).__name__} of length {len(outputs) if hasattr(outputs, '__len__') else '?'}")
    return list(outputs)


def _nonzero_window(mask: torch.Tensor) -> tuple[int, int, torch.Tensor]:
    """``(dy, dx, window)``: the smallest window ``(1, h, w)`` (float32, CPU, a copy) of a
    ``(1, H, W)`` mask that holds all its non-zero pixels, and its offset; ``(0, 0, (1, 0, 0))``
    for an all-zero mask. A detector's masks are zero outside their box, so the window is about the
    box: pasting it is pasting the whole mask."""
    on = mask[0] != 0
    rows, cols = on.any(1).nonzero(), on.any(0).nonzero()  # (k, 1) indices
    if len(rows) == 0:
        return 0, 0, torch.zeros((1, 0, 0))
    y0, y1, x0, x1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    return y0, x0, mask[:, y0:y1, x0:x1].float().cpu().clone()


@torch.no_grad()
def sliced_predict(detector: Callable, image, *, slice_size: int | tuple[int, int], overlap: float = 0.2,
                   full_image: bool = True, merge: str = "nms", match: str = "iou", threshold: float = 0.5,
                   batch_size: int = 8, occlusion_safe: bool = True, resize: str = "native",
                   score_threshold: float = 0.0, max_detections: int | None = 100,
                   seam_margin: float = 2.0) -> dict[str, torch.Tensor]:
    """Detect on overlapping tiles of ``image`` (and optionally the whole image) and merge (SAHI).

    Args:
        detector: a torchvision-API detector in ``eval()`` mode (``detector(list[Tensor(3, h, w)])``
            -> ``[{"boxes", "scores", "labels"[, "masks"]}]``), e.g. from
            :func:`visattn.models.build_detector` or :func:`visattn.weights.load_pretrained`.
        image: ``(3, H, W)`` float tensor in 0..1 (or an ``(H, W, 3)`` numpy array, uint8 or 0..1).
        slice_size: tile side, or ``(width, height)``. For a model trained on 256 px images (or
            256 px crops, ``crop_size=256``), 256: tiles then look like what it was trained on.
        overlap: fraction of a tile shared with its neighbour, in [0, 1) (SAHI's default 0.2).
        full_image: also run the whole image (at the detector's own input size) for large objects;
            skipped when one tile is the whole image.
        merge / match / threshold: how duplicates are merged (module docstring). The default,
            NMS at IoU 0.5, is among the best on the large-scene benchmark and the simplest
            (``benchmarks/results/sliced-cpu.md``): at the low score thresholds of an evaluation, box
            merging also grows good boxes with weak matches (SAHI itself switches to NMS / IoU below a
            0.1 confidence threshold); ``"greedy_nmm"`` / ``"ios"`` (SAHI's defaults) joins the
            parts of objects split by a seam.
        batch_size: tiles per forward pass (results do not depend on it).
        occlusion_safe: never merge two boxes of one tile; one box per tile in a group; a pair
            from different tiles must straddle a seam or lie where both tiles saw it.
        resize: ``"native"``: tiles at their own resolution (the detector's ``transform`` min/max
            size set to the tile's for the tile pass, restored afterwards); ``"model"``: every tile
            is resized by the detector as it is configured (what SAHI does).
        score_threshold: drop detections scoring at or below this before merging.
        max_detections: keep the best this many after merging (``None``: all).
        seam_margin: pixels within which a box edge touches a seam.

    Returns:
        ``{"boxes": (N, 4) xyxy float in image pixels, "scores": (N,), "labels": (N,) int64}`` and
        ``"masks": (N, 1, H, W)`` float (tile masks pasted back; merged masks take the maximum)
        when the detector predicts masks; by descending score.

    Example:
        >>> model = visattn.weights.load_pretrained("fcos_resnet10t_eca.synth256")
        >>> out = sliced_predict(model, image, slice_size=256, overlap=0.2, batch_size=8)
    """
    cfg = SlicingConfig(slice_size=slice_size, overlap=overlap, full_image=full_image, merge=merge, match=match,
                        threshold=threshold, batch_size=batch_size, occlusion_safe=occlusion_safe, resize=resize,
                        score_threshold=score_threshold, max_detections=max_detections, seam_margin=seam_margin)
    if not callable(detector):
        raise TypeError(f"detector must be a callable torchvision-API detector, got {type(detector).__name__}")
    if isinstance(detector, nn.Module) and detector.training:
        raise ValueError("detector is in training mode; call detector.eval() first (in training mode torchvision "
                         "detectors need targets and return losses)")
    image = _as_image(image, dtype=_input_dtype(detector))
    _, height, width = image.shape
    if height == 0 or width == 0:
        raise ValueError(f"image is empty ({width}x{height} pixels)")
    tw, th = _check_size("slice_size", cfg.slice_size)
    steps = [len(tile_starts(length, tile, cfg.overlap)) for length, tile in ((width, tw), (height, th))]
    count = steps[0] * steps[1]
    coverage = count * min(tw, width) * min(th, height) / (width * height)
    if count > MAX_TILES or coverage > MAX_COVERAGE:
        raise ValueError(f"slice_size {cfg.slice_size} with overlap {cfg.overlap} cuts the {width}x{height} image "
                         f"into {count} tiles covering it {coverage:.0f} times over (limits: {MAX_TILES} tiles, "
                         f"{MAX_COVERAGE:.0f}x); use a lower overlap or larger tiles")
    windows = tile_windows(width, height, cfg.slice_size, cfg.overlap)
    tile_wh = (windows[0][2] - windows[0][0], windows[0][3] - windows[0][1])

    parts: list[tuple[int, dict]] = []  # (source index, output in that source's pixels)
    with _tile_resolution(detector, tile_wh, cfg.resize == "native"):
        for start in range(0, len(windows), cfg.batch_size):
            batch = windows[start:start + cfg.batch_size]
            crops = [image[:, y0:y1, x0:x1] for x0, y0, x1, y1 in batch]  # views, (3, th, tw) each
            parts += [(start + k, out) for k, out in enumerate(_run(detector, crops))]
    sources_xyxy = list(windows)
    if cfg.full_image and len(windows) > 1:
        if _resized_is_empty(detector, height, width):
            warnings.warn(f"full_image: the detector would resize the {width}x{height} image to 0 pixels on a "
                          "side; the full-image pass is skipped", stacklevel=2)
        else:
            sources_xyxy.append((0, 0, width, height))
            parts.append((len(windows), _run(detector, [image])[0]))
    has_masks = any(isinstance(out, dict) and "masks" in out for _, out in parts)
    parts = [(s, _check_output(out, (sources_xyxy[s][2] - sources_xyxy[s][0], sources_xyxy[s][3] - sources_xyxy[s][1]),
                               has_masks)) for s, out in parts]

    boxes, scores, labels, srcs, masks = [], [], [], [], []
    for s, out in parts:
        x0, y0 = sources_xyxy[s][:2]
        keep = out["scores"].detach() > cfg.score_threshold
        b = out["boxes"].detach()[keep].float().cpu()
        boxes.append(b + torch.tensor([x0, y0, x0, y0], dtype=b.dtype))  # tile -> image pixels
        scores.append(out["scores"].detach()[keep].float().cpu())
        labels.append(out["labels"].detach()[keep].cpu().long())
        srcs.append(torch.full((len(b),), s, dtype=torch.long))
        if has_masks:  # each kept as its non-zero window only: memory grows with objects, not tiles
            masks += [(s, *_nonzero_window(m)) for m in out["masks"].detach()[keep]]
    boxes_t, scores_t, labels_t = torch.cat(boxes), torch.cat(scores), torch.cat(labels)
    groups = merge_predictions(boxes_t, scores_t, labels_t, merge=cfg.merge, match=cfg.match,
                               threshold=cfg.threshold, sources=torch.cat(srcs),
                               windows=torch.tensor(sources_xyxy, dtype=torch.float32),
                               image_size=(width, height), occlusion_safe=cfg.occlusion_safe,
                               seam_margin=cfg.seam_margin)
    if cfg.max_detections is not None:
        groups = groups[:cfg.max_detections]
    rows, score_list = boxes_t.tolist(), scores_t.tolist()
    out_boxes, out_scores = [], []
    for k, merged in groups:
        members = [k, *merged]
        out_boxes.append([min(rows[i][0] for i in members), min(rows[i][1] for i in members),
                          max(rows[i][2] for i in members), max(rows[i][3] for i in members)])
        out_scores.append(max(score_list[i] for i in members))
    result = {"boxes": torch.tensor(out_boxes, dtype=torch.float32).reshape(-1, 4),
              "scores": torch.tensor(out_scores, dtype=torch.float32),
              "labels": labels_t[[k for k, _ in groups]].reshape(-1)}
    if has_masks:
        full = torch.zeros((len(groups), 1, height, width))
        for r, (k, merged) in enumerate(groups):
            for i in (k, *merged):
                s, dy, dx, m = masks[i]
                x0, y0, x1, y1 = sources_xyxy[s]
                y0, x0 = y0 + dy, x0 + dx  # the window's place in the image, cut to the source
                m = m[:, : max(0, y1 - y0), : max(0, x1 - x0)]
                region = full[r, :, y0:y0 + m.shape[1], x0:x0 + m.shape[2]]
                torch.maximum(region, m, out=region)
        result["masks"] = full
    return result


@torch.no_grad()
def predict_images(detector: Callable, images: Sequence, slicing: SlicingConfig | dict | None,
                   score_threshold: float = 0.0) -> list[dict]:
    """Predictions for ``images`` (each ``(3, H, W)`` in 0..1 or ``(H, W, 3)`` numpy): sliced per
    image with ``slicing`` (a :class:`SlicingConfig` or a dict of its fields), else one batched
    forward of the detector as configured. Detections scoring at or below ``score_threshold`` are
    dropped either way (sliced, ``slicing.score_threshold`` also drops them before merging)."""
    slicing = SlicingConfig.coerce(slicing)
    threshold = check_real("score_threshold", score_threshold, 0.0, 1.0, hi_open=True)
    dtype = _input_dtype(detector)
    images = [_as_image(im, f"images[{i}]", dtype) for i, im in enumerate(images)]
    if slicing is None:
        outputs = _run(detector, images)
    else:
        outputs = [sliced_predict(detector, im, **slicing.kwargs()) for im in images]
    if threshold > 0:
        outputs = [{k: (v[out["scores"] > threshold] if isinstance(v, torch.Tensor) and v.ndim and
                        len(v) == len(out["scores"]) else v) for k, v in out.items()} for out in outputs]
    return outputs



# --------------------------------------------------------------------------------------------------
# Whole folders (``visattn predict``)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def load_detector(*, weights: str | None = None, ckpt=None, config=None) -> nn.Module:
    """A detector in ``eval()`` mode from published ``weights`` (a name, sha256-verified) or from a
    Lightning checkpoint of your own (``ckpt``, verified: zip CRCs, ``weights_only=True``, keys and
    shapes) with the run's ``config`` (its ``config.yaml``, which says how to build the model)."""
    from . import weights as published
    from .lit.checkpoint import check_state_dict_matches

    if (weights is None) == (ckpt is None):
        raise ValueError("give exactly one of weights (a published name) or ckpt (a checkpoint path)")
    if weights is not None:
        if config is not None:
            raise ValueError("config is only for ckpt: published weights carry their own config")
        return published.load_pretrained(weights)
    if config is None:
        raise ValueError("ckpt needs config: the run's config.yaml, to build the model")
    from pathlib import Path

    model = published.build_from_config(published._model_config(Path(config)))
    state = published._state_dict_from_checkpoint(Path(ckpt))
    check_state_dict_matches(model.state_dict(), state, repr(str(ckpt)))
    model.load_state_dict(state, strict=True)
    return model.eval()


def predict_folder(detector: Callable, images, *, slicing: SlicingConfig | None = None, gt=None,
                   score_threshold: float = 0.0) -> list[dict]:
    """COCO results (``image_id, category_id, bbox`` xywh, ``score`` [, ``segmentation``]) for the
    images of a folder, sliced with ``slicing`` (``None``: one forward per image, as configured),
    without the detections scoring at or below ``score_threshold``.

    With ``gt`` (a COCO instances file), the images it lists are predicted, with its image ids, and
    labels ``1..K`` map to its category ids in ascending order (as in training); without it, every
    image file in the folder (sorted by name) gets id 1, 2, ... and ``category_id`` is the label.
    """
    from pathlib import Path

    from .data.coco import CategoryMap, load_coco
    from .data.images import read_image, resolve_image
    from .lit.detection import to_coco_results

    folder = Path(images)
    if not folder.is_dir():
        raise NotADirectoryError(f"images folder {str(folder)!r} does not exist or is not a folder")
    slicing = SlicingConfig.coerce(slicing)
    if gt is not None:
        data = load_coco(gt)
        entries = [(im["id"], resolve_image(folder, im["file_name"], image_id=im["id"], source=str(gt)), im)
                   for im in sorted(data["images"], key=lambda im: im["id"])]
        to_category = CategoryMap(data["categories"]).to_category
    else:
        files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise FileNotFoundError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) in {str(folder)!r}")
        entries = [(i + 1, p, {}) for i, p in enumerate(files)]
        to_category = None
    results: list[dict] = []
    for image_id, path, info in entries:
        pixels = read_image(path, width=info.get("width"), height=info.get("height"), image_id=image_id)
        tensor = _as_image(pixels if pixels.dtype == np.uint8 else pixels.astype(np.float32))
        output = predict_images(detector, [tensor], slicing, score_threshold)[0]
        labels = {int(v) for v in output["labels"].tolist()}
        mapping = to_category if to_category is not None else {v: v for v in labels}
        h, w = tensor.shape[1:]
        target = {"image_id": image_id, "orig_size": (h, w), "size": (h, w)}
        results += to_coco_results(output, target, mapping, with_masks="masks" in output)
    return results
