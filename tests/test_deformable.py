"""Deformable attention (Deformable DETR, Zhu et al. ICLR 2021): the block and the multi-scale core
against the paper's formula computed one query at a time, the authors' initialisation, the
explain maps, float64 gradcheck of the core, and graph capture without breaks. The registry
contract (shapes, dtypes, channels_last, autocast, gradcheck of the block, ...) is in
test_blocks_contract.py."""
import math

import pytest
import torch
import torch.nn.functional as F

import visattn
from visattn.layers._attention import sincos_2d
from visattn.layers._capture import Capture
from visattn.layers.deformable import (
    DeformableAttention,
    MultiScaleDeformableAttention,
    deformable_sample,
    reference_points,
    splat,
)

from .conftest import randomize_


def _bilinear(img: torch.Tensor, x: float, y: float) -> torch.Tensor:
    """``img`` (D, H, W) at the pixel coordinates (x, y) (pixel centres at integers), zero outside."""
    _, h, w = img.shape
    x0, y0 = math.floor(x), math.floor(y)
    out = torch.zeros(img.shape[0], dtype=img.dtype)
    for xi, yi in ((x0, y0), (x0 + 1, y0), (x0, y0 + 1), (x0 + 1, y0 + 1)):
        if 0 <= xi < w and 0 <= yi < h:
            out += (1 - abs(x - xi)) * (1 - abs(y - yi)) * img[:, yi, xi]
    return out


def _naive(attn: MultiScaleDeformableAttention, query, ref, maps):
    """The paper's eq. 3, one query, head, level and point at a time, in float64.

    query (N, Q, C), ref (Q, 2) as (x, y) fractions, maps: list of (N, C, H_l, W_l) value inputs."""
    p = {k: v.double() for k, v in attn.state_dict().items()}
    m, lv, pts = attn.heads, attn.levels, attn.points
    n, q, c = query.shape
    d = c // m
    query = query.double()
    values = [torch.einsum("oc,nchw->nohw", p["value_proj.weight"], f.double())
              + p["value_proj.bias"][None, :, None, None] for f in maps]
    out = torch.zeros(n, q, c, dtype=torch.float64)
    for b in range(n):
        for i in range(q):
            offsets = (p["sampling_offsets.weight"] @ query[b, i] + p["sampling_offsets.bias"]).view(m, lv, pts, 2)
            logits = (p["attention_weights.weight"] @ query[b, i] + p["attention_weights.bias"]).view(m, lv * pts)
            weights = logits.softmax(-1).view(m, lv, pts)
            for head in range(m):
                acc = torch.zeros(d, dtype=torch.float64)
                for lvl, v in enumerate(values):
                    h, w = v.shape[-2:]
                    for k in range(pts):
                        # location in fractions of the level, then in its pixel coordinates
                        fx = ref[i, 0].item() + offsets[head, lvl, k, 0].item() / w
                        fy = ref[i, 1].item() + offsets[head, lvl, k, 1].item() / h
                        sample = _bilinear(v[b, head * d:(head + 1) * d], fx * w - 0.5, fy * h - 0.5)
                        acc += weights[head, lvl, k] * sample
                out[b, i, head * d:(head + 1) * d] = acc
    return out @ p["output_proj.weight"].t() + p["output_proj.bias"]


def test_block_equals_per_query_formula():
    block = randomize_(DeformableAttention(8, heads=2, points=3), scale=0.7).eval()
    x = torch.randn(2, 8, 3, 4)
    y = block(x)
    n, c, h, w = x.shape
    tokens = x.flatten(2).transpose(1, 2)
    query = tokens + sincos_2d(h, w, c)
    expected = x.double() + _naive(block.attn, query, reference_points(h, w), [x]).transpose(1, 2).reshape(n, c, h, w)
    torch.testing.assert_close(y.double(), expected, atol=1e-5, rtol=0)
    # the offsets are large enough that some points fall off the map (zero padding is exercised)
    loc, _ = block.attn.sampling(query, reference_points(h, w), [(h, w)])
    assert ((loc < 0) | (loc > 1)).any() and ((loc > 0) & (loc < 1)).all(-1).any()


