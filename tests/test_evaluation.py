"""evaluate(): equality with pycocotools on real data, bucket semantics, errors; compare(); reports."""
import copy
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from visattn.cli import main as cli
from visattn.data import generate_synthetic
from visattn.evaluation import STANDARD_KEYS, compare, error_breakdown, evaluate, occluded_recall
from visattn.evaluation.compare import _tables
from visattn.evaluation.core import SIZE_BINS

COCO128 = Path(__file__).resolve().parents[2] / "shared" / "data" / "coco128" / "annotations" / "instances.json"
needs_coco128 = pytest.mark.skipif(not COCO128.is_file(), reason="../shared/data/coco128 not present")


def _perturbed(gt: dict, seed: int, noise: float = 1.0, segm: bool = False) -> list[dict]:
    """Predictions nobody tuned: jittered boxes, dropped and relabelled objects, random clutter."""
    rng = np.random.default_rng(seed)
    cats = [c["id"] for c in gt["categories"]]
    sizes = {im["id"]: (im["height"], im["width"]) for im in gt["images"]}
    out = []
    for a in gt["annotations"]:
        if rng.random() < 0.2:
            continue
        x, y, w, h = a["bbox"]
        p = {"image_id": a["image_id"], "score": float(rng.random()),
             "category_id": a["category_id"] if rng.random() > 0.1 else int(rng.choice(cats)),
             "bbox": [x + rng.normal(0, noise * (w / 10 + 1)), y + rng.normal(0, noise * (h / 10 + 1)),
                      w * float(np.exp(rng.normal(0, 0.1 * noise))), h * float(np.exp(rng.normal(0, 0.1 * noise)))]}
        out.append(p)
    for im in gt["images"]:
        for _ in range(3):
            out.append({"image_id": im["id"], "category_id": int(rng.choice(cats)), "score": float(rng.random() / 2),
                        "bbox": [float(rng.uniform(0, im["width"] / 2)), float(rng.uniform(0, im["height"] / 2)),
                                 float(rng.uniform(4, 100)), float(rng.uniform(4, 100))]})
    if segm:
        from pycocotools import mask as mu
        for p in out:
            h, w = sizes[p["image_id"]]
            x, y, bw, bh = p["bbox"]
            rle = mu.frPyObjects([[x, y, x + bw, y, x + bw, y + bh, x, y + bh]], h, w)[0]
            rle["counts"] = rle["counts"].decode("ascii")
            p["segmentation"] = rle
            del p["bbox"]
    return out


def _pycocotools_stats(gt_path, preds, iou_type):
    gt = COCO(str(gt_path))
    ev = COCOeval(gt, gt.loadRes(copy.deepcopy(preds)), iou_type)
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    return ev.stats


@pytest.fixture(scope="module")
def coco128():
    return json.loads(COCO128.read_text())


@needs_coco128
@pytest.mark.parametrize("backend", ["pycocotools", "faster_coco_eval"])
@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_standard_metrics_equal_pycocotools_on_coco128(coco128, backend, iou_type):
    preds = _perturbed(coco128, seed=1, segm=iou_type == "segm")
    want = _pycocotools_stats(COCO128, preds, iou_type)
    got = evaluate(str(COCO128), preds, iou_type=iou_type, backend=backend, errors=False)
    assert list(got)[4:16] == list(STANDARD_KEYS)
    for i, k in enumerate(STANDARD_KEYS):
        assert abs(got[k] - want[i]) < 1e-6, (k, got[k], want[i])
    assert 0.05 < got["AP"] < 0.9  # a real, non-degenerate case
    assert set(got["size"]) == set(SIZE_BINS) and sum(b["count"] for b in got["size"].values()) >= 900
    assert len(got["per_class"]) == 80


@needs_coco128
def test_backends_agree_on_everything_and_predictions_from_file(coco128, tmp_path):
    preds = _perturbed(coco128, seed=2)
    path = tmp_path / "preds.json"
    path.write_text(json.dumps(preds))
    a = evaluate(COCO128, path)
    b = evaluate(COCO(str(COCO128)), preds, backend="faster_coco_eval")
    for k in STANDARD_KEYS:
        assert abs(a[k] - b[k]) < 1e-9
    for name in SIZE_BINS:
        assert abs(a["size"][name]["AP"] - b["size"][name]["AP"]) < 1e-9
    for kind, r in a["errors"]["types"].items():
        assert abs(r["delta_AP50"] - b["errors"]["types"][kind]["delta_AP50"]) < 1e-9


