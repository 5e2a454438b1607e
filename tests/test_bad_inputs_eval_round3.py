"""No silent wrong answers, round 3 (issue 24): evaluation groups, ground-truth validation and
the detector's image sizes.

- A group with no ground truth (size bin, occlusion bucket, class, error-breakdown bin, the
  standard metrics' area ranges) is n/a (-1; ``None`` for a difference) in every path: with or
  without predictions, on either backend; a group with ground truth and no predictions is 0.0.
- One ground-truth validator: ``check_coco``/``load_coco`` (data) and ``load_gt`` (evaluation)
  accept and refuse the same files, a file with the same message.
- ``build_detector`` bounds ``min_size``/``max_size`` and refuses ``max_size < min_size``.

Add a case: one row in the table of its kind (``NA``, ``BAD_GT``, ``BAD_DETECTOR``).
"""
from __future__ import annotations

import copy
import json
from functools import partial

import pytest

from visattn.data import check_coco, load_coco
from visattn.evaluation import evaluate, format_markdown, load_gt
from visattn.models import build_detector

BACKENDS = ("pycocotools", "faster_coco_eval")


def _gt() -> dict:
    """2 images, 3 classes; ``c`` has no ground truth. One 20x20 object (``small``, COCO's
    small, occlusion ``none``) and one 6x6 (``very_tiny``, also ``none``): bins ``tiny``,
    ``medium``, ``large``, COCO's medium and large, and buckets ``partial``, ``heavy`` are empty."""
    return {"images": [{"id": i, "file_name": f"{i}.png", "width": 64, "height": 64} for i in (1, 2)],
            "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}, {"id": 3, "name": "c"}],
            "annotations": [
                {"id": 1, "image_id": 1, "category_id": 1, "bbox": [4, 4, 20, 20], "area": 400.0, "iscrowd": 0,
                 "occlusion": 0.0},
                {"id": 2, "image_id": 2, "category_id": 2, "bbox": [30, 30, 6, 6], "area": 36.0, "iscrowd": 0,
                 "occlusion": 0.05}]}


# a hit on object 1, a false positive of the class with no ground truth
PREDS = [{"image_id": 1, "category_id": 1, "score": 0.9, "bbox": [4, 4, 20, 20]},
         {"image_id": 1, "category_id": 3, "score": 0.5, "bbox": [40, 40, 5, 5]}]


def _crowd() -> dict:
    gt = _gt()
    for a in gt["annotations"]:
        a["iscrowd"] = 1
    return gt


def _no_images() -> dict:
    return {**_gt(), "images": [], "annotations": []}


def _at(result: dict, path: str):
    for key in path.split("."):
        result = result[key]
    return result


# --------------------------------------------------------------------------------------------------
# 1. empty groups are n/a in every path

# (id, ground truth, predictions, path into the result, expected)
NA = [
    ("nopred-APl", _gt, [], "APl", -1.0),
    ("nopred-APm", _gt, [], "APm", -1.0),
    ("nopred-ARl", _gt, [], "ARl", -1.0),
    ("nopred-APs-has-gt", _gt, [], "APs", 0.0),
    ("nopred-AP-has-gt", _gt, [], "AP", 0.0),
    ("nopred-size-large", _gt, [], "size.large.AP", -1.0),
    ("nopred-size-tiny-ar", _gt, [], "size.tiny.AR100", -1.0),
    ("nopred-size-small-has-gt", _gt, [], "size.small.AP", 0.0),
    ("nopred-occlusion-heavy", _gt, [], "occlusion.heavy.AP", -1.0),
    ("nopred-occlusion-partial-ar", _gt, [], "occlusion.partial.AR100", -1.0),
    ("nopred-occlusion-none-has-gt", _gt, [], "occlusion.none.AP", 0.0),
    ("nopred-class-without-gt", _gt, [], "per_class.c", -1.0),
    ("nopred-class-with-gt", _gt, [], "per_class.a", 0.0),
    ("nopred-occluded-recall-none-occluded", _gt, [], "occluded_recall.recall", -1.0),
    ("nopred-errors-AP50", _gt, [], "errors.AP50", 0.0),
    ("nopred-errors-missed-count", _gt, [], "errors.types.missed.count", 2),
    ("nopred-errors-bin-without-gt", _gt, [], "errors.types.background.size.large", None),
    ("pred-errors-bin-without-gt", _gt, PREDS, "errors.types.background.size.large", None),
    ("pred-errors-bin-with-gt", _gt, PREDS, "errors.types.background.size.small", 0.0),
    ("pred-class-only-in-predictions", _gt, PREDS, "per_class.c", -1.0),
    ("pred-no-gt-errors-AP50", lambda: {**_gt(), "annotations": []}, PREDS, "errors.AP50", -1.0),
    ("pred-no-gt-errors-delta", lambda: {**_gt(), "annotations": []}, PREDS, "errors.types.background.delta_AP50",
     None),
    ("all-crowd-nopred-AP", _crowd, [], "AP", -1.0),
    ("all-crowd-nopred-class", _crowd, [], "per_class.a", -1.0),
    ("all-crowd-nopred-size", _crowd, [], "size.small.AP", -1.0),
    ("all-crowd-pred-AP", _crowd, PREDS, "AP", -1.0),
    ("no-images-AP", _no_images, [], "AP", -1.0),
    ("no-images-AR100", _no_images, [], "AR100", -1.0),
    ("no-images-class", _no_images, [], "per_class.b", -1.0),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("gt", "preds", "path", "want"), [c[1:] for c in NA], ids=[c[0] for c in NA])
