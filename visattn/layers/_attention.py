"""Shared pieces of the token-attention blocks: head bookkeeping, 2-D sin-cos positions, and one
attention function with a fused path (``scaled_dot_product_attention``: no L x S matrix kept) and
a plain-math reference path that the tests compare it with."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._base import check_int

__all__ = ["attend", "default_heads", "merge_heads", "sincos_2d", "split_heads"]


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


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None,
           mask: torch.Tensor | None = None, reference: bool = False) -> torch.Tensor:
    """``softmax(q k^T * scale + mask) v`` over the last two dims.

    ``mask`` is additive (float, ``-inf`` where not allowed) and broadcasts to ``(..., L, S)``.
    ``reference=True`` computes it with the full matrix in plain operations (tests only)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if not reference:
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
    s = (q @ k.transpose(-2, -1)) * scale
    if mask is not None:
        s = s + mask
    return s.softmax(-1) @ v
