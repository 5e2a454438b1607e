"""Sliced inference (visattn.predict): tiling, merge rules on hand-computed cases, batching,
masks, the detector's resize, sliced validation through train.py, and `visattn predict`."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from visattn.predict import (
    SlicingConfig,
    merge_predictions,
    sliced_predict,
    tile_starts,
    tile_windows,
)

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------------
# Tiling


@pytest.mark.parametrize(("length", "tile", "overlap", "want"), [
    (600, 256, 0.2, [0, 205, 344]),     # does not divide: last tile shifted back to end at 600
    (512, 256, 0.0, [0, 256]),          # divides exactly: no extra tile
    (512, 256, 0.2, [0, 205, 256]),
    (256, 256, 0.2, [0]),               # exactly one tile
    (100, 256, 0.2, [0]),               # smaller than a tile
    (257, 256, 0.5, [0, 1]),
])
def test_tile_starts(length, tile, overlap, want):
    assert tile_starts(length, tile, overlap) == want


@pytest.mark.parametrize(("w", "h", "size"), [(600, 300, 256), (512, 512, 256), (100, 80, 256), (257, 1000, (128, 96)),
                                              (1536, 1024, 512)])
def test_tiles_cover_every_pixel_and_stay_inside(w, h, size):
    windows = tile_windows(w, h, size, 0.2)
    tw, th = (size, size) if isinstance(size, int) else size
    covered = np.zeros((h, w), dtype=np.int32)
    for x0, y0, x1, y1 in windows:
        assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
        assert (x1 - x0, y1 - y0) == (min(tw, w), min(th, h))  # never padded, never cut short
        covered[y0:y1, x0:x1] += 1
    assert covered.min() >= 1
    assert len(set(windows)) == len(windows)


# --------------------------------------------------------------------------------------------------
# A detector stub: knows which tile it is shown from the pixels (channel 0 = x / W, channel 1 = y / H)

W, H = 400, 200
SLICE = (256, 200)   # two tiles: x 0-256 and 144-400 (seams at x = 256 for the first, 144 for the second)


def coded_image(w=W, h=H) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    return torch.stack([xx / w, yy / h, torch.zeros_like(xx)]).float()


class Stub(torch.nn.Module):
    """Returns the boxes listed for each tile origin (tile pixels) or ``"full"`` (image pixels)."""

    def __init__(self, per_tile: dict, w=W, h=H, masks=False):
        super().__init__()
        self.per_tile, self.w, self.h, self.masks = per_tile, w, h, masks
        self.batches: list[int] = []
        self.eval()

    def forward(self, images):
        self.batches.append(len(images))
        outs = []
        for im in images:
            if tuple(im.shape[1:]) == (self.h, self.w) and "full" in self.per_tile:
                key = "full"
            else:
                key = (round(float(im[0, 0, 0]) * self.w), round(float(im[1, 0, 0]) * self.h))
            dets = self.per_tile.get(key, [])
            out = {"boxes": torch.tensor([d[0] for d in dets], dtype=torch.float32).reshape(-1, 4),
                   "scores": torch.tensor([d[1] for d in dets], dtype=torch.float32),
                   "labels": torch.tensor([d[2] for d in dets], dtype=torch.int64)}
            if self.masks:
                m = torch.zeros((len(dets), 1, *im.shape[1:]))
                for i, d in enumerate(dets):
                    x0, y0, x1, y1 = (int(v) for v in d[0])
                    m[i, 0, y0:y1, x0:x1] = d[1]
                out["masks"] = m
            outs.append(out)
        return outs


# Case A (class 1): an object cut by the seam at x = 256: tile 0 sees its left part, tile 1 all of it.
# Case B (class 2): one object inside the overlap, seen whole by both tiles (a duplicate).
# Case C (class 3): two overlapping objects in tile 0 only, Q partly hidden by P (IoS 0.75).
# Case D (class 4): two overlapping objects in the overlap, R in front of S, seen by both tiles.
TILES = {
    (0, 0): [([240, 50, 256, 80], 0.9, 1), ([180, 120, 200, 140], 0.7, 2),
             ([20, 20, 60, 60], 0.95, 3), ([45, 30, 65, 50], 0.5, 3),
             ([160, 20, 200, 60], 0.9, 4), ([185, 30, 205, 50], 0.6, 4)],
    (144, 0): [([96, 50, 126, 80], 0.8, 1), ([37, 121, 57, 141], 0.6, 2),
               ([17, 20, 57, 60], 0.85, 4), ([42, 30, 62, 50], 0.55, 4)],
}


def as_set(out) -> set:
    return {(tuple(round(v, 3) for v in b.tolist()), round(float(s), 3), int(lab))
            for b, s, lab in zip(out["boxes"], out["scores"], out["labels"], strict=True)}


def run(merge, match, safe, **kw):
    return sliced_predict(Stub(TILES), coded_image(), slice_size=SLICE, overlap=0.2, full_image=False, merge=merge,
                          match=match, threshold=0.5, occlusion_safe=safe, **kw)


def test_windows_of_the_stub_case():
    assert tile_windows(W, H, SLICE, 0.2) == [(0, 0, 256, 200), (144, 0, 400, 200)]


def test_greedy_nmm_occlusion_safe_hand_computed():
    assert as_set(run("greedy_nmm", "ios", True)) == {
        ((240, 50, 270, 80), 0.9, 1),                                # A: halves joined across the seam
        ((180, 120, 200, 140), 0.7, 2),                              # B: second whole view absorbed
        ((20, 20, 60, 60), 0.95, 3), ((45, 30, 65, 50), 0.5, 3),     # C: one tile's two objects stay two
        ((160, 20, 200, 60), 0.9, 4), ((185, 30, 205, 50), 0.6, 4),  # D: each absorbs its own twin only
    }


def test_greedy_nmm_plain_fuses_occluded_neighbours():
    """SAHI's rule: every same-class pair with IoS >= 0.5 merges, so C and D collapse to one box each."""
    assert as_set(run("greedy_nmm", "ios", False)) == {
        ((240, 50, 270, 80), 0.9, 1), ((180, 120, 201, 141), 0.7, 2),
        ((20, 20, 65, 60), 0.95, 3), ((160, 20, 206, 60), 0.9, 4),
    }


