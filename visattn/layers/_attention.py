"""Shared pieces of the token-attention blocks: head bookkeeping, 2-D sin-cos positions, and one
attention function with a fused path (``scaled_dot_product_attention``: no L x S matrix kept) and
a plain-math reference path that the tests compare it with; the plain math also serves a backward
that builds a graph (double backward), which the fused kernels cannot differentiate."""
from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F

from ._base import check_int
from ._double_backward import twice_differentiable

#: Bytes of gathered keys/values (or other per-query intermediates) per chunk in the sparse blocks
#: (``routing``, ``quadtree``, ``deformable``): 16 MiB stay in the last-level cache between the
#: op that writes them and the attention that reads them, so large maps do not stream them
#: through memory. Each block reads it at call time from its own module (tests shrink it there).
GATHER_BYTES = 16 * 1024 * 1024

__all__ = ["GATHER_BYTES", "POS_EMBEDS", "RowChunks", "attend", "attention_probs", "attention_totals",
           "check_pos_embed", "default_heads", "merge_heads", "project_qkv", "record_attention", "sincos_2d",
           "split_heads", "spread_to_grid"]


def default_heads(channels: int, min_head_dim: int = 16) -> int:
    """The most heads of (8, 4, 2) that divide ``channels`` with at least ``min_head_dim`` each; 1 otherwise."""
    return next((h for h in (8, 4, 2) if channels % h == 0 and channels // h >= min_head_dim), 1)


def check_heads(channels: int, heads: int | None, block: str) -> int:
    """``heads``, or the default for ``channels``; an error naming ``heads`` unless it divides C."""
    check_int(channels, "channels", block)
    heads = default_heads(channels) if check_int(heads, "heads", block, optional=True) is None else heads
    if channels % heads:
        raise ValueError(f"{block}: heads={heads} must be >= 1 and divide channels={channels}")
    return heads


def split_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """``(B, L, C)`` -> ``(B, heads, L, C // heads)``."""
    b, length, c = t.shape
    return t.view(b, length, heads, c // heads).transpose(1, 2)


def merge_heads(t: torch.Tensor) -> torch.Tensor:
    """``(B, heads, L, D)`` -> ``(B, L, heads * D)``."""
    b, h, length, d = t.shape
    return t.transpose(1, 2).reshape(b, length, h * d)


def sincos_2d(h: int, w: int, dim: int, *, device=None, dtype=None, temperature: float = 10000.0) -> torch.Tensor:
    """Fixed 2-D sine-cosine position encoding ``(h * w, dim)``: a quarter of the channels each for
    sin/cos of y and of x at geometric frequencies (MoCo v3 / ViT style); ``dim`` not divisible by
    4 leaves the last channels zero. Defined for any map size, so blocks work at any resolution."""
    quarter = dim // 4
    out = torch.zeros(h * w, dim, device=device, dtype=torch.float32)
    if quarter:
        omega = 1.0 / temperature ** (torch.arange(quarter, device=device, dtype=torch.float32) / quarter)
        ys, xs = torch.meshgrid(torch.arange(h, device=device, dtype=torch.float32),
                                torch.arange(w, device=device, dtype=torch.float32), indexing="ij")
        ay = ys.reshape(-1, 1) * omega  # (HW, quarter)
        ax = xs.reshape(-1, 1) * omega
        out[:, :4 * quarter] = torch.cat([ay.sin(), ay.cos(), ax.sin(), ax.cos()], 1)
    return out.to(dtype or torch.get_default_dtype())


POS_EMBEDS = ("sincos", "none")


def check_pos_embed(pos_embed: object, block: str) -> str:
    """``pos_embed`` if it is ``"sincos"`` or ``"none"``; a ``ValueError`` naming ``block`` otherwise."""
    if pos_embed not in POS_EMBEDS:
        raise ValueError(f"{block} pos_embed must be 'sincos' or 'none', got {pos_embed!r}")
    return pos_embed


def project_qkv(qkv: torch.nn.Conv2d, x: torch.Tensor, heads: int,
                pos_embed: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Queries, keys and values ``(N, heads, HW, C // heads)`` of ``x`` by the 1x1 convolution
    ``qkv`` (``C -> 3C``), with ``q, k = W_{q,k}(x + p)`` for the 2-D sin-cos positions ``p`` when
    ``pos_embed == "sincos"`` (added after the projection as ``W_{q,k} p``: no ``x + p`` copy)."""
    n, c, h, w = x.shape
    out = qkv(x).flatten(2)  # (N, 3C, HW)
    if pos_embed == "sincos":
        pos = sincos_2d(h, w, c, device=x.device, dtype=out.dtype).t()  # (C, HW)
        pos_qk = qkv.weight[:2 * c].flatten(1).to(out.dtype) @ pos  # (2C, HW): W_{q,k} p
        out = torch.cat([out[:, :2 * c] + pos_qk, out[:, 2 * c:]], 1)
    return out.view(n, 3, heads, c // heads, h * w).transpose(-2, -1).unbind(1)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None,
           mask: torch.Tensor | None = None, reference: bool = False) -> torch.Tensor:
    """``softmax(q k^T * scale + mask) v`` over the last two dims.

    ``mask`` is additive (float, ``-inf`` where not allowed) and broadcasts to ``(..., L, S)``.
    ``reference=True`` computes it with the full matrix in plain operations (tests only).

    Differentiable twice: the fused kernels' backward is not (a gradient penalty would fail in
    them), so a backward that builds a graph (``create_graph=True``) differentiates the plain math
    instead (:func:`~visattn.layers._double_backward.twice_differentiable`; the fused path's
    result and first backward are unchanged). Under ``torch.func`` transforms with autograd on
    (``grad``, ``vmap`` of ``grad``, ``hessian``), where that switch cannot be made, the plain math
    runs."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if reference:
        return _attend_plain(q, k, v, mask, scale=scale)
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return _attend_fused(q, k, v, mask, scale=scale)
    if torch._C._are_functorch_transforms_active():
        if torch.is_grad_enabled():
            return _attend_plain(q, k, v, mask, scale=scale)
        return _attend_fused(q, k, v, mask, scale=scale)
    return twice_differentiable(partial(_attend_fused, scale=scale), partial(_attend_plain, scale=scale),
                                q, k, v, mask)


def _attend_fused(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, *,
                  scale: float) -> torch.Tensor:
    """:func:`attend` by ``scaled_dot_product_attention`` (its fused kernels where they apply)."""
    # the fused (flash) CPU kernel needs unit stride in the last dim; otherwise SDPA silently
    # falls back to the math path, which materialises the L x S matrix
    # and equal q/k and v widths: zero-pad the narrower side (scores and outputs unchanged)
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    dk, dv = q.shape[-1], v.shape[-1]
    if dk < dv:
        q, k = F.pad(q, (0, dv - dk)), F.pad(k, (0, dv - dk))
    elif dv < dk:
        v = F.pad(v, (0, dk - dv))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)[..., :dv]


def _attend_plain(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, *,
                  scale: float) -> torch.Tensor:
    """:func:`attend` in plain operations (the full ``L x S`` matrix; differentiable at any order)."""
    s = (q @ k.transpose(-2, -1)) * scale
    if mask is not None:
        s = s + mask
    return s.softmax(-1) @ v


class RowChunks:
    """Take rows of one source tensor in several ``index_select`` calls (cache-sized chunks) while
    its gradient is built once. Autograd would give every chunk's backward its own zero-filled
    copy of the whole source and then add them up (``chunks`` full-size fills and adds); here the
    chunks ``index_add`` into one shared buffer, handed to autograd by the last chunk's backward.

    Use one instance per source and forward, and take exactly ``chunks`` chunks; every chunk's
    output must reach the loss (as it does when the chunks are concatenated). A backward that
    builds a graph (``create_graph=True``) gives each chunk its own gradient (differentiable), and
    a pass that stopped part-way (an error in another node) is discarded when the next begins.
    Without autograd (no grad, a source that needs none, or inside a ``torch.func`` transform) it
    is a plain ``index_select``."""

    def __init__(self, rows: torch.Tensor, chunks: int) -> None:
        self.rows = rows
        self.chunks = chunks
        self.grad: torch.Tensor | None = None
        self.seen: set[int] = set()  # chunks whose gradient is in ``grad`` in this backward pass
        self.taken = 0
        self.tracked = (chunks > 1 and torch.is_grad_enabled() and rows.requires_grad
                        and not torch._C._are_functorch_transforms_active())

    def take(self, index: torch.Tensor) -> torch.Tensor:
        """``rows.index_select(0, index)``."""
        if not self.tracked:
            return self.rows.index_select(0, index)
        self.taken += 1
        return _TakeRows.apply(self.rows, index, self, self.taken - 1)

    def _backward(self, chunk: int, index: torch.Tensor, grad: torch.Tensor) -> torch.Tensor | None:
        if torch.is_grad_enabled():  # building a graph of the backward: one differentiable gradient each
            return grad.new_zeros(self.rows.shape).index_add(0, index, grad)
        if chunk in self.seen:  # a new pass over a retained graph after one that stopped part-way
            self.grad, self.seen = None, set()
        if self.grad is None:
            self.grad = grad.new_zeros(self.rows.shape)
        self.grad.index_add_(0, index, grad)
        self.seen.add(chunk)
        if len(self.seen) < self.chunks:
            return None  # no gradient from this chunk yet: it is in the shared buffer
        grad, self.grad, self.seen = self.grad, None, set()  # ready for a retained graph
        return grad


class _TakeRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows: torch.Tensor, index: torch.Tensor, chunks: RowChunks, chunk: int) -> torch.Tensor:
        ctx.save_for_backward(index)
        ctx.chunks, ctx.chunk = chunks, chunk
        return rows.index_select(0, index)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (index,) = ctx.saved_tensors
        return ctx.chunks._backward(ctx.chunk, index, grad), None, None, None


# --------------------------------------------------------------------------------------------------
# Recording attention for visattn.explain: only ever called when a block's ``_capture`` is set.


def attention_probs(q: torch.Tensor, k: torch.Tensor, *, scale: float | None = None,
                    mask: torch.Tensor | None = None) -> torch.Tensor:
    """``softmax(q k^T * scale + mask)`` in float32 plain math, ``(..., L, S)``: the probabilities
    :func:`attend` applies (its fused path never forms them). For capture only."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = (q.float() @ k.float().transpose(-2, -1)) * scale
    if mask is not None:
        s = s + mask.float()
    return s.softmax(-1)


def spread_to_grid(m: torch.Tensor, size: tuple[int, int], stride: int = 1) -> torch.Tensor:
    """``(N, h', w')`` values of key cells that each summarise ``stride x stride`` positions of an
    ``(H, W)`` map (the bottom/right cells may be cut by the map's edge: zero padding) ->
    ``(N, H, W)``, each cell's value shared evenly by the real positions it covers (a distribution
    over keys stays a distribution over positions)."""
    if stride == 1:
        return m
    h, w = size
    kh, kw = m.shape[-2:]
    ny = (h - stride * torch.arange(kh, device=m.device)).clamp(max=stride)  # real rows per cell
    nx = (w - stride * torch.arange(kw, device=m.device)).clamp(max=stride)
    m = m / (ny[:, None] * nx[None, :]).to(m.dtype)
    return m.repeat_interleave(stride, 1).repeat_interleave(stride, 2)[:, :h, :w]


def attention_totals(q: torch.Tensor, k: torch.Tensor, *, query: int | None = None,
                     scale: float | None = None, mask: torch.Tensor | None = None,
                     rows: int = 1024) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The attention each key receives and the attention one query pays, without ever forming the
    whole ``L x S`` matrix (``rows`` queries at a time, float32).

    ``q``: ``(N, heads, L, d)``; ``k``: ``(N, heads, S, d)``; ``mask`` as for :func:`attend`.
    Returns ``received`` ``(N, S)`` (probabilities summed over queries, averaged over heads, divided
    by ``L``: a distribution over keys) and the row of query index ``query`` averaged over heads,
    ``(N, S)`` (``None`` without a query).
    """
    n, heads, length, _ = q.shape

    def rows_of(t: torch.Tensor | None, start: int, stop: int) -> torch.Tensor | None:
        return t if t is None or t.ndim < 2 or t.shape[-2] == 1 else t[..., start:stop, :]

    received = q.new_zeros(n, k.shape[2], dtype=torch.float32)
    for start in range(0, length, rows):
        p = attention_probs(q[:, :, start:start + rows], k, scale=scale,
                            mask=rows_of(mask, start, start + rows))  # (N, heads, rows, S)
        received += p.sum((1, 2))
    received /= heads * length
    row = None
    if query is not None:
        row = attention_probs(q[:, :, query:query + 1], k, scale=scale,
                              mask=rows_of(mask, query, query + 1)).mean(1)[:, 0]  # (N, S)
    return received, row


def record_attention(capture, q: torch.Tensor, k: torch.Tensor, *, size: tuple[int, int],
                     scale: float | None = None, mask: torch.Tensor | None = None,
                     key_stride: int = 1, rows: int = 1024) -> None:
    """Record ``"received"`` and (with a query point) ``"query"`` of a softmax attention of every
    position of an ``(H, W)`` map over keys on the same map, or on a ``key_stride``-reduced grid of
    it (``ceil(H / stride) x ceil(W / stride)`` keys, as spatial-reduction attention has).

    ``q``: ``(N, heads, H*W, d)``; ``k``: ``(N, heads, S, d)``; ``mask`` as for :func:`attend`
    (the same ``scale`` and ``mask`` the block gives :func:`attend`). Computed by
    :func:`attention_totals` in plain float32 math, for the captured layer only; keys on a reduced
    grid are spread over the positions they summarise (:func:`spread_to_grid`).
    """
    n, _, length, _ = q.shape
    h, w = size
    kh, kw = -(-h // key_stride), -(-w // key_stride)
    if length != h * w or k.shape[2] != kh * kw:
        raise ValueError(f"record_attention: q has {length} queries and k {k.shape[2]} keys, expected "
                         f"{h * w} and {kh * kw} for a {h}x{w} map with key_stride {key_stride}")
    received, row = attention_totals(q, k, query=capture.query_index(h, w), scale=scale, mask=mask,
                                     rows=rows)
    capture.add("received", spread_to_grid(received.view(n, kh, kw), size, key_stride))
    if row is not None:
        capture.add("query", spread_to_grid(row.view(n, kh, kw), size, key_stride))
