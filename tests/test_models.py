"""Detectors and segmenters: torchvision API in and out, attention in backbone and neck, errors."""
import math

import pytest
import torch

import visattn
from visattn.models import (
    ARCHS,
    SEGMENTER_ARCHS,
    build_detector,
    build_segmenter,
    default_anchor_sizes,
)
from visattn.plug import Blend

BACKBONES = ["resnet10t", "torchvision:resnet18"]


def _batch(masks=False):
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 64, 80, generator=g), torch.rand(3, 72, 64, generator=g)]
    targets = [
        {"boxes": torch.tensor([[5.0, 5.0, 30.0, 40.0]]), "labels": torch.tensor([1])},
        {"boxes": torch.tensor([[10.0, 10.0, 20.0, 20.0], [0.0, 0.0, 60.0, 60.0]]), "labels": torch.tensor([2, 1])},
    ]
    if masks:
        for img, t in zip(images, targets):
            m = torch.zeros(len(t["boxes"]), *img.shape[1:], dtype=torch.uint8)
            for i, (x0, y0, x1, y1) in enumerate(t["boxes"].int().tolist()):
                m[i, y0:y1, x0:x1] = 1
            t["masks"] = m
    return images, targets


def _tiny(arch, backbone, **kw):
    return build_detector(arch, backbone=backbone, num_classes=3, fpn_channels=32, min_size=64, max_size=96, **kw)


def _train_step(model, arch):
    images, targets = _batch(masks=arch == "maskrcnn")
    model.train()
    losses = model(images, targets)
    assert losses and all(torch.isfinite(v) for v in losses.values()), losses
    sum(losses.values()).backward()
    return losses


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("attention", [None, "cbam"])
def test_detector_train_and_eval(arch, backbone, attention):
    model = _tiny(arch, backbone, attention=attention, neck_attention="se" if attention else None)
    for m in model.modules():  # timm zero-initialises each block's last BN (zero_init_last); a
        if isinstance(m, torch.nn.BatchNorm2d):  # zero branch gives its gate no gradient at step 0
            torch.nn.init.ones_(m.weight)
    _train_step(model, arch)
    blends = [m for m in model.modules() if isinstance(m, Blend)]
    if attention:
        assert len(blends) > 4  # backbone + every FPN level
        assert all(b.gate.grad is not None for b in blends)
        # every gate learns, the 1x1 top levels' too (FCOS's head normalises them with two
        # channels per group at fpn_channels=32; one, as in torchvision, passes no gradient)
        assert all(b.gate.grad.abs() > 0 for b in blends)
    else:
        assert not blends
    model.eval()
    with torch.no_grad():
        out = model(_batch()[0])
    assert len(out) == 2
    keys = {"boxes", "labels", "scores"} | ({"masks"} if arch == "maskrcnn" else set())
    for o in out:
        assert set(o) == keys
        assert o["boxes"].shape[1] == 4 and len(o["labels"]) == len(o["scores"])
        assert (o["labels"] >= 1).all() and (o["labels"] <= 3).all() if len(o["labels"]) else True


