"""The neck attentions across FPN levels, ``neck_attention="deformable"`` (Deformable DETR's
encoder) and ``"dyhead"`` (DyHead): identity at initialisation, every parameter trainable,
float64 gradcheck, graph capture, a detector training step, and option checks. Each config
(configs/fcos_deformable.yaml, configs/fcos_dyhead.yaml) runs with ``fast_dev_run`` in
test_train.py::test_every_config_fast_dev_run."""
import threading
from types import SimpleNamespace

import pytest
import torch

from visattn.models import ARCHS, build_detector
from visattn.models.neck import DeformableEncoder, DyHeadBlock, DynamicHead

from .conftest import randomize_

NECKS = {"deformable": DeformableEncoder, "dyhead": DynamicHead}
OPTIONS = {"deformable": {"heads": 2, "points": 2, "blocks": 2}, "dyhead": {"blocks": 2}}


def _feats(channels=16, sizes=((9, 7), (5, 4), (3, 2), (2, 1), (1, 1)), dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(2, channels, h, w, generator=g, dtype=dtype) for h, w in sizes]


def _opened(module: torch.nn.Module) -> torch.nn.Module:
    """Open the gates and give the zero-initialised parameters values (as training would);
    positive ones, so that DyHead's scale attention ``hard_sigmoid(relu(w . mean + b))`` is not
    cut off by its ReLU (GroupNorm leaves channel means near zero, so its bias decides)."""
    with torch.no_grad():
        module.gates.fill_(0.7)
        for p in module.parameters():
            if not p.any():
                p.uniform_(0.05, 0.15)
    return module


@pytest.mark.parametrize("name", NECKS)
def test_identity_at_init(name):
    feats = _feats()
    module = NECKS[name](16, len(feats), **OPTIONS[name])
    out = module(feats)
    assert all(o.shape == f.shape and torch.equal(o, f) for o, f in zip(out, feats))
    changed = _opened(module)(feats)
    assert all(o.shape == f.shape and not torch.allclose(o, f) for o, f in zip(changed, feats))


@pytest.mark.parametrize("name", NECKS)
def test_every_parameter_gets_a_gradient(name):
    feats = [f.requires_grad_() for f in _feats()]
    module = _opened(NECKS[name](16, len(feats), **OPTIONS[name]))
    sum(o.square().mean() for o in module(feats)).backward()
    assert all(f.grad.abs().sum() > 0 for f in feats)
    for pname, p in module.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, f"{pname} has an all-zero gradient"


def _gradcheck(module, feats):
    params = dict(module.named_parameters())
    n = len(feats)

    def fn(*args):
        return tuple(torch.func.functional_call(module, dict(zip(params, args[n:])), (list(args[:n]),)))

    return torch.autograd.gradcheck(fn, (*feats, *params.values()), fast_mode=True)


def test_gradcheck_deformable_encoder_float64():
    module = randomize_(DeformableEncoder(4, 2, heads=2, points=2)).double()
    feats = [f.requires_grad_() for f in _feats(4, ((3, 3), (2, 1)), torch.float64)]
    assert _gradcheck(module, feats)


def test_gradcheck_dyhead_block_float64():
    # random offsets: sampling points off the integer grid, where bilinear sampling is smooth
    module = randomize_(DyHeadBlock(2)).double()
    feats = [f[:1].requires_grad_() for f in _feats(2, ((3, 3), (2, 2), (1, 1)), torch.float64)]
    assert _gradcheck(module, feats)


@pytest.mark.parametrize("name", NECKS)
def test_graph_capture_without_breaks(name):
    torch._dynamo.reset()
    feats = _feats(16, ((6, 5), (3, 3), (2, 2)))
    module = _opened(NECKS[name](16, len(feats))).eval()
    compiled = torch.compile(module, backend="eager", fullgraph=True)
    for o, r in zip(compiled(feats), module(feats)):
        torch.testing.assert_close(o, r)


@pytest.mark.slow
@pytest.mark.parametrize("name", NECKS)
def test_compile_aot_eager_backward(name):
    """The backward graph too (grid_sample, torchvision's deform_conv2d) is captured whole."""
    torch._dynamo.reset()
    feats = [f.requires_grad_() for f in _feats(16, ((6, 5), (3, 3), (2, 2)))]
    module = _opened(NECKS[name](16, len(feats)))
    compiled = torch.compile(module, backend="aot_eager", fullgraph=True)
    grads = torch.autograd.grad(sum(o.square().sum() for o in compiled(feats)), feats)
    ref = torch.autograd.grad(sum(o.square().sum() for o in module(feats)), feats)
    for g, r in zip(grads, ref):
        torch.testing.assert_close(g, r)


