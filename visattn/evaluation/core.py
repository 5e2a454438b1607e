"""COCO evaluation with pycocotools (the metric of record) or faster-coco-eval, plus finer size
bins, occlusion buckets, occluded recall and per-class AP.

Everything goes through COCOeval's own matching; the extra numbers only change which ground truth
counts (``areaRng`` on a chosen attribute), exactly as COCO does for its small/medium/large split.
"""
from __future__ import annotations

import contextlib
import copy
import io
import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from pycocotools import mask as mask_utils

from .._checks import check_bool, check_choice, check_real, is_int, is_real
from .._io import read_json
from .._rle import rle_problem
from ..data.validate import IOU_TYPES, check_gt, read_gt

__all__ = [
    "BACKENDS", "OCCLUSION_BUCKETS", "SIZE_BINS", "STANDARD_KEYS", "evaluate", "load_gt", "load_predictions",
]

STANDARD_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
# AI-TOD size bins, by ground-truth area (pixels)
SIZE_BINS: dict[str, tuple[float, float]] = {
    "very_tiny": (0.0, 8.0 ** 2),
    "tiny": (8.0 ** 2, 16.0 ** 2),
    "small": (16.0 ** 2, 32.0 ** 2),
    "medium": (32.0 ** 2, 96.0 ** 2),
    "large": (96.0 ** 2, 1e10),
}
# hidden fraction; (low, high] except "none", which includes 0
OCCLUSION_BUCKETS: dict[str, tuple[float, float]] = {
    "none": (0.0, 0.1),
    "partial": (0.1, 0.5),
    "heavy": (0.5, 1.0),
}
_EPS = 1e-9
BACKENDS = ("pycocotools", "faster_coco_eval")


# --------------------------------------------------------------------------------------------------
# Argument checks: each names the bad argument and what was expected


_is_int, _is_real = is_int, is_real


def _finite(v) -> bool:
    return _is_real(v) and math.isfinite(v)


# --------------------------------------------------------------------------------------------------
# Inputs


def _backend(name: str):
    check_choice("backend", name, BACKENDS)
    if name == "pycocotools":
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
        return COCO, COCOeval
    from faster_coco_eval import COCO, COCOeval_faster
    return COCO, COCOeval_faster


def _check_iou_type(iou_type) -> str:
    return check_choice("iou_type", iou_type, IOU_TYPES)


def load_gt(gt, *, iou_type: str | None = None) -> dict:
    """The ground-truth dataset dict from a path, a dict or a loaded ``COCO`` object, checked.

    The check is the data loaders' (:func:`visattn.data.validate.check_gt`), so what
    :func:`visattn.data.load_coco` accepts for training is accepted here, and a file either
    refuses is refused by both with the same message. Errors name the entry: ``images``/
    ``categories``/``annotations`` are lists; image, category and annotation ids are unique ints;
    every image has a str ``file_name``; every annotation has an ``id``, refers to a known image
    and category and has a finite ``bbox`` ``[x, y, w, h]`` with ``w, h >= 0``, a finite
    ``area >= 0``, ``iscrowd`` 0 or 1 and, where present, a finite ``occlusion`` in [0, 1] and a
    ``segmentation`` that is polygons or a valid RLE. With ``iou_type="segm"`` every image needs
    ``height``/``width`` and every annotation polygons (>= 3 points) or an RLE ``segmentation``.
    Ground truth given as a dict or ``COCO`` is named ``gt`` in errors, each annotation with its
    id and image id. The dict is returned as given (not copied, not reordered).
    """
    if iou_type is not None:
        _check_iou_type(iou_type)
    if hasattr(gt, "dataset") and isinstance(gt.dataset, dict):
        data, source = gt.dataset, "gt (COCO object)"
    elif isinstance(gt, dict):
        data, source = gt, "gt"
    elif isinstance(gt, str | os.PathLike):
        data = read_gt(gt, iou_type=iou_type)
        data.setdefault("annotations", [])
        return data
    else:
        raise TypeError(f"gt must be a COCO instances JSON path, its dict or a pycocotools COCO, "
                        f"got {type(gt).__name__}")
    check_gt(data, source, iou_type=iou_type, name_ids=True)
    return data


