"""A TIDE-style breakdown of what costs AP.

After "TIDE: A General Toolbox for Identifying Object Detection Errors" (Bolya et al., ECCV 2020,
https://arxiv.org/abs/2008.08115). Every detection that is not a true positive at IoU 0.5 gets one
error type, by its best overlap with the ground truth of the same image:

- ``duplicate``: IoU >= 0.5 with a same-class object already claimed by a higher-scoring detection;
- ``classification``: IoU >= 0.5 with an object of another class;
- ``localisation``: 0.1 <= IoU < 0.5 with an object of its class;
- ``both``: 0.1 <= IoU < 0.5 with an object of another class only;
- ``background``: IoU < 0.1 with everything;

and ``missed`` is ground truth that no detection found or came near. Each type's cost is the AP50
gained by an oracle that fixes only that type (relabel / snap to the object, or drop; for missed,
forget those objects), computed with COCOeval, overall and per size bin. When several errors point
at one object, the oracle fixes the highest-scoring one and drops the others (as TIDE does).

Inputs are put in a canonical order first (see :func:`visattn.evaluation.core.prepare`), so the
numbers do not depend on the order of the predictions file or of the ground truth's lists.
"""
from __future__ import annotations

import copy

import numpy as np

from .._checks import check_int
from .core import (
    SIZE_BINS,
    _attach_rles,
    _backend,
    _coco,
    _evaluator,
    _iou,
    _load_res,
    _mean_valid,
    canonical_order,
    empty_score,
    gt_count,
    load_gt,
    load_predictions,
    prepare,
)

__all__ = ["ERROR_TYPES", "classify_detections", "error_breakdown"]

ERROR_TYPES = ("classification", "localisation", "both", "duplicate", "background", "missed")
FG, BG = 0.5, 0.1


def classify_detections(gt, preds, *, iou_type: str = "bbox", max_dets: int = 100):
    """Label each prediction ``"tp"``, ``"ignore"`` (on a crowd region) or an error type, with the
    index of the ground-truth annotation it is about (or -1); and list the missed annotations.

    Lists follow the caller's order (``kinds[i]`` is about ``preds[i]``, indices are into
    ``gt["annotations"]``), but the matching runs in canonical order, so the labels do not depend
    on it. Inputs are checked as by :func:`visattn.evaluation.evaluate`.
    """
    check_int("max_dets", max_dets, 1)
    gt_data = load_gt(gt, iou_type=iou_type)
    preds = load_predictions(preds)
    canon_gt, canon_preds = prepare(gt_data, preds, iou_type)
    p_order = canonical_order(preds, iou_type)
    anns = gt_data.get("annotations", [])
    g_order = sorted(range(len(anns)), key=lambda i: anns[i]["id"])  # canonical index -> caller's
    kinds_c, target_c, missed_c = _classify(canon_gt, canon_preds, iou_type, max_dets)
    kinds, target = [""] * len(preds), [-1] * len(preds)
    for j, i in enumerate(p_order):
        kinds[i], target[i] = kinds_c[j], (g_order[target_c[j]] if target_c[j] >= 0 else -1)
    return kinds, target, sorted(g_order[j] for j in missed_c)


def _classify(gt: dict, preds: list[dict], iou_type: str = "bbox", max_dets: int = 100):
    """:func:`classify_detections` on checked, canonically ordered inputs (``gt``'s annotations are
    written to and restored); ties in score or IoU go to the earlier entry."""
    anns = gt["annotations"]
    if iou_type == "segm":
        _attach_rles(gt)
    gt_by_img: dict = {}
    for gi, a in enumerate(anns):
        gt_by_img.setdefault(a["image_id"], []).append(gi)
    pred_by_img: dict = {}
    for pi, p in enumerate(preds):
        pred_by_img.setdefault(p["image_id"], []).append(pi)
    kinds = ["background"] * len(preds)
    target = [-1] * len(preds)
    matched: set[int] = set()
    for img, pis in pred_by_img.items():
        pis = sorted(pis, key=lambda i: -preds[i]["score"])
        # COCO keeps the top max_dets per class; we apply it per image and class as well
        per_class: dict = {}
        kept = []
        for i in pis:
            c = preds[i]["category_id"]
            per_class[c] = per_class.get(c, 0) + 1
            if per_class[c] <= max_dets:
                kept.append(i)
            else:
                kinds[i] = "ignore"
        gis = gt_by_img.get(img, [])
        ious = _iou([preds[i] for i in kept], [anns[g] for g in gis], iou_type)
        crowd = np.array([bool(anns[g].get("iscrowd", 0)) for g in gis], dtype=bool)
        gcls = np.array([anns[g]["category_id"] for g in gis])
        for row, i in enumerate(kept):
            c = preds[i]["category_id"]
            if not gis:
                continue
            iou = ious[row]
            same = (gcls == c) & ~crowd
            free = same & np.array([g not in matched for g in gis])
            if free.any() and iou[free].max() >= FG:
                j = int(np.flatnonzero(free)[np.argmax(iou[free])])
                matched.add(gis[j])
                kinds[i], target[i] = "tp", gis[j]
                continue
            if ((gcls == c) & crowd).any() and iou[(gcls == c) & crowd].max() >= FG:
                kinds[i] = "ignore"
                continue
            other = (gcls != c) & ~crowd
            best_same = iou[same].max() if same.any() else 0.0
            best_other = iou[other].max() if other.any() else 0.0
            if best_same >= FG:
                kinds[i] = "duplicate"
                target[i] = gis[int(np.flatnonzero(same)[np.argmax(iou[same])])]
            elif best_other >= FG:
                kinds[i] = "classification"
                target[i] = gis[int(np.flatnonzero(other)[np.argmax(iou[other])])]
            elif best_same >= BG:
                kinds[i] = "localisation"
                target[i] = gis[int(np.flatnonzero(same)[np.argmax(iou[same])])]
            elif best_other >= BG:
                kinds[i] = "both"
            else:
                kinds[i] = "background"
    near = {t for k, t in zip(kinds, target, strict=True) if k in ("classification", "localisation")}
    missed = [gi for gi, a in enumerate(anns) if not a.get("iscrowd", 0) and gi not in matched and gi not in near]
    for a in anns:
        a.pop("_rle", None)
    return kinds, target, missed


