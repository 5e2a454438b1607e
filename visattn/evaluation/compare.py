"""Paired bootstrap over images: is model B really better than model A, and where?

Both prediction sets are matched to the ground truth once with pycocotools' ``COCOeval.evaluate``.
Each bootstrap replicate draws images with replacement (the same draw for A and B, so the
comparison is paired) and re-accumulates COCO's precision/recall with each image counted as often as
it was drawn, which equals running COCOeval on the resampled dataset (each drawn image's copies
numbered next to each other, so tied scores keep COCOeval's image order), without re-matching. At
unit weights the numbers are bit-for-bit COCOeval's, at every IoU threshold (tested).

Inputs are checked and put in a canonical order first (as by :func:`visattn.evaluation.evaluate`),
so results do not depend on the order of the predictions or of the ground truth's lists.

:func:`compare_runs` extends this to a grid of trained models, several seeds each: every replicate
resamples the images *and* the seeds (the same draw for every model, so each comparison with the
reference is paired on both), and each model's metric is its mean over the drawn seeds.
"""
from __future__ import annotations

import numpy as np

from .._checks import check_bool, check_int, check_real
from .core import (
    OCCLUSION_BUCKETS,
    SIZE_BINS,
    _attach_rles,
    _check_iou_type,
    _coco,
    _evaluator,
    _iou,
    _load_res,
    _recall_kwargs,
    _with_area,
    occlusion_range,
    prepare,
)

__all__ = ["RUN_METRICS", "MatchTables", "benjamini_hochberg", "bootstrap_p", "compare", "compare_runs", "verdict"]


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
                # a detection ignored at every IoU threshold (e.g. outside the area range) adds 0 to
                # both running sums, so dropping it changes no number, to the last bit, and makes
                # the per-bin tables much shorter
                keep = tp.any(axis=0) | fp.any(axis=0)
                if not keep.any():
                    row.append((None, None, None, npig))
                    continue
                row.append((img[order][keep], tp[:, keep].astype(np.float64), fp[:, keep].astype(np.float64), npig))
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


# --------------------------------------------------------------------------------------------------
# A grid of runs: several models, several seeds each, resampled over images and seeds

#: The metrics :func:`compare_runs` reports per run, named as :class:`visattn.lit.DetectionModule`
#: logs them: COCO's AP, AP50 and APs (area < 32^2), AP per AI-TOD size bin (``AP_<bin>``), AP per
#: occlusion bucket (``AP_occ_<bucket>``, when the ground truth has occlusion) and occluded recall.
RUN_METRICS = ("AP", "AP50", "APs", *(f"AP_{b}" for b in SIZE_BINS), *(f"AP_occ_{b}" for b in OCCLUSION_BUCKETS),
               *(f"AP50_occ_{b}" for b in OCCLUSION_BUCKETS), *(f"AR_occ_{b}" for b in OCCLUSION_BUCKETS),
               "occluded_recall")
_COCO_SMALL = (0.0, 32.0 ** 2)  # pycocotools' "small" area range (APs)


def bootstrap_p(diffs: list[float]) -> float | None:
    """Two-sided bootstrap p-value of "the difference is 0": twice the smaller tail of the replicate
    differences on either side of 0, counting a replicate at exactly 0 on both sides, with the +1
    of a Monte-Carlo p-value so it is never 0 (``None`` without replicates)."""
    d = _finite_values("bootstrap_p", "diffs", diffs)
    if not len(d):
        return None
    tail = min(int(np.count_nonzero(d <= 0)), int(np.count_nonzero(d >= 0)))
    return float(min(1.0, 2 * (tail + 1) / (len(d) + 1)))


def benjamini_hochberg(p_values: dict, q: float = 0.05) -> dict:
    """Benjamini-Hochberg step-up procedure over ``{key: p}`` (``None`` entries are left out):
    ``{key: (adjusted p, rejected)}`` with the false discovery rate controlled at ``q``."""
    check_real("q", q, 0.0, 1.0, lo_open=True, hi_open=True)
    if not isinstance(p_values, dict):
        raise TypeError(f"benjamini_hochberg: p_values must be a dict {{key: p-value or None}}, got "
                        f"{type(p_values).__name__}")
    for k, p in p_values.items():
        if p is not None:
            check_real(f"benjamini_hochberg: p_values[{k!r}]", p, 0.0, 1.0)
    keys = sorted((k for k, p in p_values.items() if p is not None), key=lambda k: (p_values[k], str(k)))
    m = len(keys)
    adjusted: dict = {}
    running = 1.0
    for rank in range(m, 0, -1):  # from the largest p down: adjusted = min over ranks >= this one
        k = keys[rank - 1]
        running = min(running, p_values[k] * m / rank)
        adjusted[k] = running
    return {k: (adjusted[k], adjusted[k] <= q) for k in keys}


