"""Dual Attention: a position attention module (every position attends to every other) and a
channel attention module (every channel attends to every other), summed into the input.

Paper: Fu, Liu, Tian, Li, Bao, Fang, Lu. "Dual Attention Network for Scene Segmentation", CVPR 2019.
https://arxiv.org/abs/1809.02983
"""
from __future__ import annotations

import torch
from torch import nn

from ._attention import attend, record_attention
from ._base import AttentionBlock, check_int

__all__ = ["DualAttention"]


class DualAttention(AttentionBlock):
    """``x + gamma_p * PAM(x) + gamma_c * CAM(x)``, both gammas zero at initialisation (paper).

        PAM(x)_i = sum_j softmax_j(q_i . k_j) v_j   with q, k = 1x1 convs to C/8, v = 1x1 conv to C
        CAM(x)_c = sum_d softmax_d(max_d' E_cd' - E_cd) x_d   with E = X X^T over the HW positions

    PAM runs through ``scaled_dot_product_attention`` (scale 1, as in the paper), so the HW x HW
    matrix is never materialised; CAM's ``max - E`` equals ``-E`` under the softmax (it is shift
    invariant per row) and is computed that way.

    In the paper the two modules sit in parallel in a segmentation head, each with its own residual,
    and their outputs are summed; as a block we keep one residual so that the output equals the
    input at initialisation.

    Captured (:mod:`visattn.explain`): PAM's ``"received"`` / ``"query"`` (formed in plain math
    for the captured layer only), and ``"channel"``: the attention each channel receives in CAM,
    times C (1 for an even share).

    Args:
        channels: input channels C.
        reduction: query/key width C // reduction (paper: 8).
    """

    def __init__(self, channels: int, *, reduction: int = 8,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.channels = check_int(channels, "channels", "DualAttention")
        check_int(reduction, "reduction", "DualAttention")
        dd = {"device": device, "dtype": dtype}
        qk = max(1, channels // reduction)
        self.query = nn.Conv2d(channels, qk, 1, **dd)
        self.key = nn.Conv2d(channels, qk, 1, **dd)
        self.value = nn.Conv2d(channels, channels, 1, **dd)
        self.gamma_pos = nn.Parameter(torch.zeros(1, **dd))
        self.gamma_chan = nn.Parameter(torch.zeros(1, **dd))

    def position_attention(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        q = self.query(x).flatten(2).transpose(1, 2).unsqueeze(1)  # (N, 1, HW, C/r)
        k = self.key(x).flatten(2).transpose(1, 2).unsqueeze(1)  # (N, 1, HW, C/r)
        v = self.value(x).flatten(2).transpose(1, 2).unsqueeze(1)  # (N, 1, HW, C)
        if self._capture is not None:
            record_attention(self._capture, q, k, size=(h, w), scale=1.0)
        y = attend(q, k, v, scale=1.0)  # (N, 1, HW, C)
        return y.squeeze(1).transpose(1, 2).reshape(n, c, h, w)

    def channel_attention(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        flat = x.reshape(n, c, h * w)  # (N, C, HW)
        energy = torch.bmm(flat, flat.transpose(1, 2))  # (N, C, C)
        attn = torch.softmax(-energy, -1)  # (N, C, C)
        if self._capture is not None:  # attention each channel receives, times C (mean 1)
            self._capture.add("channel", attn.float().mean(1) * c)
        return torch.bmm(attn, flat).view(n, c, h, w)

    def _forward(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        y = x + self.gamma_pos * self.position_attention(x)
        return torch.addcmul(y, self.gamma_chan, self.channel_attention(x), out=out)
