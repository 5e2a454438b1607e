"""Coordinate Attention: channel attention factorised into two 1-D encodings along height and
width, so the gate keeps the position of objects along each axis.

Paper: Hou, Zhou, Feng. "Coordinate Attention for Efficient Mobile Network Design", CVPR 2021.
https://arxiv.org/abs/2103.02907
"""
from __future__ import annotations

import torch
from torch import nn

from ._base import AttentionBlock, SafeBatchNorm2d, check_int, get_act_layer

__all__ = ["CoordAttention"]


class CoordAttention(AttentionBlock):
    """``x * sigmoid(F_h(f)) * sigmoid(F_w(f))`` with ``f = act(BN(F_1([avg_w(x), avg_h(x)])))``.

    The two directional pools are concatenated along the spatial axis, share one 1x1 conv
    (C -> mip), and split again into a height gate ``(N, C, H, 1)`` and a width gate ``(N, C, 1, W)``.

    Args:
        channels: input channels C.
        reduction: ``mip = max(min_channels, C // reduction)`` (paper: 32, with a floor of 8).
        min_channels: floor of the hidden width.
        act_layer: hidden activation (paper: h-swish).
    """

    def __init__(
        self,
        channels: int,
        *,
        reduction: int = 32,
        min_channels: int = 8,
        act_layer: str | type[nn.Module] = "hard_swish",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.channels = check_int(channels, "channels", "CoordAttention")
        check_int(reduction, "reduction", "CoordAttention")
        check_int(min_channels, "min_channels", "CoordAttention")
        dd = {"device": device, "dtype": dtype}
        mip = max(min_channels, channels // reduction)
        self.conv1 = nn.Conv2d(channels, mip, 1, **dd)
        self.bn1 = SafeBatchNorm2d(mip, **dd)
        self.act = get_act_layer(act_layer)
        self.conv_h = nn.Conv2d(mip, channels, 1, **dd)
        self.conv_w = nn.Conv2d(mip, channels, 1, **dd)

    def _forward(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        h, w = x.shape[-2:]
        x_h = x.mean(3, keepdim=True)  # (N, C, H, 1)
        x_w = x.mean(2, keepdim=True).transpose(2, 3)  # (N, C, W, 1)
        f = self.act(self.bn1(self.conv1(torch.cat([x_h, x_w], 2))))  # (N, mip, H+W, 1)
        f_h, f_w = f.split([h, w], 2)
        g_h = self.conv_h(f_h).sigmoid()  # (N, C, H, 1)
        g_w = self.conv_w(f_w.transpose(2, 3)).sigmoid()  # (N, C, 1, W)
        if self._capture is not None:  # mean over channels of g_h * g_w, without the (N, C, H, W) product
            self._capture.add("spatial", torch.einsum("nch,ncw->nhw", g_h[..., 0], g_w[:, :, 0]) / g_h.shape[1])
        return torch.mul(x, g_h * g_w, out=out)
