"""visattn.explain: every block records its attention (without changing its output), maps are found
in any model, land on each original image of a detector batch, are drawn, and are tested for
faithfulness; the `visattn explain` command writes its grid, crops and JSON."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torchvision
from PIL import Image
from torch import nn

import visattn
from visattn import explain as E
from visattn.cli import main
from visattn.layers import _attention
from visattn.layers._attention import attention_probs, attention_totals
from visattn.layers._base import AttentionBlock
from visattn.layers._capture import Capture
from visattn.models import build_detector
from visattn.models.neck import FPNNeck

from .conftest import randomize_

COCO = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "coco128" / "images"
COCO_IMAGE = COCO / "000000000110.jpg"
KEYS_OF_KIND = {"channel": ("channel",), "spatial": ("spatial",), "hybrid": ("spatial", "channel"),
                "self": ("received",), "cross": ("received",)}


def _no_traces(model: nn.Module) -> None:
    """Nothing of the capture is left on ``model`` (the one hook a model is built with, the
    deformable neck noting the transform's image sizes, stays)."""
    for name, m in model.named_modules():
        own = [h for h in m._forward_hooks.values() if getattr(h, "__func__", None) is not FPNNeck.note_images]
        assert not own, f"{name} kept a forward hook"
        if isinstance(m, AttentionBlock):
            assert m._capture is None, f"{name} kept its capture"


def _check_maps(maps: dict, n: int, size: tuple[int, int]) -> None:
    for name, m in maps.items():
        for key, t in m.maps.items():
            assert t.shape[0] == n and torch.isfinite(t).all(), (name, key)
        for i in range(n):
            up = m.map(i)
            assert tuple(up.shape) == size and torch.isfinite(up).all(), name


# --------------------------------------------------------------------------------------------------
# Blocks


@pytest.mark.parametrize("name", visattn.list_blocks())
def test_block_records_without_changing_its_output(name):
    """Every registered block records the keys of its kind, shaped as documented, and computes
    exactly the same output as without recording."""
    block = randomize_(visattn.create_block(name, 32), scale=0.3).eval()
    x = torch.randn(2, 32, 7, 9)
    with torch.no_grad():
        plain = block(x)
        block._capture = Capture(query=(0.5, 0.25))
        try:
            captured = block(x)
        finally:
            cap, block._capture = block._capture, None
    assert torch.equal(plain, captured)
    kind = visattn.block_info(name).kind
    assert any(k in cap.maps for k in KEYS_OF_KIND[kind]), f"{name} ({kind}) recorded {sorted(cap.maps)}"
    for key, t in cap.maps.items():
        assert t.dtype == torch.float32 and torch.isfinite(t).all()
        assert t.shape == ((2, 32) if key == "channel" else (2, 7, 9)), (key, t.shape)
    if kind == "self":
        assert "query" in cap.maps


def test_attention_totals_equal_the_plain_softmax():
    """Chunked totals (a few rows at a time, with a mask) equal the full softmax matrix."""
    q, k = torch.randn(2, 4, 23, 8), torch.randn(2, 4, 17, 8)
    mask = torch.zeros(2, 4, 23, 17).masked_fill_(torch.rand(2, 4, 23, 17) < 0.3, float("-inf"))
    mask[..., 0] = 0.0
    full = ((q @ k.transpose(-2, -1)) * 0.7 + mask).softmax(-1)  # (N, heads, L, S)
    received, row = attention_totals(q, k, query=5, scale=0.7, mask=mask, rows=4)
    torch.testing.assert_close(received, full.mean((1, 2)), atol=1e-5, rtol=0)
    torch.testing.assert_close(row, full[:, :, 5].mean(1), atol=1e-5, rtol=0)
    torch.testing.assert_close(attention_probs(q, k, scale=0.7, mask=mask), full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["mhsa", "nonlocal", "danet", "sra", "cross"])
def test_captured_self_attention_is_the_softmax_attend_applies(name, monkeypatch):
    """What a block on the fused path records equals the plain softmax of the very q, k, scale and
    mask it hands to ``attend`` (recomputed here in float64) within 1e-5."""
    module = {"mhsa": "mhsa", "nonlocal": "non_local", "danet": "danet", "sra": "sra", "cross": "cross"}[name]
    seen = []
    real = _attention.attend

    def spy(q, k, v, *, scale=None, mask=None, reference=False):
        seen.append((q, k, scale, mask))
        return real(q, k, v, scale=scale, mask=mask, reference=reference)

    monkeypatch.setattr(f"visattn.layers.{module}.attend", spy)
    kwargs = {"sr_ratio": 1} if name == "sra" else {}
    block = randomize_(visattn.create_block(name, 32, **kwargs), scale=0.3).eval()
    block._capture = Capture(query=(0.4, 0.6))
    with torch.no_grad():
        block(torch.randn(2, 32, 5, 6))
    cap, block._capture = block._capture, None
    q, k, scale, mask = seen[-1]
    s = (q.double() @ k.double().transpose(-2, -1)) * (scale or 1 / math.sqrt(q.shape[-1]))
    p = (s if mask is None else s + mask.double()).softmax(-1)  # (N, heads, 30, 30)
    torch.testing.assert_close(cap.maps["received"], p.mean((1, 2)).view(2, 5, 6).float(), atol=1e-5, rtol=0)
    qi = Capture(query=(0.4, 0.6)).query_index(5, 6)
    torch.testing.assert_close(cap.maps["query"], p[:, :, qi].mean(1).view(2, 5, 6).float(), atol=1e-5, rtol=0)


def test_windowed_and_axial_maps_are_distributions():
    """Window (shifted, padded), axial, criss-cross, linear and external attention record a
    distribution over the map as "received" and for the query; window's query stays in its window."""
    x = torch.randn(1, 32, 9, 11)
    for name, kw in [("window", {"window_size": 4, "shift": True}), ("axial", {}), ("criss_cross", {}),
                     ("linear", {}), ("external", {})]:
        block = randomize_(visattn.create_block(name, 32, **kw), scale=0.3).eval()
        block._capture = Capture(query=(0.0, 0.0))
        with torch.no_grad():
            block(x)
        cap, block._capture = block._capture, None
        for key in ("received", "query"):
            torch.testing.assert_close(cap.maps[key].sum(), torch.tensor(1.0), atol=1e-4, rtol=0)
        if name == "window":  # the top-left position's (rolled) window spans at most 4x4 positions
            assert (cap.maps["query"] > 0).sum() <= 16


# --------------------------------------------------------------------------------------------------
# Finding blocks in models


class _EveryBlock(nn.Sequential):
    """A stem, then each block on the stem's features."""

    def __init__(self, names):
        super().__init__(nn.Conv2d(3, 32, 3, stride=2, padding=1),
                         nn.ModuleDict({n: visattn.create_block(n, 32) for n in names}))

    def forward(self, x):
        f = self[0](x)
        return [blk(f) for blk in self[1].values()]


def test_all_blocks_in_a_users_own_model():
    """One model of the user's own holding every registered block: one map per block, named by
    its dotted path, on the input's grid; nothing left behind."""
    names = visattn.list_blocks()
    model = _EveryBlock(names)
    maps = E.attention_maps(model, torch.rand(2, 3, 12, 18), query=(0.5, 0.5), upsample=True)
    assert sorted(maps) == sorted(f"1.{n}" for n in names)
    for n in names:
        m = maps[f"1.{n}"]
        assert m.block == n and m.kind == visattn.block_info(n).kind and m.size == (6, 9)
        assert m.stride == (2.0, 2.0)
    _check_maps(maps, 2, (12, 18))
    _no_traces(model)


def _timm_plugged(block: str) -> nn.Module:
    model = timm.create_model("resnet10t", pretrained=False, num_classes=5).eval()
    visattn.plug(model, block, stages=[2, 4])
    return model


def _torchvision_plugged(block: str) -> nn.Module:
    model = torchvision.models.resnet18(weights=None, num_classes=5).eval()
    visattn.plug(model, block, stages=[3])
    return model


def _check_plugged(model: nn.Module, block: str) -> None:
    n_blocks = sum(isinstance(m, AttentionBlock) for m in model.modules())
    model.train()
    maps = E.attention_maps(model, torch.rand(2, 3, 48, 40), query=(0.3, 0.7), upsample=True)
    assert len(maps) == n_blocks > 0
    assert all(m.block == block for m in maps.values())
    _check_maps(maps, 2, (48, 40))
    _no_traces(model)
    assert all(m.training for m in model.modules())  # the train/eval state is restored


@pytest.mark.parametrize("block", ["cbam"])
def test_maps_in_a_plugged_timm_model(block):
    _check_plugged(_timm_plugged(block), block)


@pytest.mark.parametrize("block", ["mhsa"])
def test_maps_in_a_plugged_torchvision_model(block):
    _check_plugged(_torchvision_plugged(block), block)


@pytest.mark.slow
@pytest.mark.parametrize("block", visattn.list_blocks())
def test_maps_of_every_block_in_plugged_timm_and_torchvision_models(block):
    _check_plugged(_timm_plugged(block), block)
    _check_plugged(_torchvision_plugged(block), block)


def test_maps_of_a_timm_attn_layer():
    """A visattn block given to timm as ``attn_layer`` is found too."""
    model = timm.create_model("resnet10t", pretrained=False, num_classes=5,
                              block_args={"attn_layer": visattn.layers.CBAM}).eval()
    maps = E.attention_maps(model, torch.rand(1, 3, 32, 32))
    assert len(maps) == 4 and all(m.block == "cbam" and "spatial" in m.maps for m in maps.values())


class _Boom(nn.Module):
    def forward(self, x):
        raise RuntimeError("boom")


def test_everything_is_removed_when_the_forward_raises():
    model = nn.Sequential(visattn.create_block("cbam", 3), visattn.create_block("simam", 3), _Boom()).train()
    with pytest.raises(RuntimeError, match="boom"):
        E.attention_maps(model, torch.rand(1, 3, 8, 8), upsample=True)
    _no_traces(model)
    assert all(m.training for m in model.modules())


def test_bad_arguments_are_named():
    model = nn.Sequential(visattn.create_block("se", 8))
    with pytest.raises(TypeError, match="model"):
        E.attention_maps("resnet", torch.rand(1, 8, 4, 4))
    with pytest.raises(TypeError, match="images"):
        E.attention_maps(model, torch.rand(8, 4, 4))
    with pytest.raises(ValueError, match="query"):
        E.attention_maps(model, torch.rand(1, 8, 4, 4), query=(1.5, 0.0))
    with pytest.raises(TypeError, match="upsample"):
        E.attention_maps(model, torch.rand(1, 8, 4, 4), upsample="yes")
    with pytest.raises(TypeError, match="detector"):
        E.explain_detections(model, torch.rand(3, 8, 8))
    with pytest.raises(ValueError, match="steps"):
        E.faithfulness(model, torch.rand(3, 8, 8), steps=0)
    with pytest.raises(TypeError, match="image"):
        E.save_overlay(torch.rand(8, 8), torch.rand(4, 4), "x.png")


# --------------------------------------------------------------------------------------------------
# Detectors


def _detector(arch: str, **kw) -> nn.Module:
    thresh = {"box_score_thresh": 0.0} if arch in ("fasterrcnn", "maskrcnn") else {"score_thresh": 0.0}
    return build_detector(arch, backbone="resnet10t", num_classes=3, fpn_channels=64, min_size=64,
                          max_size=96, **thresh, **kw).eval()


IMAGES = [torch.rand(3, 90, 120), torch.rand(3, 120, 72)]


@pytest.mark.parametrize("arch", ["fcos", *(pytest.param(a, marks=pytest.mark.slow)
                                           for a in ("retinanet", "fasterrcnn", "maskrcnn"))])
def test_detector_with_cbam_backbone_and_neck_attention(arch):
    """What must be true: CBAM in the backbone and attention in the neck give one map per inserted
    block, each in the original image's coordinates, for images of different sizes."""
    det = _detector(arch, attention="cbam", neck_attention="mhsa")
    inserted = [n for n, m in det.named_modules() if isinstance(m, AttentionBlock)]
    maps = E.attention_maps(det, IMAGES, upsample=True)
    assert sorted(maps) == sorted(inserted)
    assert sum(m.block == "cbam" for m in maps.values()) == 4  # resnet10t: one block per stage
    assert sum(m.block == "mhsa" and ".attention." in m.name for m in maps.values()) == det.backbone.num_levels
    for m in maps.values():
        for i, im in enumerate(IMAGES):
            assert tuple(m.map(i).shape) == tuple(im.shape[-2:])
    _no_traces(det)
    exps = E.explain_detections(det, IMAGES[0], top_k=3)
    assert 1 <= len(exps) <= 3
    for d in exps:
        x0, y0, x1, y1 = d.crop_box
        assert 0 <= x0 < x1 <= 120 and 0 <= y0 < y1 <= 90 and d.crops
        assert all(c.shape == (y1 - y0, x1 - x0) for c in d.crops.values())
        assert all(maps[n].level_stride == d.stride for n in d.crops) or d.stride > 32


class _QuadrantGate(AttentionBlock):
    """Test block: records a spatial gate of 1 over the top-left quadrant of each image's resized
    region in the detector's padded batch (``sizes``), 0 elsewhere; passes its input through."""

    def __init__(self, sizes, stride):
        super().__init__()
        self.channels, self.sizes, self.stride = None, sizes, stride

    def _forward(self, x, out=None):
        _, _, h, w = x.shape
        ys = (torch.arange(h) + 0.5) * self.stride
        xs = (torch.arange(w) + 0.5) * self.stride
        gate = torch.stack([(ys[:, None] < ch / 2) & (xs[None, :] < cw / 2) for ch, cw in self.sizes]).float()
        if self._capture is not None:
            self._capture.add("spatial", gate)
        return x.clone() if out is None else out.copy_(x)


def test_maps_land_on_each_original_image():
    """A gate known in the padded batch's coordinates comes back as the top-left quadrant of each
    original image: the resize is undone and the padding cut away."""
    det = _detector("fcos")
    sizes = det.transform(IMAGES)[0].image_sizes
    assert len({tuple(s) for s in sizes}) == 2  # different resized sizes, so padding differs
    det.backbone.attention = nn.ModuleList([nn.ModuleList([_QuadrantGate(sizes, 8)] + [nn.Identity()] * 4)])
    maps = E.attention_maps(det, IMAGES, upsample=True)
    (m,) = maps.values()
    assert m.primary == "spatial" and m.level_stride == 8
    for i, im in enumerate(IMAGES):
        h, w = im.shape[-2:]
        up = m.map(i)
        assert up[: int(0.35 * h), : int(0.35 * w)].min() > 0.9
        assert up[int(0.65 * h):].max() < 0.1 and up[:, int(0.65 * w):].max() < 0.1


def test_box_levels_follow_the_heads():
    fcos, rcnn = _detector("fcos"), _detector("fasterrcnn")
    boxes = torch.tensor([[0, 0, 20, 20], [0, 0, 200, 200], [0, 0, 224, 224], [0, 0, 900, 900]], dtype=torch.float)
    # FCOS (anchor sizes = strides 8..128): half the longer side in (4a, 8a)
    assert E._box_levels(fcos, boxes, [8, 16, 32, 64, 128]) == [0, 1, 1, 3]
    # R-CNN: torchvision's LevelMapper, 224 px -> k0 = 4 -> stride 16 (index 2 from stride 4)
    assert E._box_levels(rcnn, boxes, [4, 8, 16, 32]) == [0, 1, 2, 3]


# --------------------------------------------------------------------------------------------------
# Faithfulness and drawing


class _RegionGate(AttentionBlock):
    """Test block: a fixed spatial gate, 1 on the top-left 12x12 pixels, 0 elsewhere."""

    def __init__(self):
        super().__init__()
        self.channels = None
        gate = torch.zeros(32, 32)
        gate[:12, :12] = 1
        self.register_buffer("gate", gate)

    def _forward(self, x, out=None):
        if self._capture is not None:
            self._capture.add("spatial", self.gate.expand(x.shape[0], -1, -1))
        return x * self.gate


class _Texture(nn.Module):
    """Class 0 wins when the gated region keeps its fine texture (high mean square)."""

    def forward(self, x):
        z = 40 * (x.square().mean((1, 2, 3)) * (32 * 32 / 144) - 0.375)
        return torch.stack([z, torch.zeros_like(z)], 1)


def test_deletion_beats_random_when_the_answer_is_known():
    model = nn.Sequential(_RegionGate(), _Texture()).eval()
    image = ((torch.arange(32)[:, None] + torch.arange(32)[None]) % 2).float().expand(3, 32, 32).clone()
    maps = E.attention_maps(model, image[None], upsample=True)
    scores = E.faithfulness(model, image, maps, steps=8)
    (s,) = scores.values()
    assert s["deletion_auc"] < s["random_deletion_auc"] and s["insertion_auc"] > s["random_insertion_auc"]
    assert s["verdict"] == "better than random"
    # the same map turned inside out points away from the region: no better than random
    (m,) = maps.values()
    m.image_maps[0]["spatial"] = 1 - m.image_maps[0]["spatial"]
    (s,) = E.faithfulness(model, image, maps, steps=8).values()
    assert s["verdict"].startswith("no better than random")


def test_overlay_has_the_images_size_and_is_not_blank(tmp_path):
    image = torch.zeros(3, 50, 70)
    amap = torch.zeros(5, 7)
    amap[1:3, 2:4] = 1
    path = E.save_overlay(image, amap, tmp_path / "o.png", title="test")
    with Image.open(path) as im:
        assert im.size == (70, 50)
        pixels = torch.from_numpy(np.array(im.convert("RGB"))).float().flatten(0, 1)
    assert pixels.std(0).max() > 20  # a heat map over a black image, with a colour bar
    assert not list(tmp_path.glob(".*tmp*"))  # written atomically


# --------------------------------------------------------------------------------------------------
# The command


def _tiny_config(tmp_path: Path) -> Path:
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text("""
model:
  class_path: visattn.lit.DetectionModule
  init_args:
    model:
      class_path: visattn.models.build_detector
      init_args:
        arch: fcos
        backbone: resnet10t
        num_classes: 3
        attention: cbam
        fpn_channels: 64
        detector_kwargs: {min_size: 64, max_size: 96, score_thresh: 0.0, detections_per_img: 5}
""")
    return cfg


@pytest.mark.skipif(not COCO_IMAGE.is_file(), reason="coco128 not available")
def test_cli_explain_writes_grid_crops_and_json(tmp_path, capsys):
    out = tmp_path / "out"
    """The faithfulness test costs 2 (steps + 1) (blocks + seeds) detector passes: skipped here
    (test_deletion_beats_random... covers it; the slow test below runs it through the command)."""
    (out / "detections").mkdir(parents=True)
    for name in ("det_00.png", "det_07.png", "det_123.png", "det_keep.png", "notes.txt"):
        (out / "detections" / name).write_bytes(b"an earlier run")
    rc = main(["explain", "--config", str(_tiny_config(tmp_path)), "--image", str(COCO_IMAGE),
               "--out", str(out), "--top-k", "2", "--query", "100", "200", "--no-faithfulness"])
    assert rc == 0, capsys.readouterr().err
    assert "UNTRAINED" in capsys.readouterr().out
    with Image.open(out / "grid.png") as im:
        assert im.size[0] > 200
    # this run's two crops replace an earlier run's; files not named like ours are kept
    assert sorted(p.name for p in (out / "detections").iterdir()) == [
        "det_00.png", "det_01.png", "det_keep.png", "notes.txt"]
    assert (out / "detections" / "det_00.png").read_bytes() != b"an earlier run"
    summary = json.loads((out / "faithfulness.json").read_text())
    assert len(summary["blocks"]) == 4 and summary["faithfulness"] == {}  # CBAM in each backbone stage
    assert len(summary["detections"]) == 2
    assert all(d["blocks"] for d in summary["detections"])


def test_cli_explain_errors(tmp_path, capsys):
    cfg = _tiny_config(tmp_path)
    img = tmp_path / "i.png"
    Image.new("RGB", (40, 30)).save(img)
    assert main(["explain", "--config", str(cfg), "--image", str(img), "--out", str(tmp_path / "o"),
                 "--query", "31", "0"]) == 2
    assert "--query" in capsys.readouterr().err
    assert main(["explain", "--weights", "x", "--ckpt", str(cfg), "--image", str(img)]) == 2
    assert "--ckpt" in capsys.readouterr().err
    assert main(["explain", "--config", str(cfg), "--image", str(tmp_path / "none.png")]) == 2
    assert "--image" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.skipif(not COCO_IMAGE.is_file(), reason="coco128 not available")
def test_cli_explain_with_the_shipped_weights(tmp_path):
    out = tmp_path / "out"
    assert main(["explain", "--weights", "fcos_resnet10t_eca.synth256", "--image", str(COCO_IMAGE),
                 "--out", str(out), "--top-k", "3", "--steps", "4", "--seeds", "2"]) == 0
    summary = json.loads((out / "faithfulness.json").read_text())
    assert len(summary["blocks"]) == 4 and summary["detections"]
    assert set(summary["faithfulness"]) == set(summary["blocks"])
    for s in summary["faithfulness"].values():
        assert len(s["deletion"]) == 5 and 0 <= s["deletion_auc"] and s["verdict"]


# --------------------------------------------------------------------------------------------------
# Regressions found in review


class _LastRowGate(AttentionBlock):
    """Test block: records a spatial gate of 1 on the last row of its map, 0 elsewhere."""

    def __init__(self):
        super().__init__()
        self.channels = None

    def _forward(self, x, out=None):
        gate = torch.zeros(x.shape[0], *x.shape[-2:])
        gate[:, -1] = 1
        if self._capture is not None:
            self._capture.add("spatial", gate)
        return x.clone() if out is None else out.copy_(x)


def test_maps_keep_the_networks_stride_when_the_size_happens_to_divide():
    """A stride-32 map of a 40 px input has 2 rows: row 0 covers pixels 0..31, row 1 the rest
    (it was stretched as if the stride were 40 / 2 = 20); a patch stride of 14 is still found."""
    assert [E._cell_stride(t, c) for t, c in [(40, 2), (33, 2), (448, 4), (448, 56), (224, 16), (32, 64)]] == \
        [32, 32, 128, 8, 14, None]
    model = nn.Sequential(nn.Conv2d(3, 4, 1, stride=32), _LastRowGate()).eval()
    (m,) = E.attention_maps(model, torch.rand(1, 3, 40, 8), upsample=True).values()
    assert m.size == (2, 1) and m.stride[0] == 32.0
    up = m.map(0)[:, 0]
    assert up[:32].max() < 0.5 < up[32:].min()


class _FakeDetector(nn.Module):
    """Has a detector's transform (so explain treats it as one); never run."""

    def __init__(self):
        super().__init__()
        from torchvision.models.detection.transform import GeneralizedRCNNTransform

        self.transform = GeneralizedRCNNTransform(32, 32, [0.5] * 3, [0.2] * 3)


def test_review_bad_arguments_are_named():
    det = _FakeDetector()
    for bad in (torch.rand(1, 20, 20), torch.rand(4, 20, 20)):  # grayscale, RGBA
        with pytest.raises(TypeError, match=r"images\[0\] must be a \(3, H, W\)"):
            E.attention_maps(det, [bad])
    _no_traces(det)
    model = nn.Sequential(visattn.create_block("cbam", 3)).eval()
    for bad in (torch.tensor([0.5, 0.5]), "ab", (True, False)):
        with pytest.raises(TypeError, match="query"):
            E.attention_maps(model, torch.rand(1, 3, 8, 8), query=bad)
    maps = E.attention_maps(model, torch.rand(1, 3, 8, 8), upsample=True)
    (m,) = maps.values()
    with pytest.raises(ValueError, match="image must be an index < 1"):
        m.map(1)
    with pytest.raises(ValueError, match=r"maps\['0'\] is \(8, 8\) pixels, but image is \(12, 12\)"):
        E.faithfulness(model, torch.rand(3, 12, 12), maps)
    with pytest.raises(TypeError, match=r"\(N, classes\) logits.*\(1, 3, 8, 8\)"):  # a feature map, not logits
        E.faithfulness(model, torch.rand(3, 8, 8), maps)


def test_faithfulness_on_a_one_pixel_wide_image():
    """The blur that removes patches fits images 1 px wide (reflect padding needs k // 2 < side)."""
    model = nn.Sequential(visattn.create_block("cbam", 3), nn.Flatten(), nn.LazyLinear(2)).eval()
    image = torch.rand(3, 7, 1)
    model(image[None])  # materialise the lazy layer
    (s,) = E.faithfulness(model, image, steps=2, seeds=1).values()
    assert len(s["deletion"]) == 3 and all(math.isfinite(v) for v in s["deletion"])


def test_a_degenerate_box_on_the_image_edge_gets_a_crop(tmp_path):
    """A zero-width box clipped onto the right edge (x0 == width; boxes from anchors in the batch
    padding are clipped there) or the bottom edge gets a one-pixel-wide crop, and draws."""
    det = _detector("fcos", attention="cbam")
    image = torch.rand(3, 60, 80)
    maps, _, geo = E._run(det, [image], upsample=True)
    output = [{"boxes": torch.tensor([[80.0, 10.0, 80.0, 20.0], [10.0, 60.0, 30.0, 60.0]]),
               "scores": torch.tensor([0.9, 0.8]), "labels": torch.tensor([1, 2])}]
    dets = E._explain(det, image, maps, output, geo, 5, 0.5, 0.0)
    assert [d.crop_box for d in dets] == [(79, 5, 80, 25), (0, 59, 40, 60)]
    assert all(c.numel() > 0 for d in dets for c in d.crops.values())
    assert len(E.save_detection_crops(dets, tmp_path)) == 2


def test_grid_of_a_very_thin_image(tmp_path):
    """A 2000 x 3 image made a grid less than a pixel wide (PIL: "cannot write empty image"); its
    panels are now letterboxed at least 48 px wide."""
    model = nn.Sequential(visattn.create_block("cbam", 3)).eval()
    image = torch.rand(3, 2000, 3)
    maps = E.attention_maps(model, image[None], upsample=True)
    with Image.open(E.save_grid(image, maps, tmp_path / "g.png")) as im:
        assert im.size[0] >= 2 * 48


# --------------------------------------------------------------------------------------------------
# Neck attention across the pyramid levels (scale-aware, DyHead, Deformable DETR's encoder)


def _level_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    from visattn.models.neck import LevelAttention

    return [(n, m) for n, m in model.named_modules() if isinstance(m, LevelAttention)]


def _capturing(model: nn.Module, query=None) -> dict:
    from visattn.models.neck import LevelCaptures

    caps = {}
    for name, m in _level_modules(model):
        caps[name] = m._capture = LevelCaptures(query=query)
    return caps


@pytest.mark.parametrize("neck", ["scale", "dyhead", "deformable"])
def test_neck_capture_changes_no_output(neck):
    """Recording changes no bit of what a neck attention computes (trained-like random weights)."""
    from visattn.models.neck import ACROSS_LEVELS

    g = torch.Generator().manual_seed(1)
    feats = [torch.randn(2, 16, h, w, generator=g) for h, w in ((9, 7), (5, 4), (3, 2))]
    options = {"dyhead": {"blocks": 2}, "deformable": {"heads": 2, "points": 2, "blocks": 2}}.get(neck, {})
    module = randomize_(ACROSS_LEVELS[neck](16, len(feats), **options)).eval()
    ref = module(feats)
    caps = _capturing(module, query=(0.5, 0.5))
    out = module(feats)
    assert caps and all(len(c.levels) == len(feats) for c in caps.values())
    assert all(torch.equal(o, r) for o, r in zip(out, ref))


@pytest.mark.parametrize("neck", ["dyhead", "deformable"])
def test_neck_attention_maps_land_on_each_original_image(neck):
    """A detector with DyHead / Deformable DETR's encoder as its neck gives one finite map per
    (module, level), with the keys of its kind, in each original image's pixels, for two images of
    different sizes; the detections are those of the model run without capture; nothing is left."""
    det = _detector("fcos", neck_attention=neck)
    randomize_(det.backbone.attention)
    with torch.no_grad():
        ref = det(IMAGES)
    maps, output, _ = E._run(det, IMAGES, upsample=True)
    for r, o in zip(ref, output):
        assert all(torch.equal(r[k], o[k]) for k in r)
    modules = _level_modules(det)
    assert modules and all(n.startswith("backbone.attention.0.") for n, _ in modules)
    expected = {f"{n}.level{i}" for n, _ in modules for i in range(det.backbone.num_levels)}
    assert set(maps) == expected
    strides = set()
    for m in maps.values():
        assert m.block == neck and m.level is not None
        if neck == "dyhead":
            assert m.kind == "hybrid" and m.primary == "spatial" and m.channel.shape == (2, 64)
            assert {"scale", "energy"} <= set(m.maps) | set(m.weights) and torch.isfinite(m.weights["scale"]).all()
        else:
            assert m.kind == "self" and m.primary == "received" and "received" in m.maps
            assert (m.maps["received"] >= 0).all()
        for key, t in m.maps.items():
            assert t.shape[0] == 2 and torch.isfinite(t).all(), (m.name, key)
        for i, im in enumerate(IMAGES):
            up = m.map(i)
            assert tuple(up.shape) == tuple(im.shape[-2:]) and torch.isfinite(up).all()
        strides.add(m.level_stride)
    assert {8, 16, 32, 64} <= strides
    _no_traces(det)
    assert all(m._capture is None for _, m in modules)


def test_deformable_neck_maps_are_distributions_over_the_levels():
    """With every sampling point on its reference (zero offsets) and levels of one size (so every
    reference is a pixel centre of every level), no weight falls off the maps: what all levels
    receive sums to 1 per image, and so does what the query point's queries pay, all of it at the
    point itself. (On a coarser level the references of a finer one's border pixels lie outside the
    pixel centres, and bilinear sampling reads part of the zero padding: that weight is lost.)"""
    from visattn.models.neck import DeformableEncoder

    g = torch.Generator().manual_seed(2)
    feats = [torch.randn(2, 16, 8, 8, generator=g) for _ in range(3)]
    module = randomize_(DeformableEncoder(16, 3, heads=2, points=2)).eval()
    with torch.no_grad():
        module.layers[0].attn.sampling_offsets.weight.zero_()
        module.layers[0].attn.sampling_offsets.bias.zero_()
    (cap,) = _capturing(module, query=(0.3, 0.7)).values()
    module(feats)
    received = sum(c.maps["received"].sum((1, 2)) for c in cap.levels.values())
    paid = sum(c.maps["query"].sum((1, 2)) for c in cap.levels.values())
    torch.testing.assert_close(received, torch.ones(2))
    torch.testing.assert_close(paid, torch.ones(2))
    for c in cap.levels.values():  # the point (0.3, 0.7) is cell (2, 5) of every level
        q = c.maps["query"].flatten(1)
        torch.testing.assert_close(q[:, 2 * 8 + 5], q.sum(1))


class _NeckThenBoom(nn.Module):
    def __init__(self):
        super().__init__()
        from visattn.models.neck import ScaleAwareAttention

        self.neck = ScaleAwareAttention(3, 1)

    def forward(self, x):
        self.neck([x])
        raise RuntimeError("boom")


def test_neck_capture_is_removed_when_the_forward_raises():
    model = _NeckThenBoom()
    with pytest.raises(RuntimeError, match="boom"):
        E.attention_maps(model, torch.rand(1, 3, 8, 8))
    assert model.neck._capture is None and not model.neck._forward_hooks
