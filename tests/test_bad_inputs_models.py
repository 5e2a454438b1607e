"""Bad inputs to blocks, plug and the model builders: each is a clear error naming the bad
argument, raised before anything is built or changed.

To add a case, add one line to ``CASES``: ``(id, callable, expected exception, message regex)``.
"""
import inspect
from functools import partial

import pytest
import timm
import torch
import torchvision
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor

import visattn
from visattn.models import build_body, build_detector, build_segmenter
from visattn.plug import Blend, Plugged, find_residual_blocks
from visattn.timm_compat import load_timm_weights

BLOCKS = visattn.list_blocks()
det = partial(build_detector, "fcos", backbone="resnet10t", num_classes=3, fpn_channels=32)
frcnn = partial(build_detector, "fasterrcnn", backbone="resnet10t", num_classes=3, fpn_channels=32)
seg = partial(build_segmenter, "fcn", backbone="resnet10t", num_classes=3, output_stride=None)
block = visattn.create_block


def _tv():
    return torchvision.models.resnet18(num_classes=4)


def _plugged_twice(**kw):
    model = _tv()
    visattn.plug(model, "se", stages=[1], **kw)
    visattn.plug(model, "se", stages=[1, 2], **kw)


def _too_wide(channels):
    if channels > 64:
        raise ValueError(f"factory refuses channels={channels}")
    return visattn.create_block("se", channels)


