"""Self- and cross-attention blocks against plain references: the full softmax matrix written out."""
import math

import pytest
import torch
import torch.nn.functional as F

import visattn
from visattn.layers._attention import sincos_2d

from .conftest import randomize_


def full_attention(q, k, v, scale, bias=None):
    s = q @ k.transpose(-2, -1) * scale
    if bias is not None:
        s = s + bias
    return s.softmax(-1) @ v


@pytest.mark.parametrize("name", ["mhsa", "nonlocal", "window", "axial", "sra", "cross"])
def test_fused_path_equals_reference_path(name):
    kwargs = {"window": {"window_size": 4, "shift": True}}.get(name, {})
    block = randomize_(visattn.create_block(name, 32, **kwargs), scale=0.2)
    x = torch.randn(2, 32, 9, 7)
    y = block(x)
    block.reference = True
    torch.testing.assert_close(y, block(x), rtol=1e-4, atol=1e-5)


def test_mhsa_equals_plain_softmax():
    block = randomize_(visattn.create_block("mhsa", 32, heads=4), scale=0.2)
    x = torch.randn(2, 32, 5, 6)
    n, c, hw, d = 2, 32, 30, 8
    pos = sincos_2d(5, 6, 32)  # (HW, C)
    tokens = x.flatten(2).transpose(1, 2)  # (N, HW, C)
    wq, wk, wv = block.qkv.weight.flatten(1).chunk(3)
    bq, bk, bv = block.qkv.bias.chunk(3)
    q = (tokens + pos) @ wq.t() + bq
    k = (tokens + pos) @ wk.t() + bk
    v = tokens @ wv.t() + bv
    heads = [full_attention(q[..., i * d:(i + 1) * d], k[..., i * d:(i + 1) * d], v[..., i * d:(i + 1) * d],
                            1 / math.sqrt(d)) for i in range(4)]
    y = torch.cat(heads, -1) @ block.proj.weight.flatten(1).t() + block.proj.bias
    torch.testing.assert_close(block(x), x + y.transpose(1, 2).reshape(n, c, 5, 6), rtol=1e-4, atol=1e-5)


def test_mhsa_positions_matter():
    block = randomize_(visattn.create_block("mhsa", 16), scale=0.3)
    plain = visattn.create_block("mhsa", 16, pos_embed="none")
    plain.load_state_dict(block.state_dict())
    x = torch.randn(1, 16, 4, 4)
    assert not torch.allclose(block(x), plain(x))


def _window_global_reference(block, x):
    """Global attention over the whole map with the window block's weights and relative bias."""
    n, c, h, w = x.shape
    ws, heads = block.window_size, block.heads
    tokens = x.flatten(2).transpose(1, 2)
    q, k, v = block.qkv(tokens).chunk(3, -1)
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    idx = (ys[:, None] - ys[None] + ws - 1) * (2 * ws - 1) + (xs[:, None] - xs[None] + ws - 1)
    bias = block.rel_bias[idx].permute(2, 0, 1)  # (heads, HW, HW)
    d = c // heads
    out = torch.cat([full_attention(q[..., i * d:(i + 1) * d], k[..., i * d:(i + 1) * d],
                                    v[..., i * d:(i + 1) * d], d ** -0.5, bias[i]) for i in range(heads)], -1)
    return x + block.proj(out).transpose(1, 2).reshape(n, c, h, w)


@pytest.mark.parametrize("hw", [(8, 8), (5, 7)])  # exactly one window, and one padded window
def test_window_covering_map_equals_global_attention(hw):
    block = randomize_(visattn.create_block("window", 32, window_size=8, heads=2), scale=0.2)
    x = torch.randn(2, 32, *hw)
    torch.testing.assert_close(block(x), _window_global_reference(block, x), rtol=1e-4, atol=1e-5)


def _influence(block, x, src):
    """Which output positions change when input position ``src`` changes."""
    x2 = x.clone()
    x2[:, :, src[0], src[1]] += 5.0
    return ((block(x2) - block(x)).abs().sum((0, 1)) > 1e-6)


