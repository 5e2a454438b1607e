"""Issue #24, round 3, the prediction path: no silent wrong answers from ``visattn.predict`` and
``visattn predict``.

Each table row is one case of the issue: a seam-cut box reported next to its whole view, a detector
output that is not a detection (NaN, inverted, negative label, score outside 0..1, lengths or masks
that disagree), a class set that does not fit the model, an image too thin for the detector's
resize, an EXIF-rotated photo without a ground-truth file, and the command line's count of images.
Add a case: one row in the table of its kind. Detectors are stubs or tiny untrained models.
"""
from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch
from PIL import Image

from visattn.cli import main
from visattn.predict import (
    MATCHES,
    MERGES,
    merge_predictions,
    predict_folder,
    predict_images,
    sliced_predict,
)

# --------------------------------------------------------------------------------------------------
# Stubs

W, H = 400, 200
SLICE = (256, 200)  # two tiles: x 0..256 and 144..400; seams at x = 256 (tile 0) and x = 144 (tile 1)


def coded_image(w: int = W, h: int = H) -> torch.Tensor:
    """Channel 0 = x / w, channel 1 = y / h: a stub reads a tile's origin from its first pixel."""
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    return torch.stack([xx / w, yy / h, torch.zeros_like(xx)]).float()


class Stub(torch.nn.Module):
    """Returns the detections listed per tile origin ``(x0, y0)`` (tile pixels) or ``"full"``."""

    def __init__(self, per_source: dict, reverse: bool = False):
        super().__init__()
        self.per_source, self.reverse = per_source, reverse
        self.eval()

    def forward(self, images):
        outs = []
        for im in images:
            key = "full" if tuple(im.shape[1:]) == (H, W) else (round(float(im[0, 0, 0]) * W),
                                                                 round(float(im[1, 0, 0]) * H))
            dets = list(self.per_source.get(key, []))
            dets = dets[::-1] if self.reverse else dets
            outs.append({"boxes": torch.tensor([d[0] for d in dets], dtype=torch.float32).reshape(-1, 4),
                         "scores": torch.tensor([d[1] for d in dets], dtype=torch.float32),
                         "labels": torch.tensor([d[2] for d in dets], dtype=torch.int64)})
        return outs


class Fixed(torch.nn.Module):
    """``make(image) -> output dict`` for every input; records the input shapes."""

    def __init__(self, make):
        super().__init__()
        self.make, self.shapes = make, []
        self.eval()

    def forward(self, images):
        self.shapes += [tuple(im.shape) for im in images]
        return [self.make(im) for im in images]


def tiny_fcos(num_classes: int = 3):
    from visattn.models import build_detector

    return build_detector("fcos", backbone="resnet10t", num_classes=num_classes, pretrained_backbone=False,
                          fpn_channels=32, detector_kwargs={"min_size": 64, "max_size": 64}).eval()


def boxes_of(out) -> list[tuple]:
    return [tuple(round(v, 3) for v in b) for b in out["boxes"].tolist()]


# --------------------------------------------------------------------------------------------------
# 1. A box cut by a seam is reconciled with its whole view, whatever the merge rule

CUT = [230, 50, 256, 80]     # tile 0's view: ends at its seam, x = 256
WHOLE_T1 = [86, 50, 146, 80]  # tile 1's view (origin 144) of the same object: image x 230..290
WHOLE = (230.0, 50.0, 290.0, 80.0)  # IoU with the cut view 26 / 60 = 0.43 < 0.5

SEAM_CASES = [  # (id, detections per source, scores of cut and whole, expected box or None (count only))
    ("neighbour-tile-tied", {(0, 0): [(CUT, 0.8, 1)], (144, 0): [(WHOLE_T1, 0.8, 1)]}, WHOLE),
    ("full-image-tied", {(0, 0): [(CUT, 0.8, 1)], "full": [(list(WHOLE), 0.8, 1)]}, WHOLE),
    ("neighbour-tile-cut-scores-higher", {(0, 0): [(CUT, 0.9, 1)], (144, 0): [(WHOLE_T1, 0.8, 1)]}, None),
]


