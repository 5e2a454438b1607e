"""Axial attention: self-attention along each row, then along each column, so every position
reaches the whole map in two steps at O(HW (H + W)) cost.

Papers: Ho, Kalchbrenner, Weissenborn, Salimans. "Axial Attention in Multidimensional
Transformers", 2019 (https://arxiv.org/abs/1912.12180); Wang et al. "Axial-DeepLab", ECCV 2020
(https://arxiv.org/abs/2003.07853).
"""
from __future__ import annotations

import torch
from torch import nn

from ._attention import attend, check_heads, merge_heads, split_heads
from ._base import AttentionBlock

__all__ = ["AxialAttention"]


class _AxisAttention(nn.Module):
    def __init__(self, channels: int, heads: int, qkv_bias: bool, dd) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(channels, 3 * channels, bias=qkv_bias, **dd)
        self.proj = nn.Linear(channels, channels, **dd)

    def forward(self, seq: torch.Tensor, reference: bool) -> torch.Tensor:
        q, k, v = (split_heads(z, self.heads) for z in self.qkv(seq).chunk(3, -1))  # (B, heads, L, d)
        return self.proj(merge_heads(attend(q, k, v, reference=reference)))  # (B, L, C)


class AxialAttention(AttentionBlock):
    """``y = x + RowAttn(x)``, then ``y + ColAttn(y)``; each a multi-head attention over one axis.

    No position encoding is added (the block is equivariant to permutations within a row or a
    column); stack it after convolutions, which supply position.

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

    def _forward(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        n, c, h, w = x.shape
        t = x.permute(0, 2, 3, 1)  # (N, H, W, C)
        t = t + self.row(t.reshape(n * h, w, c), self.reference).view(n, h, w, c)
        cols = t.transpose(1, 2).reshape(n * w, h, c)  # (N*W, H, C)
        t = t + self.col(cols, self.reference).view(n, w, h, c).transpose(1, 2)
        y = t.permute(0, 3, 1, 2)
        return y if out is None else out.copy_(y)
