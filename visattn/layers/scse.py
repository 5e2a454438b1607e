"""scSE: a channel squeeze-and-excitation gate and a spatial (1x1 conv) gate applied concurrently
and combined.

Paper: Roy, Navab, Wachinger. "Concurrent Spatial and Channel 'Squeeze & Excitation' in Fully
Convolutional Networks", MICCAI 2018. https://arxiv.org/abs/1803.02579
"""
from __future__ import annotations

import torch
from torch import nn

from ._base import AttentionBlock, check_int, get_act_layer

__all__ = ["SpatialChannelSE"]


class SpatialChannelSE(AttentionBlock):
    """``cSE(x) + sSE(x) = x * (sigmoid(W2 relu(W1 avg_hw(x))) + sigmoid(conv_1x1(x)))``.

    Args:
        channels: input channels C.
        reduction: channel squeeze ratio of cSE (paper: 2; often 16 in backbones).
        mode: ``"add"`` (the MICCAI paper) or ``"max"`` (element-wise max, found best in the
            authors' follow-up, TMI 2019).
        act_layer: hidden activation of cSE.
    """

    def __init__(
        self,
        channels: int,
        *,
        reduction: int = 2,
        mode: str = "add",
        act_layer: str | type[nn.Module] = "relu",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if mode not in ("add", "max"):
            raise ValueError(f"SpatialChannelSE mode must be 'add' or 'max', got {mode!r}")
        self.channels = check_int(channels, "channels", "SpatialChannelSE")
        check_int(reduction, "reduction", "SpatialChannelSE")
        dd = {"device": device, "dtype": dtype}
        self.mode = mode
        mid = max(1, channels // reduction)
        self.fc1 = nn.Conv2d(channels, mid, 1, **dd)
        self.act = get_act_layer(act_layer)
        self.fc2 = nn.Conv2d(mid, channels, 1, **dd)
        self.spatial = nn.Conv2d(channels, 1, 1, **dd)

    def _forward(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        gc = torch.sigmoid(self.fc2(self.act(self.fc1(x.mean((2, 3), keepdim=True)))))  # (N, C, 1, 1)
        gs = torch.sigmoid(self.spatial(x))  # (N, 1, H, W)
        if self._capture is not None:
            self._capture.add("channel", gc.flatten(1))
            self._capture.add("spatial", gs[:, 0])
        if self.mode == "add":
            return torch.mul(x, gc + gs, out=out)  # x*gc + x*gs in one pass
        # max(x*gc, x*gs) = x * (max(gc, gs) if x >= 0 else min(gc, gs)): keep the plain form
        y = torch.maximum(x * gc, x * gs)
        return y if out is None else out.copy_(y)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, mode={self.mode!r}"