def test_nmm_plain_and_safe_hand_computed():
    assert as_set(run("nmm", "ios", False)) == as_set(run("greedy_nmm", "ios", False))
    assert as_set(run("nmm", "ios", True)) == as_set(run("greedy_nmm", "ios", True))


def test_nms_hand_computed():
    plain = as_set(run("nms", "iou", False))  # torchvision's batched_nms
    assert plain == {((240, 50, 256, 80), 0.9, 1),   # A: IoU 480 / 900 = 0.53 > 0.5: the cut half survives
                     ((180, 120, 200, 140), 0.7, 2),
                     ((20, 20, 60, 60), 0.95, 3), ((45, 30, 65, 50), 0.5, 3),  # C: IoU 0.18, kept
                     ((160, 20, 200, 60), 0.9, 4), ((185, 30, 205, 50), 0.6, 4)}
    # occlusion safe: the surviving cut half hands its place to tile 1's whole view, at its score
    assert as_set(run("nms", "iou", True)) == plain - {((240, 50, 256, 80), 0.9, 1)} | {((240, 50, 270, 80), 0.9, 1)}
    # IoS: C's pair matches (0.75): plain NMS drops Q, the occlusion-safe rule keeps it
    assert ((45, 30, 65, 50), 0.5, 3) not in as_set(run("nms", "ios", False))
    assert ((45, 30, 65, 50), 0.5, 3) in as_set(run("nms", "ios", True))


