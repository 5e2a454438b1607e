"""Paired bootstrap over images: is model B really better than model A, and where?

Both prediction sets are matched to the ground truth once with pycocotools' ``COCOeval.evaluate``.
Each bootstrap replicate draws images with replacement (the same draw for A and B, so the
comparison is paired) and re-accumulates COCO's precision/recall with each image counted as often as
it was drawn, which equals running COCOeval on the resampled dataset (each drawn image's copies
numbered next to each other, so tied scores keep COCOeval's image order), without re-matching. At
unit weights the numbers are bit-for-bit COCOeval's, at every IoU threshold (tested).

Inputs are checked and put in a canonical order first (as by :func:`visattn.evaluation.evaluate`),
so results do not depend on the order of the predictions or of the ground truth's lists.
"""
from __future__ import annotations

import numpy as np

from .._checks import check_int, check_real
from .core import (
    OCCLUSION_BUCKETS,
    SIZE_BINS,
    _check_iou_type,
    _coco,
    _evaluator,
    _load_res,
    _with_area,
    occlusion_range,
    prepare,
)

__all__ = ["MatchTables", "compare"]


class MatchTables:
    """Per-image COCO matches for one prediction set, ready for weighted re-accumulation.

    For each (category, area range): detections sorted as COCOeval sorts them, their image index,
    true/false-positive flags per IoU threshold, and per-image counts of non-ignored ground truth.
    """

    def __init__(self, ev) -> None:
        p = ev.params
        self.img_index = {img: i for i, img in enumerate(p.imgIds)}
        self.n_images, self.rec_thrs = len(p.imgIds), np.asarray(p.recThrs)
        self.n_iou = len(p.iouThrs)
        n_k, n_a, n_i = len(p.catIds), len(p.areaRng), len(p.imgIds)
        max_det = p.maxDets[-1]
        self.tables: list[list[tuple]] = []
        for a in range(n_a):
            row = []
            for k in range(n_k):
                entries = [ev.evalImgs[k * n_a * n_i + a * n_i + i] for i in range(n_i)]
                entries = [(i, e) for i, e in enumerate(entries) if e is not None]
                npig = np.zeros(n_i)
                if not entries:
                    row.append((None, None, None, npig))
                    continue
                scores = np.concatenate([np.asarray(e["dtScores"][:max_det]) for _, e in entries])
                img = np.concatenate([np.full(len(e["dtScores"][:max_det]), i) for i, e in entries])
                m = np.concatenate([np.asarray(e["dtMatches"])[:, :max_det] for _, e in entries], axis=1)
                ig = np.concatenate([np.asarray(e["dtIgnore"])[:, :max_det] for _, e in entries], axis=1)
                for i, e in entries:
                    npig[i] = int(np.count_nonzero(np.asarray(e["gtIgnore"]) == 0))
                order = np.argsort(-scores, kind="mergesort")
                tp = np.logical_and(m[:, order] != 0, ~ig[:, order].astype(bool))
                fp = np.logical_and(m[:, order] == 0, ~ig[:, order].astype(bool))
                if scores.size == 0:
                    row.append((None, None, None, npig))
                    continue
                row.append((img[order], tp.astype(np.float64), fp.astype(np.float64), npig))
            self.tables.append(row)

    def accumulate(self, a: int, weights: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Precision ``(T, R, K')`` and recall ``(T, K')`` (max 100 detections) for area range ``a``
        over the K' categories with ground truth, each image counted ``weights[i]`` times (default
        once, which reproduces COCOeval.accumulate bit for bit: same formulas, same order)."""
        w_img = np.ones(self.n_images) if weights is None else weights
        n_t, n_r = self.n_iou, len(self.rec_thrs)
        precisions, recalls = [], []
        for img, tp, fp, npig in self.tables[a]:
            total = float(np.dot(w_img, npig))
            if total == 0:
                continue
            if img is None:
                precisions.append(np.zeros((n_t, n_r)))
                recalls.append(np.zeros(n_t))
                continue
            w = w_img[img]
            tp_sum = np.cumsum(tp * w, axis=1)
            fp_sum = np.cumsum(fp * w, axis=1)
            rc = tp_sum / total
            pr = tp_sum / (fp_sum + tp_sum + np.spacing(1))  # COCOeval's formula, to the last bit
            pr = np.maximum.accumulate(pr[:, ::-1], axis=1)[:, ::-1]  # precision envelope
            precisions.append(self._at_recall_thresholds(rc, pr))
            recalls.append(rc[:, -1])
        if not precisions:
            return np.zeros((n_t, n_r, 0)), np.zeros((n_t, 0))
        return np.stack(precisions, axis=-1), np.stack(recalls, axis=-1)

    def _at_recall_thresholds(self, rc: np.ndarray, pr: np.ndarray) -> np.ndarray:
        """Interpolated precision at each recall threshold: COCOeval's per-row
        ``searchsorted(rc, recThrs, side="left")``, 0 past the last recall reached. Exact, with no
        arithmetic on recalls (shifting the rows apart to search them at once rounds them)."""
        n_t, d = rc.shape
        n_r = len(self.rec_thrs)
        if d <= 4 * n_r:  # short rows: count, per row, the recalls below each threshold
            below = np.searchsorted(self.rec_thrs, rc, side="right") + (n_r + 1) * np.arange(n_t)[:, None]
            idx = np.bincount(below.ravel(), minlength=n_t * (n_r + 1)).reshape(n_t, n_r + 1)
            idx = np.cumsum(idx, axis=1)[:, :n_r]
        else:
            idx = np.stack([np.searchsorted(row, self.rec_thrs, side="left") for row in rc])
        ok = idx < d
        q = np.zeros((n_t, n_r))
        q[ok] = np.take_along_axis(pr, np.minimum(idx, d - 1), axis=1)[ok]
        return q

    def metrics(self, a: int, weights: np.ndarray | None = None) -> dict[str, float]:
        """AP, AP50, AP75 and AR100 for area range ``a`` (-1 where there is no ground truth), each
        the mean of the same values in the same order as COCOeval's ``summarize``."""
        p, r = self.accumulate(a, weights)
        if p.shape[-1] == 0:
            return dict.fromkeys(("AP", "AP50", "AP75", "AR100"), -1.0)
        return {"AP": float(np.mean(p.ravel())), "AP50": float(np.mean(p[0].ravel())),
                "AP75": float(np.mean(p[5].ravel())) if len(p) > 5 else -1.0, "AR100": float(np.mean(r.ravel()))}


