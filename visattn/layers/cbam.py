"""CBAM: channel attention (avg- and max-pooled MLP) followed by spatial attention (7x7 conv over
channel-pooled maps).

Paper: Woo, Park, Lee, Kweon. "CBAM: Convolutional Block Attention Module", ECCV 2018.
https://arxiv.org/abs/1807.06521
"""
from __future__ import annotations

import torch
from torch import nn

from ._base import (
    AttentionBlock,
    SafeBatchNorm2d,
    check_float,
    check_int,
    check_odd,
    get_act_layer,
    make_divisible,
)

__all__ = ["CBAM", "CbamChannelGate", "CbamSpatialGate"]


def _max(x: torch.Tensor, dim: int, keepdim: bool = False) -> torch.Tensor:
    """Max over ``dim``. With autograd, ``max`` with indices: its backward is a scatter, far cheaper
    than ``amax``'s full-size equality mask. Without, ``amax``, whose forward is ~15x faster."""
    if torch.is_grad_enabled() and x.requires_grad:
        return x.max(dim, keepdim=keepdim).values
    return x.amax(dim, keepdim=keepdim)


class CbamChannelGate(nn.Module):
    """``sigmoid(MLP(avg_hw(x)) + MLP(max_hw(x)))`` -> ``(N, C, 1, 1)``; one MLP shared by both."""

    def __init__(self, channels: int, rd_channels: int, act_layer, gate_layer, bias: bool, dd) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(channels, rd_channels, 1, bias=bias, **dd)
        self.act = get_act_layer(act_layer)
        self.fc2 = nn.Conv2d(rd_channels, channels, 1, bias=bias, **dd)
        self.gate = get_act_layer(gate_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c = x.shape[:2]
        flat = x.flatten(2)  # (N, C, HW)
        # both pools go through the MLP as one (2N, C, 1, 1) batch
        pooled = torch.cat([flat.mean(2), _max(flat, 2)]).view(2 * n, c, 1, 1)
        y = self.fc2(self.act(self.fc1(pooled)))  # (2N, C, 1, 1)
        return self.gate(y[:n] + y[n:])


class CbamSpatialGate(nn.Module):
    """``sigmoid(BN(conv_k([max_c(x), mean_c(x)])))`` -> ``(N, 1, H, W)``.

    As the authors' code (``ChannelPool``, ``BasicConv``): max before mean in the pooled map, and
    BatchNorm momentum 0.01, so their weights load unchanged. (timm's ``CbamModule`` pools
    ``[mean, max]`` with momentum 0.1; :func:`visattn.timm_compat.load_timm_weights` swaps the two
    input channels of the conv.)
    """

    def __init__(self, kernel_size: int, gate_layer, dd) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False, **dd)
        self.bn = SafeBatchNorm2d(1, eps=1e-5, momentum=0.01, **dd)
        self.gate = get_act_layer(gate_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        stats = torch.cat([_max(x, 1, keepdim=True), x.mean(1, keepdim=True)], 1)  # (N, 2, H, W)
        return self.gate(self.bn(self.conv(stats)))


class CBAM(AttentionBlock):
    """``x' = x * Mc(x)``, then ``x' * Ms(x')`` (channel first, then spatial, as in the paper).

    Args:
        channels: input channels C.
        rd_ratio / rd_channels / rd_divisor: hidden width of the shared channel MLP (paper: C/16).
        spatial_kernel_size: odd kernel of the spatial convolution (paper: 7).
        act_layer, gate_layer: activations by name or class.
        mlp_bias: biases in the channel MLP.

    The spatial gate follows the authors' code (Park, Woo et al., github.com/Jongchan/
    attention-module): its pooled map is ``[max, mean]`` and its BatchNorm has momentum 0.01, so
    the authors' weights load as they are. Parameter names match ``timm.layers.CbamModule``
    (``channel.fc1/fc2``, ``spatial.conv``) except the spatial BatchNorm, here ``spatial.bn``; timm
    orders the pooled map ``[mean, max]``, which :func:`visattn.timm_compat.load_timm_weights`
    converts.
    """

    def __init__(
        self,
        channels: int,
        *,
        rd_ratio: float = 1.0 / 16,
        rd_channels: int | None = None,
        rd_divisor: int = 1,
        spatial_kernel_size: int = 7,
        act_layer: str | type[nn.Module] = "relu",
        gate_layer: str | type[nn.Module] = "sigmoid",
        mlp_bias: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.channels = check_int(channels, "channels", "CBAM")
        check_float(rd_ratio, "rd_ratio", "CBAM")
        check_int(rd_channels, "rd_channels", "CBAM", optional=True)
        check_int(rd_divisor, "rd_divisor", "CBAM")
        check_odd(spatial_kernel_size, "spatial_kernel_size", "CBAM")
        dd = {"device": device, "dtype": dtype}
        rd_channels = rd_channels or make_divisible(channels * rd_ratio, rd_divisor, round_limit=0.0)
        self.channel = CbamChannelGate(channels, rd_channels, act_layer, gate_layer, mlp_bias, dd)
        self.spatial = CbamSpatialGate(spatial_kernel_size, gate_layer, dd)

    def _forward(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        gc = self.channel(x)  # (N, C, 1, 1)
        x = x * gc  # (N, C, H, W)
        gs = self.spatial(x)  # (N, 1, H, W)
        if self._capture is not None:
            self._capture.add("channel", gc.flatten(1))
            self._capture.add("spatial", gs[:, 0])
        return torch.mul(x, gs, out=out)