def test_window_attention_is_local_and_shift_moves_windows():
    x = torch.randn(1, 16, 8, 8)
    plain = randomize_(visattn.create_block("window", 16, window_size=4), scale=0.3)
    hit = _influence(plain, x, (3, 3))
    expected = torch.zeros(8, 8, dtype=torch.bool)
    expected[:4, :4] = True
    assert torch.equal(hit, expected)
    shifted = visattn.create_block("window", 16, window_size=4, shift=True)
    shifted.load_state_dict(plain.state_dict())
    hit = _influence(shifted, x, (3, 3))
    expected = torch.zeros(8, 8, dtype=torch.bool)
    expected[2:6, 2:6] = True  # rolled by 2: (3, 3) now shares a window with (2..5, 2..5)
    assert torch.equal(hit, expected)
    # the wrapped-around corner window keeps its regions apart: (0, 0) and (7, 7) do not mix
    assert not _influence(shifted, x, (0, 0))[7, 7]


def test_window_padding_is_not_attended():
    block = randomize_(visattn.create_block("window", 16, window_size=4), scale=0.3)
    x = torch.randn(1, 16, 6, 6)  # padded to 8x8; the padded zeros must not be keys
    y = block(x)
    block.reference = True
    torch.testing.assert_close(y, block(x), rtol=1e-4, atol=1e-5)
    # equal to attention restricted to each (cropped) window
    ref = torch.empty_like(x)
    for y0, x0 in [(0, 0), (0, 4), (4, 0), (4, 4)]:
        tile = x[:, :, y0:y0 + 4, x0:x0 + 4]
        ref[:, :, y0:y0 + 4, x0:x0 + 4] = _window_global_reference(block, tile)
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-5)


def test_linear_attention_explicit_formula():
    block = randomize_(visattn.create_block("linear", 16, heads=2), scale=0.3)
    x = torch.randn(2, 16, 5, 6)
    n, hw = 2, 30
    q = F.conv2d(x, block.query.weight, block.query.bias).view(n, 16, hw)
    k = F.conv2d(x, block.key.weight, block.key.bias).view(n, 16, hw)
    v = F.conv2d(x, block.value.weight, block.value.bias).view(n, 16, hw)
    outs = []
    for i in range(2):
        s = slice(8 * i, 8 * (i + 1))
        rq = torch.exp(q[:, s]) / torch.exp(q[:, s]).sum(1, keepdim=True)  # softmax over channels
        rk = torch.exp(k[:, s]) / torch.exp(k[:, s]).sum(2, keepdim=True)  # softmax over positions
        outs.append(torch.einsum("ndp,nep,ndq->neq", rk, v[:, s], rq))  # (rk v^T)^T rq
    y = torch.cat(outs, 1).view(n, 16, 5, 6)
    expected = x + F.conv2d(y, block.proj.weight, block.proj.bias)
    torch.testing.assert_close(block(x), expected, rtol=1e-4, atol=1e-5)


def test_criss_cross_equals_masked_full_softmax():
    block = randomize_(visattn.create_block("criss_cross", 16, recurrence=2), scale=0.3)
    x = torch.randn(2, 16, 5, 6)
    h, w = 5, 6
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    cross = (ys[:, None] == ys[None]) | (xs[:, None] == xs[None])  # same row or column, self once
    bias = torch.zeros(h * w, h * w).masked_fill(~cross, float("-inf"))
    y = x
    for _ in range(2):
        q = F.conv2d(y, block.query.weight, block.query.bias).flatten(2).transpose(1, 2)
        k = F.conv2d(y, block.key.weight, block.key.bias).flatten(2).transpose(1, 2)
        v = F.conv2d(y, block.value.weight, block.value.bias).flatten(2).transpose(1, 2)
        agg = full_attention(q, k, v, 1.0, bias).transpose(1, 2).reshape_as(y)
        y = y + block.gamma * agg
    torch.testing.assert_close(block(x), y, rtol=1e-4, atol=1e-5)


def test_criss_cross_one_row_and_one_column_maps():
    block = randomize_(visattn.create_block("criss_cross", 16))
    for shape in [(1, 16, 1, 7), (1, 16, 7, 1), (1, 16, 1, 1)]:
        assert torch.isfinite(block(torch.randn(shape))).all()


def test_nonlocal_plain_and_identity_at_init():
    x = torch.randn(2, 16, 4, 5)
    torch.testing.assert_close(visattn.create_block("nonlocal", 16)(x), x)
    block = randomize_(visattn.create_block("nonlocal", 16), scale=0.2)
    conv = lambda m, t: F.conv2d(t, m.weight, m.bias).flatten(2).transpose(1, 2)
    y = full_attention(conv(block.theta, x), conv(block.phi, x), conv(block.g, x), 1.0)
    y = F.conv2d(y.transpose(1, 2).reshape(2, 8, 4, 5), block.w_z.weight, block.w_z.bias)
    torch.testing.assert_close(block(x), x + y, rtol=1e-4, atol=1e-5)