def test_nmm_is_transitive_greedy_is_not():
    """A-B and B-C match (IoU 0.54), A-C does not (0.25). Greedy: A takes B, C stays. NMM (SAHI):
    B hands C to A's group, C no longer matches the merged A+B (0.44) and is dropped."""
    boxes = torch.tensor([[0, 0, 10, 10], [3, 0, 13, 10], [6, 0, 16, 10]], dtype=torch.float32)
    scores, labels = torch.tensor([0.9, 0.8, 0.7]), torch.tensor([5, 5, 5])
    assert merge_predictions(boxes, scores, labels, merge="greedy_nmm", match="iou", threshold=0.5) == \
        [(0, [1]), (2, [])]
    assert merge_predictions(boxes, scores, labels, merge="nmm", match="iou", threshold=0.5) == [(0, [1])]
    # a different class never merges
    assert merge_predictions(boxes, scores, torch.tensor([5, 6, 5]), merge="greedy_nmm", match="iou",
                             threshold=0.5) == [(0, []), (1, []), (2, [])]


def test_merge_does_not_depend_on_input_order():
    out = run("greedy_nmm", "ios", True)
    tiles = {k: list(reversed(v)) for k, v in TILES.items()}
    rev = sliced_predict(Stub(tiles), coded_image(), slice_size=SLICE, full_image=False, merge="greedy_nmm",
                         match="ios")
    assert torch.equal(out["boxes"], rev["boxes"]) and torch.equal(out["scores"], rev["scores"])


def test_full_image_pass_merges_with_tiles_and_adds_large_objects():
    tiles = dict(TILES)
    tiles["full"] = [([238, 49, 271, 81], 0.5, 1),      # A again, from the full image: merges
                     ([0, 0, 390, 190], 0.8, 7)]        # a large object only the full pass sees
    out = sliced_predict(Stub(tiles), coded_image(), slice_size=SLICE, full_image=True, merge="greedy_nmm",
                         match="ios")
    got = as_set(out)
    assert ((238, 49, 271, 81), 0.9, 1) in got and ((0, 0, 390, 190), 0.8, 7) in got
    assert len(got) == 7


# --------------------------------------------------------------------------------------------------
# Batching, resizing, masks


def many_tiles():
    """A 1000 x 600 image in 256 px tiles, each tile with boxes at its seams and inside."""
    w, h = 1000, 600
    per = {}
    for x0, y0, _, _ in tile_windows(w, h, 256, 0.2):
        per[(x0, y0)] = [([0, 10, 12, 30], 0.5 + (x0 % 7) / 20, 1), ([240, 100, 256, 120], 0.6, 1),
                         ([100, 100, 130, 140], 0.3 + (y0 % 5) / 20, 2), ([110, 105, 128, 130], 0.4, 2)]
    return per, w, h


