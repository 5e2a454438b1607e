"""Non-local block, embedded-Gaussian form: every position is a softmax-weighted sum of all others.

Paper: Wang, Girshick, Gupta, He. "Non-local Neural Networks", CVPR 2018. https://arxiv.org/abs/1711.07971
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._attention import attend, record_attention
from ._base import AttentionBlock, check_int

__all__ = ["NonLocal"]


class NonLocal(AttentionBlock):
    """``z = x + W_z y``, ``y_i = sum_j softmax_j(theta(x_i) . phi(x_j)) g(x_j)`` (eq. 1-3 of the paper).

    ``W_z`` starts at zero (the paper zero-initialises the BN after it), so the block is the
    identity when inserted. ``sub_sample`` max-pools phi and g by 2 (the paper's cheaper variant).

    Departure from the authors' code: their 2x2 max-pool rounds odd sizes down, dropping the last
    row or column of an odd map from the keys (and leaving a map one pixel high or wide with no
    key at all). We pool with ``ceil_mode=True``: the last row/column is pooled on its own, so
    every position can be attended to and any ``H, W >= 1`` works. On even sizes the two agree
    exactly (tested).

    Args:
        channels: input channels C.
        inter_channels: width of theta/phi/g (paper: C/2).
        sub_sample: 2x2 max-pool keys and values.
    """

    def __init__(self, channels: int, *, inter_channels: int | None = None, sub_sample: bool = False,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.channels = check_int(channels, "channels", "NonLocal")
        check_int(inter_channels, "inter_channels", "NonLocal", optional=True)
        self.inter_channels = inter_channels or max(1, channels // 2)
        self.sub_sample = sub_sample
        self.reference = False
        self.theta = nn.Conv2d(channels, self.inter_channels, 1, **dd)
        self.phi = nn.Conv2d(channels, self.inter_channels, 1, **dd)
        self.g = nn.Conv2d(channels, self.inter_channels, 1, **dd)
        self.w_z = nn.Conv2d(self.inter_channels, channels, 1, **dd)
        nn.init.zeros_(self.w_z.weight)
        nn.init.zeros_(self.w_z.bias)

    def _forward(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        n, _, h, w = x.shape
        kv_in = F.max_pool2d(x, 2, ceil_mode=True) if self.sub_sample else x
        q = self.theta(x).flatten(2).transpose(1, 2).unsqueeze(1)  # (N, 1, HW, C')
        k = self.phi(kv_in).flatten(2).transpose(1, 2).unsqueeze(1)  # (N, 1, S, C')
        v = self.g(kv_in).flatten(2).transpose(1, 2).unsqueeze(1)  # (N, 1, S, C')
        if self._capture is not None:  # with sub_sample a pooled key's mass is shared by its 2x2 cell
            record_attention(self._capture, q, k, size=(h, w), scale=1.0, key_stride=2 if self.sub_sample else 1)
        y = attend(q, k, v, scale=1.0, reference=self.reference)  # embedded Gaussian: no 1/sqrt(d)
        y = y.squeeze(1).transpose(1, 2).reshape(n, self.inter_channels, h, w)
        return torch.add(x, self.w_z(y), out=out)
