"""The learned-sparse blocks (``routing``, ``quadtree``, ``adaptive``) against their papers'
formulations written out plainly here: naive per-query loops or full matrices with masks, in
float64, plus gradcheck, graph capture without breaks, and the explain capture."""
import math

import pytest
import torch
import torch.nn.functional as F

import visattn
from visattn.layers import adaptive as adaptive_mod
from visattn.layers._capture import Capture
from visattn.layers.adaptive import entmax_bisect

from .conftest import randomize_


def make(name, channels=16, **kw):
    return randomize_(visattn.create_block(name, channels, **kw), scale=0.3).double()


def heads_split(t, heads):
    """(HW, C) -> (heads, HW, d)."""
    return t.view(t.shape[0], heads, -1).transpose(0, 1)


def dwconv(v_map, conv):
    return F.conv2d(v_map, conv.weight, conv.bias, padding=conv.padding, groups=conv.groups)


# ---------------------------------------------------------------- routing (BiFormer)

def routing_reference(block, x):
    """Bi-level routing attention, one sample at a time, with a full (HW x HW) matrix masked to the
    tokens of each query region's top-k regions (regions from the padded grid, means over real
    tokens, padded tokens never keys), plus the LCE term, as in BiFormer's Algorithm 1."""
    n, c, h, w = x.shape
    heads, d = block.heads, c // block.heads
    sh, rh, sw, rw = block.grid(h, w)
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    region = ((ys // rh) * sw + xs // rw).flatten()  # (HW,) region of every real token
    nr = sh * sw
    outs = []
    for i in range(n):
        t = x[i].flatten(1).t()  # (HW, C)
        q, k, v = (t @ block.qkv.weight.t() + block.qkv.bias).chunk(3, -1)
        q_r = torch.zeros(nr, c, dtype=x.dtype)
        k_r = torch.zeros(nr, c, dtype=x.dtype)
        real = torch.zeros(nr, dtype=torch.bool)
        for r in range(nr):
            members = region == r
            if members.any():
                q_r[r], k_r[r], real[r] = q[members].mean(0), k[members].mean(0), True
        logits = (q_r @ k_r.t()).masked_fill(~real[None], float("-inf"))
        top = logits.topk(min(block.topk, nr), -1).indices  # (nr, k)
        allowed = torch.zeros(h * w, h * w, dtype=torch.bool)
        for p in range(h * w):
            allowed[p] = torch.isin(region, top[region[p]])
        bias = torch.zeros(h * w, h * w, dtype=x.dtype).masked_fill(~allowed, float("-inf"))
        qh, kh, vh = (heads_split(z, heads) for z in (q, k, v))
        att = ((qh @ kh.transpose(1, 2)) / math.sqrt(d) + bias).softmax(-1) @ vh  # (heads, HW, d)
        y = att.transpose(0, 1).reshape(h * w, c)
        lce = dwconv(v.t().reshape(1, c, h, w), block.lce)[0].flatten(1).t()
        y = (y + lce) @ block.proj.weight.t() + block.proj.bias
        outs.append(x[i] + y.t().reshape(c, h, w))
    return torch.stack(outs)


@pytest.mark.parametrize("kw,hw", [
    ({"regions": 3, "topk": 2}, (7, 8)),  # padded grid (3x3 regions of 3x3 tokens)
    ({"region_size": 2, "topk": 3}, (5, 6)),  # padded last row of regions
    ({"regions": 2, "topk": 1}, (4, 4)),  # no padding, each region keeps one region
    ({"regions": 5, "topk": 4}, (3, 7)),  # some regions hold only padding
])
def test_routing_equals_masked_full_attention(kw, hw):
    block = make("routing", heads=2, **kw)
    x = torch.randn(2, 16, *hw, dtype=torch.float64)
    torch.testing.assert_close(block(x), routing_reference(block, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kw,hw", [({"regions": 6, "topk": 40}, (3, 5)), ({"regions": 4, "topk": 3}, (5, 2)),
                                   ({"region_size": 8, "topk": 2}, (3, 5)), ({"region_size": 4, "topk": 2}, (9, 3))])
def test_routing_without_padding_only_regions_is_unchanged(kw, hw, monkeypatch):
    """A grid of S x S regions (or regions of region_size) larger than the map: the regions of
    padding only are not formed. Output and gradients equal the masked full attention over the
    whole padded grid."""
    block = make("routing", heads=2, **kw)
    x = torch.randn(2, 16, *hw, dtype=torch.float64, requires_grad=True)
    y = block(x)
    gx, = torch.autograd.grad(y.square().sum(), x)
    s, r = block.regions, block.region_size
    padded = (lambda h, w: (s, -(-h // s), s, -(-w // s))) if s else (lambda h, w: (-(-h // r), r, -(-w // r), r))
    assert padded(*hw) != block.grid(*hw)  # the padded grid has more (or larger) regions
    monkeypatch.setattr(block, "grid", padded)
    want = routing_reference(block, x)
    torch.testing.assert_close(y, want)
    torch.testing.assert_close(gx, torch.autograd.grad(want.square().sum(), x)[0])


def test_routing_ranks_regions_in_float32_for_bf16():
    """Two regions whose affinities differ by 2^-8 tie once rounded to bf16: a bf16 block still
    routes to the better one (its region means and affinities are computed in float32)."""
    block = visattn.create_block("routing", 16, region_size=1, topk=2)  # one region per token
    with torch.no_grad():  # q = k = v = x, no LCE, identity output projection: y = x + attention
        block.qkv.weight.copy_(torch.eye(16).repeat(3, 1))
        block.proj.weight.copy_(torch.eye(16))
        for t in (block.qkv.bias, block.proj.bias, block.lce.weight, block.lce.bias):
            t.zero_()
    x = torch.zeros(1, 16, 1, 3)
    x[0, :2, 0, 0] = torch.tensor([1.0, 1.0])  # the query region; it keeps itself and one other
    x[0, :2, 0, 1] = torch.tensor([1.0, 0.0])  # affinity 1
    x[0, :2, 0, 2] = torch.tensor([0.5, 0.5 + 2 ** -8])  # affinity 1 + 2^-8 (bf16 inputs, exact)
    want = block.double()(x.double())[0, :, 0, 0]
    got = block.to(torch.bfloat16)(x.to(torch.bfloat16))[0, :, 0, 0]
    torch.testing.assert_close(got.double(), want, atol=0.01, rtol=0)  # region 1 instead: 0.22 off


def test_routing_all_regions_is_full_attention_plus_lce():
    block = make("routing", regions=3, topk=9, heads=4)
    x = torch.randn(2, 16, 6, 7, dtype=torch.float64)
    n, c, h, w = x.shape
    t = x.flatten(2).transpose(1, 2)
    q, k, v = (t @ block.qkv.weight.t() + block.qkv.bias).chunk(3, -1)
    split = lambda z: z.view(n, h * w, 4, 4).transpose(1, 2)
    att = ((split(q) @ split(k).transpose(-2, -1)) / 2.0).softmax(-1) @ split(v)
    y = att.transpose(1, 2).reshape(n, h * w, c)
    y = y + dwconv(v.transpose(1, 2).reshape(n, c, h, w), block.lce).flatten(2).transpose(1, 2)
    expected = x + (y @ block.proj.weight.t() + block.proj.bias).transpose(1, 2).reshape_as(x)
    torch.testing.assert_close(block(x), expected, rtol=1e-5, atol=1e-5)
    block.reference = True  # plain-math path
    torch.testing.assert_close(block(x), expected, rtol=1e-5, atol=1e-5)


def test_routing_arguments():
    with pytest.raises(ValueError, match="not both"):
        visattn.create_block("routing", 16, regions=4, region_size=4)
    with pytest.raises(TypeError, match="topk"):
        visattn.create_block("routing", 16, topk=1.5)
    with pytest.raises(ValueError, match="lce_kernel"):
        visattn.create_block("routing", 16, lce_kernel=4)


# ---------------------------------------------------------------- quadtree

def quadtree_reference(block, x):
    """QuadTree attention per finest query, following its chain of ancestors down the pyramid,
    with plain loops: level 0 attends to every coarse key; at each finer level the query's
    candidates are the 2x2 children of the keys its parent kept. Variant "b": a softmax over the
    candidates, every level's message plus LePE weighted by softmax(level_weight); variant "a": a
    child's score is its parent's score times a softmax over the parent's 4 children, messages of
    the non-kept keys at coarse levels plus all candidates at the finest."""
    n, c, h, w = x.shape
    levels, heads = block.levels, block.heads
    d = c // heads
    f = 2 ** (levels - 1)
    hp, wp = -(-h // f) * f, -(-w // f) * f
    outs = []
    for i in range(n):
        t = x[i].permute(1, 2, 0) @ block.qkv.weight.t() + block.qkv.bias  # (H, W, 3C)
        real = torch.zeros(hp, wp, dtype=torch.bool)
        real[:h, :w] = True
        pyr = []  # finest first: (map (h_l, w_l, 3C) of means over real tokens, real mask)
        full = torch.zeros(hp, wp, 3 * c, dtype=x.dtype)
        full[:h, :w] = t
        for lvl in range(levels):
            s = 2 ** lvl
            hl, wl = hp // s, wp // s
            m = torch.zeros(hl, wl, 3 * c, dtype=x.dtype)
            ok = torch.zeros(hl, wl, dtype=torch.bool)
            for a in range(hl):
                for b in range(wl):
                    cell = real[a * s:(a + 1) * s, b * s:(b + 1) * s]
                    if cell.any():
                        m[a, b] = full[a * s:(a + 1) * s, b * s:(b + 1) * s][cell].mean(0)
                        ok[a, b] = True
            pyr.append((m, ok))
        pyr = pyr[::-1]  # coarsest first
        lw = block.level_weight.softmax(0) if block.variant == "b" else None
        lepe = []
        if block.variant == "b":
            for lvl, (m, _) in enumerate(pyr):
                vmap = m[..., 2 * c:].permute(2, 0, 1)[None]
                lepe.append(dwconv(vmap, block.lepe[lvl])[0].permute(1, 2, 0))
        y = torch.zeros(h, w, c, dtype=x.dtype)
        for py in range(h):
            for px in range(w):
                msg = torch.zeros(c, dtype=x.dtype)
                for hd in range(heads):
                    ch = slice(hd * d, (hd + 1) * d)
                    kept, kept_score = None, None  # level-(l-1) kept keys of this query's ancestor
                    for lvl, (m, ok) in enumerate(pyr):
                        hl, wl = ok.shape
                        sft = levels - 1 - lvl
                        qa = m[py >> sft, px >> sft, :c][ch]
                        if lvl == 0:
                            cand = [(a, b) for a in range(hl) for b in range(wl)]
                        else:
                            cand = [(2 * a + u, 2 * b + v) for (a, b) in kept for u in (0, 1) for v in (0, 1)]
                        keys = torch.stack([m[a, b, c:2 * c][ch] for a, b in cand])
                        vals = torch.stack([m[a, b, 2 * c:][ch] for a, b in cand])
                        okc = torch.tensor([bool(ok[a, b]) for a, b in cand])
                        sc = (keys @ qa) / math.sqrt(d)
                        sc = sc.masked_fill(~okc, torch.finfo(x.dtype).min)
                        if block.variant == "b" or lvl == 0:
                            p = sc.softmax(0)
                        else:
                            p = (sc.view(-1, 4).softmax(1) * kept_score[:, None]).flatten()
                        last = lvl == levels - 1
                        if last:
                            use = torch.ones_like(p, dtype=torch.bool)
                        else:
                            top = p.topk(min(block.topk[lvl], len(cand))).indices
                            use = torch.ones_like(p, dtype=torch.bool)
                            if block.variant == "a":
                                use[top] = False
                            kept = [cand[j] for j in top.tolist()]
                            kept_score = p[top]
                        part = (p * use) @ vals
                        if block.variant == "b":
                            part = (part + lepe[lvl][py >> sft, px >> sft, ch]) * lw[lvl]
                        msg[ch] += part
                y[py, px] = msg
        y = y @ block.proj.weight.t() + block.proj.bias
        outs.append(x[i] + y.permute(2, 0, 1))
    return torch.stack(outs)


@pytest.mark.parametrize("variant", ["b", "a"])
@pytest.mark.parametrize("kw,hw", [
    ({"levels": 3, "topk": 2}, (7, 6)),  # padded to 8x8
    ({"levels": 2, "topk": (3,)}, (4, 5)),  # padded to 4x6
    ({"levels": 3, "topk": (1, 3)}, (4, 8)),
])
def test_quadtree_equals_per_query_loops(variant, kw, hw):
    block = make("quadtree", heads=2, variant=variant, **kw)
    x = torch.randn(1, 16, *hw, dtype=torch.float64)
    torch.testing.assert_close(block(x), quadtree_reference(block, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("hw", [(8, 8), (6, 7)])
def test_quadtree_all_topk_is_full_attention_at_the_finest_level(hw):
    block = make("quadtree", levels=3, topk=64, heads=2)
    with torch.no_grad():  # all weight on the finest level
        block.level_weight.copy_(torch.tensor([-1e4, -1e4, 0.0]))
    x = torch.randn(2, 16, *hw, dtype=torch.float64)
    n, c, h, w = x.shape
    t = x.flatten(2).transpose(1, 2)
    q, k, v = (t @ block.qkv.weight.t() + block.qkv.bias).chunk(3, -1)
    split = lambda z: z.view(n, h * w, 2, 8).transpose(1, 2)
    att = ((split(q) @ split(k).transpose(-2, -1)) / math.sqrt(8)).softmax(-1) @ split(v)
    y = att.transpose(1, 2).reshape(n, h * w, c)
    y = y + dwconv(v.transpose(1, 2).reshape(n, c, h, w), block.lepe[2]).flatten(2).transpose(1, 2)
    expected = x + (y @ block.proj.weight.t() + block.proj.bias).transpose(1, 2).reshape_as(x)
    torch.testing.assert_close(block(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", ["a", "b"])
@pytest.mark.parametrize("levels,hw,topk", [(5, (3, 5), 2), (6, (1, 1), 3), (4, (1, 3), 5), (7, (5, 9), 2)])
def test_quadtree_levels_beyond_the_map_are_not_padded_out(variant, levels, hw, topk, monkeypatch):
    """More levels than the map needs: the coarser levels are not formed on a padded map (levels=16
    on a 1x1 map padded it to 32768 x 32768). Output, gradients (the skipped levels' LePE and
    level weights included) and captured maps equal the computation over the whole padded pyramid."""
    block = make("quadtree", levels=levels, topk=topk, variant=variant, heads=2)
    assert block._levels_used(*hw) < levels
    x = torch.randn(2, 16, *hw, dtype=torch.float64, requires_grad=True)

    def run():
        block._capture = Capture(query=(0.5, 0.3))
        y = block(x)
        maps, block._capture = block._capture.maps, None
        return y, torch.autograd.grad(y.square().sum(), [x, *block.parameters()]), maps

    y, grads, maps = run()
    monkeypatch.setattr(block, "_levels_used", lambda h, w: levels)  # the map padded to 2^(levels-1)
    y_padded, grads_padded, maps_padded = run()
    torch.testing.assert_close(y, y_padded)
    torch.testing.assert_close(grads, grads_padded)
    torch.testing.assert_close(maps, maps_padded)


def test_quadtree_arguments():
    with pytest.raises(ValueError, match="one value per level"):
        visattn.create_block("quadtree", 16, levels=3, topk=(2, 2, 2))
    with pytest.raises(ValueError, match="variant"):
        visattn.create_block("quadtree", 16, variant="c")
    with pytest.raises(TypeError, match="levels"):
        visattn.create_block("quadtree", 16, levels="3")


# ---------------------------------------------------------------- adaptive (alpha-entmax)

def sparsemax(z):
    """Martins & Astudillo 2016, the sort-based closed form."""
    zs = z.sort(-1, descending=True).values
    r = torch.arange(1, z.shape[-1] + 1, dtype=z.dtype)
    cum = zs.cumsum(-1)
    support = (1 + r * zs > cum)
    k = support.sum(-1, keepdim=True)
    tau = (cum.gather(-1, k - 1) - 1) / k
    return (z - tau).clamp(min=0)


def naive_entmax(z, alpha, steps=200):
    """alpha-entmax by its definition: p_i = [(alpha - 1) z_i - tau]_+^(1/(alpha - 1)) with tau
    solved to make the sum one (plain bisection on a wide bracket, many steps, float64)."""
    alpha = torch.as_tensor(alpha, dtype=z.dtype)
    xs = (alpha - 1) * z
    lo, hi = xs.amax(-1, keepdim=True) - 2, xs.amax(-1, keepdim=True)
    for _ in range(steps):
        mid = (lo + hi) / 2
        s = (xs - mid).clamp(min=0).pow(1 / (alpha - 1)).sum(-1, keepdim=True)
        lo, hi = torch.where(s > 1, mid, lo), torch.where(s > 1, hi, mid)
    return (xs - lo).clamp(min=0).pow(1 / (alpha - 1))


def test_entmax_is_sparsemax_at_two_and_tends_to_softmax():
    z = torch.randn(6, 11, dtype=torch.float64) * 2
    torch.testing.assert_close(entmax_bisect(z, 2.0), sparsemax(z), rtol=1e-5, atol=1e-5)
    assert (entmax_bisect(z, 2.0) == 0).any()  # exact zeros
    errs = [(entmax_bisect(z, a) - z.softmax(-1)).abs().max().item() for a in (1.1, 1.01, 1.001)]
    assert errs[0] > errs[1] > errs[2] and errs[2] < 2e-3, errs
    for a in (1.2, 1.5, 1.8):
        torch.testing.assert_close(entmax_bisect(z, a), naive_entmax(z, a), rtol=1e-5, atol=1e-5)
    z32 = z.float()
    torch.testing.assert_close(entmax_bisect(z32, 1.5), naive_entmax(z, 1.5).float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_entmax_newton_threshold_on_hard_rows(dtype):
    """The Newton threshold against plain bisection where it needs the most steps (near-sparsemax
    alpha, many keys, scores of small spread or two clusters: the support shrinks over the steps),
    eager (stopping when converged) and with the fixed step count used under torch.compile."""
    g = torch.Generator().manual_seed(0)
    n = 4096
    z = torch.cat([0.2 * torch.randn(2, n, generator=g, dtype=torch.float64),
                   torch.where(torch.rand(2, n, generator=g) < 0.5, 2.0, 0.0).double()
                   + 0.1 * torch.randn(2, n, generator=g, dtype=torch.float64),
                   torch.linspace(0, 5, n, dtype=torch.float64).expand(1, n),
                   torch.full((1, n), 3.0, dtype=torch.float64)])
    alpha = torch.tensor([1.01, 1.5, 1.97, 2.0, 1.9, 1.3], dtype=torch.float64).view(-1, 1)
    ref = naive_entmax(z, alpha)
    steps = adaptive_mod._COMPILED_STEPS[dtype == torch.float64]
    for p in (entmax_bisect(z.to(dtype), alpha.to(dtype)),
              adaptive_mod._threshold(z.to(dtype), alpha.to(dtype), steps)[2]):
        p = p / p.sum(-1, keepdim=True)
        torch.testing.assert_close(p.double(), ref, rtol=0, atol=1e-6)
        assert ((p > 0) == (ref > 0)).float().mean() > 0.999  # same support but for rounding


def test_entmax_gradients_in_scores_and_alpha():
    z = torch.randn(4, 7, dtype=torch.float64, requires_grad=True)
    alpha = torch.tensor([[1.3], [1.5], [1.7], [2.0]], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(entmax_bisect, (z, alpha))
    with pytest.raises(ValueError, match="alpha must be in"):
        entmax_bisect(z, 2.5)


def test_adaptive_equals_naive_entmax_attention():
    block = make("adaptive", heads=2)
    with torch.no_grad():
        block.alpha_logit.copy_(torch.tensor([-1.0, 1.5]))  # alpha ~1.27 and ~1.82
    x = torch.randn(2, 16, 4, 5, dtype=torch.float64)
    _n, c, h, w = x.shape
    pos = visattn.layers._attention.sincos_2d(h, w, c, dtype=torch.float64)
    t = x.flatten(2).transpose(1, 2)
    wq, wk, wv = block.qkv.weight.flatten(1).chunk(3)
    bq, bk, bv = block.qkv.bias.chunk(3)
    q, k, v = (t + pos) @ wq.t() + bq, (t + pos) @ wk.t() + bk, t @ wv.t() + bv
    alpha = 1 + torch.sigmoid(block.alpha_logit)
    outs = []
    for hd in range(2):
        ch = slice(8 * hd, 8 * (hd + 1))
        p = naive_entmax(q[..., ch] @ k[..., ch].transpose(1, 2) / math.sqrt(8), alpha[hd])
        outs.append(p @ v[..., ch])
    y = torch.cat(outs, -1) @ block.proj.weight.flatten(1).t() + block.proj.bias
    torch.testing.assert_close(block(x), x + y.transpose(1, 2).reshape_as(x), rtol=1e-5, atol=1e-5)


def test_adaptive_gradcheck_with_chunks(monkeypatch):
    """The closed-form backward (scores and alpha, recomputed chunk by chunk) against finite
    differences on a tiny input."""
    monkeypatch.setattr(adaptive_mod, "CHUNK_ELEMENTS", 2 * 2 * 6)  # 2 queries per chunk
    block = make("adaptive", 8, heads=2)
    x = torch.randn(2, 8, 2, 3, dtype=torch.float64, requires_grad=True)

    def fn(x, alpha_logit):
        return torch.func.functional_call(block, {"alpha_logit": alpha_logit}, (x,), strict=False)

    assert torch.autograd.gradcheck(fn, (x, block.alpha_logit.detach().clone().requires_grad_()),
                                    fast_mode=True)


def test_adaptive_sparsity_is_measured_per_head(monkeypatch):
    block = make("adaptive", heads=2).float()
    x = torch.randn(1, 16, 6, 6)
    with torch.no_grad():
        block.alpha_logit.copy_(torch.tensor([-20.0, 20.0]))  # alpha 1.01 (dense) and 2 (sparsemax)
    s = block.sparsity(x)
    assert s.shape == (2,) and 0 <= s[0] < s[1] < 1
    # the same count from the weights written out
    _n, _c, _h, _w = x.shape
    with torch.no_grad():
        q, k, _ = block._qkv(x)
        p = entmax_bisect(q[:, 1] @ k[:, 1].transpose(-2, -1), 2.0)
    assert abs((p == 0).float().mean().item() - s[1].item()) < 0.02
    # the forward's dtype rules: under bf16 autocast the scores and thresholds stay float32; a
    # bf16 block measures a bf16 input; a float64 input is named
    seen = []
    threshold = adaptive_mod._threshold
    monkeypatch.setattr(adaptive_mod, "_threshold", lambda z, *a: seen.append(z.dtype) or threshold(z, *a))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert block.sparsity(x).shape == (2,)
    assert seen and set(seen) == {torch.float32}
    assert block.bfloat16().sparsity(x.bfloat16()).shape == (2,)
    with pytest.raises(TypeError, match="bfloat16 parameters but got a torch.float64 input"):
        block.sparsity(x.double())


# ---------------------------------------------------------------- shared: gradcheck, compile, capture

CONFIGS = [
    ("routing", {"regions": 3, "topk": 2, "heads": 2}),
    ("quadtree", {"levels": 3, "topk": 2, "heads": 2, "variant": "b"}),
    ("quadtree", {"levels": 2, "topk": 3, "heads": 2, "variant": "a"}),
    ("adaptive", {"heads": 2}),
]
# the registry contract tests capture every block's default configuration with backend="eager";
# these add the padded / variant configurations, and the backward graph (aot_eager) of adaptive's
# custom autograd function
COMPILE = [("routing", {"regions": 3, "topk": 2, "heads": 2}, "eager"),
           ("quadtree", {"levels": 2, "topk": 3, "heads": 2, "variant": "a"}, "eager"),
           pytest.param("adaptive", {"heads": 2}, "aot_eager", marks=pytest.mark.slow)]


@pytest.mark.parametrize("name,kw", [CONFIGS[0], CONFIGS[2], CONFIGS[3]])  # defaults: contract tests
def test_gradcheck_padded_multi_region(name, kw):
    block = make(name, 8, **kw)
    params = dict(block.named_parameters())
    x = torch.randn(1, 8, 5, 6, dtype=torch.float64, requires_grad=True)

    def fn(x, *ps):
        return torch.func.functional_call(block, dict(zip(params, ps)), (x,))

    assert torch.autograd.gradcheck(fn, (x, *params.values()), fast_mode=True)


@pytest.mark.parametrize("name,kw,backend", COMPILE)
def test_compile_fullgraph_no_graph_breaks(name, kw, backend):
    torch._dynamo.reset()
    block = make(name, **kw).float()
    x = torch.randn(1, 16, 7, 9, requires_grad=True)
    compiled = torch.compile(block, backend=backend, fullgraph=True)
    y = compiled(x)
    torch.testing.assert_close(y, block(x), rtol=1e-5, atol=1e-5)
    if backend == "aot_eager":  # the traced backward too
        (g,) = torch.autograd.grad(y.square().sum(), x)
        (g_ref,) = torch.autograd.grad(block(x).square().sum(), x)
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["routing", "quadtree", "adaptive"])
def test_inductor_compile(name):
    torch._dynamo.reset()
    block = randomize_(visattn.create_block(name, 16), scale=0.3)
    x = torch.randn(2, 16, 12, 10, requires_grad=True)
    compiled = torch.compile(block, fullgraph=True)
    torch.testing.assert_close(compiled(x), block(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name,kw", CONFIGS)
def test_capture_received_and_query(name, kw):
    block = make(name, **kw)
    x = torch.randn(2, 16, 7, 6, dtype=torch.float64)
    plain = block(x)
    block._capture = Capture(query=(0.5, 0.3))
    captured = block(x)
    torch.testing.assert_close(captured, plain)  # recording changes nothing
    maps = block._capture.maps
    block._capture = None
    assert maps["received"].shape == (2, 7, 6) and maps["query"].shape == (2, 7, 6)
    torch.testing.assert_close(maps["received"].sum((1, 2)), torch.ones(2), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(maps["query"].sum((1, 2)), torch.ones(2), rtol=1e-4, atol=1e-4)
    assert (maps["received"] >= 0).all() and (maps["query"] >= 0).all()


def test_capture_routing_query_map_matches_full_attention():
    """With every region kept, the query map is the full softmax row averaged over heads."""
    block = make("routing", regions=2, topk=4, heads=2)
    x = torch.randn(1, 16, 4, 6, dtype=torch.float64)
    block._capture = Capture(query=(0.6, 0.2))  # position (2, 1)
    block(x)
    got = block._capture.maps["query"]
    t = x.flatten(2).transpose(1, 2)
    q, k, _ = (t @ block.qkv.weight.t() + block.qkv.bias).chunk(3, -1)
    qh, kh = q.view(1, 24, 2, 8).transpose(1, 2), k.view(1, 24, 2, 8).transpose(1, 2)
    p = ((qh @ kh.transpose(-2, -1)) / math.sqrt(8)).softmax(-1)[0, :, 2 * 6 + 1].mean(0)
    torch.testing.assert_close(got[0], p.view(4, 6).float(), rtol=1e-5, atol=1e-6)


def test_routing_chunked_gather_equals_one_gather(monkeypatch):
    """Large maps gather keys/values over chunks of regions (cache-sized): the result and the
    gradients equal those of one gather over all regions, padding included."""
    from visattn.layers import routing as routing_mod

    torch.manual_seed(0)
    block = visattn.create_block("routing", 16, region_size=4, topk=3).double()
    x = torch.randn(2, 16, 13, 11, dtype=torch.float64, requires_grad=True)
    y_one = block(x)
    (g_one,) = torch.autograd.grad(y_one.square().sum(), x)
    monkeypatch.setattr(routing_mod, "GATHER_BYTES", 1)  # one region per chunk
    y_chunks = block(x)
    (g_chunks,) = torch.autograd.grad(y_chunks.square().sum(), x)
    torch.testing.assert_close(y_chunks, y_one, rtol=0, atol=1e-12)
    torch.testing.assert_close(g_chunks, g_one, rtol=0, atol=1e-10)


@pytest.mark.parametrize("variant", ["a", "b"])
def test_quadtree_chunked_levels_equal_one_chunk(variant, monkeypatch):
    """Large maps run each fine level over cache-sized chunks of parents: the output and the
    gradients (input and parameters) equal those of one chunk, padding included."""
    from visattn.layers import quadtree as quadtree_mod

    torch.manual_seed(0)
    block = visattn.create_block("quadtree", 16, levels=3, topk=2, variant=variant).double()
    if variant == "b":
        with torch.no_grad():
            block.level_weight.copy_(torch.randn(3))
    x = torch.randn(2, 16, 13, 11, dtype=torch.float64, requires_grad=True)
    _assert_tiny_chunks_change_nothing(block, x, quadtree_mod, monkeypatch)  # one parent per chunk


def _assert_tiny_chunks_change_nothing(block, x, module, monkeypatch):
    """The output and the gradients (input and parameters) of ``block`` with ``module``'s
    ``GATHER_BYTES`` at 1 (one item per chunk) equal those with the default chunks."""
    def run():
        y = block(x)
        return y, torch.autograd.grad(y.square().sum(), [x, *block.parameters()])

    y_one, g_one = run()
    monkeypatch.setattr(module, "GATHER_BYTES", 1)
    y_chunks, g_chunks = run()
    torch.testing.assert_close(y_chunks, y_one, rtol=0, atol=1e-12)
    for a, b in zip(g_chunks, g_one, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


def test_deformable_chunked_queries_equal_one_chunk(monkeypatch):
    """Large maps sample over cache-sized chunks of queries: same output and gradients."""
    from visattn.layers import deformable as deformable_mod

    torch.manual_seed(0)
    block = visattn.create_block("deformable", 16).double()
    with torch.no_grad():
        for p in block.parameters():
            p.add_(0.1 * torch.randn_like(p))  # off the identity init: offsets and weights vary
    x = torch.randn(2, 16, 9, 7, dtype=torch.float64, requires_grad=True)
    _assert_tiny_chunks_change_nothing(block, x, deformable_mod, monkeypatch)  # one query per chunk


def test_row_chunks_gradient_equals_index_select():
    """RowChunks: chunked index_selects with one shared gradient buffer give the gradient of
    plain index_selects (repeated rows, rows never taken), and again on a retained graph."""
    from visattn.layers._attention import RowChunks

    torch.manual_seed(0)
    rows = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    index = torch.tensor([4, 0, 4, 2, 2, 4, 1])
    weight = torch.randn(7, 3, dtype=torch.float64)
    (expected,) = torch.autograd.grad((rows.index_select(0, index) * weight).sum(), rows)
    source = RowChunks(rows, 3)
    parts = [source.take(index[:2]), source.take(index[2:5]), source.take(index[5:])]
    loss = (torch.cat(parts) * weight).sum()
    for _ in range(2):  # the buffer is handed over and reset: a second backward is right too
        (got,) = torch.autograd.grad(loss, rows, retain_graph=True)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-14)  # summed in another order
    assert expected[5].abs().sum() == 0 and got[3].abs().sum() == 0


def test_row_chunks_discards_a_pass_that_stopped_part_way():
    """A backward that fails part-way on a retained graph leaves a partial sum behind; the next
    pass starts over instead of adding to it."""
    from visattn.layers._attention import RowChunks

    torch.manual_seed(0)
    rows = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    index = torch.tensor([4, 0, 4, 2, 2, 4, 1])
    (want,) = torch.autograd.grad(rows.index_select(0, index).sum(), rows)
    source = RowChunks(rows, 3)
    parts = [source.take(index[:2]), source.take(index[2:5]), source.take(index[5:])]
    loss = torch.cat(parts).sum()
    failed = []

    def fail_once(_):
        if not failed:
            failed.append(True)
            raise RuntimeError("transient failure")

    parts[0].grad_fn.register_prehook(fail_once)  # chunk 0 runs last: the others are summed already
    with pytest.raises(RuntimeError, match="transient"):
        torch.autograd.grad(loss, rows, retain_graph=True)
    (got,) = torch.autograd.grad(loss, rows, retain_graph=True)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-14)


@pytest.mark.parametrize("variant", ["a", "b"])
def test_quadtree_chunked_double_backward_and_func_grad(variant, monkeypatch):
    """Chunked gathers and banded LePE gradients stay twice differentiable (gradient penalties)
    and work under torch.func.grad, equal to the one-chunk path."""
    from visattn.layers import _depthwise
    from visattn.layers import quadtree as quadtree_mod

    torch.manual_seed(0)
    block = visattn.create_block("quadtree", 16, levels=3, topk=2, variant=variant).double()
    x = torch.randn(1, 16, 8, 8, dtype=torch.float64, requires_grad=True)

    def penalty():
        (g,) = torch.autograd.grad(block(x).square().sum(), x, create_graph=True)
        return torch.autograd.grad(g.square().sum(), list(block.parameters()))

    def func_grad():
        params = dict(block.named_parameters())
        return torch.func.grad(lambda p: torch.func.functional_call(block, p, (x,)).square().sum())(params)

    want_penalty, want_func = penalty(), func_grad()
    monkeypatch.setattr(quadtree_mod, "GATHER_BYTES", 1)
    monkeypatch.setattr(_depthwise, "BAND_BYTES", 1)
    for a, b in zip(penalty(), want_penalty, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    for a, b in zip(func_grad().values(), want_func.values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
