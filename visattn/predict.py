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
  absorbed without enlarging it (as NMS would); (5) a box cut by a seam is reconciled with a view of
  the same class from another source (the neighbouring tile or the full image) by containment, whatever
  ``merge`` and ``match`` are: the pair matches when the intersection covers ``threshold`` of the cut
  box's area (of the smaller one when both are cut), or when the pair's own ``match`` value does; so a
  256 px tile's cut piece of an object (IoU 0.43 with the whole view) is no longer reported next to it.
  Among tied scores the more complete view goes first: a box not cut by a seam before a cut one, a
  larger cut box before a smaller one. ``occlusion_safe=False`` is SAHI's rule exactly (every same-class
  pair above the threshold merges, no seam rule), which fuses neighbouring occluded objects (sahi#560).

Merge rules (per class, as SAHI defines them; ``match`` is ``"iou"`` or ``"ios"``, intersection
over the smaller box, and a pair matches when its value is ``>= threshold``; candidates are taken
in descending score, ties broken (occlusion safe) toward the more complete view, then by the box's
``x1, y1, x2, y2``, so that no result depends on the order of the input):

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


def _score_order(boxes: torch.Tensor, scores: torch.Tensor, cut: torch.Tensor | None = None) -> torch.Tensor:
    """Indices by descending score, ties by ``x1, y1, x2, y2`` ascending (SAHI's order). With ``cut``
    ((N,) bool, boxes cut by a seam), ties go to the more complete view first: uncut boxes, then cut
    ones by descending area (the order among uncut boxes is SAHI's)."""
    keys = [boxes[:, 3].numpy(), boxes[:, 2].numpy(), boxes[:, 1].numpy(), boxes[:, 0].numpy()]
    if cut is not None:
        area = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).numpy()
        keys += [np.where(cut.numpy(), -area, 0.0), cut.numpy()]
    return torch.from_numpy(np.lexsort(np.stack([*keys, -scores.numpy()])).astype(np.int64))


