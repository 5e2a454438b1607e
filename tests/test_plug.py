"""plug(): structure recognition, identity at insertion for every block, positions, errors."""
from functools import partial

import pytest
import timm
import torch
import torchvision
from torch import nn

import visattn
from visattn.plug import Blend, find_residual_blocks


def _timm(name="resnet10t"):
    return timm.create_model(name, pretrained=False, num_classes=10).eval()


def _tv(name="resnet18"):
    return torchvision.models.get_model(name, weights=None, num_classes=10).eval()


def _randomize_bn(model):
    # non-trivial statistics, so an identity that only holds for fresh BN would show
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5, generator=g)
            m.bias.data.uniform_(-0.2, 0.2, generator=g)
            m.running_mean.uniform_(-0.2, 0.2, generator=g)
            m.running_var.uniform_(0.5, 1.5, generator=g)
    return model


def _max_change(model, block, x, **kw):
    with torch.no_grad():
        before = model(x)
        names = visattn.plug(model, block, **kw)
        after = model(x)
    return names, (after - before).abs().max().item()


@pytest.mark.parametrize("block", visattn.list_blocks())
@pytest.mark.parametrize("make", [_timm, _tv], ids=["timm-resnet10t", "tv-resnet18"])
def test_identity_at_insertion_every_block(block, make):
    model = _randomize_bn(make())
    x = torch.randn(2, 3, 48, 40)
    names, change = _max_change(model, block, x)
    assert len(names) == (8 if make is _tv else 4)  # resnet18: 2 blocks per stage, resnet10t: 1
    assert change < 1e-4


@pytest.mark.parametrize("name,expected", [
    ("resnet26d", 8), ("resnext26ts", 8), ("seresnet18", 8), ("resnetv2_50", 16), ("regnety_002", 13),
    ("res2net50_14w_8s", 16), ("skresnet18", 8), ("ecaresnet26t", 8), ("dla34", 12),
    ("efficientnet_b0", 9), ("cspresnet50", 13),
])
def test_recognises_residual_structure_beyond_resnet(name, expected):
    model = _randomize_bn(_timm(name))
    names, change = _max_change(model, "cbam", torch.randn(1, 3, 64, 64))
    assert len(names) == expected
    assert change < 1e-4


@pytest.mark.parametrize("name", ["resnet50", "resnext50_32x4d", "wide_resnet50_2"])
def test_torchvision_bottlenecks(name):
    model = _randomize_bn(_tv(name))
    names, change = _max_change(model, "eca", torch.randn(1, 3, 64, 64))
    assert names[0] == "layer1.0.bn3.attn" and len(names) == 16
    assert change < 1e-4


def test_after_block_sits_before_the_add():
    model = _tv()
    visattn.plug(model, "se", stages=[2])
    block = model.layer2[0]
    seen = []
    block.bn2.attn.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    block.downsample.register_forward_hook(lambda m, i, o: seen.append(("shortcut", o.shape)))
    model(torch.randn(1, 3, 64, 64))
    assert seen[0] == torch.Size([1, 128, 8, 8])  # the branch, before the add and the final ReLU


def test_stages_and_after_stage():
    model = _randomize_bn(_timm())
    x = torch.randn(1, 3, 64, 64)
    names, change = _max_change(model, "cbam", x, stages=[2, 4], position="after_stage")
    assert names == ["layer2.attn", "layer4.attn"] and change < 1e-4
    assert model.layer2.attn.block.channels == 128 and model.layer4.attn.block.channels == 512
    model = _tv()
    names = visattn.plug(model, "eca", stages=3)
    assert names == ["layer3.0.bn2.attn", "layer3.1.bn2.attn"]


def test_block_kwargs_and_callable_factory():
    model = _tv()
    names = visattn.plug(model, "se", stages=[1], rd_ratio=0.5)
    assert model.get_submodule(names[0]).block.fc1.out_channels == 32
    model = _tv()
    names = visattn.plug(model, partial(visattn.create_block, "eca"), stages=[4])
    assert isinstance(model.get_submodule(names[0]), Blend)