def test_multiscale_core_equals_per_query_formula():
    attn = randomize_(MultiScaleDeformableAttention(8, levels=2, heads=2, points=2), scale=0.7)
    maps = [torch.randn(1, 8, 4, 5), torch.randn(1, 8, 2, 3)]
    shapes = [(4, 5), (2, 3)]
    value = torch.cat([f.flatten(2) for f in maps], 2).transpose(1, 2)  # (1, 26, 8)
    query = torch.randn(1, 26, 8)
    ref = torch.cat([reference_points(h, w) for h, w in shapes])
    out = attn(query, ref, value, shapes)
    torch.testing.assert_close(out.double(), _naive(attn, query, ref, maps), atol=1e-5, rtol=0)


def test_authors_initialisation():
    attn = MultiScaleDeformableAttention(16, levels=2, heads=4, points=3)
    bias = attn.sampling_offsets.bias.view(4, 2, 3, 2)
    # head h points along angle 2 pi h / 4, scaled onto the square; point k at k + 1 pixels, every level
    torch.testing.assert_close(bias[0, 1, 2], torch.tensor([3.0, 0.0]))
    torch.testing.assert_close(bias[1, 0, 1], torch.tensor([0.0, 2.0]), atol=1e-6, rtol=0)
    torch.testing.assert_close(bias[2, 0, 0], torch.tensor([-1.0, 0.0]), atol=1e-6, rtol=0)
    assert not attn.sampling_offsets.weight.any() and not attn.attention_weights.weight.any()
    loc, weights = attn.sampling(torch.randn(2, 6, 16), torch.rand(6, 2), [(4, 4), (2, 2)])
    torch.testing.assert_close(weights, torch.full_like(weights, 1 / 6))  # uniform over 2 levels x 3 points
    assert loc.shape == (2, 6, 4, 2, 3, 2)
    diag = MultiScaleDeformableAttention(16, heads=8, points=1).sampling_offsets.bias.view(8, 2)
    torch.testing.assert_close(diag[1], torch.tensor([1.0, 1.0]))  # 45 degrees: the square's corner


def test_splat_is_the_adjoint_of_bilinear_sampling():
    g = torch.Generator().manual_seed(1)
    h, w = 5, 7
    loc = torch.rand(3, 40, 2, generator=g) * 1.4 - 0.2  # some points off the map
    weights = torch.rand(3, 40, generator=g)
    v = torch.randn(3, 1, h, w, generator=g)
    sampled = F.grid_sample(v, (2 * loc - 1)[:, :, None], align_corners=False)[:, 0, :, 0]  # (3, 40)
    lhs = (splat(loc, weights, h, w) * v.flatten(1)).sum(1)
    torch.testing.assert_close(lhs, (weights * sampled).sum(1), atol=1e-5, rtol=1e-5)


def test_capture_received_and_query_maps():
    block = DeformableAttention(16, heads=2, points=2).eval()
    x = torch.randn(2, 16, 4, 6)
    ref = block(x)
    block._capture = Capture(query=(0.5, 0.9))
    torch.testing.assert_close(block(x), ref)  # recording changes nothing
    maps = block._capture.maps
    assert maps["received"].shape == maps["query"].shape == (2, 4, 6)
    # the authors' offsets (1 and 2 pixels out) leave the map at the border: at most all the weight
    assert (maps["received"] >= 0).all() and (maps["received"].sum((1, 2)) <= 1 + 1e-6).all()
    # every sample at its own pixel centre: each position receives exactly its own query's weight
    block = DeformableAttention(16, heads=2, points=2).eval()
    with torch.no_grad():
        block.attn.sampling_offsets.bias.zero_()
    block._capture = Capture(query=(0.5, 0.9))
    block(x)
    torch.testing.assert_close(block._capture.maps["received"], torch.full((2, 4, 6), 1 / 24))
    onehot = torch.zeros(2, 4, 6)
    onehot[:, 2, 5] = 1
    torch.testing.assert_close(block._capture.maps["query"], onehot)


