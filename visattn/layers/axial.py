"""Axial attention: self-attention along each row, then along each column, so every position
reaches the whole map in two steps at O(HW (H + W)) cost.

Papers: Ho, Kalchbrenner, Weissenborn, Salimans. "Axial Attention in Multidimensional
Transformers", 2019 (https://arxiv.org/abs/1912.12180); Wang et al. "Axial-DeepLab", ECCV 2020
(https://arxiv.org/abs/2003.07853).
"""
from __future__ import annotations

import torch
from torch import nn

from ._attention import attend, attention_probs, check_heads, merge_heads, split_heads
from ._base import AttentionBlock

__all__ = ["AxialAttention"]


class _AxisAttention(nn.Module):
    def __init__(self, channels: int, heads: int, qkv_bias: bool, dd) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(channels, 3 * channels, bias=qkv_bias, **dd)
        self.proj = nn.Linear(channels, channels, **dd)

    def forward(self, seq: torch.Tensor, reference: bool, probs: list | None = None) -> torch.Tensor:
        q, k, v = (split_heads(z, self.heads) for z in self.qkv(seq).chunk(3, -1))  # (B, heads, L, d)
        if probs is not None:  # capturing: (B, L, L), mean over heads
            probs.append(attention_probs(q, k).mean(1))
        return self.proj(merge_heads(attend(q, k, v, reference=reference)))  # (B, L, C)


class AxialAttention(AttentionBlock):
    """``y = x + RowAttn(x)``, then ``y + ColAttn(y)``; each a multi-head attention over one axis.

    No position encoding is added (the block is equivariant to permutations within a row or a
    column); stack it after convolutions, which supply position.

    Captured (:mod:`visattn.explain`): the two-step attention the block composes, ignoring the
    residual paths: query ``(y, x)`` attends ``(y', x)`` in its column, which had attended
    ``(y', x')`` in its row, with weight ``col_x(y -> y') * row_y'(x -> x')`` (a distribution over
    the whole map, heads averaged per step). ``"received"`` is its mean over queries, ``"query"``
    the query point's row.

    Args:
        channels: input channels C.
        heads: number of heads (must divide C); default: the most of 8/4/2 with >= 16 channels each.
        qkv_bias: biases in the q/k/v projections.
    """

    def __init__(self, channels: int, *, heads: int | None = None, qkv_bias: bool = True,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.channels = channels
        self.heads = check_heads(channels, heads, "AxialAttention")
        self.reference = False
        self.row = _AxisAttention(channels, self.heads, qkv_bias, dd)
        self.col = _AxisAttention(channels, self.heads, qkv_bias, dd)

    def _record(self, row: torch.Tensor, col: torch.Tensor) -> None:
        """Record the two-step attention: ``row`` ``(N, H, W, W)`` (row y: query x -> key x'),
        ``col`` ``(N, W, H, H)`` (column x: query y -> key y')."""
        _, h, w, _ = row.shape
        # A[(y, x) -> (y', x')] = col[x, y, y'] * row[y', x, x']; received sums A over (y, x)
        received = torch.einsum("nxk,nkxj->nkj", col.sum(2), row) / (h * w)  # (N, H, W)
        self._capture.add("received", received)
        qi = self._capture.query_index(h, w)
        if qi is not None:
            qy, qx = divmod(qi, w)
            self._capture.add("query", col[:, qx, qy, :, None] * row[:, :, qx, :])  # (N, H, W)

    def _forward(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        n, c, h, w = x.shape
        probs = [] if self._capture is not None else None
        t = x.permute(0, 2, 3, 1)  # (N, H, W, C)
        t = t + self.row(t.reshape(n * h, w, c), self.reference, probs).view(n, h, w, c)
        cols = t.transpose(1, 2).reshape(n * w, h, c)  # (N*W, H, C)
        t = t + self.col(cols, self.reference, probs).view(n, w, h, c).transpose(1, 2)
        if probs is not None:
            self._record(probs[0].view(n, h, w, w), probs[1].view(n, w, h, h))
        y = t.permute(0, 3, 1, 2)
        return y if out is None else out.copy_(y)
