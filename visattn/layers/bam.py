"""BAM: a channel gate (pooled MLP) and a spatial gate (dilated convs) added into one 3-D map, used
as a residual rescaling ``x * (1 + sigmoid(Mc + Ms))``.

Paper: Park, Woo, Lee, Kweon. "BAM: Bottleneck Attention Module", BMVC 2018.
https://arxiv.org/abs/1807.06514
"""
from __future__ import annotations

import torch
from torch import nn

from ._base import AttentionBlock, SafeBatchNorm2d, check_int, get_act_layer

__all__ = ["BottleneckAttention"]


class BottleneckAttention(AttentionBlock):
    """``x * (1 + sigmoid(Mc(x) + Ms(x)))`` following the paper's equations:

        Mc(x) = BN(W1 act(BN(W0 avg_hw(x))))                     -> (N, C, 1, 1)
        Ms(x) = BN(f_1x1(f_3x3,d(f_3x3,d(f_1x1(x)))))  (d=4)     -> (N, 1, H, W)

    The paper sums the two branches (the authors' released code multiplies them); we follow the
    paper.

    Captured (:mod:`visattn.explain`): the applied gate ``1 + sigmoid(Mc + Ms)`` (in ``[1, 2]``),
    averaged over positions as ``"channel"`` and over channels as ``"spatial"``.

    Args:
        channels: input channels C.
        reduction: the reduction ratio r of both branches (paper: 16).
        dilation: dilation d of the spatial 3x3 convolutions (paper: 4).
        num_dilated: number of dilated 3x3 convolutions (paper: 2).
        act_layer: hidden activation.
    """

    def __init__(
        self,
        channels: int,
        *,
        reduction: int = 16,
        dilation: int = 4,
        num_dilated: int = 2,
        act_layer: str | type[nn.Module] = "relu",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        name = "BottleneckAttention"
        self.channels = check_int(channels, "channels", name)
        check_int(reduction, "reduction", name)
        check_int(dilation, "dilation", name)
        check_int(num_dilated, "num_dilated", name, low=0)
        dd = {"device": device, "dtype": dtype}
        mid = max(1, channels // reduction)
        self.channel_gate = nn.Sequential(
            nn.Conv2d(channels, mid, 1, **dd), SafeBatchNorm2d(mid, **dd), get_act_layer(act_layer),
            nn.Conv2d(mid, channels, 1, **dd), SafeBatchNorm2d(channels, **dd),
        )
        layers: list[nn.Module] = [
            nn.Conv2d(channels, mid, 1, **dd), SafeBatchNorm2d(mid, **dd), get_act_layer(act_layer),
        ]
        for _ in range(num_dilated):
            layers += [nn.Conv2d(mid, mid, 3, padding=dilation, dilation=dilation, **dd),
                       SafeBatchNorm2d(mid, **dd), get_act_layer(act_layer)]
        layers += [nn.Conv2d(mid, 1, 1, **dd), SafeBatchNorm2d(1, **dd)]
        self.spatial_gate = nn.Sequential(*layers)

    def _forward(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        mc = self.channel_gate(x.mean((2, 3), keepdim=True))  # (N, C, 1, 1)
        ms = self.spatial_gate(x)  # (N, 1, H, W)
        att = torch.sigmoid(mc + ms)  # (N, C, H, W)
        if self._capture is not None:  # the applied gate 1 + att, averaged over positions / channels
            self._capture.add("channel", 1 + att.mean((2, 3)))
            self._capture.add("spatial", 1 + att.mean(1))
        if not att.requires_grad:
            att.add_(1)
            return torch.mul(x, att, out=out)
        return torch.mul(x, att + 1, out=out)