def test_a_group_without_ground_truth_is_na(gt, preds, path, want, backend):
    got = _at(evaluate(gt(), preds, backend=backend), path)
    assert got == want, f"{path}: {got!r}, want {want!r}"


def _na_paths(result: dict, prefix: str = "") -> set[str]:
    """Every path whose value says n/a (-1 or None), curves and settings left out."""
    out: set[str] = set()
    for k, v in result.items():
        path = f"{prefix}{k}"
        if k in ("curves", "thresholds"):
            continue
        if isinstance(v, dict):
            out |= _na_paths(v, path + ".")
        elif v is None or (isinstance(v, float) and v == -1.0):
            out.add(path)
    return out


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_same_groups_are_na_with_and_without_predictions(backend):
    with_preds, without = evaluate(_gt(), PREDS, backend=backend), evaluate(_gt(), [], backend=backend)
    na, na_without = _na_paths(with_preds), _na_paths(without)
    assert {"APl", "size.large.AP", "occlusion.heavy.AP", "per_class.c", "errors.types.missed.size.large"} <= na
    # the missed-object oracle forgets what was missed: without predictions that is every object,
    # which leaves nothing to score (n/a) where the predictions found something
    missed = "errors.types.missed."
    assert {p for p in na if not p.startswith(missed)} == {p for p in na_without if not p.startswith(missed)}
    assert {p for p in na if p.startswith(missed)} < {p for p in na_without if p.startswith(missed)}
    assert set(with_preds) == set(without)  # no key appears only with predictions
    assert set(with_preds["curves"]) == set(without["curves"]) == {"size/very_tiny", "size/small", "occlusion/none"}


def test_no_curve_for_a_group_without_ground_truth():
    curves = evaluate(_gt(), PREDS, errors=False)["curves"]
    assert "size/large" not in curves and "occlusion/heavy" not in curves
    assert len(curves["size/small"]) == 101


def test_markdown_says_na_for_empty_groups_and_keeps_negative_differences():
    md = format_markdown(evaluate(_gt(), []))
    assert "| large | >= 9216 | 0 | n/a | n/a |" in md
    assert "| heavy | (0.5, 1.0] | 0 | n/a | n/a |" in md
    assert "| c | n/a |" in md and "| a | 0.0 |" in md
    result = evaluate(_gt(), PREDS)
    result["errors"]["types"]["duplicate"]["delta_AP50"] = -0.05  # a loss is a number, not n/a
    row = next(line for line in format_markdown(result).splitlines() if line.startswith("| duplicate |"))
    assert row.split(" | ")[2] == "-5.0" and row.rstrip(" |").endswith("n/a")  # large: no ground truth


# --------------------------------------------------------------------------------------------------
# 2. one ground-truth validator: data and evaluation accept and refuse the same files


def _spoil(**changes):
    def spoil(gt):
        for k, v in changes.items():
            if v is ...:
                del gt["annotations"][1][k]
            else:
                gt["annotations"][1][k] = v
    return spoil