def test_gradients_reach_inserted_blocks():
    model = _tv().train()
    names = visattn.plug(model, "cbam", stages=[4])
    x = torch.randn(2, 3, 64, 64)
    model(x).square().mean().backward()
    blend = model.get_submodule(names[0])
    assert blend.gate.grad is not None and blend.gate.grad.abs() > 0
    # once the gate leaves zero (after the first optimiser step), the block's own weights learn
    with torch.no_grad():
        for n in names:
            model.get_submodule(n).gate.fill_(0.1)
    model.zero_grad()
    model(x).square().mean().backward()
    grads = [p.grad for p in blend.block.parameters()]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_state_dict_from_before_plug_loads():
    src = _randomize_bn(_tv())
    model = _tv()
    visattn.plug(model, "se")
    missing, unexpected = model.load_state_dict(src.state_dict(), strict=False)
    assert not unexpected and all(".attn." in k for k in missing)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(model(x), src(x), atol=1e-5)


def test_plug_into_a_whole_detector_and_features_only_model():
    det = torchvision.models.detection.fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None)
    names = visattn.plug(det, "eca", stages=[1])
    assert names[0].startswith("backbone.body.layer1.0.")
    feats = timm.create_model("resnet10t", features_only=True, pretrained=False)
    assert len(visattn.plug(feats, "se")) == 4


def test_timm_attn_layer_one_liner():
    # timm 1.0 calls attn_layer(channels, device=..., dtype=...)
    model = timm.create_model("resnet18", pretrained=False,
                              block_args=dict(attn_layer=partial(visattn.create_block, "cbam")))
    assert type(model.layer1[0].se).__name__ == "CBAM"
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 1000)


@pytest.mark.parametrize("model", [torchvision.models.vgg11(), timm.create_model("densenet121"), nn.Linear(3, 3)],
                         ids=["vgg", "densenet", "linear"])
def test_no_residual_blocks_is_a_clear_error(model):
    with pytest.raises(ValueError, match="found no residual block.*adds a branch of convolutions"):
        visattn.plug(model, "se")


def test_errors():
    with pytest.raises(ValueError, match="stages \\[5\\] out of range.*4 stages"):
        visattn.plug(_tv(), "se", stages=[5])
    with pytest.raises(ValueError, match="position must be"):
        visattn.plug(_tv(), "se", position="before")
    with pytest.raises(ValueError, match="unknown block"):
        visattn.plug(_tv(), "nope")
    with pytest.raises(TypeError, match="unexpected keyword"):
        visattn.plug(_tv(), "se", bogus=1)


def test_find_residual_blocks_reports_channels():
    found = find_residual_blocks(_tv("resnet50"))
    per_stage = {stage: ch for _, _, stage, ch in found}
    assert per_stage == {"layer1": 256, "layer2": 512, "layer3": 1024, "layer4": 2048}
    assert len(found) == 16


# -- gate="none": the block as its paper applies it (issue 25) -------------------------------------


def test_gate_none_applies_the_block_as_the_paper_does():
    torch.manual_seed(0)
    m = torchvision.models.resnet18(num_classes=10).eval()
    names = visattn.plug(m, "se", stages=[4], gate="none")
    blend = m.get_submodule(names[0])
    assert isinstance(blend, Blend) and blend.gate is None and "gate" not in dict(blend.named_parameters())
    x = torch.randn(2, 512, 3, 5)
    assert torch.equal(blend(x), blend.block(x))  # no blend: block(y) itself
    # the whole model differs from the unplugged one (SE rescales the branch from the start)
    ref = torchvision.models.resnet18(num_classes=10).eval()
    ref.load_state_dict(m.state_dict(), strict=False)
    img = torch.randn(1, 3, 64, 64)
    assert not torch.allclose(m(img), ref(img))
    # the block's parameters keep their names whatever the gate
    keys_none = {k for k in m.state_dict() if ".attn." in k}
    m2 = torchvision.models.resnet18(num_classes=10)
    visattn.plug(m2, "se", stages=[4], gate="zero")
    keys_zero = {k for k in m2.state_dict() if ".attn." in k}
    assert keys_zero - keys_none == {n + ".gate" for n in names} and keys_none <= keys_zero


