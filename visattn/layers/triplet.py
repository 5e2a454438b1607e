"""Triplet Attention: three branches capture the (C, W), (H, C) and (H, W) interactions with a
Z-pool (max and mean) and a 7x7 conv each, and the three gated results are averaged.

Paper: Misra, Nalamada, Arasanipalai, Hou. "Rotate to Attend: Convolutional Triplet Attention
Module", WACV 2021. https://arxiv.org/abs/2010.03045
"""
from __future__ import annotations

import torch
from torch import nn

from ._base import AttentionBlock, SafeBatchNorm2d, check_int, check_odd

__all__ = ["TripletAttention"]


class _ZPoolGate(nn.Module):
    """``sigmoid(BN(conv_k([max, mean])))`` over a pooled ``(N, 2, A, B)`` map -> ``(N, 1, A, B)``."""

    def __init__(self, kernel_size: int, dd) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False, **dd)
        self.bn = SafeBatchNorm2d(1, eps=1e-5, momentum=0.01, **dd)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(pooled)).sigmoid()


def _zpool(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Max and mean over ``dim`` stacked as two channels: ``(N, C, H, W)`` -> ``(N, 2, ., .)``."""
    return torch.stack([x.amax(dim), x.mean(dim)], 1)


class TripletAttention(AttentionBlock):
    """``x * (g_cw + g_hc + g_hw) / 3`` with each gate broadcast back to ``(N, C, H, W)``.

    The paper rotates the tensor so each branch pools one axis away; rotating only the small pooled
    maps gives the same gates (each conv sees its plane in the paper's orientation, so weights of
    the official implementation load unchanged) without permuting the full tensor.

    Args:
        channels: input channels (any count works: the block has no per-channel weights).
        kernel_size: odd kernel of the three branch convolutions (paper: 7).
        no_spatial: drop the (H, W) branch and average the other two.
    """

    def __init__(self, channels: int | None = None, *, kernel_size: int = 7, no_spatial: bool = False,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        check_int(channels, "channels", "TripletAttention", optional=True)
        check_odd(kernel_size, "kernel_size", "TripletAttention")
        dd = {"device": device, "dtype": dtype}
        self.channels = None  # gates are channel-count agnostic
        self.cw = _ZPoolGate(kernel_size, dd)
        self.hc = _ZPoolGate(kernel_size, dd)
        self.hw = None if no_spatial else _ZPoolGate(kernel_size, dd)

    def _forward(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        # (C, W) plane, pooled over H: gate (N, 1, C, W) -> (N, C, 1, W)
        g = self.cw(_zpool(x, 2)).transpose(1, 2)
        # (H, C) plane, pooled over W: the paper's (N, W, H, C) rotation; gate (N, 1, H, C) -> (N, C, H, 1)
        g = g + self.hc(_zpool(x, 3).transpose(2, 3)).permute(0, 3, 2, 1)
        if self.hw is not None:
            g = g + self.hw(_zpool(x, 1))  # (N, 1, H, W)
            if self._capture is not None:
                self._capture.add("spatial", g.mean(1) / 3)  # (N, H, W): mean over channels
            return torch.mul(x, g.div_(3) if not g.requires_grad else g / 3, out=out)
        if self._capture is not None:
            self._capture.add("spatial", g.mean(1) / 2)
        return torch.mul(x, g / 2, out=out)