@needs_coco128
def test_bootstrap_accumulate_reproduces_cocoeval(coco128):
    preds = _perturbed(coco128, seed=3)
    r = evaluate(COCO128, preds, errors=False, per_class=False)
    tables = _tables(coco128, preds, "bbox", {"all": (0, 1e10), **SIZE_BINS})
    m = tables.metrics(0)
    for k in ("AP", "AP50", "AP75", "AR100"):
        assert abs(m[k] - r[k]) < 1e-12
    assert abs(tables.metrics(2)["AP"] - r["size"]["tiny"]["AP"]) < 1e-12


# -- occlusion buckets on hand-made cases ------------------------------------------------------------


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = generate_synthetic(tmp_path_factory.mktemp("s"), num_images=40, image_size=192, seed=5)
    return json.loads((root / "annotations" / "instances.json").read_text())


def _exact(anns, score=1.0):
    return [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": list(a["bbox"]), "score": score}
            for a in anns]


def test_bucket_semantics_ignore_other_buckets(synth):
    none = [a for a in synth["annotations"] if a["occlusion"] <= 0.1]
    heavy = [a for a in synth["annotations"] if a["occlusion"] > 0.5]
    assert none and heavy
    r = evaluate(synth, _exact(none), errors=False)
    assert r["occlusion"]["none"]["AP"] == pytest.approx(1.0)
    assert r["occlusion"]["heavy"]["AR100"] == pytest.approx(0.0)
    assert r["occlusion"]["none"]["count"] == len(none)
    # detecting heavy objects too is not a false positive in "none" ...
    r = evaluate(synth, _exact(none) + _exact(heavy, score=0.5), errors=False)
    assert r["occlusion"]["none"]["AP"] == pytest.approx(1.0)
    assert r["occlusion"]["heavy"]["AP"] == pytest.approx(1.0)
    # ... but a detection of nothing is a false positive in every bucket
    img = synth["images"][0]
    junk = [{"image_id": img["id"], "category_id": 1, "bbox": [0.0, 0.0, 2.0, 2.0], "score": 2.0}]
    r = evaluate(synth, junk + _exact(none), errors=False)
    assert r["occlusion"]["none"]["AP"] < 1.0
    assert r["occluded_recall"]["recall"] == pytest.approx(0.0)


def test_occluded_recall(synth):
    occluded = [a for a in synth["annotations"] if a["occlusion"] > 0.1]
    r = occluded_recall(synth, _exact(occluded[::2], score=0.5))
    assert r["count"] == len(occluded)
    assert r["recall"] == pytest.approx(len(occluded[::2]) / len(occluded))
    low = occluded_recall(synth, _exact(occluded, score=0.2))
    assert low["recall"] == 0.0  # below the score threshold


def test_error_breakdown_finds_the_planted_errors(synth):
    anns = synth["annotations"]
    preds = _exact(anns[:50])
    dup = _exact(anns[50:60], score=0.5) * 2                   # 10 duplicates
    wrong = _exact(anns[60:70])
    for p in wrong:
        p["category_id"] = p["category_id"] % 8 + 1            # 10 classification errors
    shifted = _exact(anns[70:80])
    for p, a in zip(shifted, anns[70:80]):
        p["bbox"][0] += 0.6 * a["bbox"][2]                     # 10 localisation errors (IoU 0.25)
    img = synth["images"][0]
    bkg = [{"image_id": img["id"], "category_id": 1, "bbox": [1.0, 1.0, 1.0, 1.0], "score": 0.9}]
    r = error_breakdown(synth, preds + dup + wrong + shifted + bkg)
    t = r["types"]
    # synthetic objects overlap, so a shifted box may land on a neighbour of another class
    assert t["duplicate"]["count"] == 10 and t["classification"]["count"] >= 10
    assert t["localisation"]["count"] >= 8 and t["background"]["count"] >= 1
    assert sum(t[k]["count"] for k in ("classification", "localisation", "both", "duplicate", "background")) == 31
    assert len(anns) - 80 <= t["missed"]["count"] <= len(anns) - 60
    assert t["missed"]["delta_AP50"] > 0 and t["classification"]["delta_AP50"] > 0
    assert r["true_positives"] == 60


# -- pitfalls -------------------------------------------------------------------------------------