@pytest.mark.parametrize("merge", MERGES)
@pytest.mark.parametrize("match", MATCHES)
@pytest.mark.parametrize(("per_source", "want"), [c[1:] for c in SEAM_CASES], ids=[c[0] for c in SEAM_CASES])
def test_a_seam_cut_box_is_reported_once(per_source, want, merge, match):
    results = []
    for reverse in (False, True):
        out = sliced_predict(Stub(per_source, reverse), coded_image(), slice_size=SLICE, overlap=0.2, merge=merge,
                             match=match)
        assert len(out["boxes"]) == 1, f"{merge}/{match}: {boxes_of(out)}"
        results.append((boxes_of(out), out["scores"].tolist()))
        if want is not None:  # tied scores: the whole view wins
            assert boxes_of(out) == [want]
        else:  # the cut view scores higher: still the whole object (nms: the whole view at the cut's score)
            assert boxes_of(out) == [WHOLE] and out["scores"].tolist() == [pytest.approx(0.9)]
    assert results[0] == results[1]


def test_seam_tie_break_does_not_depend_on_input_order():
    """merge_predictions directly: the cut and the whole view in both orders give the whole box."""
    cut, whole = torch.tensor([CUT], dtype=torch.float32), torch.tensor([list(WHOLE)])
    windows = torch.tensor([[0, 0, 256, 200], [144, 0, 400, 200]], dtype=torch.float32)
    for merge in MERGES:
        for order in ((cut, whole, [0, 1]), (whole, cut, [1, 0])):
            boxes = torch.cat(order[:2])
            groups = merge_predictions(boxes, torch.tensor([0.7, 0.7]), torch.tensor([1, 1]), merge=merge, match="iou",
                                       sources=torch.tensor(order[2]), windows=windows, image_size=(W, H),
                                       occlusion_safe=True)
            assert len(groups) == 1 and tuple(boxes[groups[0][0]].tolist()) == WHOLE, (merge, groups)


def test_boxes_away_from_seams_keep_their_rule():
    """Two whole views in the overlap at IoU 0.40 (< 0.5): with IoU matching they stay two, as before."""
    per = {(0, 0): [([150, 50, 180, 80], 0.8, 1)], (144, 0): [([19, 50, 49, 80], 0.7, 1)]}
    for merge in MERGES:
        out = sliced_predict(Stub(per), coded_image(), slice_size=SLICE, merge=merge, match="iou")
        assert sorted(boxes_of(out)) == [(150, 50, 180, 80), (163, 50, 193, 80)]


# --------------------------------------------------------------------------------------------------
# 2. Detector outputs are checked on every path, naming the problem and the tile or image


def output(boxes=((2.0, 2.0, 10.0, 10.0),), scores=(0.9,), labels=(1,), masks=None):
    out = {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
           "scores": torch.tensor(scores, dtype=torch.float32),
           "labels": labels if isinstance(labels, torch.Tensor) else torch.tensor(labels, dtype=torch.int64)}
    if masks is not None:
        out["masks"] = masks
    return out