def _pool2x2(t, floor):
    """2x2 max-pool written out: window (i, j) covers rows 2i..2i+1 and columns 2j..2j+1; a window
    that runs past an odd edge keeps what is inside (``floor=False``) or is dropped (``floor=True``,
    the authors' nn.MaxPool2d(2))."""
    h, w = t.shape[-2:]
    rows = range(0, h - 1 if floor else h, 2)
    cols = range(0, w - 1 if floor else w, 2)
    return torch.stack([torch.stack([t[..., i:i + 2, j:j + 2].amax((-2, -1)) for j in cols], -1)
                        for i in rows], -2)


@pytest.mark.parametrize("size", [(4, 6), (5, 7), (1, 3)])
def test_nonlocal_sub_sample_pools_odd_edges_on_their_own(size):
    """Pins the documented departure: on even sizes sub-sampling equals the authors' 2x2 pool; on
    odd sizes the last row/column is pooled on its own instead of dropped, so 1-pixel maps work."""
    h, w = size
    block = randomize_(visattn.create_block("nonlocal", 16, sub_sample=True), scale=0.2)
    x = torch.randn(2, 16, h, w)
    conv = lambda m, t: F.conv2d(t, m.weight, m.bias)
    keys_in = _pool2x2(x, floor=False)
    if h % 2 == 0 and w % 2 == 0:
        torch.testing.assert_close(keys_in, _pool2x2(x, floor=True))
    assert keys_in.shape[-2:] == (-(-h // 2), -(-w // 2))
    tok = lambda t: t.flatten(2).transpose(1, 2)
    y = full_attention(tok(conv(block.theta, x)), tok(conv(block.phi, keys_in)),
                       tok(conv(block.g, keys_in)), 1.0)
    y = F.conv2d(y.transpose(1, 2).reshape(2, 8, h, w), block.w_z.weight, block.w_z.bias)
    torch.testing.assert_close(block(x), x + y, rtol=1e-4, atol=1e-5)


def test_external_attention_double_normalisation():
    block = randomize_(visattn.create_block("external", 16, memory=8), scale=0.3).eval()
    x = torch.randn(2, 16, 4, 5)
    f = F.conv2d(x, block.conv_in.weight, block.conv_in.bias).flatten(2)  # (N, C, HW)
    a = torch.einsum("sc,ncp->nsp", block.mk.weight[..., 0], f)
    a = torch.exp(a - a.amax(-1, keepdim=True))
    a = a / a.sum(-1, keepdim=True)  # over positions
    a = a / (1e-9 + a.sum(1, keepdim=True))  # over memory slots
    y = torch.einsum("cs,nsp->ncp", block.mv.weight[..., 0], a).view_as(x)
    y = F.conv2d(y, block.conv_out.weight)
    bn = block.bn
    y = (y - bn.running_mean[:, None, None]) / torch.sqrt(bn.running_var[:, None, None] + bn.eps) \
        * bn.weight[:, None, None] + bn.bias[:, None, None]
    torch.testing.assert_close(block(x), x + y, rtol=1e-4, atol=1e-5)


def test_sra_reduces_keys_and_ratio_one_is_global():
    block = randomize_(visattn.create_block("sra", 16, sr_ratio=2, heads=2), scale=0.3)
    x = torch.randn(1, 16, 6, 8)
    seen = []
    block.kv.register_forward_hook(lambda m, i, o: seen.append(i[0].shape))
    block(x)
    assert seen[-1] == (1, 12, 16)  # 6*8 / 2^2 keys
    glob = randomize_(visattn.create_block("sra", 16, sr_ratio=1, heads=2), scale=0.3)
    mhsa_like = glob(x)
    glob.reference = True
    torch.testing.assert_close(mhsa_like, glob(x), rtol=1e-4, atol=1e-5)
    assert visattn.create_block("sra", 16, sr_ratio=4)(torch.randn(1, 16, 1, 1)).shape == (1, 16, 1, 1)


def test_axial_is_row_then_column():
    block = randomize_(visattn.create_block("axial", 16, heads=1), scale=0.3)
    x = torch.randn(1, 16, 3, 4)
    t = x.permute(0, 2, 3, 1)  # (N, H, W, C)

    def axis(m, seq):
        q, k, v = m.qkv(seq).chunk(3, -1)
        return m.proj(full_attention(q, k, v, 16 ** -0.5))

    t = t + torch.stack([axis(block.row, t[:, i]) for i in range(3)], 1)
    t = t + torch.stack([axis(block.col, t[:, :, j]) for j in range(4)], 2)
    torch.testing.assert_close(block(x), t.permute(0, 3, 1, 2), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- cross-attention

def test_cross_attention_uses_the_context():
    block = randomize_(visattn.create_block("cross", 32, context_channels=24), scale=0.3)
    x = torch.randn(2, 32, 6, 5)
    ctx_map = torch.randn(2, 24, 3, 4)
    y = block(x, ctx_map)
    assert y.shape == x.shape
    assert not torch.allclose(y, block(x, torch.randn(2, 24, 3, 4)))
    # a map and the same positions as a token sequence give the same result
    torch.testing.assert_close(y, block(x, ctx_map.flatten(2).transpose(1, 2)))
    y.sum().backward()
    assert block.kv.weight.grad.abs().sum() > 0


def test_cross_attention_equals_plain_formula():
    block = randomize_(visattn.create_block("cross", 16, context_channels=8, heads=1), scale=0.3)
    x, ctx = torch.randn(1, 16, 3, 3), torch.randn(1, 5, 8)
    q = block.q(x.flatten(2).transpose(1, 2))
    k, v = block.kv(ctx).chunk(2, -1)
    y = block.proj(full_attention(q, k, v, 16 ** -0.5)).transpose(1, 2).reshape(1, 16, 3, 3)
    torch.testing.assert_close(block(x, ctx), x + y, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("ctx,match", [
    (torch.randn(2, 16, 3, 3), "built for context_channels=24"),
    (torch.randn(2, 7, 16), "built for context_channels=24"),
    (torch.randn(24), "feature map .* or a token sequence"),
    (torch.randn(3, 5, 24), "does not match the batch"),
    (torch.randn(2, 0, 24), "or is empty"),
])
def test_cross_attention_bad_context(ctx, match):
    block = visattn.create_block("cross", 32, context_channels=24)
    with pytest.raises(ValueError, match=match):
        block(torch.randn(2, 32, 4, 4), ctx)
    with pytest.raises(ValueError, match="needs a context"):
        block(torch.randn(2, 32, 4, 4))


def test_cross_attention_context_dtype():
    """The context's dtype meets x's as the input's meets the parameters' (outside autocast equal;
    under it float32 or autocast's dtype, or both float64)."""
    block = visattn.create_block("cross", 16, context_channels=8)
    x = torch.randn(1, 16, 4, 4)
    with pytest.raises(TypeError, match="context has dtype torch.float64 but x has torch.float32; convert"):
        block(x, torch.randn(1, 8, 3, 3, dtype=torch.float64))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert block(x, torch.randn(1, 8, 3, 3, dtype=torch.bfloat16)).dtype == torch.float32
        for dtype in (torch.float64, torch.float16):
            with pytest.raises(TypeError, match=rf"context has dtype {dtype} .* under torch.autocast"):
                block(x, torch.randn(1, 8, 3, 3, dtype=dtype))


def test_heads_must_divide_channels():
    for name in ["mhsa", "window", "axial", "sra", "cross", "linear"]:
        with pytest.raises(ValueError, match="heads=3 must be >= 1 and divide channels=16"):
            visattn.create_block(name, 16, heads=3)


def test_registered_kinds():
    assert visattn.list_blocks("self") == sorted(
        ["mhsa", "nonlocal", "window", "axial", "criss_cross", "linear", "external", "sra",
         "deformable", "routing", "quadtree", "adaptive"])
    assert visattn.list_blocks("cross") == ["cross"]


@pytest.mark.parametrize("name", ["mhsa", "nonlocal", "danet", "sra", "window", "cross"])
def test_softmax_attention_never_materialises_the_matrix(name):
    """64x64 = 4096 positions: one fp32 HW x HW matrix is 64 MiB. The fused SDPA path must stay far
    below (a transposed q/k/v or unequal head widths silently fall back to the math path)."""
    from visattn.bench import peak_memory_mb

    block = visattn.create_block(name, 32).eval()
    x = torch.randn(1, 32, 64, 64)

    def run():
        with torch.no_grad():
            return block(x)

    assert peak_memory_mb(run) < 24
