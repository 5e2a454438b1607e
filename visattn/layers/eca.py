"""Efficient Channel Attention: a 1-D convolution across pooled channels instead of an MLP.

Paper: Wang, Wu, Zhu, Li, Zuo, Hu. "ECA-Net: Efficient Channel Attention for Deep Convolutional
Neural Networks", CVPR 2020. https://arxiv.org/abs/1910.03151

The circular-padding variant (``circular=True``) is timm's CECA: channels have no edges.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ._base import AttentionBlock, check_float, check_int, check_odd, get_act_layer

__all__ = ["EfficientChannelAttention", "eca_kernel_size"]


def eca_kernel_size(channels: int, gamma: float = 2, beta: float = 1) -> int:
    """The paper's adaptive kernel size: ``|log2(C) + beta| / gamma`` rounded to an odd number >= 3."""
    t = int(abs(math.log2(channels) + beta) / gamma)
    return max(t if t % 2 else t + 1, 3)


class EfficientChannelAttention(AttentionBlock):
    """``x * sigmoid(conv1d_k(mean_hw(x)))`` with ``k`` chosen from C unless given.

    Args:
        channels: input channels C (sets the adaptive kernel size).
        kernel_size: odd 1-D kernel size; ``None`` picks it from C with ``gamma``/``beta``.
        gamma, beta: the paper's mapping from C to the kernel size.
        circular: pad the channel axis circularly (CECA) instead of with zeros.
        gate_layer: gate activation (name or class).

    Same parameter layout as ``timm.layers.EcaModule`` (``conv``).
    """

    # One cheap pooling read then one multiply: cache-blocking saves less than its per-chunk
    # overhead here (benchmarks/chunking.py, results in benchmarks/results/chunking-cpu.md).
    chunked_inference = False

    def __init__(
        self,
        channels: int,
        *,
        kernel_size: int | None = None,
        gamma: float = 2,
        beta: float = 1,
        circular: bool = False,
        gate_layer: str | type[nn.Module] = "sigmoid",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        name = "EfficientChannelAttention"
        self.channels = check_int(channels, "channels", name)
        check_float(gamma, "gamma", name)
        check_float(beta, "beta", name, low=-math.inf)
        k = kernel_size if kernel_size is not None else eca_kernel_size(channels, gamma, beta)
        check_odd(k, "kernel_size", name)
        self.circular = circular
        self.pad = (k - 1) // 2
        self.conv = nn.Conv1d(1, 1, k, padding=0 if circular else self.pad, bias=False,
                              device=device, dtype=dtype)
        self.gate = get_act_layer(gate_layer)

    def _forward(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        n, c = x.shape[:2]
        y = x.mean((2, 3)).view(n, 1, c)  # (N, 1, C): channels as a 1-D signal
        if self.circular:
            y = F.pad(y, (self.pad, self.pad), mode="circular")
        g = self.gate(self.conv(y)).view(n, c, 1, 1)
        if self._capture is not None:
            self._capture.add("channel", g.view(n, c))
        return torch.mul(x, g, out=out)