def _containment(boxes: torch.Tensor, cut: torch.Tensor) -> torch.Tensor:
    """(n, n) intersection over the area of the cut box of each pair (the larger value when both
    are cut, i.e. over the smaller box); 0 where neither is cut or a cut box has no area."""
    lt = torch.maximum(boxes[:, None, :2], boxes[None, :, :2])  # (n, n, 2)
    rb = torch.minimum(boxes[:, None, 2:], boxes[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(dim=2)  # (n, n)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])  # (n,)
    over = torch.where(cut & (area > 0), 1.0 / area.clamp(min=1e-12), torch.zeros_like(area))  # (n,)
    return inter * torch.maximum(over[:, None], over[None, :])


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


def _area(b: list[float]) -> float:
    return max(b[2] - b[0], 0.0) * max(b[3] - b[1], 0.0)


def _pair_match(a: list[float], b: list[float], match: str, cut_a: bool = False, cut_b: bool = False) -> float:
    """IoU or IoS of two xyxy boxes (plain floats; 0 for empty boxes), or, where it is larger, the
    intersection over the area of a box cut by a seam (``cut_a`` / ``cut_b``: see :func:`_containment`)."""
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    inter = max(iw, 0.0) * max(ih, 0.0)
    area_a, area_b = (a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1])
    denom = area_a + area_b - inter if match == "iou" else min(area_a, area_b)
    value = inter / denom if denom > 0 else 0.0
    for cut, area in ((cut_a, area_a), (cut_b, area_b)):
        if cut and area > 0:
            value = max(value, inter / area)
    return value


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
        occlusion_safe: the occlusion-safe rule, with seam reconciliation and ties broken toward the
            more complete view (module docstring); ``False`` is SAHI's.
        seam_margin: how close (pixels) to a seam a box's edge must be to count as cut by it.

    Returns:
        ``[(keeper, merged), ...]``: the index of each output box's keeper and the indices merged
        into it (in merge order), by descending score of the keeper. The output box is the union
        of the keeper and ``merged``, its score the highest of them. For ``"nms"`` the output box
        is the keeper's own (``merged`` is empty, except where an occlusion-safe keeper cut by a
        seam handed its place to a whole view it matched: then ``merged`` holds the cut box, whose
        score the output keeps). The result
        does not depend on the order of the input (up to exact duplicates).

    Non-finite boxes or scores and inverted boxes (``x2 < x1`` or ``y2 < y1``) are a ``ValueError``.
    """
    check_choice("merge", merge, MERGES)
    check_choice("match", match, MATCHES)
    check_real("threshold", threshold, 0.0, 1.0, lo_open=True)
    check_bool("occlusion_safe", occlusion_safe)
    for name, value in (("boxes", boxes), ("scores", scores), ("labels", labels)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(value).__name__}")
    n = boxes.shape[0] if boxes.ndim else -1
    if boxes.ndim != 2 or boxes.shape[1] != 4 or scores.shape != (n,) or labels.shape != (n,):
        raise ValueError(f"boxes must be (N, 4) with scores and labels (N,), got {tuple(boxes.shape)}, "
                         f"{tuple(scores.shape)}, {tuple(labels.shape)}")
    _check_boxes_scores(boxes.detach(), scores.detach(), "merge_predictions")
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
    ok_all = src_all = cut = cut_t = None
    if occlusion_safe:
        sources = sources.detach().cpu().long()
        ok_all, cut_t = _seam_pairs(boxes, sources, windows.detach().cpu().float(), image_size, seam_margin)
        ok_all, cut, src_all = ok_all.numpy(), cut_t.tolist(), sources.numpy()
    out: list[tuple[int, list[int]]] = []
    for label in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == label).flatten()
        idx = idx[_score_order(boxes[idx], scores[idx], None if cut_t is None else cut_t[idx])]  # rank -> index
        b = boxes[idx]
        m = _match_matrix(b, b, match)  # (k, k)
        if cut_t is not None:  # a box cut by a seam also matches what contains it (rule 5)
            m = torch.maximum(m, _containment(b, cut_t[idx]))
        m = m.numpy()
        idx_np = idx.numpy()
        ok = ok_all[np.ix_(idx_np, idx_np)] if ok_all is not None else None
        src = src_all[idx_np] if src_all is not None else None
        grouping = _groups_transitive if merge == "nmm" else _groups_greedy
        rows = b.tolist()
        for keep, members in grouping(m, ok, src, threshold).items():
            if merge == "nms":
                # occlusion safe: a keeper cut by a seam hands its place to the most complete
                # whole view it suppressed (the object is reported whole, at the group's best score)
                whole = [] if cut is None or not cut[idx_np[keep]] else [
                    j for j in members if not cut[idx_np[j]] and _pair_match(rows[j], rows[keep], match, False, True)
                    >= threshold]
                if whole:
                    best = max(whole, key=lambda j: (_area(rows[j]), -j))  # largest; then the higher ranked
                    out.append((int(idx_np[best]), [int(idx_np[keep])]))
                else:
                    out.append((int(idx_np[keep]), []))
                continue
            # SAHI: merge one by one while each still matches the growing box. Occlusion safe: only
            # a view cut by a seam grows the box; a second whole view of the object is absorbed
            cur, merged = list(rows[keep]), []
            for j in members:
                cut_k, cut_j = (False, False) if cut is None else (cut[idx_np[keep]], cut[idx_np[j]])
                grows = cut is None or cut_k or cut_j
                # a whole second view that matches is absorbed: it scores no higher than the keeper
                if grows and _pair_match(cur, rows[j], match, cut_k, cut_j) >= threshold:
                    cur = [min(cur[0], rows[j][0]), min(cur[1], rows[j][1]), max(cur[2], rows[j][2]),
                           max(cur[3], rows[j][3])]
                    merged.append(int(idx_np[j]))
            out.append((int(idx_np[keep]), merged))
    keepers = torch.tensor([k for k, _ in out], dtype=torch.long)
    rank = {int(k): r for r, k in enumerate(_sorted(keepers, boxes, scores, cut_t))}
    return sorted(out, key=lambda km: rank[km[0]])


def _sorted(keep: torch.Tensor, boxes: torch.Tensor, scores: torch.Tensor,
            cut: torch.Tensor | None = None) -> list[int]:
    return keep[_score_order(boxes[keep], scores[keep], None if cut is None else cut[keep])].tolist()


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


def _check_detector(detector) -> None:
    """A callable torchvision-API detector, in ``eval()`` mode if it is a module."""
    if not callable(detector):
        raise TypeError(f"detector must be a callable torchvision-API detector, got {type(detector).__name__}")
    if isinstance(detector, nn.Module) and detector.training:
        raise ValueError("detector is in training mode; call detector.eval() first (in training mode torchvision "
                         "detectors need targets and return losses)")


def _check_boxes_scores(boxes: torch.Tensor, scores: torch.Tensor, where: str) -> None:
    """Finite ``(N, 4)`` xyxy boxes with ``x1 <= x2``, ``y1 <= y2``, and finite ``(N,)`` scores."""
    if not len(boxes):
        return
    finite = torch.isfinite(boxes).all(1)
    if not bool(finite.all()):
        raise ValueError(f"{where}: boxes must be finite, got {int((~finite).sum())} non-finite (NaN or infinite) "
                         f"of {len(boxes)}, e.g. {boxes[~finite][0].tolist()}")
    if not bool(torch.isfinite(scores).all()):
        raise ValueError(f"{where}: scores must be finite, got non-finite (NaN or infinite) "
                         f"{scores[~torch.isfinite(scores)][:3].tolist()}")
    for axis, (lo, hi) in (("x", (0, 2)), ("y", (1, 3))):
        inverted = boxes[:, hi] < boxes[:, lo]
        if bool(inverted.any()):
            raise ValueError(f"{where}: boxes must be xyxy with {axis}1 <= {axis}2, got {int(inverted.sum())} with "
                             f"{axis}2 < {axis}1 (inverted), e.g. {boxes[inverted][0].tolist()}")


def _check_output(out, size_wh: tuple[int, int], has_masks: bool, where: str = "its input") -> dict:
    """One detector output in torchvision's format for the ``(w, h)`` input named ``where``,
    checked, with an error naming the problem and ``where``: a dict of ``(N, 4)`` boxes, ``(N,)``
    scores and labels (``(N, 1, h, w)`` masks with ``has_masks``); finite boxes with ``x1 <= x2``,
    ``y1 <= y2``; finite scores in 0..1; whole labels ``>= 0``; finite masks.

    Returns the boxes clipped to the input, without those that have no area left (a box wholly
    outside its tile, or of zero width or height), labels as int64, the other keys of ``out``
    (rows dropped alike); a mask-less empty output of a mask model gets empty masks.
    """
    what = f"the detector's output for {where}"
    if not isinstance(out, dict):
        raise TypeError(f"{what} must be a dict (boxes, scores, labels[, masks]), got {type(out).__name__}")
    for key in ("boxes", "scores", "labels"):
        if not isinstance(out.get(key), torch.Tensor):
            raise TypeError(f"{what} needs {key!r} as a tensor, got {type(out.get(key)).__name__}")
    boxes, scores, labels = out["boxes"].detach(), out["scores"].detach(), out["labels"].detach()
    n = boxes.shape[0] if boxes.ndim else -1
    if boxes.shape != (n, 4) or scores.shape != (n,) or labels.shape != (n,):
        raise ValueError(f"{what}: boxes must be (N, 4) with scores and labels (N,), got "
                         f"{tuple(boxes.shape)}, {tuple(scores.shape)}, {tuple(labels.shape)}")
    if labels.dtype == torch.bool or labels.is_complex():
        raise ValueError(f"{what}: labels must be whole numbers, got dtype {labels.dtype}")
    if labels.is_floating_point() and not bool((labels == labels.round()).all()):
        raise ValueError(f"{what}: labels must be whole numbers, got {labels[labels != labels.round()][:3].tolist()}")
    if n and int(labels.min()) < 0:
        raise ValueError(f"{what}: labels must be >= 0 (1..num_classes, 0 is background), got negative "
                         f"{sorted(set(labels[labels < 0].tolist()))[:3]}")
    _check_boxes_scores(boxes, scores, what)
    if n and (float(scores.min()) < 0 or float(scores.max()) > 1):
        raise ValueError(f"{what}: scores must be in 0..1 (probabilities, as torchvision's detectors return them), "
                         f"got {float(scores.min()):g}..{float(scores.max()):g}")
    w, h = size_wh
    masks = None
    if has_masks:
        masks = out.get("masks")
        if masks is None and n == 0:
            masks = torch.zeros((0, 1, h, w))
        if not isinstance(masks, torch.Tensor) or masks.shape != (n, 1, h, w):
            got = tuple(masks.shape) if isinstance(masks, torch.Tensor) else type(masks).__name__
            raise ValueError(f"{what}: masks must be (N, 1, H, W) = {(n, 1, h, w)} for its {w}x{h} input "
                             f"(as torchvision's Mask R-CNN returns them), got {got}")
        masks = masks.detach()
        if masks.numel() and not bool(torch.isfinite(masks).all()):
            raise ValueError(f"{what}: masks must be finite, got non-finite (NaN or infinite) values")
    clipped = torch.stack([boxes[:, 0].clamp(0, w), boxes[:, 1].clamp(0, h), boxes[:, 2].clamp(0, w),
                           boxes[:, 3].clamp(0, h)], 1) if n else boxes.reshape(0, 4)
    keep = (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])  # (N,) area left
    checked = {k: (v[keep] if isinstance(v, torch.Tensor) and v.ndim and len(v) == n else v)
               for k, v in out.items() if k not in ("boxes", "scores", "labels", "masks")}
    checked.update(boxes=clipped[keep], scores=scores[keep], labels=labels[keep].long())
    if masks is not None:
        checked["masks"] = masks[keep]
    return checked


def _run(detector: Callable, images: list[torch.Tensor], where: str = "the images") -> list[dict]:
    outputs = detector(images)
    if not isinstance(outputs, list | tuple) or len(outputs) != len(images):
        raise TypeError(f"the detector must return one dict per input image (torchvision's format), got "
                        f"{type(outputs).__name__} of length {len(outputs) if hasattr(outputs, '__len__') else '?'} "
                        f"for {len(images)} input(s) ({where})")
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
            from different tiles must straddle a seam or lie where both tiles saw it; a box cut by
            a seam is reconciled with a view that contains it (intersection over the cut box's area
            ``>= threshold``) under every ``merge`` / ``match``, and tied scores keep the more
            complete view (module docstring).
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

    Every detector output is checked before merging: a ``ValueError`` naming the tile (or the
    full-image pass) and the problem for non-finite boxes, scores or masks, inverted boxes
    (``x2 < x1`` or ``y2 < y1``), negative or fractional labels, scores outside 0..1, and lengths or
    mask sizes that disagree. Boxes are clipped to their tile; one left with no area (wholly outside
    it, or of zero width or height) is dropped. An empty image, or with ``resize="model"`` tiles that
    the detector's resize would shrink to 0 pixels on a side, is a ``ValueError``.

    Example:
        >>> model = visattn.weights.load_pretrained("fcos_resnet10t_eca.synth256")
        >>> out = sliced_predict(model, image, slice_size=256, overlap=0.2, batch_size=8)
    """
    cfg = SlicingConfig(slice_size=slice_size, overlap=overlap, full_image=full_image, merge=merge, match=match,
                        threshold=threshold, batch_size=batch_size, occlusion_safe=occlusion_safe, resize=resize,
                        score_threshold=score_threshold, max_detections=max_detections, seam_margin=seam_margin)
    _check_detector(detector)
    return _sliced(detector, _as_image(image, dtype=_input_dtype(detector)), cfg, "image")