def test_gradcheck_multiscale_core_float64():
    g = torch.Generator().manual_seed(2)
    values = [torch.randn(2 * 2, 3, 4, 5, generator=g, dtype=torch.float64, requires_grad=True),
              torch.randn(2 * 2, 3, 2, 3, generator=g, dtype=torch.float64, requires_grad=True)]
    loc = (torch.rand(2, 5, 2, 2, 3, 2, generator=g, dtype=torch.float64) * 1.2 - 0.1).requires_grad_()
    weights = torch.rand(2, 5, 2, 2, 3, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, c, d: deformable_sample([a, b], c, d),
                                    (*values, loc, weights))


def test_gradcheck_multiscale_attention_float64():
    attn = randomize_(MultiScaleDeformableAttention(4, levels=2, heads=2, points=2)).double()
    shapes = [(3, 4), (2, 2)]
    query = torch.randn(1, 16, 4, dtype=torch.float64, requires_grad=True)
    value = torch.randn(1, 16, 4, dtype=torch.float64, requires_grad=True)
    ref = torch.cat([reference_points(h, w, dtype=torch.float64) for h, w in shapes])
    params = dict(attn.named_parameters())

    def fn(q, v, *ps):
        return torch.func.functional_call(attn, dict(zip(params, ps)), (q, ref, v, shapes))

    assert torch.autograd.gradcheck(fn, (query, value, *params.values()), fast_mode=True)


@pytest.mark.slow  # ~5 s; the default run captures the block's graph in test_blocks_contract.py
def test_compile_aot_eager_forward_and_backward_without_graph_breaks():
    torch._dynamo.reset()
    block = randomize_(DeformableAttention(16, heads=2, points=2))
    x = torch.randn(2, 16, 5, 6, requires_grad=True)
    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    y = compiled(x)
    torch.testing.assert_close(y, block(x))
    (gx,) = torch.autograd.grad(y.square().sum(), x)
    (ref,) = torch.autograd.grad(block(x).square().sum(), x)
    torch.testing.assert_close(gx, ref)


@pytest.mark.slow
def test_compile_inductor_matches_eager():
    torch._dynamo.reset()
    block = randomize_(DeformableAttention(16, heads=2, points=4)).eval()
    x = torch.randn(2, 16, 9, 11)
    compiled = torch.compile(block, fullgraph=True)
    torch.testing.assert_close(compiled(x), block(x), rtol=1e-4, atol=1e-4)


def test_registry_entry_and_errors():
    info = visattn.block_info("deformable")
    assert info.kind == "self" and info.cls is DeformableAttention and "2010.04159" in info.url
    assert "deformable" in visattn.list_blocks("self")
    block = visattn.create_block("deformable", 32, heads=4, points=2)
    assert (block.heads, block.points) == (4, 2)
    with pytest.raises(ValueError, match="heads=3 must be >= 1 and divide channels=32"):
        visattn.create_block("deformable", 32, heads=3)
    with pytest.raises(ValueError, match="points must be an int >= 1"):
        visattn.create_block("deformable", 32, points=0)
    with pytest.raises(TypeError, match="points must be an int"):
        visattn.create_block("deformable", 32, points=2.0)
    with pytest.raises(ValueError, match="pos_embed"):
        visattn.create_block("deformable", 32, pos_embed="learned")
    attn = MultiScaleDeformableAttention(8, levels=2)
    with pytest.raises(ValueError, match="built for 2 levels"):
        attn(torch.randn(1, 4, 8), torch.rand(4, 2), torch.randn(1, 4, 8), [(2, 2)])