def load_predictions(predictions) -> list[dict]:
    """A list of COCO result dicts from a list or a results JSON path (entries are checked by the
    functions that use them, against the ground truth)."""
    if isinstance(predictions, str | os.PathLike):
        path = Path(predictions)
        predictions = read_json(path, "predictions file")
        if not isinstance(predictions, list):
            # the file's content is wrong, not the argument's type
            raise ValueError(f"{path}: must hold a list of COCO result dicts, got {type(predictions).__name__}")  # noqa: TRY004
    if isinstance(predictions, tuple):
        predictions = list(predictions)
    if not isinstance(predictions, list):
        raise TypeError(f"predictions must be a list of COCO result dicts or a results JSON path, "
                        f"got {type(predictions).__name__}")
    return predictions


def _rle_prediction_problem(segm) -> str | None:
    """Why a predicted ``segmentation`` is not a compressed RLE of whole runs, or ``None``."""
    if not (isinstance(segm, dict) and isinstance(segm.get("counts"), str | bytes)):
        return "it must be a compressed RLE dict {'size': [h, w], 'counts': str} (pycocotools.mask.encode)"
    return rle_problem(segm)


def _check_entry(i: int, p, iou_type: str, need: tuple[str, ...], with_box: bool) -> None:
    """One prediction's types and values; the error names its index and image id."""
    if not isinstance(p, dict) or any(k not in p for k in need):
        raise ValueError(f"predictions[{i}] needs keys {', '.join(need)} for iou_type={iou_type!r}, "
                         f"got {p!r:.160}")
    where = f"predictions[{i}] (image_id={p['image_id']!r})"
    for key in ("image_id", "category_id"):
        if not _is_int(p[key]):
            raise ValueError(f"{where}: {key} must be an int, got {type(p[key]).__name__} {p[key]!r:.60}")
    if not _finite(p["score"]):
        raise ValueError(f"{where}: score must be a finite number, got {type(p['score']).__name__} {p['score']!r:.60}")
    if ("bbox" in p) != with_box:
        raise ValueError(f"{where}: {'has no' if with_box else 'has a'} 'bbox' where predictions[0] "
                         f"{'has one' if with_box else 'has none'}; give every prediction a box or none")
    if with_box:
        b = p["bbox"]
        if not (isinstance(b, list | tuple) and len(b) == 4 and all(_finite(v) for v in b)):
            raise ValueError(f"{where}: bbox must be 4 finite numbers [x, y, w, h], got {b!r:.120}")
        if b[2] < 0 or b[3] < 0:
            raise ValueError(f"{where}: bbox width and height must be >= 0, got {b!r:.120}")
    if iou_type == "segm" and (problem := _rle_prediction_problem(p["segmentation"])) is not None:
        raise ValueError(f"{where}: segmentation is not valid: {problem}; got {p['segmentation']!r:.120}")


def _check_predictions(gt: dict, preds: list[dict], iou_type: str) -> None:
    """Every prediction well formed and finite (the first bad one is named), and its image and
    category known to ``gt``; a warning when the boxes look like ``[x1, y1, x2, y2]``."""
    need = ("image_id", "category_id", "score", "bbox" if iou_type == "bbox" else "segmentation")
    with_box = iou_type == "bbox" or (bool(preds) and isinstance(preds[0], dict) and "bbox" in preds[0])
    for i, p in enumerate(preds):
        _check_entry(i, p, iou_type, need, with_box)
    images = {im["id"]: im for im in gt["images"]}
    cats = {c["id"] for c in gt["categories"]}
    bad_img = sorted({p["image_id"] for p in preds} - set(images), key=str)
    bad_cat = sorted({p["category_id"] for p in preds} - cats, key=str)
    if bad_img:
        raise ValueError(f"predictions refer to {len(bad_img)} image id(s) not in the ground truth: {bad_img[:10]}")
    if bad_cat:
        raise ValueError(f"predictions refer to category id(s) not in the ground truth: {bad_cat[:10]} "
                         f"(known: {sorted(cats)[:20]}...)")
    if iou_type == "segm":
        for i, p in enumerate(preds):
            im = images[p["image_id"]]
            if list(p["segmentation"]["size"]) != [im["height"], im["width"]]:
                raise ValueError(f"predictions[{i}] (image_id={p['image_id']!r}): segmentation size "
                                 f"{list(p['segmentation']['size'])} differs from the image's "
                                 f"[height, width] {[im['height'], im['width']]}")
    if with_box:
        past = 0
        for p in preds:
            im = images[p["image_id"]]
            x, y, w, h = p["bbox"]
            if "width" in im and "height" in im and (x + w > 1.1 * im["width"] or y + h > 1.1 * im["height"]):
                past += 1
        if preds and past / len(preds) > 0.5:
            warnings.warn(
                f"{past} of {len(preds)} predicted boxes run past the image edge; COCO boxes are "
                "[x, y, width, height] - these look like [x1, y1, x2, y2] (convert with "
                "torchvision.ops.box_convert(boxes, 'xyxy', 'xywh'))", stacklevel=3)