def test_gate_values_reports_learned_gates():
    from visattn.plug import gate_values

    m = torchvision.models.resnet18()
    names = visattn.plug(m, "eca", stages=[3, 4])
    gates = gate_values(m)
    assert list(gates) == sorted(names) and set(gates.values()) == {0.0}
    m.get_submodule(names[0]).gate.data.fill_(-0.5)
    assert gate_values(m)[names[0]] == -0.5
    m3 = torchvision.models.resnet18()
    visattn.plug(m3, "eca", gate="none")
    assert gate_values(m3) == {}
    with pytest.raises(TypeError, match="gate_values: model must be a torch.nn.Module"):
        gate_values("resnet18")


@pytest.mark.parametrize("gate", ["Zero", "", None, 0, "identity"])
def test_bad_gate_is_named(gate):
    m = torchvision.models.resnet18()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(ValueError, match="plug: gate must be one of 'zero', 'none'"):
        visattn.plug(m, "se", gate=gate)
    assert m.state_dict().keys() == before.keys()  # left untouched


def test_build_detector_attention_gate():
    from visattn.models import build_detector, build_segmenter

    det = build_detector("fcos", backbone="resnet10t", num_classes=3, attention="se", attention_gate="none",
                         fpn_channels=32, min_size=64, max_size=64)
    blends = [m for m in det.backbone.modules() if isinstance(m, Blend)]
    assert blends and all(b.gate is None for b in blends)
    det = build_detector("fcos", backbone="resnet10t", num_classes=3, attention="se", fpn_channels=32,
                         min_size=64, max_size=64)
    assert all(b.gate is not None for b in det.backbone.modules() if isinstance(b, Blend))
    seg = build_segmenter("fcn", backbone="resnet10t", num_classes=3, attention="eca", attention_gate="none")
    assert all(b.gate is None for b in seg.modules() if isinstance(b, Blend))
    with pytest.raises(ValueError, match="attention_gate"):
        build_detector("fcos", backbone="resnet10t", num_classes=3, attention="se", attention_gate="half")
    with pytest.raises(ValueError, match="attention_gate='none' given without attention"):
        build_detector("fcos", backbone="resnet10t", num_classes=3, attention_gate="none")


# -- review fixes -----------------------------------------------------------------------------------


@pytest.mark.parametrize("gate", ["zero", "none"])
def test_plugged_blocks_take_the_models_mode(gate):
    # a block plugged into a model in eval mode is in eval mode too: its batch norms use (and do not
    # update) their running statistics, so inference does not depend on the batch
    model = _tv().eval()
    names = visattn.plug(model, "coord", stages=[4], gate=gate)
    attn = model.get_submodule(names[0])
    assert not any(m.training for m in attn.modules())
    stats = [m.running_mean.clone() for m in attn.modules() if isinstance(m, nn.BatchNorm2d)]
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        both = model(x)
        one = model(x[:1])
    assert stats and all(torch.equal(a, m.running_mean) for a, m in
                         zip(stats, (m for m in attn.modules() if isinstance(m, nn.BatchNorm2d)), strict=True))
    torch.testing.assert_close(both[:1], one)
    # in training mode they train
    train = _tv().train()
    names = visattn.plug(train, "coord", stages=[4], gate=gate)
    assert all(m.training for m in train.get_submodule(names[0]).modules())
    # replace=True keeps the mode too
    model.eval()
    names = visattn.plug(model, "cbam", stages=[4], gate=gate, replace=True)
    assert not any(m.training for m in model.get_submodule(names[0]).modules())
    # a norm kept in eval mode while the model trains (frozen statistics) does not freeze the block
    frozen = _tv().train()
    frozen.layer4[0].bn2.eval()
    names = visattn.plug(frozen, "coord", stages=[4], gate="none")
    assert all(m.training for m in frozen.get_submodule(names[0]).modules())


def test_blend_checks_its_block():
    with pytest.raises(TypeError, match="Blend: block must be a torch.nn.Module"):
        Blend("se")
    with pytest.raises(ValueError, match="gate"):
        Blend(nn.Identity(), gate="one")
