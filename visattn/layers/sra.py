"""Spatial-reduction attention: queries at full resolution, keys and values from a map downsampled
by a strided convolution, as in the Pyramid Vision Transformer.

Paper: Wang, Xie, Li, Fan, Song, Liang, Lu, Luo, Shao. "Pyramid Vision Transformer: A Versatile
Backbone for Dense Prediction without Convolutions", ICCV 2021. https://arxiv.org/abs/2102.12122
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._attention import attend, check_heads, merge_heads, record_attention, split_heads
from ._base import AttentionBlock, check_int

__all__ = ["SpatialReductionAttention"]


class SpatialReductionAttention(AttentionBlock):
    """``x + proj(MHA(q = W_q x, k, v = W_{k,v} LN(SR(x))))`` with ``SR`` a ``sr_ratio`` x
    ``sr_ratio`` convolution of stride ``sr_ratio``: keys and values shrink by ``sr_ratio^2``.

    A map whose sides are not multiples of ``sr_ratio`` is zero-padded at the bottom/right before
    the reduction (so any size works, 1x1 included).

    Captured (:mod:`visattn.explain`): keys live on the reduced grid; each key's attention is
    shared evenly by the ``sr_ratio x sr_ratio`` positions it summarises, so ``"received"`` and
    ``"query"`` are maps of the full-resolution input (padding's share dropped).

    Args:
        channels: input channels C.
        sr_ratio: spatial reduction of keys/values (PVT: 8, 4, 2, 1 over its four stages).
        heads: number of heads (must divide C); default: the most of 8/4/2 with >= 16 channels each.
        qkv_bias: biases in the q/kv projections.
    """

    def __init__(self, channels: int, *, sr_ratio: int = 2, heads: int | None = None,
                 qkv_bias: bool = True, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        check_int(sr_ratio, "sr_ratio", "SpatialReductionAttention")
        dd = {"device": device, "dtype": dtype}
        self.channels = channels
        self.sr_ratio = sr_ratio
        self.heads = check_heads(channels, heads, "SpatialReductionAttention")
        self.reference = False
        self.q = nn.Linear(channels, channels, bias=qkv_bias, **dd)
        self.kv = nn.Linear(channels, 2 * channels, bias=qkv_bias, **dd)
        self.proj = nn.Linear(channels, channels, **dd)
        if sr_ratio > 1:
            self.sr = nn.Conv2d(channels, channels, sr_ratio, stride=sr_ratio, **dd)
            self.norm = nn.LayerNorm(channels, **dd)
        else:
            self.sr = self.norm = None

    def _forward(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        n, c, h, w = x.shape
        tokens = x.flatten(2).transpose(1, 2)  # (N, HW, C)
        if self.sr is not None:
            r = self.sr_ratio
            reduced = self.sr(F.pad(x, (0, (-w) % r, 0, (-h) % r)))  # (N, C, H/r, W/r)
            kv_in = self.norm(reduced.flatten(2).transpose(1, 2))  # (N, HW/r^2, C)
        else:
            kv_in = tokens
        q = split_heads(self.q(tokens), self.heads)
        k, v = (split_heads(z, self.heads) for z in self.kv(kv_in).chunk(2, -1))
        if self._capture is not None:
            record_attention(self._capture, q, k, size=(h, w), key_stride=self.sr_ratio)
        y = self.proj(merge_heads(attend(q, k, v, reference=self.reference)))  # (N, HW, C)
        return torch.add(x, y.transpose(1, 2).reshape(n, c, h, w), out=out)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, sr_ratio={self.sr_ratio}, heads={self.heads}"