def _no_file_name(gt):
    del gt["images"][0]["file_name"]


# (id, change to a valid ground truth, regex of the message)
BAD_GT = [
    ("no-id", _spoil(id=...), r"annotations\[1\].*has no 'id'"),
    ("no-area", _spoil(area=...), r"annotations\[1\].*has no 'area'"),
    ("occlusion-above-1", _spoil(occlusion=1.5), r"annotations\[1\].*occlusion must be a finite number in \[0, 1\]"),
    ("iscrowd-float", _spoil(iscrowd=1.0), r"annotations\[1\].*iscrowd must be 0 or 1"),
    ("rle-corrupt", _spoil(segmentation={"size": [64, 64], "counts": "0"}),
     r"annotations\[1\].*segmentation is not a valid RLE"),
    ("segmentation-str", _spoil(segmentation="x"), r"annotations\[1\].*segmentation must be"),
    ("image-no-file-name", _no_file_name, r"images\[0\].*'file_name'"),
]


@pytest.mark.parametrize(("spoil", "regex"), [c[1:] for c in BAD_GT], ids=[c[0] for c in BAD_GT])
def test_data_and_evaluation_refuse_the_same_ground_truth(spoil, regex, tmp_path):
    gt = _gt()
    spoil(gt)
    with pytest.raises(ValueError, match=regex):
        check_coco(copy.deepcopy(gt), "gt")
    with pytest.raises(ValueError, match=regex):
        load_gt(copy.deepcopy(gt))
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(gt))
    with pytest.raises(ValueError, match=regex) as data_error:
        load_coco(path)
    with pytest.raises(ValueError, match=regex) as eval_error:
        load_gt(path)
    assert str(data_error.value) == str(eval_error.value)


def test_data_and_evaluation_accept_the_same_ground_truth():
    gt = _gt()
    gt["annotations"][1]["bbox"] = (30, 30, 6, 6)  # a tuple, as a dict built in Python may hold
    gt["annotations"][0]["iscrowd"] = False
    assert check_coco(copy.deepcopy(gt), "gt")["annotations"][1]["bbox"] == (30, 30, 6, 6)
    assert load_gt(gt) is gt


# --------------------------------------------------------------------------------------------------
# 3. detector image sizes

det = partial(build_detector, "fcos", backbone="resnet10t", num_classes=3, fpn_channels=32)

# (id, call, exception, regex)
BAD_DETECTOR = [
    ("min-size-huge", lambda: det(min_size=10**9), ValueError, r"min_size must be an int in 1\.\.8192, got 1000000000"),
    ("max-size-huge", lambda: det(min_size=64, max_size=10**9), ValueError, r"max_size must be an int in 1\.\.8192"),
    ("min-size-seq-huge", lambda: det(min_size=[64, 10**6], max_size=128), ValueError, r"min_size"),
    ("max-below-min-kw", lambda: det(min_size=512, max_size=256), ValueError,
     r"max_size \(256\) must be >= min_size \(512\)"),
    ("max-below-min-detector-kwargs", lambda: det(detector_kwargs={"min_size": 512, "max_size": 256}), ValueError,
     r"max_size \(256\) must be >= min_size \(512\)"),
    ("max-below-min-sequence", lambda: det(min_size=(256, 1024), max_size=512), ValueError,
     r"max_size \(512\) must be >= min_size \(1024\)"),
    ("min-above-default-max", lambda: det(min_size=2000), ValueError,
     r"max_size \(1333, torchvision's default\) must be >= min_size \(2000\)"),
    ("max-below-default-min", lambda: det(max_size=500), ValueError,
     r"max_size \(500\) must be >= min_size \(800, torchvision's default\)"),
]


@pytest.mark.parametrize(("call", "exc", "regex"), [c[1:] for c in BAD_DETECTOR], ids=[c[0] for c in BAD_DETECTOR])
def test_bad_detector_sizes_are_refused_naming_them(call, exc, regex):
    with pytest.raises(exc, match=regex):
        call()


def test_consistent_sizes_still_build():
    model = det(min_size=(64, 96), max_size=96)
    assert model.transform.min_size == (64, 96) and model.transform.max_size == 96
