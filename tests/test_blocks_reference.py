"""Each block against a reference: timm's implementation with the weights copied across where timm
has the block, otherwise the paper's equations written out plainly here (eval-mode BatchNorm as its
affine formula, full softmax matrices materialised, the full tensor rotated where the paper
rotates it)."""
import math

import pytest
import torch
import torch.nn.functional as F

import visattn
from visattn.timm_compat import TIMM_COUNTERPARTS, load_timm_weights, timm_counterpart

from .conftest import randomize_


def bn(x, m):
    """Eval-mode BatchNorm, spelled out."""
    shape = (1, -1) + (1,) * (x.ndim - 2)
    return (x - m.running_mean.view(shape)) / torch.sqrt(m.running_var.view(shape) + m.eps) \
        * m.weight.view(shape) + m.bias.view(shape)


def conv(x, m):
    return F.conv2d(x, m.weight, m.bias, m.stride, m.padding, m.dilation, m.groups)


# ---------------------------------------------------------------- timm parity

@pytest.mark.parametrize("name", TIMM_COUNTERPARTS)
@pytest.mark.parametrize("train", [True, False])
def test_matches_timm(name, train):
    ref = randomize_(timm_counterpart(name, 32)).train(train)
    ours = visattn.create_block(name, 32).train(train)
    load_timm_weights(ours, ref, name)
    x = torch.randn(3, 32, 9, 11)
    xr = x.clone().requires_grad_()
    xo = x.clone().requires_grad_()
    y_ref, y = ref(xr), ours(xo)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y)
    y_ref.backward(g)
    y.backward(g)
    torch.testing.assert_close(xo.grad, xr.grad, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(x), ref.eval()(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fusion,kw", [("scale", dict(fuse_add=False, fuse_scale=True)),
                                       ("both", dict(fuse_add=True, fuse_scale=True)),
                                       ("add", dict(fuse_add=True, fuse_scale=False))])
def test_gc_fusions_match_timm(fusion, kw):
    from timm.layers.global_context import GlobalContext

    ref = randomize_(GlobalContext(32, **kw))
    ours = visattn.create_block("gc", 32, fusion=fusion)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(2, 32, 6, 7)
    torch.testing.assert_close(ours(x), ref(x))


def test_eca_circular_matches_timm_ceca():
    from timm.layers.eca import CecaModule

    ref = randomize_(CecaModule(64))
    ours = visattn.create_block("eca", 64, circular=True)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(2, 64, 5, 4)
    torch.testing.assert_close(ours(x), ref(x))


def test_eca_adaptive_kernel_size():
    # paper, eq. 12 with gamma=2, b=1: C=64 -> k=3 (t=3), C=256 -> 5 (t=4 -> 5), C=2048 -> 7 (t=6 -> 7)
    sizes = {c: visattn.create_block("eca", c).conv.kernel_size[0] for c in (64, 256, 2048)}
    assert sizes == {64: 3, 256: 5, 2048: 7}


# ---------------------------------------------------------------- paper equations

def test_simam_equations():
    block = visattn.create_block("simam", 8, e_lambda=1e-3)
    x = torch.randn(2, 8, 5, 7)
    n = 5 * 7 - 1
    mu = x.mean((2, 3), keepdim=True)
    var = ((x - mu) ** 2).sum((2, 3), keepdim=True) / n
    e_inv = (x - mu) ** 2 / (4 * (var + 1e-3)) + 0.5
    torch.testing.assert_close(block(x), x * torch.sigmoid(e_inv))
    with torch.no_grad():
        torch.testing.assert_close(block(x), x * torch.sigmoid(e_inv))


def test_simam_one_pixel_is_finite():
    y = visattn.create_block("simam", 4)(torch.randn(1, 4, 1, 1))
    assert torch.isfinite(y).all()


def test_coord_equations():
    block = randomize_(visattn.create_block("coord", 32)).eval()
    x = torch.randn(2, 32, 6, 9)
    h = 6
    z_h = x.mean(3, keepdim=True)  # (N, C, H, 1): eq. 2
    z_w = x.mean(2, keepdim=True).permute(0, 1, 3, 2)  # (N, C, W, 1): eq. 3
    f = conv(torch.cat([z_h, z_w], 2), block.conv1)
    f = bn(f, block.bn1)
    f = f * F.relu6(f + 3) / 6  # h-swish
    g_h = torch.sigmoid(conv(f[:, :, :h], block.conv_h))
    g_w = torch.sigmoid(conv(f[:, :, h:].permute(0, 1, 3, 2), block.conv_w))
    torch.testing.assert_close(block(x), x * g_h * g_w)
    assert block.conv1.out_channels == 8  # max(8, 32 // 32)