NAN, INF = math.nan, math.inf
BAD_OUTPUTS = [  # (id, image -> output, error, message)
    ("nan-box", lambda im: output(boxes=[[NAN, 2, 10, 10]]), ValueError, "boxes.*non-finite"),
    ("inf-score", lambda im: output(scores=[INF]), ValueError, "scores.*non-finite"),
    ("inverted-x", lambda im: output(boxes=[[10, 2, 2, 10]]), ValueError, "x2 < x1"),
    ("inverted-y", lambda im: output(boxes=[[2, 10, 10, 2]]), ValueError, "y2 < y1"),
    ("negative-label", lambda im: output(labels=[-1]), ValueError, "negative"),
    ("fractional-label", lambda im: output(labels=torch.tensor([1.5])), ValueError, "whole"),
    ("score-above-1", lambda im: output(scores=[1.5]), ValueError, r"scores.*0\.\.1"),
    ("score-below-0", lambda im: output(scores=[-0.1]), ValueError, r"scores.*0\.\.1"),
    ("short-scores", lambda im: output(boxes=[[2, 2, 10, 10], [3, 3, 9, 9]], labels=[1, 1]), ValueError,
     r"\(N, 4\)"),
    ("mask-size", lambda im: output(masks=torch.zeros(1, 1, 5, 5)), ValueError, "masks must be"),
    ("nan-mask", lambda im: output(masks=torch.full((1, 1, *im.shape[1:]), NAN)), ValueError,
     "masks.*non-finite"),
]
PATHS = {  # how the detector is called, and how the message names the input
    "sliced": (lambda det: sliced_predict(det, torch.rand(3, 32, 48), slice_size=32), r"tile \d"),
    "whole": (lambda det: predict_images(det, [torch.rand(3, 32, 48)], None), r"images\[0\]"),
}


@pytest.mark.parametrize("path", sorted(PATHS))
@pytest.mark.parametrize(("make", "error", "message"), [c[1:] for c in BAD_OUTPUTS], ids=[c[0] for c in BAD_OUTPUTS])
def test_bad_detector_outputs_are_named(make, error, message, path):
    call, where = PATHS[path]
    with pytest.raises(error, match=message) as info:
        call(Fixed(make))
    assert re.search(where, str(info.value)), str(info.value)


@pytest.mark.parametrize("path", sorted(PATHS))
def test_boxes_left_with_no_area_after_clipping_are_dropped(path):
    call, _ = PATHS[path]
    out = call(Fixed(lambda im: output(boxes=[[-50, -50, -10, -10], [2, 2, 10, 10]], scores=[0.9, 0.8],
                                       labels=[1, 1])))
    assert boxes_of(out if path == "sliced" else out[0]) in ([(2, 2, 10, 10)], [(2, 2, 10, 10), (18, 2, 26, 10)])


# --------------------------------------------------------------------------------------------------
# 3-6. Folders and the command line: class sets, thin images, EXIF, the report


def write_png(path, w: int, h: int) -> None:
    Image.fromarray(np.full((h, w, 3), 128, dtype=np.uint8)).save(path)


def gt_file(tmp_path, names, files=(("a.png", 32, 32),)) -> str:
    data = {"images": [{"id": i + 1, "file_name": f, "width": w, "height": h} for i, (f, w, h) in enumerate(files)],
            "annotations": [], "categories": [{"id": i + 1, "name": n} for i, n in enumerate(names)]}
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(data))
    return str(path)