def _fixed(gt: dict, preds: list[dict], kinds, target, missed, kind: str):
    """The (gt, preds) an oracle for ``kind`` would produce. Where several errors point at one
    object, the highest-scoring one is fixed (ties: the earlier in ``preds``) and the rest dropped."""
    if kind == "missed":
        drop = set(missed)
        return {**gt, "annotations": [a for i, a in enumerate(gt["annotations"]) if i not in drop]}, preds
    claimed = {t for k, t in zip(kinds, target, strict=True) if k == "tp"}
    out: list[dict | None] = list(preds)
    for i in sorted(range(len(preds)), key=lambda i: -preds[i]["score"]):
        if kinds[i] != kind:
            continue
        t = target[i]
        out[i] = None  # duplicate, both, background (and fixes whose object is already found): dropped
        if kind in ("classification", "localisation") and t not in claimed:
            q = copy.copy(preds[i])
            a = gt["annotations"][t]
            if kind == "classification":
                q["category_id"] = a["category_id"]
            else:
                q["bbox"] = list(a["bbox"])
                if "segmentation" in q and "_rle_fix" in a:
                    q["segmentation"] = a["_rle_fix"]
            claimed.add(t)
            out[i] = q
    return gt, [q for q in out if q is not None]


def _ap50_by_bin(backend: str, gt: dict, preds: list[dict], iou_type: str) -> dict[str, float]:
    """AP50 overall (``"all"``) and per size bin; -1 (n/a) for one without ground truth."""
    cls_coco, _ = _backend(backend)
    rngs = {"all": (0.0, 1e10), **SIZE_BINS}
    if not preds:
        return {name: empty_score(gt_count(gt, rng)) for name, rng in rngs.items()}
    gt_obj = _coco(cls_coco, gt)
    ev = _evaluator(backend, gt_obj, _load_res(gt_obj, preds), iou_type, rngs, iou_thrs=[0.5])
    return {name: _mean_valid(ev.eval["precision"][:, :, :, a, -1]) for a, name in enumerate(rngs)}


def _gain(fixed: float, base: float) -> float | None:
    """AP50 an oracle gains; ``None`` (n/a) where either side has no ground truth (-1): a bin
    without any, or one whose every object the ``missed`` oracle forgets."""
    return fixed - base if fixed >= 0 and base >= 0 else None


def error_breakdown(gt, preds, *, iou_type: str = "bbox", backend: str = "pycocotools") -> dict:
    """AP50 lost to each error type (``delta_AP50``, in AP points 0..1), the number of detections
    (or objects, for ``missed``) of each type, overall and per size bin; see the module docstring.

    Where there is no ground truth (a size bin without any, or none at all) ``AP50`` is -1 and
    every ``delta_AP50`` ``None`` (n/a), with or without predictions; so is the ``missed`` gain of a
    bin whose every object was missed (forgetting them leaves nothing to score).

    ``gt`` and ``preds`` are taken and checked as by :func:`visattn.evaluation.evaluate`; the
    result is the same for any order of either.
    """
    _backend(backend)
    gt_data, preds = prepare(gt, preds, iou_type)
    return _error_breakdown(gt_data, preds, iou_type, backend)


def _error_breakdown(gt: dict, preds: list[dict], iou_type: str, backend: str) -> dict:
    """:func:`error_breakdown` on checked, canonically ordered inputs."""
    kinds, target, missed = _classify(gt, preds, iou_type)
    if iou_type == "segm":  # give the localisation oracle the object's mask as RLE
        gt = {**gt, "annotations": [dict(a) for a in gt["annotations"]]}
        _attach_rles(gt)
        for a in gt["annotations"]:
            if "_rle" in a:
                rle = a.pop("_rle")
                a["_rle_fix"] = {"size": rle["size"], "counts": rle["counts"].decode("ascii")
                                 if isinstance(rle["counts"], bytes) else rle["counts"]}
    base = _ap50_by_bin(backend, gt, preds, iou_type)
    out = {"AP50": base["all"], "thresholds": {"foreground": FG, "background": BG}, "types": {}}
    for kind in ERROR_TYPES:
        g, p = _fixed(gt, preds, kinds, target, missed, kind)
        fixed = _ap50_by_bin(backend, g, p, iou_type)
        count = len(missed) if kind == "missed" else sum(k == kind for k in kinds)
        out["types"][kind] = {
            "count": count,
            "delta_AP50": _gain(fixed["all"], base["all"]),
            "size": {b: _gain(fixed[b], base[b]) for b in SIZE_BINS},
        }
    out["true_positives"] = sum(k == "tp" for k in kinds)
    return out