def test_triplet_rotates_like_the_paper():
    block = randomize_(visattn.create_block("triplet", 16)).eval()
    x = torch.randn(2, 16, 6, 9)

    def gate(t, m):  # t: (N, A, B, D) rotated so that dim 1 is pooled away
        z = torch.cat([t.max(1, keepdim=True)[0], t.mean(1, keepdim=True)], 1)
        return t * torch.sigmoid(bn(conv(z, m.conv), m.bn))

    out_cw = gate(x.permute(0, 2, 1, 3), block.cw).permute(0, 2, 1, 3)
    out_hc = gate(x.permute(0, 3, 2, 1), block.hc).permute(0, 3, 2, 1)
    out_hw = gate(x, block.hw)
    torch.testing.assert_close(block(x), (out_cw + out_hc + out_hw) / 3)
    no_sp = visattn.create_block("triplet", 16, no_spatial=True).eval()
    no_sp.load_state_dict({k: v for k, v in block.state_dict().items() if not k.startswith("hw.")})
    torch.testing.assert_close(no_sp(x), (out_cw + out_hc) / 2)


def test_bam_equations():
    block = randomize_(visattn.create_block("bam", 32), scale=0.3).eval()
    x = torch.randn(2, 32, 9, 10)
    c0, b0, _, c1, b1 = block.channel_gate
    mc = bn(conv(F.relu(bn(conv(x.mean((2, 3), keepdim=True), c0), b0)), c1), b1)
    s = list(block.spatial_gate)
    f = F.relu(bn(conv(x, s[0]), s[1]))
    f = F.relu(bn(conv(f, s[3]), s[4]))
    f = F.relu(bn(conv(f, s[6]), s[7]))
    ms = bn(conv(f, s[9]), s[10])
    assert s[3].dilation == (4, 4) and block.channel_gate[0].out_channels == 2
    torch.testing.assert_close(block(x), x + x * torch.sigmoid(mc + ms))


@pytest.mark.parametrize("mode", ["add", "max"])
def test_scse_equations(mode):
    block = randomize_(visattn.create_block("scse", 16, mode=mode))
    x = torch.randn(2, 16, 5, 6)
    cse = x * torch.sigmoid(conv(F.relu(conv(x.mean((2, 3), keepdim=True), block.fc1)), block.fc2))
    sse = x * torch.sigmoid(conv(x, block.spatial))
    expected = cse + sse if mode == "add" else torch.maximum(cse, sse)
    torch.testing.assert_close(block(x), expected)


def test_danet_equations():
    block = randomize_(visattn.create_block("danet", 16), scale=0.3)
    x = torch.randn(2, 16, 5, 6)
    n, c, hw = 2, 16, 30
    q = conv(x, block.query).view(n, -1, hw).permute(0, 2, 1)  # (N, HW, C/8)
    k = conv(x, block.key).view(n, -1, hw)  # (N, C/8, HW)
    v = conv(x, block.value).view(n, c, hw)  # (N, C, HW)
    s = torch.softmax(torch.bmm(q, k), -1)  # (N, HW, HW), eq. 1
    pam = torch.bmm(v, s.permute(0, 2, 1)).view_as(x)  # eq. 2 without the residual
    flat = x.view(n, c, hw)
    energy = torch.bmm(flat, flat.permute(0, 2, 1))  # (N, C, C)
    a = torch.softmax(energy.max(-1, keepdim=True)[0] - energy, -1)  # the authors' max - E form
    cam = torch.bmm(a, flat).view_as(x)
    expected = x + block.gamma_pos * pam + block.gamma_chan * cam
    torch.testing.assert_close(block(x), expected, rtol=1e-4, atol=1e-5)


def test_danet_is_identity_at_init():
    x = torch.randn(2, 16, 5, 6)
    torch.testing.assert_close(visattn.create_block("danet", 16)(x), x)


def test_danet_large_map_does_not_materialise_hw_squared():
    """64x64 = 4096 positions: a materialised (N, HW, HW) fp32 matrix would be 64 MiB per sample."""
    block = visattn.create_block("danet", 32).eval()
    with torch.no_grad():
        y = block(torch.randn(1, 32, 64, 64))
    assert y.shape == (1, 32, 64, 64)


def test_gc_equations():
    block = randomize_(visattn.create_block("gc", 32))
    x = torch.randn(2, 32, 5, 6)
    w = torch.softmax(conv(x, block.conv_attn).flatten(1), 1)  # (N, HW)
    ctx = (x.flatten(2) * w[:, None]).sum(2)[..., None, None]  # (N, C, 1, 1)
    m = block.mlp_add
    t = conv(ctx, m.fc1)
    t = F.layer_norm(t.flatten(1), t.shape[1:2], m.norm.weight, m.norm.bias, m.norm.eps)[..., None, None]
    t = conv(F.relu(t), m.fc2)
    torch.testing.assert_close(block(x), x + t)