def _tables(gt_data: dict, preds: list[dict], iou_type: str, area_rngs: dict, bucket_mid: float | None = None):
    from pycocotools.coco import COCO

    gt_obj = _coco(COCO, gt_data)
    if preds:
        dt_obj = _load_res(gt_obj, preds, area=bucket_mid)
    else:  # pycocotools' loadRes([]) crashes
        dt_obj = _coco(COCO, {**gt_data, "annotations": []})
    return MatchTables(_evaluator("pycocotools", gt_obj, dt_obj, iou_type, area_rngs))


def _check_compare_args(n_boot, seed, confidence) -> None:
    check_int("n_boot", n_boot, 1)
    check_int("seed", seed, 0)
    check_real("confidence", confidence, 0.0, 1.0, lo_open=True, hi_open=True)


def _groups(gt_data: dict, pa: list[dict], pb: list[dict], iou_type: str) -> list[tuple]:
    """``(name, (tables A, tables B), area index, metrics)`` for overall, size bins and buckets."""
    rngs = {"all": (0.0, 1e10), **SIZE_BINS}
    ta, tb = _tables(gt_data, pa, iou_type, rngs), _tables(gt_data, pb, iou_type, rngs)
    groups: list[tuple] = [("overall", (ta, tb), 0, ["AP", "AP50", "AP75", "AR100"])]
    for a, name in enumerate(SIZE_BINS, start=1):
        groups.append((f"size/{name}", (ta, tb), a, ["AP", "AR100"]))
    if any("occlusion" in x for x in gt_data["annotations"]):
        occ = _with_area(gt_data, "occlusion")
        for name in OCCLUSION_BUCKETS:
            lo, hi = occlusion_range(name)
            pair = tuple(_tables(occ, p, iou_type, {name: (lo, hi)}, bucket_mid=(lo + hi) / 2) for p in (pa, pb))
            groups.append((f"occlusion/{name}", pair, 0, ["AP", "AR100"]))
    return groups