def test_empty_predictions_give_zeros(synth):
    # 0 where there is ground truth; n/a (-1, as COCOeval) where there is none: no large objects here
    r = evaluate(synth, [])
    assert all(r[k] == (-1.0 if k in ("APl", "ARl") else 0.0) for k in STANDARD_KEYS)
    assert r["occlusion"]["heavy"]["AP"] == 0.0 and r["size"]["tiny"]["count"] > 0


def test_xyxy_boxes_warn(synth):
    preds = []
    for a in synth["annotations"]:
        x, y, w, h = a["bbox"]
        if x + w + x > 1.15 * 192:  # only boxes whose xyxy form runs past the edge
            preds.append({"image_id": a["image_id"], "category_id": a["category_id"], "score": 1.0,
                          "bbox": [x, y, x + w, y + h]})
    with pytest.warns(UserWarning, match=r"look like \[x1, y1, x2, y2\]"):
        evaluate(synth, preds, errors=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        evaluate(synth, _exact(synth["annotations"][:20]), errors=False)


def test_bad_predictions_are_errors(synth, tmp_path):
    good = _exact(synth["annotations"][:3])
    with pytest.raises(ValueError, match=r"image id\(s\) not in the ground truth: \[424242\]"):
        evaluate(synth, good + [dict(good[0], image_id=424242)])
    with pytest.raises(ValueError, match=r"category id\(s\) not in the ground truth: \[99\]"):
        evaluate(synth, good + [dict(good[0], category_id=99)])
    with pytest.raises(ValueError, match=r"predictions\[1\] needs keys"):
        evaluate(synth, [good[0], {"image_id": 1}])
    with pytest.raises(ValueError, match="iou_type"):
        evaluate(synth, good, iou_type="keypoints")
    with pytest.raises(ValueError, match="backend must be one of"):
        evaluate(synth, good, backend="detectron")
    bad = tmp_path / "bad.json"
    bad.write_text("[{")
    with pytest.raises(ValueError, match="not valid JSON"):
        evaluate(synth, bad)


# -- compare and reports ----------------------------------------------------------------------------


def test_compare_identical_and_clearly_better(synth):
    anns = synth["annotations"]
    rng = np.random.default_rng(0)
    weak = []
    for a in anns:
        if rng.random() < 0.5:
            p = _exact([a], score=float(rng.random()))[0]
            p["bbox"][0] += 0.3 * a["bbox"][2]
            weak.append(p)
    strong = _exact(anns, score=0.9)
    same = compare(synth, weak, copy.deepcopy(weak), n_boot=200)
    for group in ("overall", "size/tiny", "occlusion/heavy"):
        r = same[group]["AP"]
        assert r["low"] <= 0.0 <= r["high"] and not r["significant"]
    better = compare(synth, weak, strong, n_boot=200)
    assert better["overall"]["AP"]["low"] > 0 and better["overall"]["AP"]["significant"]
    assert better["occlusion/none"]["AP"]["low"] > 0


def test_eval_cli_writes_report(synth, tmp_path, capsys):
    gt = tmp_path / "gt.json"
    gt.write_text(json.dumps(synth))
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(_exact(synth["annotations"][::3])))
    b.write_text(json.dumps(_exact(synth["annotations"][::2])))
    assert cli(["eval", "--gt", str(gt), "--pred", str(b), "--compare", str(a), "--out", str(tmp_path / "r"),
                "--n-boot", "50"]) == 0
    out = capsys.readouterr().out
    assert "| AP | AP50 |" in out and "very_tiny" in out and "heavy" in out and "B - A" in out
    files = {p.name for p in (tmp_path / "r").iterdir()}
    assert {"report.json", "report.md", "pr_size.png", "pr_occlusion.png", "ap_by_bucket.png"} <= files
    rep = json.loads((tmp_path / "r" / "report.json").read_text())
    assert {"size", "occlusion", "occluded_recall", "per_class", "errors"} <= set(rep["result"])
    assert "overall" in rep["comparison"]


@needs_coco128
@pytest.mark.parametrize("backend", ["pycocotools", "faster_coco_eval"])
def test_inputs_are_left_untouched(coco128, backend):
    # COCOeval writes into ground-truth annotations; a data module reuses its parsed ground truth
    gt, preds = copy.deepcopy(coco128), _perturbed(coco128, seed=4)
    gt0, preds0 = copy.deepcopy(gt), copy.deepcopy(preds)
    evaluate(gt, preds, backend=backend)
    compare(gt, preds, preds, n_boot=5)
    assert gt == gt0 and preds == preds0