def _sliced(detector: Callable, image: torch.Tensor, cfg: SlicingConfig, name: str) -> dict[str, torch.Tensor]:
    """:func:`sliced_predict` of a checked ``(3, H, W)`` image; errors name it ``name``."""
    _, height, width = image.shape
    if height == 0 or width == 0:
        raise ValueError(f"{name} is empty ({width}x{height} pixels)")
    tw, th = _check_size("slice_size", cfg.slice_size)
    steps = [len(tile_starts(length, tile, cfg.overlap)) for length, tile in ((width, tw), (height, th))]
    count = steps[0] * steps[1]
    coverage = count * min(tw, width) * min(th, height) / (width * height)
    if count > MAX_TILES or coverage > MAX_COVERAGE:
        raise ValueError(f"{name}: slice_size {cfg.slice_size} with overlap {cfg.overlap} cuts the {width}x{height} "
                         f"image into {count} tiles covering it {coverage:.0f} times over (limits: {MAX_TILES} tiles, "
                         f"{MAX_COVERAGE:.0f}x); use a lower overlap or larger tiles")
    windows = tile_windows(width, height, cfg.slice_size, cfg.overlap)
    tile_wh = (windows[0][2] - windows[0][0], windows[0][3] - windows[0][1])
    if cfg.resize == "model" and _resized_is_empty(detector, tile_wh[1], tile_wh[0]):
        raise ValueError(f"{name}: a tile of {tile_wh[0]}x{tile_wh[1]} pixels would be resized by the detector "
                         "(resize='model') to 0 pixels on a side; use resize='native' (tiles at their own size) "
                         "or larger tiles")

    parts: list[tuple[int, dict]] = []  # (source index, output in that source's pixels)
    with _tile_resolution(detector, tile_wh, cfg.resize == "native"):
        for start in range(0, len(windows), cfg.batch_size):
            batch = windows[start:start + cfg.batch_size]
            crops = [image[:, y0:y1, x0:x1] for x0, y0, x1, y1 in batch]  # views, (3, th, tw) each
            outs = _run(detector, crops, f"{name}, tiles {start + 1}..{start + len(batch)}")
            parts += [(start + k, out) for k, out in enumerate(outs)]
    sources_xyxy = list(windows)
    if cfg.full_image and len(windows) > 1:
        if _resized_is_empty(detector, height, width):
            warnings.warn(f"full_image: the detector would resize the {width}x{height} image to 0 pixels on a "
                          "side; the full-image pass is skipped", stacklevel=2)
        else:
            sources_xyxy.append((0, 0, width, height))
            parts.append((len(windows), _run(detector, [image], f"{name}, full-image pass")[0]))
    has_masks = any(isinstance(out, dict) and "masks" in out for _, out in parts)

    def source(s: int) -> str:
        x0, y0, x1, y1 = sources_xyxy[s]
        if s == len(windows):
            return f"{name}, full-image pass"
        return f"{name}, tile {s + 1} of {len(windows)} (x {x0}..{x1}, y {y0}..{y1})"

    parts = [(s, _check_output(out, (sources_xyxy[s][2] - sources_xyxy[s][0], sources_xyxy[s][3] - sources_xyxy[s][1]),
                               has_masks, source(s))) for s, out in parts]

    boxes, scores, labels, srcs, masks = [], [], [], [], []
    for s, out in parts:
        x0, y0 = sources_xyxy[s][:2]
        keep = out["scores"] > cfg.score_threshold
        b = out["boxes"][keep].float().cpu()
        boxes.append(b + torch.tensor([x0, y0, x0, y0], dtype=b.dtype))  # tile -> image pixels
        scores.append(out["scores"][keep].float().cpu())
        labels.append(out["labels"][keep].cpu())
        srcs.append(torch.full((len(b),), s, dtype=torch.long))
        if has_masks:  # each kept as its non-zero window only: memory grows with objects, not tiles
            masks += [(s, *_nonzero_window(m)) for m in out["masks"][keep]]
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
        box_members = [k] if cfg.merge == "nms" else members  # nms: the keeper's box (a whole view)
        out_boxes.append([min(rows[i][0] for i in box_members), min(rows[i][1] for i in box_members),
                          max(rows[i][2] for i in box_members), max(rows[i][3] for i in box_members)])
        out_scores.append(max(score_list[i] for i in members))
    result = {"boxes": torch.tensor(out_boxes, dtype=torch.float32).reshape(-1, 4),
              "scores": torch.tensor(out_scores, dtype=torch.float32),
              "labels": labels_t[[k for k, _ in groups]].reshape(-1)}
    if has_masks:
        full = torch.zeros((len(groups), 1, height, width))
        for r, (k, merged) in enumerate(groups):
            for i in ((k,) if cfg.merge == "nms" else (k, *merged)):
                s, dy, dx, m = masks[i]
                x0, y0, x1, y1 = sources_xyxy[s]
                y0, x0 = y0 + dy, x0 + dx  # the window's place in the image, cut to the source
                m = m[:, : max(0, y1 - y0), : max(0, x1 - x0)]
                region = full[r, :, y0:y0 + m.shape[1], x0:x0 + m.shape[2]]
                torch.maximum(region, m, out=region)
        result["masks"] = full
    return result