def test_results_identical_for_batch_sizes_1_and_8():
    per, w, h = many_tiles()
    outs = []
    for bs in (1, 8):
        stub = Stub(per, w, h)
        outs.append(sliced_predict(stub, coded_image(w, h), slice_size=256, batch_size=bs, full_image=False))
        assert max(stub.batches) == bs  # tiles really go bs at a time
    n_tiles = len(tile_windows(w, h, 256, 0.2))
    assert stub.batches == [8] * (n_tiles // 8) + ([n_tiles % 8] if n_tiles % 8 else [])
    for k in ("boxes", "scores", "labels"):
        assert torch.equal(outs[0][k], outs[1][k])
    assert len(outs[0]["boxes"]) > 0


class Resizing(Stub):
    """A stub with a torchvision-like transform, recording the sizes it was asked to resize to."""

    def __init__(self, *a, fail=False, **kw):
        super().__init__(*a, **kw)
        self.transform = torch.nn.Module()
        self.transform.min_size, self.transform.max_size = (800,), 1333
        self.seen, self.fail = [], fail

    def forward(self, images):
        self.seen.append((self.transform.min_size, self.transform.max_size, tuple(images[0].shape[1:])))
        if self.fail:
            raise RuntimeError("boom")
        return super().forward(images)


def test_tiles_run_at_native_resolution_and_the_transform_is_restored():
    stub = Resizing(TILES)
    sliced_predict(stub, coded_image(), slice_size=SLICE, full_image=True)
    assert stub.seen[0] == ((200,), 256, (200, 256))           # tile pass: scale 1
    assert stub.seen[-1] == ((800,), 1333, (H, W))             # full pass: the model's own setting
    assert (stub.transform.min_size, stub.transform.max_size) == ((800,), 1333)
    stub = Resizing(TILES)
    sliced_predict(stub, coded_image(), slice_size=SLICE, full_image=False, resize="model")
    assert stub.seen[0][:2] == ((800,), 1333)
    failing = Resizing(TILES, fail=True)
    with pytest.raises(RuntimeError, match="boom"):
        sliced_predict(failing, coded_image(), slice_size=SLICE)
    assert (failing.transform.min_size, failing.transform.max_size) == ((800,), 1333)


def test_masks_are_pasted_at_their_tile_and_merged():
    out = sliced_predict(Stub(TILES, masks=True), coded_image(), slice_size=SLICE, full_image=False,
                         merge="greedy_nmm", match="ios")
    assert out["masks"].shape == (len(out["boxes"]), 1, H, W)
    for box, mask, label in zip(out["boxes"], out["masks"], out["labels"], strict=True):
        ys, xs = torch.nonzero(mask[0] > 0, as_tuple=True)
        # every mask fills exactly its (merged) box: the stub paints each box, pasted at the tile origin
        assert (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1) == tuple(int(v) for v in box)
        if int(label) == 1:  # A: tile 0's half (0.9) and tile 1's whole (0.8) -> the maximum
            assert float(mask[0, 60, 245]) == pytest.approx(0.9) and float(mask[0, 60, 265]) == pytest.approx(0.8)


class BlobMasks(torch.nn.Module):
    """Six detections per input, drawn from a generator seeded by the input's size and first
    pixel: masks of random values on random rectangles (some touching the input's edges, holes
    inside, one all zero), boxes around them, a few near-duplicates across tiles."""

    def __init__(self):
        super().__init__()
        self.eval()

    def forward(self, images):
        outs = []
        for im in images:
            h, w = im.shape[1:]
            g = torch.Generator().manual_seed(int(float(im[0, 0, 0]) * 1e6) + 7 * h + w)
            boxes, masks = [], torch.zeros(6, 1, h, w)
            for i in range(6):
                x0, y0 = int(torch.randint(0, w - 1, (1,), generator=g)), int(torch.randint(0, h - 1, (1,), generator=g))
                x1 = w if i == 1 else int(torch.randint(x0 + 1, w + 1, (1,), generator=g))
                y1 = h if i == 2 else int(torch.randint(y0 + 1, h + 1, (1,), generator=g))
                if i != 5:  # the last mask stays all zero
                    masks[i, 0, y0:y1, x0:x1] = torch.rand(y1 - y0, x1 - x0, generator=g) * (
                        torch.rand(y1 - y0, x1 - x0, generator=g) > 0.3)
                boxes.append([x0, y0, x1, y1])
            outs.append({"boxes": torch.tensor(boxes, dtype=torch.float32),
                         "scores": torch.rand(6, generator=g), "labels": torch.ones(6, dtype=torch.long),
                         "masks": masks})
        return outs


@pytest.mark.parametrize("merge", ["nms", "greedy_nmm"])
def test_masks_kept_as_their_nonzero_window_paste_like_whole_masks(merge, monkeypatch):
    """Tile masks are held as their non-zero window until pasted; the result equals pasting the
    whole masks, merged ones included."""
    from visattn import predict

    image = torch.rand(3, 90, 150)
    kw = {"slice_size": 64, "overlap": 0.3, "merge": merge, "match": "ios", "threshold": 0.3,
          "max_detections": None, "occlusion_safe": False}
    got = sliced_predict(BlobMasks(), image, **kw)
    monkeypatch.setattr(predict, "_nonzero_window", lambda m: (0, 0, m.float()))
    want = sliced_predict(BlobMasks(), image, **kw)
    assert len(got["masks"]) == len(want["masks"]) > 20
    assert got["masks"].equal(want["masks"]) and got["boxes"].equal(want["boxes"])
    assert bool((want["masks"].flatten(1) == 0).all(1).any())  # an all-zero mask came through


@pytest.mark.slow  # a real FCOS; the stub test above checks exact identity in the default run
def test_real_detector_batch_sizes_agree():
    from visattn.models import build_detector

    torch.manual_seed(0)
    model = build_detector("fcos", backbone="resnet10t", num_classes=3, pretrained_backbone=False, fpn_channels=64,
                           detector_kwargs={"min_size": 64, "max_size": 64, "score_thresh": 0.0,
                                            "detections_per_img": 20, "topk_candidates": 100}).eval()
    image = torch.rand(3, 80, 120)  # 4 tiles and the full image
    a = sliced_predict(model, image, slice_size=64, batch_size=1)
    b = sliced_predict(model, image, slice_size=64, batch_size=8)
    assert len(a["boxes"]) == len(b["boxes"]) > 0
    torch.testing.assert_close(a["boxes"], b["boxes"], atol=1e-3, rtol=0)
    torch.testing.assert_close(a["scores"], b["scores"], atol=1e-4, rtol=0)
    assert model.transform.min_size == (64,) and model.transform.max_size == 64


def test_real_mask_rcnn_masks_shift_to_their_tile():
    """A real (untrained, tiny) Mask R-CNN: every sliced output is one tile's detection, its box
    shifted by the tile's origin and its mask that tile's mask pasted at that origin, zero
    elsewhere (no merging: a threshold of 1 only joins identical boxes, and every box is kept)."""
    from visattn.models import build_detector

    torch.manual_seed(0)
    model = build_detector("maskrcnn", backbone="resnet10t", num_classes=2, pretrained_backbone=False,
                           fpn_channels=32, detector_kwargs={"min_size": 64, "max_size": 64,
                                                             "box_score_thresh": 0.0,
                                                             "box_detections_per_img": 5}).eval()
    image = torch.rand(3, 64, 112)  # tiles at x = 0 and x = 48 (the edge tile shifted inside)
    out = sliced_predict(model, image, slice_size=64, overlap=0.0, full_image=False, merge="nms",
                         threshold=1.0, occlusion_safe=False, max_detections=None)
    with torch.no_grad():
        tiles = model([image[:, :, 0:64], image[:, :, 48:112]])
    expected = [(x0, t) for x0, tile in zip((0, 48), tiles, strict=True) for t in zip(
        tile["boxes"], tile["scores"], tile["masks"], strict=True)]
    assert out["masks"].shape == (len(out["boxes"]), 1, 64, 112) and len(out["boxes"]) > 0
    assert len(out["boxes"]) <= len(expected)
    origins = set()
    for box, score, mask in zip(out["boxes"], out["scores"], out["masks"], strict=True):
        x0, (_, _, tile_mask) = next(
            (x0, t) for x0, t in expected if float(t[1]) == pytest.approx(float(score), abs=1e-6)
            and torch.allclose(t[0] + torch.tensor([x0, 0, x0, 0]), box, atol=1e-4))
        assert mask[:, :, x0:x0 + 64].equal(tile_mask)  # the tile's mask at the tile's place
        outside = torch.ones(64, 112, dtype=torch.bool)
        outside[:, x0:x0 + 64] = False
        assert mask[0][outside].abs().sum() == 0
        origins.add(x0)
    assert origins == {0, 48}  # both tiles' detections came through, the second one shifted


# --------------------------------------------------------------------------------------------------
# Hostile inputs: images, detector outputs, wrappers


@pytest.mark.parametrize(("image", "error", "match"), [
    (torch.full((3, 32, 32), float("nan")), ValueError, "non-finite"),
    (torch.rand(3, 32, 32) * 255, ValueError, "divide by 255"),
    (torch.rand(3, 32, 32) - 0.5, ValueError, "0..1"),
    (np.random.default_rng(0).integers(0, 256, (32, 32, 3)), TypeError, "uint8, uint16 or float"),
    (np.random.default_rng(0).random((32, 32, 3)) * 255, ValueError, "divide by 255"),
])
def test_bad_images_are_refused(image, error, match):
    with pytest.raises(error, match=match):
        sliced_predict(Stub({}), image, slice_size=16)


def test_image_dtypes_are_scaled_or_cast():
    """uint16 arrays scale by 65535; float64 / float16 tensors go in as float32 (the dtype of a
    float32 detector)."""
    from visattn.predict import _as_image

    a16 = np.full((4, 4, 3), 65535, dtype=np.uint16)
    assert float(_as_image(a16).max()) == 1.0
    for dtype in (torch.float64, torch.float16, torch.bfloat16):
        assert _as_image(torch.rand(3, 4, 4).to(dtype)).dtype == torch.float32


class Raw(torch.nn.Module):
    """Returns the same output for every input."""

    def __init__(self, out):
        super().__init__()
        self.out = out
        self.eval()

    def forward(self, images):
        return [dict(self.out) for _ in images]


@pytest.mark.parametrize(("out", "error", "match"), [
    ({"boxes": torch.zeros(1, 4), "labels": torch.ones(1, dtype=torch.long)}, TypeError, "'scores'"),
    ({"boxes": torch.zeros(4), "scores": torch.ones(1), "labels": torch.ones(1)}, ValueError, r"\(N, 4\)"),
    ({"boxes": torch.zeros(2, 4), "scores": torch.ones(1), "labels": torch.ones(2)}, ValueError, r"\(N, 4\)"),
    ({"boxes": torch.zeros(1, 4), "scores": torch.ones(1), "labels": torch.tensor([1.7])}, ValueError, "whole"),
    ({"boxes": torch.zeros(1, 4), "scores": torch.ones(1), "labels": torch.ones(1),
      "masks": torch.zeros(1, 28, 28)}, ValueError, "masks must be"),
    ({"boxes": np.zeros((1, 4)), "scores": torch.ones(1), "labels": torch.ones(1)}, TypeError, "'boxes'"),
])
def test_malformed_detector_outputs_are_named(out, error, match):
    with pytest.raises(error, match=match):
        sliced_predict(Raw(out), torch.rand(3, 32, 48), slice_size=32)


def test_boxes_are_clipped_to_their_tile_and_empty_mask_outputs_are_fine():
    out = {"boxes": torch.tensor([[-50.0, -50.0, 500.0, 500.0]]), "scores": torch.ones(1),
           "labels": torch.ones(1, dtype=torch.long)}
    res = sliced_predict(Raw(out), torch.rand(3, 32, 48), slice_size=32, full_image=False, merge="nms")
    assert float(res["boxes"][:, 0].min()) >= 0 and float(res["boxes"][:, 2].max()) <= 48
    assert float(res["boxes"][:, 1].min()) >= 0 and float(res["boxes"][:, 3].max()) <= 32

    class SomeMasks(torch.nn.Module):  # masks on the first tile only; the other tile finds nothing
        def forward(self, images):
            outs = []
            for i, im in enumerate(images):
                if i == 0:
                    outs.append({"boxes": torch.tensor([[1.0, 1.0, 5.0, 5.0]]), "scores": torch.ones(1),
                                 "labels": torch.ones(1, dtype=torch.long),
                                 "masks": torch.ones(1, 1, *im.shape[1:])})
                else:
                    outs.append({"boxes": torch.zeros(0, 4), "scores": torch.zeros(0),
                                 "labels": torch.zeros(0, dtype=torch.long)})
            return outs

    res = sliced_predict(SomeMasks().eval(), torch.rand(3, 32, 48), slice_size=32, full_image=False)
    assert res["masks"].shape == (1, 1, 32, 48)


def test_native_resize_reaches_a_wrapped_detector():
    """DetectionModule (or any module holding the detector) gets its tiles at their own size too."""
    from visattn.lit import DetectionModule
    from visattn.models import build_detector

    torch.manual_seed(0)
    model = build_detector("fcos", backbone="resnet10t", num_classes=3, pretrained_backbone=False, fpn_channels=64,
                           detector_kwargs={"min_size": 64, "max_size": 64}).eval()
    seen = []
    model.backbone.register_forward_hook(lambda m, i, o: seen.append(tuple(i[0].shape[-2:])))
    wrapped = DetectionModule(model=model).eval()
    sliced_predict(wrapped, torch.rand(3, 64, 100), slice_size=(48, 32), full_image=False)
    assert seen and all(hw == (32, 64) for hw in seen)  # 32x48 tiles, padded to a multiple of 32
    assert model.transform.min_size == (64,) and model.transform.max_size == 64


def test_tiling_limits_and_thin_images():
    with pytest.raises(ValueError, match="overlap"):
        sliced_predict(Stub({}), torch.rand(3, 64, 64), slice_size=32, overlap=0.99)
    from visattn.models import build_detector

    model = build_detector("fcos", backbone="resnet10t", num_classes=3, pretrained_backbone=False, fpn_channels=64,
                           detector_kwargs={"min_size": 64, "max_size": 64}).eval()
    with pytest.warns(UserWarning, match="full-image pass is skipped"):
        out = sliced_predict(model, torch.rand(3, 100, 1), slice_size=64)
    assert out["boxes"].shape[1] == 4


def test_predict_images_takes_dicts_and_arrays_and_thresholds():
    from visattn.predict import predict_images

    stub = Stub(TILES)
    image = coded_image()
    a = predict_images(stub, [image], {"slice_size": SLICE, "full_image": False})
    b = predict_images(stub, [image], SlicingConfig(slice_size=SLICE, full_image=False))
    assert as_set(a[0]) == as_set(b[0])
    high = predict_images(stub, [image], {"slice_size": SLICE, "full_image": False}, score_threshold=0.8)
    assert as_set(high[0]) == {d for d in as_set(a[0]) if d[1] > 0.8} and as_set(high[0])
    arr = (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    assert len(predict_images(Raw({"boxes": torch.zeros(0, 4), "scores": torch.zeros(0),
                                   "labels": torch.zeros(0)}), [arr], None)) == 1


def test_merge_predictions_checks_sources_windows_and_margin():
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 1.0, 11.0, 11.0]])
    scores, labels = torch.tensor([0.9, 0.8]), torch.tensor([1, 1])
    kw = {"windows": [[0, 0, 20, 20], [5, 0, 25, 20]], "image_size": (25, 20), "occlusion_safe": True}
    assert merge_predictions(boxes, scores, labels, sources=[0, 1], **kw)  # lists are fine
    with pytest.raises(ValueError, match="sources"):
        merge_predictions(boxes, scores, labels, sources=[0, 1, 1], **kw)
    with pytest.raises(ValueError, match="sources must index"):
        merge_predictions(boxes, scores, labels, sources=[0, 2], **kw)
    with pytest.raises(ValueError, match="seam_margin"):
        merge_predictions(boxes, scores, labels, sources=[0, 1], seam_margin=-5, **kw)
    with pytest.raises(ValueError, match="unknown setting"):
        SlicingConfig.coerce({1: 2, "x": 3})


