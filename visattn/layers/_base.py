"""Shared pieces of every visattn block: the input contract, the cache-blocked inference path,
layer look-up by name, and a BatchNorm that survives a single value per channel.

Every block derives from :class:`AttentionBlock` and implements ``_forward(x, out=None)``. The base
class checks the input, and in inference (``eval()`` under ``torch.no_grad()``) runs ``_forward``
over slices of the batch small enough to keep the block's temporaries in the CPU's last-level
cache, writing each result straight into one output tensor. A gate block (pool, tiny MLP, multiply)
then reads its input from memory once instead of two or three times. Training and
``torch.compile`` take the plain path over the whole batch.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "AttentionBlock",
    "SafeBatchNorm2d",
    "check_input",
    "emit",
    "get_act_layer",
    "make_divisible",
]

# Bytes of input per inference chunk. A chunk's input plus the two or three same-sized temporaries
# a block makes must stay in the last-level cache (32 MiB shared on the machines we measure on);
# 4 MiB of input is one 256x56x56 fp32 sample and leaves room for both cores' working sets.
CHUNK_BYTES = 4 * 1024 * 1024


def check_input(x: torch.Tensor, channels: int | None, block: str) -> None:
    """Raise a clear error unless ``x`` is a non-empty ``(N, C, H, W)`` tensor with ``channels``
    channels (``channels=None`` accepts any count)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{block} expects a torch.Tensor of shape (N, C, H, W), got {type(x).__name__}")
    if x.ndim != 4:
        raise ValueError(
            f"{block} expects a 4-D tensor of shape (N, C, H, W), got a {x.ndim}-D tensor of shape "
            f"{tuple(x.shape)}"
        )
    if channels is not None and x.shape[1] != channels:
        raise ValueError(
            f"{block} was built for {channels} input channels, got a tensor with {x.shape[1]} "
            f"channels (shape {tuple(x.shape)}); build it with create_block(..., {x.shape[1]})"
        )
    if x.numel() == 0:
        raise ValueError(f"{block} got an empty tensor of shape {tuple(x.shape)}; N, H and W must be >= 1")


def make_divisible(value: float, divisor: int = 8, min_value: int | None = None,
                   round_limit: float = 0.9) -> int:
    """Round ``value`` to the nearest multiple of ``divisor`` (at least ``min_value``, default
    ``divisor``), rounding up when rounding down would lose more than ``1 - round_limit``."""
    min_value = min_value or divisor
    rounded = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if rounded < round_limit * value:
        rounded += divisor
    return rounded


_ACT_LAYERS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "relu6": nn.ReLU6,
    "silu": nn.SiLU,
    "swish": nn.SiLU,
    "gelu": nn.GELU,
    "sigmoid": nn.Sigmoid,
    "hard_sigmoid": nn.Hardsigmoid,
    "hard_swish": nn.Hardswish,
    "tanh": nn.Tanh,
    "identity": nn.Identity,
}


def get_act_layer(layer: str | type[nn.Module] | Callable[..., nn.Module] | None) -> nn.Module:
    """Instantiate an activation given by name (``"relu"``, ``"sigmoid"``, ...) or by class."""
    if layer is None:
        return nn.Identity()
    if isinstance(layer, str):
        try:
            layer = _ACT_LAYERS[layer.lower()]
        except KeyError:
            raise ValueError(
                f"unknown activation {layer!r}; valid names: {', '.join(sorted(_ACT_LAYERS))}"
            ) from None
    return layer()


class SafeBatchNorm2d(nn.BatchNorm2d):
    """``BatchNorm2d`` that accepts a batch with one value per channel in training mode.

    Batch statistics are undefined for a single value (plain BatchNorm raises); this layer then
    normalises with its running statistics and leaves them untouched, so a block whose gate runs
    BatchNorm on pooled ``(N, C, 1, 1)`` features still works with batch size 1 and on 1x1 maps.
    Otherwise it is exactly ``nn.BatchNorm2d`` (same state dict, same results).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and x.numel() == x.shape[1]:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                False, 0.0, self.eps)
        return super().forward(x)


class AttentionBlock(nn.Module):
    """Base class of every visattn block: ``(N, C, H, W) -> (N, C, H, W)``, same dtype and device.

    Subclasses set ``self.channels`` (``None`` for blocks without per-channel weights) and
    implement ``_forward(x, out=None)``; when ``out`` is given the result must be written into it.
    """

    channels: int | None
    #: Whether inference may run in batch chunks (every block whose samples are independent in
    #: ``eval()`` mode; a subclass can turn it off).
    chunked_inference: bool = True

    def _forward(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def _use_chunks(self, x: torch.Tensor) -> bool:
        return (
            self.chunked_inference
            and not self.training
            and not torch.is_grad_enabled()
            and not torch.compiler.is_compiling()
            and x.shape[0] > 1
            and x.numel() * x.element_size() > CHUNK_BYTES
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.channels, type(self).__name__)
        if self._use_chunks(x):
            out = torch.empty_like(x)
            step = max(1, CHUNK_BYTES // (x[0].numel() * x.element_size()))
            for start in range(0, x.shape[0], step):
                self._forward(x[start:start + step], out=out[start:start + step])
            return out
        y = self._forward(x)
        return y if y.dtype == x.dtype else y.to(x.dtype)  # bf16 autocast: keep the input's dtype

    def extra_repr(self) -> str:
        return f"channels={self.channels}"


def emit(y: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """Return ``y``, or copy it into ``out`` when the caller asked for the result there."""
    if out is None:
        return y
    return out.copy_(y)
