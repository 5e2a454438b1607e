"""A depthwise convolution whose CPU weight gradient is summed over bands of rows.

PyTorch's CPU kernel for the weight gradient of a depthwise convolution slows down far faster
than the map grows once the map leaves the cache: for C=64 and a 5x5 kernel it takes about 12x
longer at 256x256 than at 128x128, while the input gradient and the forward grow 4x. Computing it
band by band (each band with its halo rows) keeps every call cache-sized, and the sum of the
bands' gradients is the weight gradient. The forward and the input gradient are PyTorch's own.
The value is the same either way (up to float summation order); only the time changes.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["BAND_BYTES", "depthwise_conv"]

#: Bytes of input per band of rows in the banded weight gradient (1 MiB: about one core's L2).
BAND_BYTES = 1 << 20


def _plain_conv2d(conv: nn.Conv2d) -> bool:
    """Whether ``conv(x)`` is exactly ``F.conv2d`` with its weight and bias: a plain ``nn.Conv2d``
    (no subclass or parametrization) with no module or global hooks (pruning, weight norm,
    fake quantization and the like act through those, and calling ``F.conv2d`` would skip them)."""
    from torch.nn.modules import module as m

    hooks = (conv._forward_hooks, conv._forward_pre_hooks, conv._backward_hooks, conv._backward_pre_hooks,
             m._global_forward_hooks, m._global_forward_pre_hooks, m._global_backward_hooks,
             m._global_backward_pre_hooks)
    return type(conv) is nn.Conv2d and not any(hooks)


def depthwise_conv(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``conv(x)`` for a depthwise (``groups == channels``), stride-1, "same"-padded ``conv``.

    On CPU, with autograd recording, no autocast, compilation or ``torch.func`` transform, and a
    plain ``nn.Conv2d`` without hooks, the backward computes the weight gradient over bands of about
    ``BAND_BYTES`` of input rows (see the module docstring; twice differentiable); everywhere else
    it is ``conv(x)``.
    """
    c = conv.in_channels
    same = all(k % 2 == 1 and p == k // 2 for k, p in zip(conv.kernel_size, conv.padding))
    if not (conv.groups == c == conv.out_channels and conv.stride == (1, 1) and conv.dilation == (1, 1)
            and conv.padding_mode == "zeros" and isinstance(conv.padding, tuple) and same):
        raise ValueError(f"depthwise_conv needs a depthwise, stride-1, zero 'same'-padded Conv2d with odd "
                         f"kernels, got {conv}")
    if (x.device.type != "cpu" or not torch.is_grad_enabled() or torch.compiler.is_compiling()
            or torch.is_autocast_enabled("cpu") or not conv.weight.requires_grad
            or torch._C._are_functorch_transforms_active() or not _plain_conv2d(conv)):
        return conv(x)
    return _BandedDepthwise.apply(x, conv.weight, conv.bias, conv.padding)


class _BandedDepthwise(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                padding: tuple[int, int]) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.padding = padding
        ctx.has_bias = bias is not None
        return F.conv2d(x, weight, bias, padding=padding, groups=weight.shape[0])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # differentiable ops only: double backward works
        x, weight = ctx.saved_tensors
        (ph, pw), c = ctx.padding, weight.shape[0]
        need_x, need_w, need_b = ctx.needs_input_grad[:3]

        def conv_backward(g, inp, padding, mask):
            return torch.ops.aten.convolution_backward(g, inp, weight, None, (1, 1), padding, (1, 1),
                                                       False, (0, 0), c, mask)

        grad_x = conv_backward(grad, x, (ph, pw), (True, False, False))[0] if need_x else None
        grad_w = None
        if need_w:
            n, _, h, w = x.shape
            rows = max(1, BAND_BYTES // max(1, n * c * w * x.element_size()))
            if rows >= h:  # one band: PyTorch's own weight gradient
                grad_w = conv_backward(grad, x, (ph, pw), (False, True, False))[1]
            else:
                padded = F.pad(x, (0, 0, ph, ph))  # the halo rows above and below each band
                acc = torch.promote_types(weight.dtype, torch.float32)  # bf16/fp16 sums in float32
                for y0 in range(0, h, rows):  # (N, C, rows + 2 ph, W) input, (N, C, rows, W) gradient
                    y1 = min(y0 + rows, h)
                    part = conv_backward(grad[:, :, y0:y1], padded[:, :, y0:y1 + 2 * ph], (0, pw),
                                         (False, True, False))[1].to(acc)
                    grad_w = part if grad_w is None else grad_w + part
                grad_w = grad_w.to(weight.dtype)
        grad_b = grad.sum((0, 2, 3)) if need_b and ctx.has_bias else None
        return grad_x, grad_w, grad_b, None