def test_fcos_at_32_channels_predicts_a_single_small_image():
    """torchvision's FCOS head has GroupNorm(32) everywhere: at 32 channels one value per group on
    the 1x1 top levels, which group_norm refuses for a single image. It gets 16 groups there."""
    model = _tiny("fcos", "resnet10t").eval()
    with torch.no_grad():
        out = model([torch.rand(3, 20, 30)])  # resized to 64 x 96: P6 and P7 are 1x1
    assert len(out) == 1 and out[0]["boxes"].shape[1] == 4
    norms = [m for m in model.head.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms and all(m.num_groups == 16 for m in norms)
    wide = build_detector("fcos", backbone="resnet10t", num_classes=3, fpn_channels=64)
    assert all(m.num_groups == 32 for m in wide.head.modules() if isinstance(m, torch.nn.GroupNorm))


def _train_block_in(block: str, archs, segmenter_archs) -> None:
    for arch in archs:
        model = _tiny(arch, "resnet10t", attention=block, attention_stages=[3, 4])
        _train_step(model, arch)
    for arch in segmenter_archs:
        model = build_segmenter(arch, backbone="resnet10t", num_classes=4, attention=block,
                                attention_stages=[4], output_stride=None).train()
        out = model(torch.rand(2, 3, 40, 40))["out"]
        torch.nn.functional.cross_entropy(out, torch.randint(0, 4, (2, 40, 40))).backward()


@pytest.mark.parametrize("index_block", list(enumerate(visattn.list_blocks())), ids=lambda ib: ib[1])
def test_every_block_trains_in_a_detector_and_a_segmenter(index_block):
    """Every registered block trains a step plugged into one detector arch and one segmenter arch;
    the archs rotate over the registry, so every arch is covered by several blocks (the full
    block x arch grid is the slow test below)."""
    i, block = index_block
    _train_block_in(block, [ARCHS[i % len(ARCHS)]], [SEGMENTER_ARCHS[i % len(SEGMENTER_ARCHS)]])


@pytest.mark.slow
@pytest.mark.parametrize("block", visattn.list_blocks())
def test_every_block_as_attention_trains_every_arch(block):
    _train_block_in(block, ARCHS, SEGMENTER_ARCHS)


@pytest.mark.parametrize("arch", ARCHS)
def test_neck_options_scale_attention_and_p2(arch):
    model = _tiny(arch, "resnet10t", neck_attention=["eca", "scale"], p2=True)
    assert list(model.backbone.body.strides) == [4, 8, 16, 32]
    losses = _train_step(model, arch)
    scale = model.backbone.attention[1]
    assert scale.fc.weight.grad.abs().sum() > 0  # zero-initialised, yet learns from step one
    assert all(math.isfinite(v.item()) for v in losses.values())


def test_scale_attention_is_identity_at_init():
    from visattn.models import ScaleAwareAttention
    feats = [torch.randn(2, 8, s, s) for s in (16, 8, 4)]
    out = ScaleAwareAttention(8, 3)(feats)
    assert all(torch.equal(a, b) for a, b in zip(feats, out))


def test_levels_and_anchor_defaults():
    assert default_anchor_sizes("fasterrcnn", [4, 8]) == ((32.0,), (64.0,))
    assert default_anchor_sizes("fcos", [8, 16]) == ((8.0,), (16.0,))
    sizes = default_anchor_sizes("retinanet", [8])[0]
    assert sizes[0] == 32.0 and len(sizes) == 3
    frcnn = _tiny("fasterrcnn", "resnet10t")
    assert frcnn.backbone.body.strides == [4, 8, 16, 32]  # P2 on by default for R-CNN
    retina = _tiny("retinanet", "resnet10t", anchor_sizes=[(8,), (16,), (32,), (64,), (128,)])
    assert retina.backbone.body.strides == [8, 16, 32]
    assert retina.anchor_generator.sizes[0] == (8,)


@pytest.mark.parametrize("arch", SEGMENTER_ARCHS)
@pytest.mark.parametrize("backbone", ["resnet10t", "torchvision:resnet50"])
@pytest.mark.parametrize("attention", [None, "eca"])
def test_segmenter(arch, backbone, attention):
    model = build_segmenter(arch, backbone=backbone, num_classes=5, attention=attention, aux_loss=True)
    for m in model.modules():  # undo timm's zero_init_last (see test_detector_train_and_eval)
        if isinstance(m, torch.nn.BatchNorm2d):
            torch.nn.init.ones_(m.weight)
    x = torch.rand(2, 3, 65, 63)
    out = model.train()(x)
    assert out["out"].shape == (2, 5, 65, 63) and out["aux"].shape == (2, 5, 65, 63)
    out["out"].mean().backward()
    if attention:
        gates = [m.gate.grad for m in model.modules() if isinstance(m, Blend)]
        assert gates and all(g is not None and g.abs() > 0 for g in gates)
    with torch.no_grad():
        assert model.eval()(x[:1])["out"].shape == (1, 5, 65, 63)


def test_errors():
    with pytest.raises(ValueError, match="unknown detector arch 'yolo'.*fasterrcnn"):
        build_detector("yolo", backbone="resnet10t", num_classes=3)
    with pytest.raises(ValueError, match="unknown backbone 'resnet9000'"):
        build_detector("fcos", backbone="resnet9000", num_classes=3)
    with pytest.raises(ValueError, match="num_classes must be a positive int"):
        build_detector("fcos", backbone="resnet10t", num_classes=0)
    with pytest.raises(ValueError, match="anchor_sizes has 2 levels but the FPN has 5"):
        build_detector("retinanet", backbone="resnet10t", num_classes=3, anchor_sizes=[(8,), (16,)])
    with pytest.raises(ValueError, match="unknown block 'nope'"):
        build_detector("fcos", backbone="resnet10t", num_classes=3, neck_attention="nope")
    with pytest.raises(ValueError, match="multiple of 32"):
        build_detector("fcos", backbone="resnet10t", num_classes=3, fpn_channels=48)
    with pytest.raises(ValueError, match="cannot dilate"):
        build_segmenter("fcn", backbone="torchvision:resnet18", num_classes=3)
    with pytest.raises(ValueError, match="unknown segmenter arch"):
        build_segmenter("unet", backbone="resnet10t", num_classes=3)
    with pytest.raises(ValueError, match="found no residual block"):
        build_detector("fcos", backbone="vgg11", num_classes=3, attention="se")
