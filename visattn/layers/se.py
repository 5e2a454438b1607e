"""Squeeze-and-Excitation channel attention.

Paper: Hu, Shen, Sun. "Squeeze-and-Excitation Networks", CVPR 2018. https://arxiv.org/abs/1709.01507
"""
from __future__ import annotations

import torch
from torch import nn

from ._base import AttentionBlock, check_float, check_int, get_act_layer, make_divisible

__all__ = ["SqueezeExcite"]


class SqueezeExcite(AttentionBlock):
    """``x * sigmoid(W2 act(W1 mean_hw(x)))``: a per-channel gate from globally pooled features.

    Args:
        channels: input (and output) channels C.
        rd_ratio: hidden width of the MLP as a fraction of C (paper: 1/16).
        rd_channels: hidden width, overriding ``rd_ratio``.
        rd_divisor: round the hidden width to a multiple of this.
        act_layer: hidden activation (name or class).
        gate_layer: gate activation (name or class).
        bias: whether the two 1x1 convolutions have biases.

    Same parameter layout as ``timm.layers.SEModule`` (``fc1``, ``fc2``).

    Example:
        >>> block = SqueezeExcite(64)
        >>> block(torch.randn(2, 64, 7, 9)).shape
        torch.Size([2, 64, 7, 9])
    """

    # One cheap pooling read then one multiply: cache-blocking saves less than its per-chunk
    # overhead here (benchmarks/chunking.py, results in benchmarks/results/chunking-cpu.md).
    chunked_inference = False

    def __init__(
        self,
        channels: int,
        *,
        rd_ratio: float = 1.0 / 16,
        rd_channels: int | None = None,
        rd_divisor: int = 8,
        act_layer: str | type[nn.Module] = "relu",
        gate_layer: str | type[nn.Module] = "sigmoid",
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.channels = check_int(channels, "channels", "SqueezeExcite")
        check_float(rd_ratio, "rd_ratio", "SqueezeExcite")
        check_int(rd_channels, "rd_channels", "SqueezeExcite", optional=True)
        check_int(rd_divisor, "rd_divisor", "SqueezeExcite")
        dd = {"device": device, "dtype": dtype}
        rd_channels = rd_channels or make_divisible(channels * rd_ratio, rd_divisor, round_limit=0.0)
        self.fc1 = nn.Conv2d(channels, rd_channels, 1, bias=bias, **dd)
        self.act = get_act_layer(act_layer)
        self.fc2 = nn.Conv2d(rd_channels, channels, 1, bias=bias, **dd)
        self.gate = get_act_layer(gate_layer)

    def _forward(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        s = x.mean((2, 3), keepdim=True)  # (N, C, 1, 1)
        g = self.gate(self.fc2(self.act(self.fc1(s))))  # (N, C, 1, 1)
        if self._capture is not None:
            self._capture.add("channel", g.flatten(1))  # (N, C)
        return torch.mul(x, g, out=out)