def _check_whole_image(detector, image: torch.Tensor, name: str) -> None:
    """An image the detector can take whole: not empty, and not so thin that its resize would leave
    0 pixels on a side (torchvision then fails inside ``interpolate``)."""
    _, h, w = image.shape
    if h == 0 or w == 0:
        raise ValueError(f"{name} is empty ({w}x{h} pixels)")
    if _resized_is_empty(detector, h, w):
        sizes = ", ".join(f"min_size {t.min_size}, max_size {t.max_size}" for t in _transforms(detector))
        raise ValueError(f"{name} is {w}x{h} pixels: the detector's resize ({sizes}) would shrink it to 0 pixels "
                         "on a side; predict it sliced (slicing=..., `visattn predict --slice PX`), whose tiles keep "
                         "their own size, or pad it")


def _predict(detector: Callable, images: list[torch.Tensor], slicing: SlicingConfig | None, threshold: float,
             names: list[str]) -> list[dict]:
    """:func:`predict_images` of checked ``(3, H, W)`` tensors; errors name each by ``names``."""
    if not images:
        return []
    if slicing is None:
        for image, name in zip(images, names, strict=True):
            _check_whole_image(detector, image, name)
        outputs = _run(detector, images, ", ".join(names[:3]) + (", ..." if len(names) > 3 else ""))
        has_masks = any(isinstance(out, dict) and "masks" in out for out in outputs)
        outputs = [_check_output(out, (image.shape[2], image.shape[1]), has_masks, name)
                   for out, image, name in zip(outputs, images, names, strict=True)]
    else:
        outputs = [_sliced(detector, image, slicing, name) for image, name in zip(images, names, strict=True)]
    if threshold > 0:
        outputs = [{k: (v[out["scores"] > threshold] if isinstance(v, torch.Tensor) and v.ndim and
                        len(v) == len(out["scores"]) else v) for k, v in out.items()} for out in outputs]
    return outputs