def _interval(diffs: list[float], alpha: float) -> tuple[float | None, float | None]:
    """Percentile interval of the replicate differences; ``(None, None)`` when no replicate had
    ground truth for the metric (nothing to compare, not an interval of [0, 0])."""
    if not diffs:
        return None, None
    d = np.asarray(diffs)
    return float(np.quantile(d, alpha)), float(np.quantile(d, 1 - alpha))


def compare(gt, predictions_a, predictions_b, *, iou_type: str = "bbox", n_boot: int = 1000,
            seed: int = 0, confidence: float = 0.95) -> dict:
    """Paired bootstrap over images of each metric's difference ``b - a``.

    Returns ``{group: {metric: {"a", "b", "diff", "low", "high", "significant"}}}`` for groups
    ``overall`` (AP, AP50, AP75, AR100), each size bin and, when the ground truth has ``occlusion``,
    each occlusion bucket (AP, AR100). ``a`` and ``b`` equal :func:`evaluate`'s numbers exactly
    (-1 where the group has no ground truth). ``low``/``high`` bound the ``confidence`` interval
    (percentile bootstrap); ``significant`` is true when it excludes 0. A metric without ground
    truth in any replicate has ``diff``, ``low`` and ``high`` ``None``.

    Errors: ``n_boot`` must be an int >= 1, ``seed`` an int >= 0, ``confidence`` in (0, 1); inputs
    are checked as by :func:`evaluate`. Results do not depend on the order of the inputs.

    Example:
        >>> r = compare("gt.json", "baseline.json", "cbam.json")
        >>> r["size/tiny"]["AP"]   # {'a': .., 'b': .., 'diff': .., 'low': .., 'high': .., ...}
    """
    _check_iou_type(iou_type)
    _check_compare_args(n_boot, seed, confidence)
    gt_data, pa = prepare(gt, predictions_a, iou_type)
    _, pb = prepare(gt_data, predictions_b, iou_type)
    groups = _groups(gt_data, pa, pb, iou_type)
    rng = np.random.default_rng(seed)
    n = groups[0][1][0].n_images
    draws = [np.bincount(rng.integers(0, n, n), minlength=n).astype(np.float64) for _ in range(n_boot)]
    alpha = (1 - confidence) / 2
    result: dict = {"n_boot": n_boot, "seed": seed, "confidence": confidence, "num_images": n}
    for name, (t_a, t_b), a, metrics in groups:
        point_a, point_b = t_a.metrics(a), t_b.metrics(a)
        boots: dict[str, list[float]] = {m: [] for m in metrics}
        for w in draws:
            va, vb = t_a.metrics(a, w), t_b.metrics(a, w)
            for m in metrics:
                if va[m] >= 0 and vb[m] >= 0:
                    boots[m].append(vb[m] - va[m])
        result[name] = {}
        for m in metrics:
            low, high = _interval(boots[m], alpha)
            has_gt = point_a[m] >= 0 and point_b[m] >= 0
            result[name][m] = {"a": point_a[m], "b": point_b[m], "diff": point_b[m] - point_a[m] if has_gt else None,
                               "low": low, "high": high,
                               "significant": bool(low is not None and (low > 0 or high < 0))}
    return result