# --------------------------------------------------------------------------------------------------
# Canonical order: COCOeval breaks tied scores (and equal IoUs) by list order, so every entry point
# sorts its inputs first; results are then the same for any permutation of them.


def _pred_key(p: dict, iou_type: str) -> tuple:
    box = tuple(float(v) for v in p.get("bbox", ()))
    segm = ()
    if iou_type == "segm":
        counts = p["segmentation"]["counts"]
        segm = (tuple(p["segmentation"]["size"]), counts.decode("ascii") if isinstance(counts, bytes) else counts)
    return (p["image_id"], p["category_id"], -float(p["score"]), box, segm)


def canonical_order(preds: list[dict], iou_type: str) -> list[int]:
    """Indices that sort ``preds`` by image id, category id, descending score, then box and mask:
    a total order up to entries that are equal in everything COCOeval reads."""
    return sorted(range(len(preds)), key=lambda i: _pred_key(preds[i], iou_type))


def canonical_gt(gt: dict) -> dict:
    """A shallow copy of ``gt`` with images, categories and annotations sorted by id (annotations
    copied one level, so evaluators may write into them)."""
    by_id = lambda x: x["id"]
    return {**gt, "images": sorted(gt["images"], key=by_id), "categories": sorted(gt["categories"], key=by_id),
            "annotations": sorted((dict(a) for a in gt.get("annotations", [])), key=by_id)}


def prepare(gt, predictions, iou_type: str) -> tuple[dict, list[dict]]:
    """Load, check and canonically order the ground truth and predictions of a public entry point."""
    _check_iou_type(iou_type)
    gt_data = load_gt(gt, iou_type=iou_type)
    preds = load_predictions(predictions)
    _check_predictions(gt_data, preds, iou_type)
    return canonical_gt(gt_data), [preds[i] for i in canonical_order(preds, iou_type)]


def _coco(cls, dataset: dict):
    """The backend's ``COCO`` over ``dataset``. COCOeval writes into ground-truth annotations
    (``ignore``, masks turned to RLE), so it gets its own copy of each: the caller's dict, and the
    data module's cached ground truth, stay as they were."""
    dataset = {**dataset, "annotations": [dict(a) for a in dataset["annotations"]]}
    with contextlib.redirect_stdout(io.StringIO()):
        if cls.__module__.startswith("pycocotools"):
            c = cls()
            c.dataset = dataset
            c.createIndex()
            return c
        return cls(dataset)


def _load_res(gt_obj, preds: list[dict], area: float | None = None):
    """The backend's results object for ``preds`` (copied: loadRes writes into them); ``area``
    overrides every detection's area (see :func:`_bucket_eval`)."""
    with contextlib.redirect_stdout(io.StringIO()):
        dt_obj = gt_obj.loadRes(copy.deepcopy(preds))
    if area is not None:
        for ann in dt_obj.dataset["annotations"]:
            ann["area"] = area
    return dt_obj


