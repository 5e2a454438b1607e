"""Bad input to ``visattn.evaluation``: a clear error naming the bad argument or the first bad entry,
never a silent wrong answer; results independent of input order; ``compare`` exact; reports whole.

Add a case: one row in ``CASES``: ``(id, call, exception, regex)``, where ``call(gt, preds, tmp)``
runs the API on a tiny valid ground truth ``gt`` (2 images, 2 classes, occlusion field) and valid
``preds`` (bbox), which it may copy and spoil with :func:`_spoil` / :func:`_spoil_gt`.
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from visattn.evaluation import (
    compare,
    error_breakdown,
    evaluate,
    load_gt,
    load_predictions,
    occluded_recall,
    write_report,
)
from visattn.evaluation.compare import _tables
from visattn.evaluation.core import OCCLUSION_BUCKETS, SIZE_BINS
from visattn.evaluation.errors import classify_detections

COCO128 = Path(__file__).resolve().parents[2] / "shared" / "data" / "coco128" / "annotations" / "instances.json"
needs_coco128 = pytest.mark.skipif(not COCO128.is_file(), reason="../shared/data/coco128 not present")


def _tiny_gt() -> dict:
    anns = []
    for img in (1, 2):
        for j, (x, y, w, h, occ) in enumerate([(4, 4, 20, 20, 0.0), (30, 30, 12, 16, 0.4), (10, 40, 8, 8, 0.7)]):
            anns.append({"id": 10 * img + j, "image_id": img, "category_id": 1 + j % 2, "bbox": [x, y, w, h],
                         "area": float(w * h), "iscrowd": 0, "occlusion": occ})
    return {"images": [{"id": i, "file_name": f"{i}.png", "width": 64, "height": 64} for i in (1, 2)],
            "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}], "annotations": anns}


def _tiny_preds(gt: dict) -> list[dict]:
    return [{"image_id": a["image_id"], "category_id": a["category_id"], "score": 0.9 - 0.1 * i,
             "bbox": [a["bbox"][0] + 1, a["bbox"][1], a["bbox"][2], a["bbox"][3]]}
            for i, a in enumerate(gt["annotations"])]


def _spoil(preds: list[dict], index: int = 1, **changes) -> list[dict]:
    """A copy of ``preds`` with ``changes`` applied to entry ``index`` (value ``...`` deletes)."""
    out = copy.deepcopy(preds)
    for k, v in changes.items():
        if v is ...:
            del out[index][k]
        else:
            out[index][k] = v
    return out


def _spoil_gt(gt: dict, index: int = 2, **changes) -> dict:
    """A copy of ``gt`` with ``changes`` applied to annotation ``index`` (value ``...`` deletes)."""
    out = copy.deepcopy(gt)
    for k, v in changes.items():
        if v is ...:
            del out["annotations"][index][k]
        else:
            out["annotations"][index][k] = v
    return out


def _segm_preds(gt: dict) -> list[dict]:
    from pycocotools import mask as mu
    out = []
    for p in _tiny_preds(gt):
        m = np.zeros((64, 64), dtype=np.uint8, order="F")
        x, y, w, h = (int(v) for v in p["bbox"])
        m[y:y + h, x:x + w] = 1
        rle = mu.encode(m)
        out.append({**p, "segmentation": {"size": [64, 64], "counts": rle["counts"].decode("ascii")}})
        del out[-1]["bbox"]
    return out


def _segm_gt(gt: dict) -> dict:
    gt = copy.deepcopy(gt)
    for a in gt["annotations"]:
        x, y, w, h = a["bbox"]
        a["segmentation"] = [[x, y, x + w, y, x + w, y + h, x, y + h]]
    return gt


def _empty_counts(h: int, w: int) -> str:
    """The compressed RLE counts of an empty h x w mask (pycocotools' own encoding)."""
    return mask_utils.encode(np.zeros((h, w), np.uint8, order="F"))["counts"].decode()


def _ev(gt, preds, **kw):
    return evaluate(gt, preds, errors=False, **kw)


NAN = float("nan")
# (id, call(gt, preds, tmp), exception, regex the message must match)
CASES = [
    # -- predictions: the first bad entry is named by index and image id
    ("pred-score-nan", lambda g, p, t: _ev(g, _spoil(p, score=NAN)), ValueError,
     r"predictions\[1\] \(image_id=1\).*score must be a finite number.*nan"),
    ("pred-score-inf", lambda g, p, t: _ev(g, _spoil(p, 4, score=math.inf)), ValueError,
     r"predictions\[4\] \(image_id=2\).*score.*inf"),
    ("pred-score-str", lambda g, p, t: _ev(g, _spoil(p, score="0.9")), ValueError, r"predictions\[1\].*score.*str"),
    ("pred-score-none", lambda g, p, t: _ev(g, _spoil(p, score=None)), ValueError, r"predictions\[1\].*score.*None"),
    ("pred-score-bool", lambda g, p, t: _ev(g, _spoil(p, score=True)), ValueError, r"predictions\[1\].*score.*bool"),
    ("pred-score-first-of-two", lambda g, p, t: _ev(g, _spoil(_spoil(p, 5, score=NAN), 3, score=NAN)), ValueError,
     r"predictions\[3\] \(image_id=2\)"),
    ("pred-bbox-nan", lambda g, p, t: _ev(g, _spoil(p, bbox=[1.0, NAN, 3.0, 3.0])), ValueError,
     r"predictions\[1\].*bbox must be 4 finite numbers"),
    ("pred-bbox-inf-w", lambda g, p, t: _ev(g, _spoil(p, bbox=[1.0, 1.0, math.inf, 3.0])), ValueError,
     r"predictions\[1\].*bbox"),
    ("pred-bbox-len3", lambda g, p, t: _ev(g, _spoil(p, bbox=[1.0, 2.0, 3.0])), ValueError, r"predictions\[1\].*bbox"),
    ("pred-bbox-str", lambda g, p, t: _ev(g, _spoil(p, bbox=[1.0, "2", 3.0, 3.0])), ValueError,
     r"predictions\[1\].*bbox"),
    ("pred-bbox-not-list", lambda g, p, t: _ev(g, _spoil(p, bbox="1 2 3 4")), ValueError, r"predictions\[1\].*bbox"),
    ("pred-bbox-neg-w", lambda g, p, t: _ev(g, _spoil(p, bbox=[10.0, 10.0, -3.0, 3.0])), ValueError,
     r"predictions\[1\].*width and height must be >= 0"),
    ("pred-bbox-neg-h", lambda g, p, t: _ev(g, _spoil(p, bbox=[10.0, 10.0, 3.0, -1.0])), ValueError,
     r"predictions\[1\].*width and height"),
    ("pred-image-id-str", lambda g, p, t: _ev(g, _spoil(p, image_id="1")), ValueError,
     r"predictions\[1\].*image_id must be an int"),
    ("pred-category-float", lambda g, p, t: _ev(g, _spoil(p, category_id=1.0)), ValueError,
     r"predictions\[1\].*category_id must be an int"),
    ("pred-not-dict", lambda g, p, t: _ev(g, [*p, [1, 2]]), ValueError, r"predictions\[6\] needs keys"),
    ("segm-polygon", lambda g, p, t: _ev(_segm_gt(g), _spoil(_segm_preds(g), segmentation=[[1, 1, 5, 1, 5, 5]]),
                                        iou_type="segm"), ValueError, r"predictions\[1\].*compressed RLE"),
    ("segm-uncompressed", lambda g, p, t: _ev(_segm_gt(g), _spoil(_segm_preds(g), segmentation={
        "size": [64, 64], "counts": [0, 5, 4091]}), iou_type="segm"), ValueError, r"predictions\[1\].*segmentation"),
    ("segm-wrong-size", lambda g, p, t: _ev(_segm_gt(g), _spoil(_segm_preds(g), segmentation={
        "size": [32, 64], "counts": _empty_counts(32, 64)}), iou_type="segm"), ValueError,
     r"predictions\[1\].*segmentation size \[32, 64\] differs.*\[64, 64\]"),
    # corrupt compressed counts: pycocotools would read them silently (wrong area, or a long loop)
    ("segm-counts-short", lambda g, p, t: _ev(_segm_gt(g), _spoil(_segm_preds(g), segmentation={
        "size": [64, 64], "counts": "0"}), iou_type="segm"), ValueError,
     r"predictions\[1\].*runs cover 0 pixels, not height \* width = 4096"),
    ("segm-counts-bad-char", lambda g, p, t: _ev(_segm_gt(g), _spoil(_segm_preds(g), segmentation={
        "size": [64, 64], "counts": "P1~~"}), iou_type="segm"), ValueError,
     r"predictions\[1\].*corrupt.*not an RLE character"),
    ("segm-counts-truncated", lambda g, p, t: _ev(_segm_gt(g), _spoil(_segm_preds(g), segmentation={
        "size": [64, 64], "counts": _empty_counts(64, 64)[:-1] + "o"}), iou_type="segm"), ValueError,
     r"predictions\[1\].*(truncated|runs cover)"),
    ("gt-rle-counts-corrupt", lambda g, p, t: _ev(_spoil_gt(_segm_gt(g), segmentation={
        "size": [64, 64], "counts": "0"}), _segm_preds(g), iou_type="segm"), ValueError,
     r"annotations\[2\].*not a valid RLE: its runs cover 0 pixels"),
    ("gt-rle-list-short", lambda g, p, t: _ev(_spoil_gt(_segm_gt(g), segmentation={
        "size": [64, 64], "counts": [10, 5]}), _segm_preds(g), iou_type="segm"), ValueError,
     r"annotations\[2\].*runs cover 15 pixels"),
    ("segm-missing", lambda g, p, t: _ev(_segm_gt(g), _spoil(_segm_preds(g), segmentation=...), iou_type="segm"),
     ValueError, r"predictions\[1\] needs keys.*segmentation"),
    ("segm-some-boxes", lambda g, p, t: _ev(_segm_gt(g), _spoil(_segm_preds(g), 2, bbox=[1, 1, 2, 2]),
                                           iou_type="segm"), ValueError, r"predictions\[2\].*has a 'bbox'"),
    # -- every entry point checks predictions
    ("compare-score-nan", lambda g, p, t: compare(g, p, _spoil(p, score=NAN), n_boot=2), ValueError,
     r"predictions\[1\].*score"),
    ("recall-score-nan", lambda g, p, t: occluded_recall(g, _spoil(p, score=NAN)), ValueError,
     r"predictions\[1\].*score"),
    ("errors-score-nan", lambda g, p, t: error_breakdown(g, _spoil(p, score=NAN)), ValueError,
     r"predictions\[1\].*score"),
    ("classify-score-nan", lambda g, p, t: classify_detections(g, _spoil(p, score=NAN)), ValueError,
     r"predictions\[1\].*score"),
    # -- ground truth given as a dict is checked like a file
    ("gt-bbox-nan", lambda g, p, t: _ev(_spoil_gt(g, bbox=[1.0, 1.0, NAN, 2.0]), p), ValueError,
     r"gt: annotations\[2\] \(id=12, image_id=1\) bbox must be 4 finite"),
    ("gt-bbox-neg", lambda g, p, t: _ev(_spoil_gt(g, bbox=[1.0, 1.0, -2.0, 2.0]), p), ValueError,
     r"annotations\[2\].*w, h >= 0"),
    ("gt-area-nan", lambda g, p, t: _ev(_spoil_gt(g, area=NAN), p), ValueError,
     r"annotations\[2\].*area must be a finite number"),
    ("gt-area-missing", lambda g, p, t: _ev(_spoil_gt(g, area=...), p), ValueError, r"annotations\[2\].*area"),
    ("gt-area-str", lambda g, p, t: _ev(_spoil_gt(g, area="64"), p), ValueError, r"annotations\[2\].*area"),
    ("gt-occlusion-nan", lambda g, p, t: _ev(_spoil_gt(g, occlusion=NAN), p), ValueError,
     r"annotations\[2\].*occlusion must be a finite number in \[0, 1\]"),
    ("gt-occlusion-big", lambda g, p, t: _ev(_spoil_gt(g, occlusion=1.5), p), ValueError,
     r"annotations\[2\].*occlusion"),
    ("gt-iscrowd-2", lambda g, p, t: _ev(_spoil_gt(g, iscrowd=2), p), ValueError, r"annotations\[2\].*iscrowd"),
    ("gt-ann-id-repeated", lambda g, p, t: _ev(_spoil_gt(g, id=10), p), ValueError, r"annotations\[2\] repeats id 10"),
    ("gt-ann-id-missing", lambda g, p, t: _ev(_spoil_gt(g, id=...), p), ValueError, r"annotations\[2\].*int 'id'"),
    ("gt-unknown-image", lambda g, p, t: _ev(_spoil_gt(g, image_id=7), p), ValueError,
     r"annotations\[2\].*image id not in 'images'"),
    ("gt-segm-missing", lambda g, p, t: _ev(_spoil_gt(_segm_gt(g), segmentation=...), _segm_preds(g),
                                           iou_type="segm"), ValueError, r"annotations\[2\].*no 'segmentation'"),
    ("gt-segm-nan", lambda g, p, t: _ev(_spoil_gt(_segm_gt(g), segmentation=[[1, 1, NAN, 1, 5, 5]]),
                                       _segm_preds(g), iou_type="segm"), ValueError, r"annotations\[2\].*segmentation"),
    ("gt-bad-type", lambda g, p, t: _ev(42, p), TypeError, r"gt must be"),
    ("compare-gt-area-nan", lambda g, p, t: compare(_spoil_gt(g, area=NAN), p, p, n_boot=2), ValueError,
     r"annotations\[2\].*area"),
    ("recall-gt-occlusion-nan", lambda g, p, t: occluded_recall(_spoil_gt(g, occlusion=NAN), p), ValueError,
     r"annotations\[2\].*occlusion"),
    ("load-gt-bad-occlusion", lambda g, p, t: load_gt(_spoil_gt(g, occlusion=-0.5)), ValueError,
     r"annotations\[2\].*occlusion"),
    # -- arguments, by name
    ("compare-n-boot-0", lambda g, p, t: compare(g, p, p, n_boot=0), ValueError, r"n_boot must be an int >= 1, got 0"),
    ("compare-n-boot-neg", lambda g, p, t: compare(g, p, p, n_boot=-3), ValueError, r"n_boot.*>= 1"),
    ("compare-n-boot-float", lambda g, p, t: compare(g, p, p, n_boot=10.5), TypeError, r"n_boot must be an int"),
    ("compare-n-boot-bool", lambda g, p, t: compare(g, p, p, n_boot=True), TypeError, r"n_boot"),
    ("compare-seed-neg", lambda g, p, t: compare(g, p, p, n_boot=2, seed=-1), ValueError, r"seed must be an int >= 0"),
    ("compare-seed-str", lambda g, p, t: compare(g, p, p, n_boot=2, seed="0"), TypeError, r"seed"),
    ("compare-confidence-1", lambda g, p, t: compare(g, p, p, n_boot=2, confidence=1.0), ValueError,
     r"confidence must be a finite number in \(0.0, 1.0\)"),
    ("compare-confidence-pct", lambda g, p, t: compare(g, p, p, n_boot=2, confidence=95), ValueError, r"confidence"),
    ("compare-iou-type", lambda g, p, t: compare(g, p, p, n_boot=2, iou_type="box"), ValueError,
     r"iou_type must be one of 'bbox', 'segm', got 'box'"),
    ("evaluate-iou-type-none", lambda g, p, t: _ev(g, p, iou_type=None), TypeError, r"iou_type must be one of"),
    ("evaluate-backend", lambda g, p, t: _ev(g, p, backend="detectron2"), ValueError,
     r"backend must be one of 'pycocotools', 'faster_coco_eval', got 'detectron2'"),
    ("evaluate-backend-none", lambda g, p, t: _ev(g, p, backend=None), TypeError, r"backend"),
    ("evaluate-size-bins-str", lambda g, p, t: _ev(g, p, size_bins="no"), TypeError, r"size_bins must be True or False"),
    ("evaluate-errors-int", lambda g, p, t: evaluate(g, p, errors=2), TypeError, r"errors must be True or False"),
    ("evaluate-recall-kwargs-typo", lambda g, p, t: _ev(g, p, occluded_recall_kwargs={"score_tresh": 0.5}),
     TypeError, r"occluded_recall_kwargs.*'score_tresh'"),
    ("evaluate-recall-kwargs-value", lambda g, p, t: _ev(g, p, occluded_recall_kwargs={"iou_thr": 0.0}),
     ValueError, r"iou_thr must be a finite number in \(0.0, 1.0\]"),
    ("recall-min-occlusion", lambda g, p, t: occluded_recall(g, p, min_occlusion=1.5), ValueError, r"min_occlusion"),
    ("recall-score-thr-nan", lambda g, p, t: occluded_recall(g, p, score_thr=NAN), ValueError, r"score_thr"),
    ("recall-iou-type", lambda g, p, t: occluded_recall(g, p, iou_type="mask"), ValueError, r"iou_type"),
    ("errors-backend", lambda g, p, t: error_breakdown(g, p, backend="tide"), ValueError, r"backend must be one of"),
    ("errors-iou-type", lambda g, p, t: error_breakdown(g, p, iou_type=1), TypeError, r"iou_type"),
    ("classify-max-dets", lambda g, p, t: classify_detections(g, p, max_dets=0), ValueError, r"max_dets"),
    ("load-predictions-int", lambda g, p, t: load_predictions(5), TypeError, r"predictions must be a list"),
    ("load-predictions-dict-file", lambda g, p, t: load_predictions(_dump(t / "d.json", {"a": 1})), ValueError,
     r"d\.json: must hold a list"),
    ("load-predictions-missing", lambda g, p, t: load_predictions(t / "nope.json"), FileNotFoundError, r"nope\.json"),
    ("load-gt-int", lambda g, p, t: load_gt(3.5), TypeError, r"gt must be"),
    ("load-gt-iou-type", lambda g, p, t: load_gt(g, iou_type="segmentation"), ValueError, r"iou_type"),
    ("report-out-dir-int", lambda g, p, t: write_report(5, _ev(g, p)), TypeError, r"out_dir"),
    ("report-out-dir-file", lambda g, p, t: write_report(_dump(t / "f.json", {}), _ev(g, p)), NotADirectoryError,
     r"out_dir.*f\.json.*not a folder"),
    ("report-result-partial", lambda g, p, t: write_report(t / "r", {"AP": 0.5}), ValueError, r"result lacks AP50"),
    ("report-comparison-list", lambda g, p, t: write_report(t / "r", _ev(g, p), comparison=[1]), TypeError,
     r"comparison"),
    ("report-title-int", lambda g, p, t: write_report(t / "r", _ev(g, p), title=3), TypeError, r"title"),
]


def _dump(path: Path, obj) -> Path:
    path.write_text(json.dumps(obj))
    return path


@pytest.mark.parametrize(("call", "exc", "regex"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input(call, exc, regex, tmp_path):
    gt = _tiny_gt()
    preds = _tiny_preds(gt)
    with pytest.raises(exc, match=regex):
        call(gt, preds, tmp_path)


def test_tiny_case_is_valid():
    """The fixtures the table spoils are themselves accepted (so each case fails for its one fault)."""
    gt = _tiny_gt()
    assert _ev(gt, _tiny_preds(gt))["AP"] > 0
    assert _ev(_segm_gt(gt), _segm_preds(gt), iou_type="segm")["AP"] > 0
    assert compare(gt, _tiny_preds(gt), _tiny_preds(gt), n_boot=2)["overall"]["AP"]["diff"] == 0.0


# -- order independence ----------------------------------------------------------------------------


def _perturbed(gt: dict, seed: int, tie_decimals: int | None = None) -> list[dict]:
    """Jittered true boxes, relabelled and dropped objects and clutter (as tests/test_evaluation.py);
    with ``tie_decimals``, scores are rounded so that many tie."""
    from tests.test_evaluation import _perturbed as perturbed
    preds = perturbed(gt, seed)
    if tie_decimals is not None:
        for p in preds:
            p["score"] = round(p["score"], tie_decimals)
    return preds


def _shuffled(gt: dict, preds: list[dict], seed: int) -> tuple[dict, list[dict]]:
    rng = np.random.default_rng(seed)
    g = copy.deepcopy(gt)
    for key in ("images", "annotations", "categories"):
        g[key] = [g[key][i] for i in rng.permutation(len(g[key]))]
    return g, [copy.deepcopy(preds[i]) for i in rng.permutation(len(preds))]


@pytest.fixture(scope="module")
def coco64():
    """The first 64 images of coco128 (keeps each evaluation well under a second)."""
    gt = json.loads(COCO128.read_text())
    keep = {im["id"] for im in gt["images"][:64]}
    return {**gt, "images": [im for im in gt["images"] if im["id"] in keep],
            "annotations": [a for a in gt["annotations"] if a["image_id"] in keep]}


@needs_coco128
def test_error_breakdown_same_for_reversed_predictions(coco64):
    """Several localisation errors on one object: the oracle fixes the highest-scoring one, whatever
    the file order (it used to fix the first in the file)."""
    preds = _perturbed(coco64, seed=11)
    rng = np.random.default_rng(0)
    for a in coco64["annotations"][::2]:
        x, y, w, h = a["bbox"]
        for dx in (0.55, -0.6):  # IoU about 0.3: localisation errors, not true positives
            preds.append({"image_id": a["image_id"], "category_id": a["category_id"], "score": float(rng.random()),
                          "bbox": [x + dx * w, y, w, h]})
    kw = {"size_bins": False, "occlusion": False, "per_class": False, "backend": "faster_coco_eval"}
    fwd = evaluate(coco64, preds, **kw)["errors"]
    rev = evaluate(coco64, preds[::-1], **kw)["errors"]
    assert fwd["types"]["localisation"]["count"] > 50
    assert fwd == rev


@needs_coco128
@pytest.mark.parametrize("backend", ["pycocotools", "faster_coco_eval"])
def test_every_number_same_for_any_order_with_tied_scores(coco64, backend):
    gt = copy.deepcopy(coco64)
    rng = np.random.default_rng(0)
    for a in gt["annotations"]:
        a["occlusion"] = float(rng.choice([0.0, 0.3, 0.8]))
    preds = _perturbed(gt, seed=12, tie_decimals=1)
    assert len({p["score"] for p in preds}) < len(preds) / 10  # ties everywhere
    want = evaluate(gt, preds, backend=backend, occluded_recall_kwargs={"iou_thr": 0.5})
    g2, p2 = _shuffled(gt, preds, seed=1)
    got = evaluate(g2, p2, backend=backend, occluded_recall_kwargs={"iou_thr": 0.5})
    assert got == want  # bit for bit, every key
    assert got["occluded_recall"]["count"] > 0


@needs_coco128
def test_compare_same_for_any_order(coco64):
    pa, pb = _perturbed(coco64, seed=13, tie_decimals=1), _perturbed(coco64, seed=14, tie_decimals=2)
    want = compare(coco64, pa, pb, n_boot=10)
    g2, pa2 = _shuffled(coco64, pa, seed=2)
    _, pb2 = _shuffled(coco64, pb, seed=3)
    assert compare(g2, pa2, pb2, n_boot=10) == want


# -- compare is exact ------------------------------------------------------------------------------


@needs_coco128
def test_compare_equals_evaluate_at_unit_weights_in_every_bucket(coco64):
    gt = copy.deepcopy(coco64)
    rng = np.random.default_rng(0)
    for a in gt["annotations"]:
        a["occlusion"] = float(rng.random())
    preds = _perturbed(gt, seed=1)
    r = evaluate(gt, preds, errors=False, per_class=False)
    c = compare(gt, preds, preds, n_boot=1)
    checks = [(c["overall"][m]["a"], r[m]) for m in ("AP", "AP50", "AP75", "AR100")]
    checks += [(c[f"size/{k}"][m]["a"], r["size"][k][m]) for k in SIZE_BINS for m in ("AP", "AR100")]
    checks += [(c[f"occlusion/{k}"][m]["a"], r["occlusion"][k][m]) for k in OCCLUSION_BUCKETS for m in ("AP", "AR100")]
    for got, want in checks:
        assert abs(got - want) <= 1e-12, (got, want)


@needs_coco128
def test_bootstrap_replicate_equals_pycocotools_on_resampled_images(coco64):
    """One replicate's weighted accumulate = COCOeval on a dataset where each drawn image appears as
    often as drawn (copies with new ids, numbered next to each other), predictions copied along."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt = coco64
    preds = _perturbed(gt, seed=15)
    rngs = {"all": (0.0, 1e10), **SIZE_BINS}
    tables = _tables(gt, preds, "bbox", rngs)
    ids = sorted(im["id"] for im in gt["images"])
    counts = np.bincount(np.random.default_rng(7).integers(0, len(ids), len(ids)), minlength=len(ids))
    assert counts.max() > 1 and (counts == 0).any()
    images, anns, res = [], [], []
    by_id = {im["id"]: im for im in gt["images"]}
    for old, n in zip(ids, counts, strict=True):
        for _ in range(n):
            new = len(images) + 1
            images.append({**by_id[old], "id": new})
            own = [a for a in gt["annotations"] if a["image_id"] == old]
            anns += [{**a, "id": len(anns) + j + 1, "image_id": new} for j, a in enumerate(own)]
            res += [{**p, "image_id": new} for p in preds if p["image_id"] == old]
    with contextlib.redirect_stdout(io.StringIO()):
        g = COCO()
        g.dataset = {**gt, "images": images, "annotations": anns}
        g.createIndex()
        ev = COCOeval(g, g.loadRes(copy.deepcopy(res)), "bbox")
        ev.params.areaRng, ev.params.areaRngLbl = [list(r) for r in rngs.values()], list(rngs)
        ev.evaluate()
        ev.accumulate()
    for a, name in enumerate(rngs):
        got = tables.metrics(a, counts.astype(np.float64))
        prec, rec = ev.eval["precision"][:, :, :, a, -1], ev.eval["recall"][:, :, a, -1]
        want = {"AP": np.mean(prec[prec > -1]), "AP50": np.mean(prec[0][prec[0] > -1]),
                "AP75": np.mean(prec[5][prec[5] > -1]), "AR100": np.mean(rec[rec > -1])}
        for m, v in want.items():
            assert abs(got[m] - v) <= 1e-12, (name, m, got[m], v)


def test_compare_without_ground_truth_in_a_group_has_no_interval():
    gt = _tiny_gt()  # no object in "large" or "very_tiny"
    r = compare(gt, _tiny_preds(gt), _tiny_preds(gt), n_boot=3)
    assert r["size/large"]["AP"]["low"] is None and not r["size/large"]["AP"]["significant"]
    assert r["size/large"]["AP"]["a"] == -1.0


# -- reports are whole and strict JSON -------------------------------------------------------------


def _temp_files(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if ".tmp-" in p.name]


def test_report_unserialisable_result_keeps_old_report(tmp_path):
    gt = _tiny_gt()
    good = _ev(gt, _tiny_preds(gt))
    write_report(tmp_path, good)
    before = (tmp_path / "report.json").read_bytes()
    with pytest.raises(TypeError, match=r"result\['extra'\].*object"):
        write_report(tmp_path, {**good, "extra": object()})
    assert (tmp_path / "report.json").read_bytes() == before
    assert _temp_files(tmp_path) == []


def test_report_write_failing_midway_keeps_old_report(tmp_path, monkeypatch):
    gt = _tiny_gt()
    result = _ev(gt, _tiny_preds(gt))
    write_report(tmp_path, result)
    texts = ("report.json", "report.md")
    before = {n: (tmp_path / n).read_bytes() for n in texts}
    import visattn._io as vio

    real_open = open

    class _DiskFull:
        """A file whose writes land halfway and then fail as a full disk does."""

        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            self.f.write(data[: len(data) // 2])
            raise OSError(28, "No space left on device")

    def disk_full_open(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        return _DiskFull(f) if "w" in mode else f

    monkeypatch.setattr(vio, "open", disk_full_open, raising=False)
    with pytest.raises(OSError, match="No space left"):
        write_report(tmp_path, {**result, "AP": 0.123})
    assert {n: (tmp_path / n).read_bytes() for n in texts} == before
    assert _temp_files(tmp_path) == []


def test_report_json_is_strict_json(tmp_path):
    gt = _tiny_gt()
    result = {**_ev(gt, _tiny_preds(gt)), "AR1": NAN, "AR10": np.float32(0.5), "extra": np.array([1.0, np.inf])}
    write_report(tmp_path, result)

    def no_constants(name):
        raise AssertionError(f"{name} in report.json")

    rep = json.loads((tmp_path / "report.json").read_text(), parse_constant=no_constants)
    assert rep["result"]["AR1"] is None and rep["result"]["AR10"] == 0.5 and rep["result"]["extra"] == [1.0, None]
    assert "| n/a |" in (tmp_path / "report.md").read_text()