CASES = [
    # detector keywords: torchvision's transform would swallow a typo
    ("det-typo-kw", lambda: det(min_sise=128), TypeError, r"min_sise.*did you mean.*min_size"),
    ("det-typo-detector_kwargs", lambda: det(detector_kwargs={"score_tresh": 0.9}), TypeError,
     r"score_tresh.*score_thresh"),
    ("frcnn-typo", lambda: frcnn(box_score_tresh=0.9), TypeError, r"box_score_tresh.*box_score_thresh"),
    ("frcnn-mask-kw", lambda: frcnn(mask_roi_pool=None), TypeError, r"mask_roi_pool"),
    ("det-anchor_generator", lambda: det(anchor_generator=None), TypeError, r"anchor_generator.*anchor_sizes"),
    ("det-kw-twice", lambda: det(detector_kwargs={"min_size": 64}, min_size=128), ValueError,
     r"min_size given both"),
    ("det-detector_kwargs-list", lambda: det(detector_kwargs=[("min_size", 64)]), TypeError, r"detector_kwargs"),
    ("det-min_size-negative", lambda: det(min_size=-5), ValueError, r"min_size"),
    # sizes
    ("fpn-0", lambda: det(fpn_channels=0), ValueError, r"fpn_channels"),
    ("fpn-negative", lambda: det(fpn_channels=-64), ValueError, r"fpn_channels"),
    ("fpn-str", lambda: det(fpn_channels="64"), TypeError, r"fpn_channels"),
    ("fpn-bool", lambda: det(fpn_channels=True), TypeError, r"fpn_channels"),
    ("fpn-float", lambda: det(fpn_channels=64.0), TypeError, r"fpn_channels"),
    ("fpn-huge", lambda: det(fpn_channels=10**7), ValueError, r"fpn_channels.*2048"),
    ("anchor-flat", lambda: det(anchor_sizes=[8, 16, 32, 64, 128]), TypeError, r"anchor_sizes\[0\]"),
    ("anchor-zero", lambda: det(anchor_sizes=[(8,), (0,), (32,), (64,), (128,)]), ValueError,
     r"anchor_sizes\[1\]"),
    ("anchor-nan", lambda: det(anchor_sizes=[(8,), (16,), (float("nan"),), (64,), (128,)]), ValueError,
     r"anchor_sizes\[2\]"),
    ("ratios-negative", lambda: frcnn(aspect_ratios=(0.5, -1.0)), ValueError, r"aspect_ratios"),
    ("ratios-fcos-ignored", lambda: det(aspect_ratios=(0.5, 1.0, 2.0)), ValueError, r"fcos.*aspect_ratios"),
    ("neck-typo", lambda: det(neck_attention=["eca", "scael"]), ValueError, r"neck_attention.*'scael'.*scale"),
    ("neck-int", lambda: det(neck_attention=["eca", 5]), TypeError, r"neck_attention"),
    ("attention-stages-0", lambda: det(attention="se", attention_stages=[0]), ValueError,
     r"attention_stages.*out of range"),
    ("attention-stages-alone", lambda: det(attention_stages=[1]), ValueError, r"attention_stages.*without attention"),
    ("attention-kwargs-str", lambda: det(attention="se", attention_kwargs="rd_ratio=0.5"), TypeError,
     r"attention_kwargs"),
    ("pretrained-str", lambda: det(pretrained_backbone="no"), TypeError, r"pretrained_backbone"),
    ("p2-str", lambda: det(p2="true"), TypeError, r"p2"),
    ("num_classes-str", lambda: det(num_classes="3"), ValueError, r"num_classes"),
    ("seg-output_stride", lambda: seg(output_stride=7), ValueError, r"output_stride"),
    ("seg-aux-str", lambda: seg(aux_loss="yes"), TypeError, r"aux_loss"),
    ("body-last-0", lambda: build_body("resnet10t", last=0), ValueError, r"last"),
    ("body-last-too-many", lambda: build_body("resnet10t", last=9), ValueError, r"last=9"),
    # plug
    ("plug-str-model", lambda: visattn.plug("resnet50", "se"), TypeError, r"model must be a torch.nn.Module.*str"),
    ("plug-none-model", lambda: visattn.plug(None, "se"), TypeError, r"model must be a torch.nn.Module"),
    ("plug-tensor-model", lambda: visattn.plug(torch.randn(3), "se"), TypeError, r"model.*Tensor"),
    ("plug-block-int", lambda: visattn.plug(_tv(), 5), TypeError, r"block must be.*cbam"),
    ("plug-block-typo", lambda: visattn.plug(_tv(), "cbma"), ValueError, r"unknown block 'cbma'.*cbam"),
    ("plug-stages-empty", lambda: visattn.plug(_tv(), "se", stages=[]), ValueError, r"stages is empty"),
    ("plug-stages-str", lambda: visattn.plug(_tv(), "se", stages="3"), TypeError, r"stages"),
    ("plug-stages-float", lambda: visattn.plug(_tv(), "se", stages=[2.0]), TypeError, r"stages"),
    ("plug-stages-0", lambda: visattn.plug(_tv(), "se", stages=0), ValueError, r"stages \[0\] out of range"),
    ("plug-position", lambda: visattn.plug(_tv(), "se", position=3), ValueError, r"position"),
    ("plug-twice", _plugged_twice, ValueError, r"already hold attention.*layer1\.0\.bn2\.attn.*replace=True"),
    ("plug-twice-after-stage", lambda: _plugged_twice(position="after_stage"), ValueError,
     r"already hold attention.*layer1\.attn"),
    ("find-residual-str", lambda: find_residual_blocks("resnet18"), TypeError, r"model must be"),
    # registry and timm weights
    ("create-unknown", lambda: block("cbma", 16), ValueError, r"unknown block 'cbma'.*cbam"),
    ("create-typo-close-match", lambda: block("se", 16, rd_ratoi=0.5), TypeError, r"rd_ratoi.*did you mean rd_ratio"),
    ("list-kind", lambda: visattn.list_blocks(kind="chanel"), ValueError, r"valid kinds"),
    ("se-huge", lambda: block("se", 10**9), ValueError, r"channels=1000000000.*limit"),
    ("se-rd_channels-huge", lambda: block("se", 64, rd_channels=10**9), ValueError, r"rd_channels=1000000000"),
    ("window-huge", lambda: block("window", 16, window_size=10**5), ValueError, r"window_size=100000"),
    ("se-rd_ratio-0", lambda: block("se", 64, rd_ratio=0), ValueError, r"rd_ratio"),
    ("cbam-rd_ratio-negative", lambda: block("cbam", 64, rd_ratio=-0.5), ValueError, r"rd_ratio"),
    ("se-rd_channels-0", lambda: block("se", 64, rd_channels=0), ValueError, r"rd_channels"),
    ("linear-key_channels-0", lambda: block("linear", 64, key_channels=0), ValueError, r"key_channels"),
    ("cross-context_channels-0", lambda: block("cross", 64, context_channels=0), ValueError, r"context_channels"),
    ("mhsa-heads-str", lambda: block("mhsa", 64, heads="2"), TypeError, r"heads"),
    ("sk-kernel-str", lambda: block("sk", 64, kernel_size="35"), TypeError, r"kernel_size"),
    ("bam-num_dilated-negative", lambda: block("bam", 64, num_dilated=-1), ValueError, r"num_dilated"),
    ("timm-weights-not-module", lambda: load_timm_weights(block("se", 32), "se.pth", "se"), TypeError,
     r"timm_module"),
    ("timm-weights-wrong-block", lambda: load_timm_weights(block("se", 32), nn.Identity(), "cbam"), TypeError,
     r"block must be a CBAM"),
    ("timm-weights-no-counterpart", lambda: load_timm_weights(block("bam", 32), nn.Identity(), "bam"),
     ValueError, r"no counterpart of block 'bam'"),
]