# --------------------------------------------------------------------------------------------------
# Arguments


@pytest.mark.parametrize(("kwargs", "error", "name"), [
    ({"slice_size": 0}, ValueError, "slice_size"),
    ({"slice_size": "256"}, TypeError, "slice_size"),
    ({"slice_size": (256, 0)}, ValueError, r"slice_size\[1\]"),
    ({"slice_size": 256, "overlap": 1.0}, ValueError, "overlap"),
    ({"slice_size": 256, "merge": "wbf"}, ValueError, "merge"),
    ({"slice_size": 256, "match": "giou"}, ValueError, "match"),
    ({"slice_size": 256, "threshold": 0}, ValueError, "threshold"),
    ({"slice_size": 256, "batch_size": 0}, ValueError, "batch_size"),
    ({"slice_size": 256, "batch_size": 2.0}, TypeError, "batch_size"),
    ({"slice_size": 256, "full_image": 1}, TypeError, "full_image"),
    ({"slice_size": 256, "resize": "up"}, ValueError, "resize"),
    ({"slice_size": 256, "max_detections": 0}, ValueError, "max_detections"),
])
def test_bad_arguments_are_named(kwargs, error, name):
    with pytest.raises(error, match=name):
        sliced_predict(Stub(TILES), coded_image(), **kwargs)


