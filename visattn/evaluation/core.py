"""COCO evaluation with pycocotools (the metric of record) or faster-coco-eval, plus finer size
bins, occlusion buckets, occluded recall and per-class AP.

Everything goes through COCOeval's own matching; the extra numbers only change which ground truth
counts (``areaRng`` on a chosen attribute), exactly as COCO does for its small/medium/large split.
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from pycocotools import mask as mask_utils

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
# Inputs


def _backend(name: str):
    if name == "pycocotools":
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
        return COCO, COCOeval
    if name == "faster_coco_eval":
        from faster_coco_eval import COCO, COCOeval_faster
        return COCO, COCOeval_faster
    raise ValueError(f"unknown backend {name!r}; choose from {', '.join(BACKENDS)}")


def load_gt(gt) -> dict:
    """The ground-truth dataset dict from a path, a dict or a loaded ``COCO`` object."""
    if hasattr(gt, "dataset") and isinstance(gt.dataset, dict):
        return gt.dataset
    if isinstance(gt, dict):
        return gt
    from ..data.coco import load_coco
    return load_coco(gt)


def load_predictions(predictions) -> list[dict]:
    """A list of COCO result dicts from a list or a results JSON path."""
    if isinstance(predictions, str | os.PathLike):
        path = Path(predictions)
        if not path.is_file():
            raise FileNotFoundError(f"predictions file not found: {path}")
        try:
            predictions = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(predictions, list):
        raise ValueError(f"predictions must be a list of COCO result dicts, got {type(predictions).__name__}")
    return predictions


def _check_predictions(gt: dict, preds: list[dict], iou_type: str) -> None:
    need = ("image_id", "category_id", "score", "bbox" if iou_type == "bbox" else "segmentation")
    for i, p in enumerate(preds):
        if not isinstance(p, dict) or any(k not in p for k in need):
            raise ValueError(f"predictions[{i}] needs keys {', '.join(need)} for iou_type={iou_type!r}, "
                             f"got {p!r:.160}")
        if iou_type == "bbox":
            b = p["bbox"]
            if not isinstance(b, Sequence) or len(b) != 4 or not all(np.isfinite(v) for v in b):
                raise ValueError(f"predictions[{i}] bbox must be 4 finite numbers [x, y, w, h], got {b!r}")
    images = {im["id"]: im for im in gt["images"]}
    cats = {c["id"] for c in gt["categories"]}
    bad_img = sorted({p["image_id"] for p in preds} - set(images), key=str)
    bad_cat = sorted({p["category_id"] for p in preds} - cats, key=str)
    if bad_img:
        raise ValueError(f"predictions refer to {len(bad_img)} image id(s) not in the ground truth: {bad_img[:10]}")
    if bad_cat:
        raise ValueError(f"predictions refer to category id(s) not in the ground truth: {bad_cat[:10]} "
                         f"(known: {sorted(cats)[:20]}...)")
    if iou_type == "bbox":
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
    v = a[a > -1]
    return float(v.mean()) if v.size else -1.0


def _ap_ar(ev, a: int) -> tuple[float, float]:
    """AP (IoU .50:.95) and AR100 for area range index ``a``."""
    return _mean_valid(ev.eval["precision"][:, :, :, a, -1]), _mean_valid(ev.eval["recall"][:, :, a, -1])


def _curve(ev, a: int) -> list[float]:
    """Mean precision over classes at IoU 0.5 for each of COCO's 101 recall thresholds."""
    p = ev.eval["precision"][0, :, :, a, -1]  # (R, K)
    out = []
    for row in p:
        v = row[row > -1]
        out.append(round(float(v.mean()), 5) if v.size else 0.0)
    return out


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


def occluded_recall(gt: dict, preds: list[dict], *, iou_type: str = "bbox", min_occlusion: float = 0.1,
                    score_thr: float = 0.3, iou_thr: float = 0.75) -> dict:
    """Fraction of occluded ground truth (``occlusion > min_occlusion``, non-crowd) that some
    same-class prediction with ``score >= score_thr`` overlaps with ``IoU >= iou_thr``. No one-to-one
    matching and no false-positive penalty, as in Occluded/Separated COCO; read it next to AP."""
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