def _finite_values(caller: str, name: str, values) -> np.ndarray:
    """``values`` (a sequence of real numbers) as a float array, else an error naming ``name[i]``."""
    if isinstance(values, (str, bytes, dict)) or not hasattr(values, "__len__"):
        raise TypeError(f"{caller}: {name} must be a sequence of real numbers, got {type(values).__name__}")
    out = np.empty(len(values))
    for i, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
            raise TypeError(f"{caller}: {name}[{i}] must be a real number, got {type(v).__name__} {v!r:.40}")
        if not np.isfinite(v):
            raise ValueError(f"{caller}: {name}[{i}] must be finite, got {v!r}")
        out[i] = v
    return out


def verdict(low: float | None, high: float | None) -> str:
    """A plain reading of a ``[low, high]`` interval of a difference ``b - a``: ``"helps"`` when it
    lies above 0, ``"hurts"`` when below, ``"no evidence"`` when it contains 0 (or is missing)."""
    if low is None or high is None:
        return "no evidence"
    if low > 0:
        return "helps"
    if high < 0:
        return "hurts"
    return "no evidence"


class _RunTables:
    """Everything one prediction set needs to recompute :data:`RUN_METRICS` on a reweighted set of
    images: COCO matches overall / per size bin / COCO small, per occlusion bucket, and the
    per-image counts behind occluded recall."""

    def __init__(self, gt_data: dict, preds: list[dict], iou_type: str, has_occ: bool, recall: dict) -> None:
        rngs = {"all": (0.0, 1e10), **SIZE_BINS, "coco_small": _COCO_SMALL}
        self.size = _tables(gt_data, preds, iou_type, rngs)
        self.n_size = len(SIZE_BINS)
        self.occ: dict[str, MatchTables] = {}
        self.hits = self.totals = None
        if has_occ:
            occ = _with_area(gt_data, "occlusion")
            for name in OCCLUSION_BUCKETS:
                lo, hi = occlusion_range(name)
                self.occ[name] = _tables(occ, preds, iou_type, {name: (lo, hi)}, bucket_mid=(lo + hi) / 2)
            self.hits, self.totals = _occluded_hits(gt_data, preds, iou_type, self.size.img_index, **recall)

    def metrics(self, weights: np.ndarray | None = None) -> dict[str, float]:
        """:data:`RUN_METRICS` (those that apply) with image ``i`` counted ``weights[i]`` times; -1
        where the reweighted set has no ground truth for a metric (as COCOeval)."""
        overall = self.size.metrics(0, weights)
        out = {"AP": overall["AP"], "AP50": overall["AP50"], "APs": self.size.metrics(self.n_size + 1, weights)["AP"]}
        for a, name in enumerate(SIZE_BINS, start=1):
            out[f"AP_{name}"] = self.size.metrics(a, weights)["AP"]
        occ = {name: tables.metrics(0, weights) for name, tables in self.occ.items()}
        for key, field in (("AP_occ", "AP"), ("AP50_occ", "AP50"), ("AR_occ", "AR100")):
            for name, m in occ.items():
                out[f"{key}_{name}"] = m[field]
        if self.hits is not None:
            w = np.ones(len(self.hits)) if weights is None else weights
            total = float(np.dot(w, self.totals))
            out["occluded_recall"] = float(np.dot(w, self.hits)) / total if total > 0 else -1.0
        return out


def _occluded_hits(gt: dict, preds: list[dict], iou_type: str, img_index: dict, min_occlusion: float,
                   score_thr: float, iou_thr: float) -> tuple[np.ndarray, np.ndarray]:
    """Per image (in ``img_index`` order): occluded objects found and occluded objects, with
    :func:`~visattn.evaluation.occluded_recall`'s definition, so that ``sum(hits) / sum(totals)``
    is its ``recall``."""
    by_key: dict[tuple, list[dict]] = {}
    for p in preds:
        if p["score"] >= score_thr:
            by_key.setdefault((p["image_id"], p["category_id"]), []).append(p)
    occluded = [dict(a) for a in gt["annotations"]
                if not a.get("iscrowd", 0) and a.get("occlusion", 0.0) > min_occlusion]
    if iou_type == "segm":
        _attach_rles({**gt, "annotations": occluded})  # copies: gt stays as it was
    hits, totals = np.zeros(len(img_index)), np.zeros(len(img_index))
    for a in occluded:
        i = img_index[a["image_id"]]
        totals[i] += 1
        cands = by_key.get((a["image_id"], a["category_id"]), [])
        if cands and _iou(cands, [a], iou_type).max() >= iou_thr:
            hits[i] += 1
    return hits, totals