@torch.no_grad()
def predict_images(detector: Callable, images: Sequence, slicing: SlicingConfig | dict | None,
                   score_threshold: float = 0.0) -> list[dict]:
    """Predictions for ``images`` (a list, each ``(3, H, W)`` in 0..1 or ``(H, W, 3)`` numpy): sliced
    per image with ``slicing`` (a :class:`SlicingConfig` or a dict of its fields), else one batched
    forward of the detector as configured. Detections scoring at or below ``score_threshold`` are
    dropped either way (sliced, ``slicing.score_threshold`` also drops them before merging).

    Every detector output is checked as in :func:`sliced_predict` (an error names ``images[i]``, and
    the tile), boxes are clipped to their image and those left with no area dropped, labels are
    int64. Without slicing, an empty image, or one so thin that the detector's resize would leave 0
    pixels on a side, is a ``ValueError`` naming it (slicing keeps tiles at their own size).
    """
    slicing = SlicingConfig.coerce(slicing)
    threshold = check_real("score_threshold", score_threshold, 0.0, 1.0, hi_open=True)
    _check_detector(detector)
    if isinstance(images, torch.Tensor | np.ndarray | str | bytes | dict) or not isinstance(images, Sequence):
        raise TypeError(f"images must be a list of images ((3, H, W) tensors or (H, W, 3) arrays), got "
                        f"{type(images).__name__}; wrap a single image in a list")
    dtype = _input_dtype(detector)
    names = [f"images[{i}]" for i in range(len(images))]
    tensors = [_as_image(im, name, dtype) for im, name in zip(images, names, strict=True)]
    return _predict(detector, tensors, slicing, threshold, names)



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