def _evaluator(backend: str, gt_obj, dt_obj, iou_type: str, area_rngs: dict[str, tuple[float, float]] | None,
               iou_thrs: Sequence[float] | None = None):
    _, cls = _backend(backend)
    with contextlib.redirect_stdout(io.StringIO()):
        if backend == "faster_coco_eval":
            ev = cls(gt_obj, dt_obj, iou_type, print_function=lambda *a, **k: None)
        else:
            ev = cls(gt_obj, dt_obj, iou_type)
        if area_rngs is not None:
            ev.params.areaRng = [list(r) for r in area_rngs.values()]
            ev.params.areaRngLbl = list(area_rngs)
        if iou_thrs is not None:
            ev.params.iouThrs = np.asarray(iou_thrs, dtype=np.float64)
        ev.evaluate()
        ev.accumulate()
    return ev


def _mean_valid(a: np.ndarray) -> float:
    """Mean of the entries COCOeval filled in; -1 (n/a) when there are none (no ground truth)."""
    v = a[a > -1]
    return float(v.mean()) if v.size else -1.0


def _ap_ar(ev, a: int) -> tuple[float, float]:
    """AP (IoU .50:.95) and AR100 for area range index ``a``; -1 where it has no ground truth."""
    return _mean_valid(ev.eval["precision"][:, :, :, a, -1]), _mean_valid(ev.eval["recall"][:, :, a, -1])


def _curve(ev, a: int) -> list[float] | None:
    """Mean precision over classes at IoU 0.5 for each of COCO's 101 recall thresholds; ``None``
    when area range ``a`` has no ground truth (a class without it has -1 at every threshold)."""
    p = ev.eval["precision"][0, :, :, a, -1]  # (R, K)
    valid = p[0] > -1  # (K,) classes with ground truth in the range
    if not valid.any():
        return None
    return [round(float(row[valid].mean()), 5) for row in p]


# --------------------------------------------------------------------------------------------------
# Groups without predictions: what COCOeval would give, from the ground-truth counts alone
# (loadRes cannot take an empty list). A group with no ground truth is -1 (n/a), as COCOeval
# reports it when there are predictions; one with ground truth and no detection scores 0.


_ALL = (0.0, 1e10)
#: The area range of each of COCOeval's 12 summary numbers (its areaRng all / small / medium / large).
STANDARD_RANGES: dict[str, tuple[float, float]] = {
    **dict.fromkeys(("AP", "AP50", "AP75", "AR1", "AR10", "AR100"), _ALL),
    "APs": (0.0, 32.0 ** 2), "ARs": (0.0, 32.0 ** 2),
    "APm": (32.0 ** 2, 96.0 ** 2), "ARm": (32.0 ** 2, 96.0 ** 2),
    "APl": (96.0 ** 2, 1e10), "ARl": (96.0 ** 2, 1e10),
}


def gt_count(gt: dict, rng: tuple[float, float], key: str = "area", category: int | None = None) -> int:
    """Ground truth COCOeval scores in ``rng`` (``lo <= gt[key] <= hi``, not crowd; an annotation
    without ``key`` counts nowhere), of one ``category`` or all."""
    lo, hi = rng
    return sum(1 for a in gt.get("annotations", [])
               if not a.get("iscrowd", 0) and lo <= a.get(key, -1) <= hi
               and (category is None or a["category_id"] == category))


def empty_score(count: int) -> float:
    """A metric without predictions: 0.0 over ``count > 0`` objects, -1 (n/a) over none."""
    return 0.0 if count else -1.0


# --------------------------------------------------------------------------------------------------
# Buckets by an attribute other than area: rewrite "area" so COCOeval's range test selects them


def _with_area(dataset: dict, key: str, missing: float = -1.0) -> dict:
    """A shallow copy of ``dataset`` whose annotations' ``area`` is their ``key`` value."""
    anns = []
    for a in dataset["annotations"]:
        b = dict(a)
        b["area"] = float(a.get(key, missing)) if not a.get("iscrowd", 0) else missing
        anns.append(b)
    return {**dataset, "annotations": anns}


def _bucket_eval(backend, cls_coco, gt_dataset: dict, preds: list[dict], iou_type: str,
                 lo: float, hi: float, iou_thrs=None):
    """COCOeval where only ground truth with ``lo <= area <= hi`` counts (others ignored), and every
    unmatched detection is a false positive (its area is set inside the range)."""
    gt_obj = _coco(cls_coco, gt_dataset)
    dt_obj = _load_res(gt_obj, preds, area=(lo + hi) / 2)
    return _evaluator(backend, gt_obj, dt_obj, iou_type, {"bucket": (lo, hi)}, iou_thrs)