@pytest.fixture
def folder(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    write_png(images / "a.png", 32, 32)
    return images


def test_a_category_file_that_does_not_fit_the_model_is_refused(folder, tmp_path):
    # the model says how many classes it has: 3 against 2 categories
    with pytest.raises(ValueError, match=r"num_classes=3.*2 categories"):
        predict_folder(tiny_fcos(3), folder, gt=gt_file(tmp_path, ["cat", "dog"]))
    # a detector that does not say: a label with no category is an error, not a dropped detection
    stub = Fixed(lambda im: output(labels=[3]))
    with pytest.raises(ValueError, match=r"label 3.*2 categories"):
        predict_folder(stub, folder, gt=gt_file(tmp_path, ["cat", "dog"]))


def test_visattn_predict_refuses_a_category_file_of_another_size(folder, tmp_path, capsys):
    out = tmp_path / "preds.json"
    code = main(["predict", "--weights", "fcos_resnet10t_eca.synth256", "--images", str(folder),
                 "--gt", gt_file(tmp_path, ["cat", "dog"]), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "num_classes=8" in err and "2 categories" in err, err
    assert not out.exists()


THIN = [  # (id, call, message)
    ("1px-wide", lambda m: predict_images(m, [torch.rand(3, 100, 1)], None), r"images\[0\].*1x100.*slic"),
    ("1px-high", lambda m: predict_images(m, [torch.rand(3, 1, 100)], None), r"images\[0\].*100x1"),
    ("empty", lambda m: predict_images(m, [torch.rand(3, 0, 5)], None), r"images\[0\].*empty"),
    ("sliced-model-resize", lambda m: sliced_predict(m, torch.rand(3, 200, 1), slice_size=256, resize="model"),
     r"tile.*1x200"),
]


@pytest.mark.parametrize(("call", "message"), [c[1:] for c in THIN], ids=[c[0] for c in THIN])
def test_images_too_thin_for_the_detector_are_named(call, message):
    with pytest.raises(ValueError, match=message):
        call(tiny_fcos())


def test_arguments_of_predict_images_are_checked():
    with pytest.raises(TypeError, match="images must be a list"):
        predict_images(Fixed(lambda im: output()), torch.rand(3, 8, 8), None)
    with pytest.raises(ValueError, match="eval"):
        predict_images(tiny_fcos().train(), [torch.rand(3, 8, 8)], None)


def test_an_exif_rotated_photo_is_predicted_upright_without_gt(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 40 x 24, shown rotated by 90 degrees: 24 x 40
    Image.fromarray(np.full((24, 40, 3), 128, dtype=np.uint8)).save(images / "photo.jpg", exif=exif)
    stub = Fixed(lambda im: output(boxes=[[0, 0, im.shape[2], im.shape[1]]]))
    results = predict_folder(stub, images)
    assert stub.shapes == [(3, 40, 24)]
    assert [r["bbox"] for r in results] == [[0.0, 0.0, 24.0, 40.0]]


def one_box_if_wide(im):
    """A detection scoring 0.5 on images wider than 40 px, none on the others."""
    return output() if im.shape[2] > 40 else output(boxes=[], scores=[], labels=[])


@pytest.fixture
def cli_model(monkeypatch):
    """`visattn predict` with a stub detector (:func:`one_box_if_wide`) instead of published weights."""
    stub = Fixed(one_box_if_wide)
    monkeypatch.setattr("visattn.predict.load_detector", lambda **kw: stub)
    return stub


REPORTS = [  # (id, extra options, expected line)
    ("some-kept", [], r"2 image\(s\).*1 detection"),
    ("all-filtered", ["--score-threshold", "0.9"], r"2 image\(s\).*0 detection"),
]


@pytest.mark.parametrize(("extra", "line"), [c[1:] for c in REPORTS], ids=[c[0] for c in REPORTS])
def test_visattn_predict_counts_images_and_detections(cli_model, tmp_path, capsys, extra, line):
    images = tmp_path / "images"
    images.mkdir()
    write_png(images / "a.png", 48, 32)
    write_png(images / "b.png", 32, 32)
    out = tmp_path / "preds.json"
    assert main(["predict", "--weights", "stub", "--images", str(images), "--out", str(out), *extra]) == 0
    assert re.search(line, capsys.readouterr().out)


def test_visattn_predict_on_exif_and_thin_images(cli_model, tmp_path, capsys, monkeypatch):
    images = tmp_path / "images"
    images.mkdir()
    exif = Image.Exif()
    exif[0x0112] = 8  # stored 48 x 24, shown 24 x 48
    Image.fromarray(np.full((24, 48, 3), 128, dtype=np.uint8)).save(images / "photo.jpg", exif=exif)
    out = tmp_path / "preds.json"
    assert main(["predict", "--weights", "stub", "--images", str(images), "--out", str(out)]) == 0, \
        capsys.readouterr().err
    assert cli_model.shapes == [(3, 48, 24)] and json.loads(out.read_text()) == []
    # a 1 px wide image and a real (tiny) detector: one line naming the file, status 2
    write_png(images / "thin.png", 1, 100)
    monkeypatch.setattr("visattn.predict.load_detector", lambda **kw: tiny_fcos())
    assert main(["predict", "--weights", "stub", "--images", str(images), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "thin.png" in err and "1x100" in err, err