# --------------------------------------------------------------------------------------------------
# evaluate


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
          equal to pycocotools' ``stats`` (empty predictions give 0.0, not a crash);
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
        - ``curves``: precision at IoU 0.5 over the 101 recall thresholds, per size bin and bucket.

    Errors: an unknown image or category id in the predictions raises ``ValueError`` naming them;
    boxes that mostly run past the image edge (xyxy passed as xywh) raise a warning.
    """
    if iou_type not in ("bbox", "segm"):
        raise ValueError(f"iou_type must be 'bbox' or 'segm', got {iou_type!r}")
    cls_coco, _ = _backend(backend)
    gt_data = load_gt(gt)
    preds = load_predictions(predictions)
    _check_predictions(gt_data, preds, iou_type)
    counts_by = lambda rng, key="area": sum(
        1 for a in gt_data["annotations"] if not a.get("iscrowd", 0) and rng[0] <= a.get(key, -1) <= rng[1])
    result: dict = {"iou_type": iou_type, "backend": backend, "num_images": len(gt_data["images"]),
                    "num_predictions": len(preds)}
    has_occ = occlusion and any("occlusion" in a for a in gt_data["annotations"])
    if not preds:
        result.update(dict.fromkeys(STANDARD_KEYS, 0.0))
        if size_bins:
            result["size"] = {k: {"AP": 0.0, "AR100": 0.0, "count": counts_by(r)} for k, r in SIZE_BINS.items()}
        if has_occ:
            result["occlusion"] = {k: {"AP": 0.0, "AR100": 0.0, "count": counts_by(occlusion_range(k), "occlusion")}
                                   for k in OCCLUSION_BUCKETS}
            result["occluded_recall"] = occluded_recall(gt_data, preds, iou_type=iou_type,
                                                        **(occluded_recall_kwargs or {}))
        if per_class:
            result["per_class"] = {c.get("name", str(c["id"])): 0.0 for c in gt_data["categories"]}
        result["curves"] = {}
        return result

    gt_obj = _coco(cls_coco, gt_data)
    dt_obj = _load_res(gt_obj, preds)
    ev = _evaluator(backend, gt_obj, dt_obj, iou_type, None)
    with contextlib.redirect_stdout(io.StringIO()):
        ev.summarize()
    result.update({k: float(v) for k, v in zip(STANDARD_KEYS, ev.stats[:12], strict=True)})
    curves: dict = {}
    if per_class:
        names = {c["id"]: c.get("name", str(c["id"])) for c in gt_data["categories"]}
        result["per_class"] = {
            names[cid]: _mean_valid(ev.eval["precision"][:, :, k, 0, -1])
            for k, cid in enumerate(ev.params.catIds)}
    if size_bins:
        rngs = {"all": (0.0, 1e10), **SIZE_BINS}
        ev_s = _evaluator(backend, gt_obj, dt_obj, iou_type, rngs)
        result["size"] = {}
        for a, (name, rng) in enumerate(rngs.items()):
            if name == "all":
                continue
            ap, ar = _ap_ar(ev_s, a)
            result["size"][name] = {"AP": ap, "AR100": ar, "count": counts_by(rng)}
            curves[f"size/{name}"] = _curve(ev_s, a)
        result["size_area_source"] = "ground-truth 'area' field (COCO: mask pixels; synthetic: visible pixels)"
    if has_occ:
        result["occlusion"] = {}
        occ_data = _with_area(gt_data, "occlusion")
        for name in OCCLUSION_BUCKETS:
            lo, hi = occlusion_range(name)
            ev_o = _bucket_eval(backend, cls_coco, occ_data, preds, iou_type, lo, hi)
            ap, ar = _ap_ar(ev_o, 0)
            result["occlusion"][name] = {"AP": ap, "AR100": ar, "count": counts_by((lo, hi), "occlusion")}
            curves[f"occlusion/{name}"] = _curve(ev_o, 0)
        result["occluded_recall"] = occluded_recall(gt_data, preds, iou_type=iou_type,
                                                    **(occluded_recall_kwargs or {}))
    if errors:
        from .errors import error_breakdown
        result["errors"] = error_breakdown(gt_data, preds, iou_type=iou_type, backend=backend)
    result["curves"] = curves
    return result