@pytest.mark.parametrize("name", NECKS)
def test_bf16_autocast(name):
    feats = _feats(16, ((6, 5), (3, 3), (2, 2)))
    module = _opened(NECKS[name](16, len(feats))).eval()
    ref = module(feats)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = module(feats)
    for o, r in zip(out, ref):
        assert o.dtype == torch.float32 and torch.isfinite(o).all()
        assert (o - r).abs().mean() / r.abs().mean() < 0.05


@pytest.mark.parametrize("name", NECKS)
def test_bf16_model(name):
    """A whole-bf16 neck (``model.bfloat16()``, Lightning's ``bf16-true``) runs: torchvision's
    deform_conv2d has no bfloat16 CPU kernel, so DyHead convolves in float32 and returns bf16."""
    feats = _feats(16, ((6, 5), (3, 3), (2, 2)))
    module = _opened(NECKS[name](16, len(feats))).eval()
    ref = module(feats)
    out = module.bfloat16()([f.bfloat16() for f in feats])
    for o, r in zip(out, ref):
        assert o.dtype == torch.bfloat16 and torch.isfinite(o).all()
        assert (o.float() - r).abs().mean() / r.abs().mean() < 0.05


def test_dyhead_levels_not_halving():
    """A finer level that is not twice the next (odd crops, custom strides) is resized to fit."""
    feats = _feats(16, ((9, 7), (4, 4), (3, 1)))
    out = _opened(DynamicHead(16, 3))(feats)
    assert [o.shape for o in out] == [f.shape for f in feats]


