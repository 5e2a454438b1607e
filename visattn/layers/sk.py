"""Selective Kernel: parallel convolution branches of different receptive fields, fused by a
softmax attention across branches computed from their pooled sum (adaptive receptive field).

Paper: Li, Wang, Hu, Yang. "Selective Kernel Networks", CVPR 2019. https://arxiv.org/abs/1903.06586
"""
from __future__ import annotations

from collections.abc import Sequence

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

__all__ = ["SelectiveKernel"]


class _ConvBnAct(nn.Sequential):
    def __init__(self, cin: int, cout: int, kernel_size: int, dilation: int, groups: int,
                 act_layer, dd) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, padding=dilation * (kernel_size - 1) // 2,
                              dilation=dilation, groups=groups, bias=False, **dd)
        self.bn = SafeBatchNorm2d(cout, **dd)
        self.act = get_act_layer(act_layer)


class SelectiveKernel(AttentionBlock):
    """Split -> fuse -> select over ``len(kernel_size)`` branches.

    Each branch is conv-BN-act with its own kernel (a kxk kernel becomes a dilated 3x3 when
    ``keep_3x3``). The branch outputs U_i are summed, pooled and squeezed to ``rd_channels``, then
    expanded to one logit per branch and channel; a softmax across branches gives the weights a_i,
    and the output is ``sum_i a_i * U_i``. Unlike the gate blocks this block *is* a convolution
    layer: it replaces a 3x3 conv in a bottleneck rather than rescaling its input.

    Args:
        channels: input and output channels C.
        kernel_size: one kernel size per branch (paper: 3 and 5).
        groups: groups of each branch convolution (paper: 32 for SKNet-50).
        rd_ratio / rd_channels / rd_divisor: width of the squeezed descriptor (paper: C/16, >= 32).
        keep_3x3: express a kxk kernel as a 3x3 with dilation (k-1)/2 (the paper's cheaper form).
        split_input: feed each branch 1/num_paths of the input channels (timm's default, fewer
            parameters); otherwise every branch sees all channels.
        act_layer: activation after each BatchNorm.

    Same parameter layout and defaults as ``timm.layers.SelectiveKernel`` (``paths``, ``attn``).

    Captured (:mod:`visattn.explain`): ``"channel"`` ``(N, C)`` is the selection weight of the
    last (widest) kernel per channel, in ``[0, 1]``: 1 means the channel looked at the widest
    context, ``1 / num_paths`` an even mix.
    """

    def __init__(
        self,
        channels: int,
        *,
        kernel_size: Sequence[int] = (3, 5),
        groups: int = 1,
        rd_ratio: float = 1.0 / 16,
        rd_channels: int | None = None,
        rd_divisor: int = 8,
        keep_3x3: bool = True,
        split_input: bool = True,
        act_layer: str | type[nn.Module] = "relu",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        name = "SelectiveKernel"
        self.channels = check_int(channels, "channels", name)
        if isinstance(kernel_size, (str, bytes)) or not isinstance(kernel_size, Sequence):
            raise TypeError(f"{name}: kernel_size must be a sequence of >= 2 odd ints (one per "
                            f"branch), got {kernel_size!r}")
        kernel_size = [check_odd(k, "kernel_size", name) for k in kernel_size]
        if len(kernel_size) < 2:
            raise ValueError(f"{name} needs >= 2 odd kernel sizes (kernel_size), got {kernel_size}")
        check_int(groups, "groups", name)
        check_float(rd_ratio, "rd_ratio", name)
        check_int(rd_channels, "rd_channels", name, optional=True)
        check_int(rd_divisor, "rd_divisor", name)
        dd = {"device": device, "dtype": dtype}
        self.num_paths = len(kernel_size)
        self.split_input = split_input
        if split_input and channels % self.num_paths:
            raise ValueError(
                f"SelectiveKernel with split_input=True needs channels ({channels}) divisible by "
                f"the number of branches ({self.num_paths})")
        cin = channels // self.num_paths if split_input else channels
        groups = min(groups, cin)
        if cin % groups or channels % groups:
            raise ValueError(f"SelectiveKernel: groups={groups} must divide the branch input "
                             f"({cin}) and output ({channels}) channels")
        if keep_3x3:
            dilations, kernel_size = [(k - 1) // 2 for k in kernel_size], [3] * self.num_paths
        else:
            dilations = [1] * self.num_paths
        self.paths = nn.ModuleList(
            _ConvBnAct(cin, channels, k, d, groups, act_layer, dd) for k, d in zip(kernel_size, dilations)
        )
        attn_channels = rd_channels or make_divisible(channels * rd_ratio, rd_divisor)
        self.attn = nn.Module()
        self.attn.fc_reduce = nn.Conv2d(channels, attn_channels, 1, bias=False, **dd)
        self.attn.bn = SafeBatchNorm2d(attn_channels, **dd)
        self.attn.act = get_act_layer(act_layer)
        self.attn.fc_select = nn.Conv2d(attn_channels, channels * self.num_paths, 1, bias=False, **dd)

    def _forward(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        n, c = x.shape[:2]
        inputs = x.chunk(self.num_paths, 1) if self.split_input else [x] * self.num_paths
        u = torch.stack([path(xi) for path, xi in zip(self.paths, inputs)], 1)  # (N, P, C, H, W)
        s = u.sum(1).mean((2, 3), keepdim=True)  # (N, C, 1, 1)
        a = self.attn
        z = a.fc_select(a.act(a.bn(a.fc_reduce(s))))  # (N, P*C, 1, 1)
        w = z.view(n, self.num_paths, c, 1, 1).softmax(1)  # (N, P, C, 1, 1)
        if self._capture is not None:  # the weight each channel gives its widest kernel
            self._capture.add("channel", w[:, -1].view(n, c))
        y = (u * w).sum(1)  # (N, C, H, W)
        return y if out is None else out.copy_(y)