def _num_classes(detector) -> int | None:
    """The object classes (background excluded) a torchvision detector, or a wrapper holding one
    as ``.model`` (``DetectionModule``), predicts; ``None`` when it does not say."""
    from .lit.detection import detector_num_classes

    for module in (detector, getattr(detector, "model", None)):
        if isinstance(module, nn.Module):
            found = detector_num_classes(module)
            if found is not None:
                return found
    return None


@torch.no_grad()
def predict_folder(detector: Callable, images, *, slicing: SlicingConfig | dict | None = None, gt=None,
                   score_threshold: float = 0.0, on_image: Callable | None = None) -> list[dict]:
    """COCO results (``image_id, category_id, bbox`` xywh, ``score`` [, ``segmentation``]) for the
    images of a folder, sliced with ``slicing`` (``None``: one forward per image, as configured),
    without the detections scoring at or below ``score_threshold``.

    With ``gt`` (a COCO instances file), the images it lists are predicted, with its image ids and
    oriented as the data module does (its ``width``/``height`` decide whether EXIF applies), and
    labels ``1..K`` map to its ``K`` category ids in ascending order (as in training). ``K`` must be
    the detector's ``num_classes`` (read from the model; a ``ValueError`` before any image is read
    otherwise), and a label above ``K`` from a detector that does not say is an error naming the
    image: a detection is never dropped or relabelled silently. The published weights and run
    configs carry no class names today, so categories are matched by count and id order, not by
    name: a file with the same number of other classes is not detected.

    Without ``gt``, every image file in the folder (sorted by name) gets id 1, 2, ... and
    ``category_id`` is the label; each image is turned upright by its EXIF orientation (as a viewer
    shows it), and its boxes are in those upright pixels.

    Either way, label 0 (background, which a sigmoid head such as FCOS's may emit) is never
    written, and every detector output is checked as in :func:`predict_images`; errors name the
    image file.

    ``on_image(image_id, path, results)``, if given, is called after each image with its COCO
    results (``visattn predict`` counts images with it).
    """
    from pathlib import Path

    from ._checks import check_pathlike
    from .data.coco import CategoryMap, load_coco
    from .data.images import read_image, read_upright, resolve_image
    from .lit.detection import to_coco_results

    _check_detector(detector)
    check_pathlike("images", images)
    folder = Path(images)
    if not folder.is_dir():
        raise NotADirectoryError(f"images folder {str(folder)!r} does not exist or is not a folder")
    slicing = SlicingConfig.coerce(slicing)
    threshold = check_real("score_threshold", score_threshold, 0.0, 1.0, hi_open=True)
    if on_image is not None and not callable(on_image):
        raise TypeError(f"on_image must be None or a callable (image_id, path, results), got {type(on_image).__name__}")
    num_classes = _num_classes(detector)
    if gt is not None:
        check_pathlike("gt", gt)
        data = load_coco(gt)
        categories = CategoryMap(data["categories"])
        if num_classes is not None and num_classes != len(categories):
            raise ValueError(f"the detector was built for num_classes={num_classes} but the ground truth {str(gt)!r} "
                             f"has {len(categories)} categories ({', '.join(categories.names[:5])}"
                             f"{', ...' if len(categories) > 5 else ''}): its labels cannot be mapped onto them; "
                             "give the annotation file of the classes the model was trained on")
        entries = [(im["id"], resolve_image(folder, im["file_name"], image_id=im["id"], source=str(gt)), im)
                   for im in sorted(data["images"], key=lambda im: im["id"])]
        to_category = categories.to_category
    else:
        files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise FileNotFoundError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) in {str(folder)!r}")
        entries = [(i + 1, p, None) for i, p in enumerate(files)]
        to_category = None
    dtype = _input_dtype(detector)
    results: list[dict] = []
    for image_id, path, info in entries:
        name = f"{path} (image id {image_id})" if info is not None else str(path)
        if info is None:
            pixels = read_upright(path)  # no ground truth: as a viewer shows it (EXIF)
        else:
            pixels = read_image(path, width=info.get("width"), height=info.get("height"), image_id=image_id)
        tensor = _as_image(pixels if pixels.dtype == np.uint8 else pixels.astype(np.float32), name, dtype)
        output = _predict(detector, [tensor], slicing, threshold, [name])[0]
        labels = sorted({int(v) for v in output["labels"].tolist()})
        if to_category is not None:
            unknown = [v for v in labels if v > len(to_category)]
            if unknown:
                raise ValueError(f"{name}: the detector predicted label {unknown[0]} but the ground truth "
                                 f"{str(gt)!r} has {len(to_category)} categories (labels 1..{len(to_category)}); "
                                 "give the annotation file of the classes the model was trained on")
        mapping = to_category if to_category is not None else {v: v for v in labels if v >= 1}
        h, w = tensor.shape[1:]
        target = {"image_id": image_id, "orig_size": (h, w), "size": (h, w)}
        found = to_coco_results(output, target, mapping, with_masks="masks" in output)
        results += found
        if on_image is not None:
            on_image(image_id, path, found)
    return results