def _check_runs(runs, reference) -> tuple[list[str], list]:
    """Model names (sorted) and the seeds every model shares (sorted), or an error naming the problem."""
    if not isinstance(runs, dict) or not runs:
        raise TypeError(f"runs must be a non-empty dict {{model name: {{seed: predictions}}}}, got "
                        f"{type(runs).__name__} {runs!r:.60}")
    if not isinstance(reference, str):
        raise TypeError(f"reference must be a model name (str), got {type(reference).__name__} {reference!r:.60}")
    if reference not in runs:
        raise ValueError(f"reference {reference!r} is not among the runs' models: {', '.join(map(repr, runs))}")
    seeds = None
    for name, by_seed in runs.items():
        if not isinstance(name, str):
            raise TypeError(f"runs: model names must be str, got {type(name).__name__} {name!r:.60}")
        if not isinstance(by_seed, dict) or not by_seed:
            raise TypeError(f"runs[{name!r}] must be a non-empty dict {{seed: predictions}}, got "
                            f"{type(by_seed).__name__} {by_seed!r:.60}")
        for s in by_seed:
            check_int(f"runs[{name!r}] seed", s, 0)
        if seeds is None:
            seeds = sorted(by_seed)
        elif sorted(by_seed) != seeds:
            raise ValueError(f"runs[{name!r}] has seeds {sorted(by_seed)} but runs[{next(iter(runs))!r}] has "
                             f"{seeds}; every model needs the same seeds (the comparison is paired on seeds)")
    return sorted(runs), seeds