def _batch(masks=False):
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 64, 64, generator=g), torch.rand(3, 56, 64, generator=g)]
    targets = [{"boxes": torch.tensor([[5.0, 5.0, 30.0, 40.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.tensor([[10.0, 8.0, 40.0, 30.0]]), "labels": torch.tensor([2])}]
    if masks:
        for img, t in zip(images, targets):
            m = torch.zeros(1, *img.shape[1:], dtype=torch.uint8)
            x0, y0, x1, y1 = t["boxes"][0].int().tolist()
            m[0, y0:y1, x0:x1] = 1
            t["masks"] = m
    return images, targets


def _train_step(arch, name):
    model = build_detector(arch, backbone="resnet10t", num_classes=3, fpn_channels=32, min_size=64,
                           max_size=64, neck_attention=name, neck_attention_kwargs={name: {"blocks": 1}})
    neck = model.backbone
    attn = neck.attention[0]
    assert isinstance(attn, NECKS[name])
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():  # the untrained neck returns the FPN's output exactly
        ref = neck.fpn(neck.body(x))
        assert all(torch.equal(a, b) for a, b in zip(neck(x).values(), ref.values()))
    images, targets = _batch(masks=arch == "maskrcnn")
    losses = model.train()(images, targets)
    assert all(torch.isfinite(v) for v in losses.values()), losses
    sum(losses.values()).backward()
    assert attn.gates.grad.abs().sum() > 0  # the gate learns from the first step
    for pname, p in attn.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname


@pytest.mark.parametrize("name", NECKS)
def test_fcos_train_step(name):
    _train_step("fcos", name)


@pytest.mark.slow
@pytest.mark.parametrize("arch", [a for a in ARCHS if a != "fcos"])
@pytest.mark.parametrize("name", NECKS)
def test_every_arch_train_step(arch, name):
    _train_step(arch, name)


def _det(**kw):
    return build_detector("fcos", backbone="resnet10t", num_classes=3, fpn_channels=32, **kw)


@pytest.mark.parametrize("kw,error,match", [
    ({"neck_attention": "deforamble"}, ValueError, r"unknown block 'deforamble' \(did you mean deformable"),
    ({"neck_attention": "dyhead", "neck_attention_kwargs": {"dyhead": {"block": 2}}}, TypeError,
     r"'dyhead' takes no option\(s\) block \(did you mean blocks\?\); it takes: blocks, reduction"),
    ({"neck_attention": "deformable", "neck_attention_kwargs": {"deformable": {"points": 0}}}, ValueError,
     r"points must be an int >= 1, got 0"),
    ({"neck_attention": "deformable", "neck_attention_kwargs": {"deformable": {"heads": 5}}}, ValueError,
     r"heads=5 must be >= 1 and divide channels=32"),
    ({"neck_attention": "dyhead", "neck_attention_kwargs": {"dyhead": {"blocks": 1.5}}}, TypeError,
     r"dyhead blocks must be an int"),
    ({"neck_attention": "dyhead", "neck_attention_kwargs": {"deformable": {"blocks": 2}}}, ValueError,
     r"options for 'deformable', which is not in neck_attention \['dyhead'\]"),
    ({"neck_attention": "dyhead", "neck_attention_kwargs": {"blocks": 2}}, TypeError,
     r"neck_attention_kwargs must map a neck_attention name to a dict"),
    ({"neck_attention": ["eca", "scale"], "neck_attention_kwargs": {"scale": {"x": 1}}}, TypeError,
     r"'scale' takes no option\(s\) x; it takes: none"),
    ({"neck_attention": "eca", "neck_attention_kwargs": {"eca": {"kernel_size": 4}}}, ValueError,
     r"odd kernel_size"),
])
def test_option_errors_name_the_problem(kw, error, match):
    with pytest.raises(error, match=match):
        _det(**kw)


def test_options_reach_the_modules():
    model = _det(neck_attention=["deformable", "dyhead", "eca"],
                 neck_attention_kwargs={"deformable": {"points": 3, "blocks": 2}, "dyhead": {"blocks": 3},
                                        "eca": {"kernel_size": 5}})
    deform, dyhead, eca = model.backbone.attention
    assert len(deform.layers) == 2 and deform.layers[0].attn.points == 3 and deform.layers[0].attn.levels == 5
    assert len(dyhead.blocks) == 3
    assert all(b.block.conv.kernel_size == (5,) for b in eca)


# --------------------------------------------------------------------------------------------------
# Batch padding: Deformable DETR's valid ratios and padding mask


def test_deformable_encoder_output_does_not_depend_on_batch_padding():
    """An image's levels padded (with anything) to a larger batch, with its valid fractions, give
    the same output on its own positions as the levels alone: positions and references are
    fractions of the valid region, padded values are zero as off the map."""
    torch.manual_seed(0)
    enc = _opened(randomize_(DeformableEncoder(16, 3, heads=2, points=2, blocks=2), scale=0.3)).double()
    own = [(8, 12), (4, 6), (2, 3)]
    alone = [torch.randn(1, 16, h, w, dtype=torch.float64) for h, w in own]
    padded = [torch.randn(2, 16, 16 >> lvl, 16 >> lvl, dtype=torch.float64) * 9 for lvl in range(3)]
    for a, p in zip(alone, padded, strict=True):
        p[:1, :, :a.shape[2], :a.shape[3]] = a
    valid = torch.tensor([[12 / 16, 8 / 16], [1.0, 1.0]])  # (width, height); the second image fills it
    want = enc(alone)
    got = enc(padded, valid)
    for g, a, w in zip(got, alone, want, strict=True):
        torch.testing.assert_close(g[:1, :, :a.shape[2], :a.shape[3]], w)
    full = [p[1:] for p in padded]  # a batch-mate that fills the batch is unchanged by the padding rule
    for g, f in zip(got, enc(full), strict=True):
        torch.testing.assert_close(g[1:], f)
    for g, w in zip(enc(alone, torch.ones(1, 2)), want, strict=True):
        torch.testing.assert_close(g, w)
    for bad in (torch.ones(2, 2), torch.zeros(1, 2), torch.full((1, 2), 1.5), [[1.0, 1.0]]):
        with pytest.raises(ValueError, match=r"valid must be \(1, 2\) fractions in \(0, 1\]"):
            enc(alone, bad)


def test_detector_passes_each_image_s_valid_region_to_the_encoder():
    model = _det(neck_attention="deformable", min_size=64, max_size=128).eval()
    seen = []
    encoder = model.backbone.attention[0]
    encoder.register_forward_pre_hook(lambda m, args: seen.append(args[1]))
    with torch.no_grad():
        model([torch.rand(3, 64, 64), torch.rand(3, 64, 128)])  # padded to 64 x 128
        model.backbone(torch.rand(1, 3, 64, 64))  # the neck on its own: no padding known
    torch.testing.assert_close(seen[0], torch.tensor([[0.5, 1.0], [1.0, 1.0]], dtype=torch.float64))
    assert seen[1] is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_valid_fractions_that_round_keep_their_exact_counts(dtype):
    """0.3 of 40 positions is 12 although 0.3 rounds up in float32: no 13th column."""
    shapes = [(10, 40), (5, 20), (3, 10)]
    ratios = DeformableEncoder._ratios(shapes, torch.tensor([[0.3, 0.7]], dtype=dtype))
    counts = ratios[0] * torch.tensor([[w, h] for h, w in shapes])
    torch.testing.assert_close(counts, torch.tensor([[12.0, 7.0], [6.0, 4.0], [3.0, 3.0]]))


def test_noted_image_sizes_are_per_thread_and_taken_once():
    neck = _det(neck_attention="deformable").backbone
    x = torch.zeros(2, 3, 64, 96)
    noted = (SimpleNamespace(tensors=x, image_sizes=[(64, 96), (32, 48)]), None)
    other = threading.Thread(target=neck.note_images, args=(None, (), noted))
    other.start()
    other.join()
    assert neck._take_valid(x) is None  # another thread's batch
    neck.note_images(None, (), noted)
    assert neck._take_valid(torch.zeros(2, 3, 64, 64)) is None  # not this batch's shape; dropped
    neck.note_images(None, (), noted)
    torch.testing.assert_close(neck._take_valid(x), torch.tensor([[1.0, 1.0], [0.5, 0.5]], dtype=torch.float64))
    assert neck._take_valid(x) is None  # taken once