def test_se_equations():
    block = randomize_(visattn.create_block("se", 32))
    x = torch.randn(2, 32, 4, 5)
    z = x.mean((2, 3))
    s = torch.sigmoid(F.linear(F.relu(F.linear(z, block.fc1.weight.flatten(1), block.fc1.bias)),
                               block.fc2.weight.flatten(1), block.fc2.bias))
    torch.testing.assert_close(block(x), x * s[..., None, None])
    assert block.fc1.out_channels == 8  # make_divisible(32 / 16, 8)


def test_sk_equations():
    block = randomize_(visattn.create_block("sk", 32), scale=0.3).eval()
    x = torch.randn(2, 32, 7, 6)
    xa, xb = x.chunk(2, 1)
    u = [F.relu(bn(conv(xi, p.conv), p.bn)) for xi, p in zip((xa, xb), block.paths)]
    assert block.paths[1].conv.dilation == (2, 2)  # the 5x5 branch as a dilated 3x3
    s = (u[0] + u[1]).mean((2, 3), keepdim=True)
    a = block.attn
    z = F.relu(bn(conv(s, a.fc_reduce), a.bn))
    logits = conv(z, a.fc_select).view(2, 2, 32, 1, 1)
    w = torch.softmax(logits, 1)
    torch.testing.assert_close(block(x), w[:, 0] * u[0] + w[:, 1] * u[1])


def test_cbam_equations():
    block = randomize_(visattn.create_block("cbam", 32)).eval()
    x = torch.randn(2, 32, 6, 5)

    def mlp(v):
        return conv(F.relu(conv(v, block.channel.fc1)), block.channel.fc2)

    mc = torch.sigmoid(mlp(x.mean((2, 3), keepdim=True)) + mlp(x.amax((2, 3), keepdim=True)))
    x1 = x * mc
    pooled = torch.cat([x1.amax(1, keepdim=True), x1.mean(1, keepdim=True)], 1)  # authors: [max, mean]
    ms = torch.sigmoid(bn(conv(pooled, block.spatial.conv), block.spatial.bn))
    torch.testing.assert_close(block(x), x1 * ms)
    assert math.isclose(block.spatial.conv.kernel_size[0], 7)


def test_cbam_loads_the_authors_layout_unchanged():
    """The authors' CBAM (github.com/Jongchan/attention-module): ChannelGate's MLP of two Linear
    layers with biases, SpatialGate's ChannelPool ``cat(max_c, mean_c)`` into a 7x7 conv without
    bias and a BatchNorm of momentum 0.01. Their weights load as they are (no channel swap) and give
    their equations' output; a training step moves the running mean by 1% of the batch mean."""
    c, r = 32, 16
    g = torch.Generator().manual_seed(1)
    w1, b1 = torch.randn(c // r, c, generator=g) * 0.3, torch.randn(c // r, generator=g) * 0.1
    w2, b2 = torch.randn(c, c // r, generator=g) * 0.3, torch.randn(c, generator=g) * 0.1
    w_sp = torch.randn(1, 2, 7, 7, generator=g) * 0.2  # input channel 0: max, 1: mean
    gamma, beta = torch.tensor([1.3]), torch.tensor([-0.2])
    mean, var = torch.tensor([0.1]), torch.tensor([0.8])

    block = visattn.create_block("cbam", c, mlp_bias=True).eval()
    block.load_state_dict({
        "channel.fc1.weight": w1[..., None, None], "channel.fc1.bias": b1,
        "channel.fc2.weight": w2[..., None, None], "channel.fc2.bias": b2,
        "spatial.conv.weight": w_sp, "spatial.bn.weight": gamma, "spatial.bn.bias": beta,
        "spatial.bn.running_mean": mean, "spatial.bn.running_var": var,
        "spatial.bn.num_batches_tracked": torch.tensor(0),
    })
    x = torch.randn(2, c, 6, 5, generator=g)

    def mlp(v):  # (N, C)
        return F.relu(v @ w1.T + b1) @ w2.T + b2

    x1 = x * torch.sigmoid(mlp(x.mean((2, 3))) + mlp(x.amax((2, 3))))[..., None, None]
    z = F.conv2d(torch.cat([x1.amax(1, keepdim=True), x1.mean(1, keepdim=True)], 1), w_sp, padding=3)
    y = x1 * torch.sigmoid((z - mean) / torch.sqrt(var + 1e-5) * gamma + beta)
    torch.testing.assert_close(block(x), y, rtol=1e-5, atol=1e-6)

    block.train()(x)
    torch.testing.assert_close(block.spatial.bn.running_mean, 0.99 * mean + 0.01 * z.mean().reshape(1))