def compare_runs(gt, runs: dict, *, reference: str, iou_type: str = "bbox", n_boot: int = 1000, seed: int = 0,
                 confidence: float = 0.95, resample_seeds: bool = True,
                 occluded_recall_kwargs: dict | None = None, fdr: float | None = None) -> dict:
    """Each model of a grid against ``reference``, with a bootstrap over images and seeds, paired.

    Args:
        gt: the ground truth every run was evaluated on (path, dict or ``COCO``; as :func:`evaluate`).
        runs: ``{model name: {seed: predictions}}``; every model has the same seeds (ints >= 0) and
            a prediction set (a list of COCO results or a JSON path) per seed.
        reference: the model the others are compared with (e.g. ``"baseline"``).
        n_boot / seed / confidence: replicates, their RNG seed, the interval's coverage.
        resample_seeds: draw the seeds with replacement in each replicate too (the default); off,
            every replicate uses every seed once and only the images are resampled.
        occluded_recall_kwargs: as :func:`evaluate`'s.
        fdr: when given (e.g. 0.05), control the false discovery rate over every (model, metric)
            difference of the table with the Benjamini-Hochberg procedure on the bootstrap p-values
            (:func:`bootstrap_p`): a difference is ``significant`` (and its verdict ``"helps"`` /
            ``"hurts"``) only when it is rejected at that rate. Without it, a difference is
            significant when its interval excludes 0 (no correction for multiple comparisons).

    Each replicate draws the images with replacement (each counted as often as drawn, as in
    :func:`compare`) and the seeds with replacement, the same draws for every model: a model's value
    is the mean of its metric over the drawn seeds on the drawn images, and its difference from the
    reference is paired in both images and seeds. A metric is :data:`RUN_METRICS`'.

    Returns a JSON-serialisable dict: ``values[model][seed][metric]`` (each run on all images, -1
    where there is no ground truth), ``mean`` and ``std`` (sample standard deviation, 0 for one
    seed) over seeds per model and metric, and ``diff[model][metric]`` for every model but the
    reference: ``{"a", "b", "diff", "low", "high", "significant", "verdict"}`` with ``a``/``b`` the
    seed means of reference and model, ``low``/``high`` the percentile interval (``None`` when no
    replicate had ground truth for the metric), ``p`` the two-sided bootstrap p-value, ``p_adjusted``
    the Benjamini-Hochberg adjusted one (with ``fdr``; else ``None``) and ``verdict`` from
    :func:`verdict` (with ``fdr``: ``"no evidence"`` unless the difference is rejected).

    Errors: ``TypeError`` / ``ValueError`` naming the argument (``runs`` of the wrong shape, unknown
    ``reference``, different seeds per model, ``n_boot`` < 1, ``confidence`` outside (0, 1) ...);
    predictions are checked as by :func:`evaluate`. Results do not depend on the order of the
    models, seeds or predictions.

    Example:
        >>> r = compare_runs("gt.json", {"baseline": {0: "b0.json", 1: "b1.json"},
        ...                              "cbam": {0: "c0.json", 1: "c1.json"}}, reference="baseline")
        >>> r["diff"]["cbam"]["AP_tiny"]   # {'a': .., 'b': .., 'diff': .., 'low': .., 'high': .., ...}
    """
    _check_iou_type(iou_type)
    _check_compare_args(n_boot, seed, confidence)
    check_bool("resample_seeds", resample_seeds)
    if fdr is not None:
        check_real("fdr", fdr, 0.0, 1.0, lo_open=True, hi_open=True)
    recall = _recall_kwargs(occluded_recall_kwargs)
    names, seeds = _check_runs(runs, reference)
    gt_data = None
    tables: dict[str, dict[int, _RunTables]] = {}
    for name in names:
        tables[name] = {}
        for s in seeds:
            g, preds = prepare(gt if gt_data is None else gt_data, runs[name][s], iou_type)
            gt_data = gt_data or g
            has_occ = any("occlusion" in a for a in gt_data["annotations"])
            tables[name][s] = _RunTables(gt_data, preds, iou_type, has_occ, recall)
    first = tables[reference][seeds[0]]
    n, n_seeds = first.size.n_images, len(seeds)
    values = {name: {s: tables[name][s].metrics() for s in seeds} for name in names}
    metrics = list(values[reference][seeds[0]])
    rng = np.random.default_rng(seed)
    alpha = (1 - confidence) / 2
    others = [m for m in names if m != reference]
    boots: dict[str, dict[str, list[float]]] = {m: {k: [] for k in metrics} for m in others}
    for _ in range(n_boot):
        w = np.bincount(rng.integers(0, n, n), minlength=n).astype(np.float64)   # images, with replacement
        c = (np.bincount(rng.integers(0, n_seeds, n_seeds), minlength=n_seeds) if resample_seeds
             else np.ones(n_seeds, dtype=np.int64))                             # seeds, with replacement
        drawn = [(s, int(k)) for s, k in zip(seeds, c, strict=True) if k > 0]
        rep = {name: {s: tables[name][s].metrics(w) for s, _ in drawn} for name in names}
        for key in metrics:
            ref = [rep[reference][s][key] for s, _ in drawn]
            if min(ref) < 0:
                continue  # no ground truth for this metric in this replicate
            ref_mean = sum(k * v for (_, k), v in zip(drawn, ref, strict=True)) / n_seeds
            for m in others:
                vals = [rep[m][s][key] for s, _ in drawn]
                if min(vals) >= 0:
                    boots[m][key].append(sum(k * v for (_, k), v in zip(drawn, vals, strict=True)) / n_seeds - ref_mean)
    mean = {m: {k: _seed_mean([values[m][s][k] for s in seeds]) for k in metrics} for m in names}
    std = {m: {k: _seed_std([values[m][s][k] for s in seeds]) for k in metrics} for m in names}
    diff: dict = {}
    for m in others:
        diff[m] = {}
        for k in metrics:
            low, high = _interval(boots[m][k], alpha)
            a, b = mean[reference][k], mean[m][k]
            has = a is not None and b is not None
            diff[m][k] = {"a": a, "b": b, "diff": b - a if has else None, "low": low, "high": high,
                          "p": bootstrap_p(boots[m][k]) if has else None, "p_adjusted": None,
                          "significant": bool(low is not None and (low > 0 or high < 0)), "verdict": verdict(low, high)}
    if fdr is not None:
        adjusted = benjamini_hochberg({(m, k): diff[m][k]["p"] for m in others for k in metrics}, fdr)
        for m in others:
            for k in metrics:
                c = diff[m][k]
                p_adj, rejected = adjusted.get((m, k), (None, False))
                c["p_adjusted"] = p_adj
                c["significant"] = bool(rejected and c["low"] is not None)
                c["verdict"] = ("no evidence" if not c["significant"] or c["diff"] is None
                                else "helps" if c["diff"] > 0 else "hurts")
    return {"n_boot": n_boot, "seed": seed, "confidence": confidence, "resample_seeds": resample_seeds, "fdr": fdr,
            "num_images": n, "reference": reference, "models": names, "seeds": seeds, "metrics": metrics,
            "values": {m: {str(s): values[m][s] for s in seeds} for m in names}, "mean": mean, "std": std,
            "diff": diff}


def _seed_mean(v: list[float]) -> float | None:
    """Mean over seeds; ``None`` when a run has no ground truth for the metric (-1)."""
    return None if min(v) < 0 else float(np.mean(v))


def _seed_std(v: list[float]) -> float | None:
    """Sample standard deviation over seeds (0 for one seed); ``None`` as :func:`_seed_mean`."""
    return None if min(v) < 0 else float(np.std(v, ddof=1)) if len(v) > 1 else 0.0
