"""Multi-head self-attention over all H*W positions of a feature map, with fixed 2-D sin-cos
positions added to queries and keys.

Papers: Vaswani et al. "Attention Is All You Need", NeurIPS 2017 (https://arxiv.org/abs/1706.03762);
positions on feature maps as in Carion et al. "End-to-End Object Detection with Transformers" (DETR),
ECCV 2020 (https://arxiv.org/abs/2005.12872).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._attention import attend, check_heads, check_pos_embed, project_qkv, record_attention
from ._base import AttentionBlock

__all__ = ["MultiHeadSelfAttention"]


class MultiHeadSelfAttention(AttentionBlock):
    """``x + proj(MHSA(x))`` with ``q, k = W_{q,k}(x + p)``, ``v = W_v x`` and ``p`` the 2-D sin-cos
    encoding of each position.

    Runs through ``scaled_dot_product_attention``, so the (HW x HW) matrix is never kept;
    ``self.reference = True`` switches to the plain softmax formula (for tests).

    Args:
        channels: input channels C.
        heads: number of heads (must divide C); default: the most of 8/4/2 with >= 16 channels each.
        qkv_bias: biases in the q/k/v projection.
        pos_embed: ``"sincos"`` or ``"none"``.
    """

    def __init__(self, channels: int, *, heads: int | None = None, qkv_bias: bool = True,
                 pos_embed: str = "sincos", device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        check_pos_embed(pos_embed, "MultiHeadSelfAttention")
        dd = {"device": device, "dtype": dtype}
        self.channels = channels
        self.heads = check_heads(channels, heads, "MultiHeadSelfAttention")
        self.pos_embed = pos_embed
        self.reference = False
        self.qkv = nn.Conv2d(channels, 3 * channels, 1, bias=qkv_bias, **dd)
        self.proj = nn.Conv2d(channels, channels, 1, **dd)

    def _forward(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        n, c, h, w = x.shape
        q, k, v = project_qkv(self.qkv, x, self.heads, self.pos_embed)  # (N, heads, HW, C/heads)
        if self._capture is not None:
            record_attention(self._capture, q, k, size=(h, w))
        y = attend(q, k, v, reference=self.reference)  # (N, heads, HW, C/heads)
        y = y.transpose(-2, -1).reshape(n, c, h, w)
        return torch.add(x, F.conv2d(y, self.proj.weight, self.proj.bias), out=out)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, heads={self.heads}, pos_embed={self.pos_embed!r}"