def occlusion_range(name: str) -> tuple[float, float]:
    lo, hi = OCCLUSION_BUCKETS[name]
    return (lo if name == "none" else lo + _EPS), hi


# --------------------------------------------------------------------------------------------------
# Occluded recall (Occluded / Separated COCO, Zhan et al., BMVC 2022)


def _iou(dets: list[dict], gts: list[dict], iou_type: str) -> np.ndarray:
    if not dets or not gts:
        return np.zeros((len(dets), len(gts)))
    if iou_type == "bbox":
        d, g = [p["bbox"] for p in dets], [a["bbox"] for a in gts]
    else:
        d, g = [p["segmentation"] for p in dets], [a["_rle"] for a in gts]
    return np.asarray(mask_utils.iou(d, g, [0] * len(gts)))


def _attach_rles(gt: dict) -> None:
    heights = {im["id"]: (im["height"], im["width"]) for im in gt["images"]}
    for a in gt["annotations"]:
        if "_rle" in a or "segmentation" not in a:
            continue
        h, w = heights[a["image_id"]]
        segm = a["segmentation"]
        if isinstance(segm, list):
            a["_rle"] = mask_utils.merge(mask_utils.frPyObjects(segm, h, w))
        elif isinstance(segm.get("counts"), list):
            a["_rle"] = mask_utils.frPyObjects(segm, h, w)
        else:
            a["_rle"] = segm


def _check_recall_args(min_occlusion, score_thr, iou_thr) -> None:
    check_real("min_occlusion", min_occlusion, 0.0, 1.0, hi_open=True)
    if not _finite(score_thr):
        raise (ValueError if _is_real(score_thr) else TypeError)(
            f"score_thr must be a finite number, got {type(score_thr).__name__} {score_thr!r:.60}")
    check_real("iou_thr", iou_thr, 0.0, 1.0, lo_open=True)


def _occluded_recall(gt: dict, preds: list[dict], iou_type: str, min_occlusion: float, score_thr: float,
                     iou_thr: float) -> dict:
    """:func:`occluded_recall` on checked inputs (``gt``'s annotations are written to, then restored)."""
    by_key: dict[tuple, list[dict]] = {}
    for p in preds:
        if p["score"] >= score_thr:
            by_key.setdefault((p["image_id"], p["category_id"]), []).append(p)
    occluded = [a for a in gt["annotations"]
                if not a.get("iscrowd", 0) and a.get("occlusion", 0.0) > min_occlusion]
    if iou_type == "segm":
        _attach_rles({**gt, "annotations": occluded})
    hit = 0
    for a in occluded:
        cands = by_key.get((a["image_id"], a["category_id"]), [])
        if cands and _iou(cands, [a], iou_type).max() >= iou_thr:
            hit += 1
    for a in occluded:
        a.pop("_rle", None)
    return {"recall": hit / len(occluded) if occluded else -1.0, "count": len(occluded),
            "min_occlusion": min_occlusion, "score_thr": score_thr, "iou_thr": iou_thr}


def occluded_recall(gt, preds, *, iou_type: str = "bbox", min_occlusion: float = 0.1,
                    score_thr: float = 0.3, iou_thr: float = 0.75) -> dict:
    """Fraction of occluded ground truth (``occlusion > min_occlusion``, non-crowd) that some
    same-class prediction with ``score >= score_thr`` overlaps with ``IoU >= iou_thr``. No one-to-one
    matching and no false-positive penalty, as in Occluded/Separated COCO; read it next to AP.

    ``gt`` and ``preds`` are taken and checked as by :func:`evaluate`; ``min_occlusion`` must lie
    in [0, 1), ``iou_thr`` in (0, 1] and ``score_thr`` be finite, else an error naming it.
    ``recall`` is -1 when no object is occluded.
    """
    _check_recall_args(min_occlusion, score_thr, iou_thr)
    gt_data, preds = prepare(gt, preds, iou_type)
    return _occluded_recall(gt_data, preds, iou_type, min_occlusion, score_thr, iou_thr)