def test_bad_image_and_detector():
    with pytest.raises(ValueError, match="image"):
        sliced_predict(Stub(TILES), torch.rand(1, 10, 10), slice_size=8)
    with pytest.raises(TypeError, match="image"):
        sliced_predict(Stub(TILES), [1, 2], slice_size=8)
    with pytest.raises(ValueError, match="eval"):
        sliced_predict(Stub(TILES).train(), coded_image(), slice_size=256)
    with pytest.raises(TypeError, match="one dict per input"):
        sliced_predict(lambda images: {"boxes": None}, coded_image(), slice_size=256)
    with pytest.raises(ValueError, match="unknown setting"):
        SlicingConfig.coerce({"slice": 256})


# --------------------------------------------------------------------------------------------------
# Where users are: train.py validate --model.init_args.slicing..., visattn predict


def test_sliced_validate_writes_the_report(tmp_path, monkeypatch):
    from train import main

    monkeypatch.setenv("VISATTN_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(ROOT)
    cli = main(["validate", "--config", "configs/quickstart.yaml", f"--trainer.default_root_dir={tmp_path}",
                "--trainer.enable_progress_bar=false", "--data.init_args.num_train=1", "--data.init_args.num_val=2",
                "--data.init_args.image_size=[192, 128]", "--data.init_args.batch_size=2",
                '--data.init_args.synth={"min_size": 4, "max_size_frac": 0.2, "max_objects": 8}',
                '--model.init_args.model.init_args.detector_kwargs={"min_size": 96, "max_size": 96, "score_thresh": 0.0}',
                "--model.init_args.slicing.slice_size=96", "--model.init_args.slicing.batch_size=4"])
    assert cli.model.slicing.slice_size == 96
    result = cli.model.last_eval
    assert result is not None and "size" in result and "occlusion" in result
    report = list(Path(tmp_path).rglob("report/report.json"))
    assert report and json.loads(report[0].read_text())
    inner = cli.model.model
    assert inner.transform.min_size == (96,) and inner.transform.max_size == 96  # restored


def test_visattn_predict_writes_coco_results(tmp_path, capsys):
    from PIL import Image

    from visattn.cli import main
    from visattn.data.synthetic import SynthConfig, render_image

    folder = tmp_path / "images"
    folder.mkdir()
    img, _ = render_image(0, 1, SynthConfig(image_size=(160, 96)))
    Image.fromarray(img).save(folder / "a.png")
    out = tmp_path / "preds.json"
    assert main(["predict", "--weights", "fcos_resnet10t_eca.synth256", "--images", str(folder), "--slice", "64",
                 "--score-threshold", "0.05", "--out", str(out)]) == 0
    preds = json.loads(out.read_text())
    assert preds and all(p["image_id"] == 1 and 1 <= p["category_id"] <= 8 and len(p["bbox"]) == 4 for p in preds)
    assert all(0 <= p["bbox"][0] and p["bbox"][0] + p["bbox"][2] <= 160.01 for p in preds)
    # errors: one line naming the option, status 2, nothing written
    bad = tmp_path / "bad.json"
    assert main(["predict", "--weights", "fcos_resnet10t_eca.synth256", "--images", str(tmp_path / "nope"),
                 "--out", str(bad)]) == 2
    assert "--images" in capsys.readouterr().err
    assert main(["predict", "--ckpt", str(out), "--images", str(folder), "--out", str(bad)]) == 2
    assert "--config" in capsys.readouterr().err
    assert main(["predict", "--weights", "fcos_resnet10t_eca.synth256", "--images", str(folder), "--slice", "64",
                 "--overlap", "1.5", "--out", str(bad)]) == 2
    assert "overlap" in capsys.readouterr().err
    # a slicing option without --slice would be ignored: refused, naming it
    assert main(["predict", "--weights", "fcos_resnet10t_eca.synth256", "--images", str(folder),
                 "--overlap", "0.3", "--no-full-image", "--out", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "--overlap" in err and "--no-full-image" in err and "--slice" in err
    assert not bad.exists()
    # --score-threshold also applies to whole images
    whole = tmp_path / "whole.json"
    assert main(["predict", "--weights", "fcos_resnet10t_eca.synth256", "--images", str(folder),
                 "--score-threshold", "0.3", "--out", str(whole)]) == 0
    scores = [p["score"] for p in json.loads(whole.read_text())]
    assert scores and min(scores) > 0.3