@pytest.mark.parametrize("fn,error,match", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input(fn, error, match):
    with pytest.raises(error, match=match):
        fn()


# ------------------------------------------------------------------ every block, automatically

@pytest.mark.parametrize("name", BLOCKS)
@pytest.mark.parametrize("channels,error", [(0, ValueError), (-1, ValueError), (2.5, TypeError),
                                            (True, TypeError), ("64", TypeError)])
def test_bad_channels_every_block(name, channels, error):
    with pytest.raises(error, match="channels"):
        visattn.create_block(name, channels)


@pytest.mark.parametrize("name", BLOCKS)
def test_huge_channels_every_block(name):
    """10**9 channels: refused, naming channels, unless the block's weights do not grow with C
    (simam, triplet, eca), which then builds small."""
    try:
        b = visattn.create_block(name, 10**9)
    except ValueError as e:
        assert "channels=1000000000" in str(e)
    else:
        assert sum(p.numel() for p in b.parameters()) < 1000


#: numeric keywords that take any real value
ANY_REAL = {("eca", "beta")}


def _size_arguments():
    for name in BLOCKS:
        for arg, p in inspect.signature(visattn.block_info(name).cls).parameters.items():
            ann = str(p.annotation)
            if arg in ("channels", "device", "dtype") or "bool" in ann or (name, arg) in ANY_REAL:
                continue
            if "int" in ann or "float" in ann:
                yield name, arg


@pytest.mark.parametrize("name,arg", list(_size_arguments()))
def test_bad_size_argument_every_block(name, arg):
    """Every numeric keyword of every block: negative is a ValueError, a string a TypeError, both
    naming the keyword."""
    sequence = "Sequence" in str(inspect.signature(visattn.block_info(name).cls).parameters[arg].annotation)
    with pytest.raises(ValueError, match=arg):
        visattn.create_block(name, 16, **{arg: [-1, 3] if sequence else -1})
    with pytest.raises(TypeError, match=arg):
        visattn.create_block(name, 16, **{arg: ["8", 3] if sequence else "8"})


@pytest.mark.parametrize("name", BLOCKS)
def test_integer_input_every_block(name):
    x = torch.randint(0, 255, (1, 16, 4, 4), dtype=torch.uint8)
    with pytest.raises(TypeError, match=r"floating-point tensor, got dtype torch.uint8"):
        visattn.create_block(name, 16)(x)


@pytest.mark.parametrize("name", BLOCKS)
def test_dtype_other_than_parameters_every_block(name):
    b = visattn.create_block(name, 16).eval()
    x = torch.randn(2, 16, 5, 4, dtype=torch.float64)
    if not any(True for _ in b.parameters()):  # parameter-free: any floating dtype, kept
        assert b(x).dtype == torch.float64
        return
    with pytest.raises(TypeError, match=r"torch.float32 parameters but got a torch.float64 input"):
        b(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast casts per op, as before
        assert b(x.float()).dtype == torch.float32
        assert b(x.bfloat16()).dtype == torch.bfloat16
        assert b.bfloat16()(x.float()).dtype == torch.float32
        assert b.double()(x).dtype == torch.float64  # autocast leaves float64 alone
        f64, f32, f16 = torch.float64, torch.float32, torch.float16
        for xd, bd in ((f64, f32), (f32, f64), (f16, f32), (f32, f16)):
            with pytest.raises(TypeError, match=rf"{bd} parameters but got a {xd} input; under torch.autocast"):
                b.to(bd)(x.to(xd))  # autocast never casts float64 and some ops refuse float16 + bf16


def test_plug_failure_leaves_the_model_untouched():
    model = _tv()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="factory refuses channels=128"):
        visattn.plug(model, _too_wide)  # 64 channels in stage 1 work, 128 in stage 2 do not
    assert not any(isinstance(m, (Plugged, Blend)) for m in model.modules())
    assert model.state_dict().keys() == before.keys()


def test_plug_twice_with_replace_swaps_the_blocks():
    model = _tv()
    first = visattn.plug(model, "se", stages=[1])
    again = visattn.plug(model, "cbam", stages=[1, 2], replace=True)
    assert again[:2] == first  # replaced in place
    blends = [m for m in model.modules() if isinstance(m, Blend)]
    assert len(blends) == 4 and all(type(b.block).__name__ == "CBAM" for b in blends)


# ------------------------------------------------------------------ torch.fx

def _same(model, x, node):
    model.eval()
    feats = create_feature_extractor(model, {node: "f"})
    with torch.no_grad():
        ref = {}
        h = model.get_submodule(node).register_forward_hook(lambda m, i, o: ref.setdefault("f", o))
        model(x)
        h.remove()
        torch.testing.assert_close(feats(x)["f"], ref["f"])


@pytest.mark.parametrize("block_name", ["se", "cbam", "window"])
def test_feature_extractor_on_plugged_torchvision(block_name):
    model = _tv()
    visattn.plug(model, block_name, stages=[3, 4])
    for blend in (m for m in model.modules() if isinstance(m, Blend)):
        blend.gate.data.fill_(0.5)  # the blocks count in the output
    _same(model, torch.randn(2, 3, 64, 64), "layer4")


def test_feature_extractor_on_plugged_timm():
    model = timm.create_model("resnet10t", pretrained=False, num_classes=4)
    visattn.plug(model, "eca")
    _same(model, torch.randn(1, 3, 64, 64), "layer3")


@pytest.mark.parametrize("name", ["simam", "triplet", "nonlocal", "cross", "sk"])
def test_fx_traces_blocks_in_a_model(name):
    model = nn.Sequential(nn.Conv2d(3, 16, 1), visattn.create_block(name, 16), nn.ReLU()).eval()
    x = torch.randn(2, 3, 7, 9)
    traced = torch.fx.symbolic_trace(model)
    with torch.no_grad():
        torch.testing.assert_close(traced(x), model(x))
    _same(model, x, "1")


@pytest.mark.parametrize(("build", "key", "value", "error"), [
    (det, "score_thresh", 1.5, ValueError),
    (det, "nms_thresh", -0.1, ValueError),
    (det, "score_thresh", float("nan"), ValueError),
    (det, "score_thresh", "0.5", TypeError),
    (det, "topk_candidates", 0, ValueError),
    (det, "detections_per_img", 2.5, TypeError),
    (frcnn, "box_score_thresh", 2.0, ValueError),
    (frcnn, "rpn_nms_thresh", 1.1, ValueError),
    (frcnn, "box_positive_fraction", 1.5, ValueError),
    (frcnn, "rpn_post_nms_top_n_test", 0, ValueError),
    (frcnn, "box_detections_per_img", -1, ValueError),
    (frcnn, "box_batch_size_per_image", 0, ValueError),
])
def test_detector_thresholds_and_counts_are_checked(build, key, value, error):
    """A score/IoU threshold or fraction outside [0, 1], or a count below 1, would make
    torchvision return no (or every) detection without a word: refused, naming the keyword."""
    with pytest.raises(error, match=key):
        build(detector_kwargs={key: value})