# --------------------------------------------------------------------------------------------------
# evaluate


def _recall_kwargs(kwargs) -> dict:
    """``occluded_recall_kwargs`` checked, with the defaults filled in."""
    out = {"min_occlusion": 0.1, "score_thr": 0.3, "iou_thr": 0.75}
    if kwargs is None:
        return out
    if not isinstance(kwargs, dict):
        raise TypeError(f"occluded_recall_kwargs must be a dict or None, got {type(kwargs).__name__}")
    unknown = sorted(set(kwargs) - set(out), key=str)
    if unknown:
        raise TypeError(f"occluded_recall_kwargs: unknown key(s) {unknown}; valid: {', '.join(out)}")
    out.update(kwargs)
    _check_recall_args(**out)
    return out


def class_names(categories: list[dict]) -> dict:
    """``{category id: name}``; a name shared by several categories gets its id appended, so that
    per-class results never merge two classes."""
    names = {c["id"]: str(c.get("name", c["id"])) for c in categories}
    seen: dict[str, int] = {}
    for n in names.values():
        seen[n] = seen.get(n, 0) + 1
    return {cid: (f"{n} (id {cid})" if seen[n] > 1 else n) for cid, n in names.items()}


def evaluate(gt, predictions, *, iou_type: str = "bbox", backend: str = "pycocotools",
             size_bins: bool = True, occlusion: bool = True, per_class: bool = True,
             errors: bool = True, occluded_recall_kwargs: dict | None = None) -> dict:
    """COCO metrics for ``predictions`` against ``gt``, with what matters for small and hidden objects.

    Args:
        gt: a COCO instances JSON path, its dict, or a loaded ``COCO``.
        predictions: a list of COCO result dicts (``image_id``, ``category_id``, ``score``, ``bbox``
            as ``[x, y, w, h]`` and/or ``segmentation`` as RLE) or a results JSON path.
        iou_type: ``"bbox"`` or ``"segm"``.
        backend: ``"pycocotools"`` (the metric of record) or ``"faster_coco_eval"`` (same numbers, faster).

    Returns a JSON-serialisable dict:
        - the 12 standard metrics ``AP, AP50, AP75, APs, APm, APl, AR1, AR10, AR100, ARs, ARm, ARl``,
          equal to pycocotools' ``stats`` (empty predictions give what COCOeval would: 0.0, or -1
          where there is no ground truth; not a crash);
        - ``size``: AP, AR100 and ground-truth count per AI-TOD bin (``very_tiny`` < 8^2,
          ``tiny`` 8^2-16^2, ``small`` 16^2-32^2, ``medium``, ``large``) of the ground truth's ``area``;
        - ``occlusion`` (when the ground truth has an ``occlusion`` field): AP, AR100 and count for
          ``none`` (<= 0.1), ``partial`` (0.1-0.5], ``heavy`` (> 0.5), with COCO's one-to-one matching:
          ground truth outside the bucket is ignored, so detecting it is neither a hit nor a false
          positive, while a detection of nothing is a false positive in every bucket;
        - ``occluded_recall``: see :func:`occluded_recall`;
        - ``per_class``: AP per category name;
        - ``errors``: TIDE-style AP50 lost to each error type, overall and per size bin
          (:func:`visattn.evaluation.errors.error_breakdown`);
        - ``curves``: precision at IoU 0.5 over the 101 recall thresholds, per size bin and bucket
          that has ground truth (``"size/tiny"``, ``"occlusion/heavy"``; all 0 without predictions).

    No ground truth, no number: a group (size bin, occlusion bucket, class, error-breakdown bin,
    a standard metric's area range, or everything, for an empty image list or all-crowd ground
    truth) without non-crowd ground truth is -1 (n/a, as COCOeval reports it; ``None`` for a
    difference), with or without predictions and on either backend, and has no curve; a group with
    ground truth and no matching detection is 0.0. Read -1 as "not measured", never as a score.

    Errors: the ground truth is checked as by :func:`load_gt`; a prediction that is not a dict with
    int ``image_id``/``category_id``, a finite number ``score``, a ``bbox`` of 4 finite numbers
    with ``w, h >= 0`` (required for ``"bbox"``; all or none for ``"segm"``) and, for ``"segm"``,
    a compressed RLE ``segmentation`` of its image's size raises ``ValueError`` naming the first
    bad entry (index and image id); unknown image or category ids raise ``ValueError`` naming them;
    a bad argument raises ``ValueError``/``TypeError`` naming it. Boxes that mostly run past the
    image edge (xyxy passed as xywh) raise a warning.

    Order: the predictions are sorted by image, category, descending score, box and mask, and the
    ground truth by id, before any matching, so every number is the same for any order of the
    predictions file or of the ground truth's lists (COCOeval alone breaks tied scores by list
    order).
    """
    cls_coco, _ = _backend(backend)
    _check_iou_type(iou_type)
    for name, flag in (("size_bins", size_bins), ("occlusion", occlusion), ("per_class", per_class),
                       ("errors", errors)):
        check_bool(name, flag)
    recall_kwargs = _recall_kwargs(occluded_recall_kwargs)
    gt_data, preds = prepare(gt, predictions, iou_type)
    result: dict = {"iou_type": iou_type, "backend": backend, "num_images": len(gt_data["images"]),
                    "num_predictions": len(preds)}
    has_occ = occlusion and any("occlusion" in a for a in gt_data["annotations"])
    curves: dict = {}
    zero_curve = [0.0] * 101  # precision 0 at every recall threshold: ground truth, no detection

    def group(name: str, count: int, ev=None, a: int = 0) -> dict:
        """AP, AR100 and count of one size bin / occlusion bucket; its curve where it has ground truth."""
        if ev is None:
            ap = ar = empty_score(count)
            curve = zero_curve if count else None
        else:
            (ap, ar), curve = _ap_ar(ev, a), _curve(ev, a)
        if curve is not None:
            curves[name] = curve
        return {"AP": ap, "AR100": ar, "count": count}

    if preds:
        gt_obj = _coco(cls_coco, gt_data)
        dt_obj = _load_res(gt_obj, preds)
        ev = _evaluator(backend, gt_obj, dt_obj, iou_type, None)
        with contextlib.redirect_stdout(io.StringIO()):
            ev.summarize()
        result.update({k: float(v) for k, v in zip(STANDARD_KEYS, ev.stats[:12], strict=True)})
    else:
        result.update({k: empty_score(gt_count(gt_data, STANDARD_RANGES[k])) for k in STANDARD_KEYS})
    if per_class:
        names = class_names(gt_data["categories"])
        if preds:
            result["per_class"] = {names[cid]: _mean_valid(ev.eval["precision"][:, :, k, 0, -1])
                                   for k, cid in enumerate(ev.params.catIds)}
        else:
            result["per_class"] = {names[c["id"]]: empty_score(gt_count(gt_data, _ALL, category=c["id"]))
                                   for c in gt_data["categories"]}
    if size_bins:
        rngs = {"all": _ALL, **SIZE_BINS}
        ev_s = _evaluator(backend, gt_obj, dt_obj, iou_type, rngs) if preds else None
        result["size"] = {name: group(f"size/{name}", gt_count(gt_data, rngs[name]), ev_s, a)
                          for a, name in enumerate(rngs) if name != "all"}
        result["size_area_source"] = "ground-truth 'area' field (COCO: mask pixels; synthetic: visible pixels)"
    if has_occ:
        result["occlusion"] = {}
        occ_data = _with_area(gt_data, "occlusion")
        for name in OCCLUSION_BUCKETS:
            lo, hi = occlusion_range(name)
            ev_o = _bucket_eval(backend, cls_coco, occ_data, preds, iou_type, lo, hi) if preds else None
            result["occlusion"][name] = group(f"occlusion/{name}", gt_count(gt_data, (lo, hi), "occlusion"), ev_o)
        result["occluded_recall"] = _occluded_recall(gt_data, preds, iou_type, **recall_kwargs)
    if errors:
        from .errors import _error_breakdown
        result["errors"] = _error_breakdown(gt_data, preds, iou_type, backend)
    result["curves"] = curves
    return result
