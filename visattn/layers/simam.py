"""SimAM: a parameter-free 3-D attention from an energy function (neuroscience's spatial suppression).

Paper: Yang, Zhang, Li, Xie. "SimAM: A Simple, Parameter-Free Attention Module for Convolutional
Neural Networks", ICML 2021. http://proceedings.mlr.press/v139/yang21o.html
"""
from __future__ import annotations

import torch

from ._base import AttentionBlock, check_float, check_int

__all__ = ["SimAM"]


class SimAM(AttentionBlock):
    """``x * sigmoid(1/e*)`` with the closed-form inverse minimal energy of each neuron:

        d = (x - mean_hw(x))^2,  var = sum_hw(d) / (H*W - 1),  1/e* = d / (4 (var + lambda)) + 1/2

    Args:
        channels: accepted for a uniform signature; any channel count works (no weights).
        e_lambda: the regulariser lambda (paper: 1e-4).

    On a 1x1 map ``H*W - 1`` is 0; the denominator is clamped to 1 (d is 0 there, so the gate is
    sigmoid(1/2) instead of NaN).
    """

    def __init__(self, channels: int | None = None, *, e_lambda: float = 1e-4,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        check_int(channels, "channels", "SimAM", optional=True)
        self.channels = None  # parameter-free: any channel count
        self.e_lambda = check_float(e_lambda, "e_lambda", "SimAM")

    def _forward(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        h, w = x.shape[-2:]
        d = (x - x.mean((2, 3), keepdim=True)).square()  # (N, C, H, W)
        var = d.sum((2, 3), keepdim=True) / max(h * w - 1, 1)  # (N, C, 1, 1)
        scale = 4 * (var + self.e_lambda)
        if torch.is_grad_enabled():
            gate = torch.sigmoid(d / scale + 0.5)
        else:  # inference: reuse d's memory instead of three more full-size temporaries
            gate = d.div_(scale).add_(0.5).sigmoid_()
        if self._capture is not None:
            self._capture.add("spatial", gate.mean(1))  # (N, H, W): mean over channels
        return torch.mul(x, gate, out=out)

    def extra_repr(self) -> str:
        return f"e_lambda={self.e_lambda}"
