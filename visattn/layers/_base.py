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

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from ._capture import Capture
from ._fused import fused_forward

__all__ = [
    "MAX_BLOCK_ELEMENTS",
    "AttentionBlock",
    "SafeBatchNorm2d",
    "check_float",
    "check_input",
    "check_int",
    "dtype_mismatch",
    "emit",
    "get_act_layer",
    "make_divisible",
]

#: The most parameter and buffer elements :func:`visattn.create_block` builds for one block (2**31,
#: 8 GiB in float32; the largest default block at 4096 channels holds about 2**26). Arguments that
#: would need more (``create_block("se", 10**9)``) are refused before anything is allocated.
MAX_BLOCK_ELEMENTS = 2**31

# Bytes of input per inference chunk. A chunk's input plus the two or three same-sized temporaries
# a block makes must stay in the last-level cache (32 MiB shared on the machines we measure on);
# 4 MiB of input is one 256x56x56 fp32 sample and leaves room for both cores' working sets.
CHUNK_BYTES = 4 * 1024 * 1024


# --------------------------------------------------------------------------------------------------
# Argument checks shared by every block and builder: the error names the argument and what it takes.


def _where(block: str | None) -> str:
    return f"{block}: " if block else ""


def check_int(value: Any, name: str, block: str | None = None, *, low: int = 1,
              high: int | None = None, optional: bool = False) -> int | None:
    """Return ``value`` if it is an int in ``low..high`` (``None`` too when ``optional``).

    A bool, float, string or other type is a ``TypeError``, an int out of range a ``ValueError``;
    both name ``name`` (and ``block``, when given) and the range.
    """
    if value is None and optional:
        return None
    span = f">= {low}" if high is None else f"in {low}..{high}"
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{_where(block)}{name} must be an int {span}"
                        f"{' or None' if optional else ''}, got {value!r} ({type(value).__name__})")
    if value < low or (high is not None and value > high):
        raise ValueError(f"{_where(block)}{name} must be an int {span}, got {value}")
    return value


def check_float(value: Any, name: str, block: str | None = None, *, low: float = 0.0,
                inclusive: bool = False, optional: bool = False) -> float | None:
    """Return ``value`` as a float if it is a finite real number above ``low`` (or equal to it when
    ``inclusive``); ``TypeError`` / ``ValueError`` naming ``name`` otherwise."""
    if value is None and optional:
        return None
    op = ">=" if inclusive else ">"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{_where(block)}{name} must be a number {op} {low}, got {value!r} "
                        f"({type(value).__name__})")
    if not math.isfinite(value) or value < low or (value == low and not inclusive):
        raise ValueError(f"{_where(block)}{name} must be a finite number {op} {low}, got {value}")
    return float(value)


def check_odd(value: Any, name: str, block: str) -> int:
    """Return ``value`` if it is an odd int >= 1 (a kernel size with a centre)."""
    check_int(value, name, block)
    if value % 2 == 0:
        raise ValueError(f"{block} needs an odd {name} >= 1, got {value}")
    return value


def dtype_mismatch(a: torch.dtype, b: torch.dtype, device_type: str, fix: str) -> str | None:
    """``None`` if tensors of dtypes ``a`` and ``b`` may meet in a block's operations on
    ``device_type``, else what is wrong and ``fix``. Outside ``torch.autocast`` they must be equal.
    Under it, which casts per operation (a block returns its input's dtype), each must be float32
    or autocast's dtype, or both float64: autocast never casts float64, and some of its operations
    refuse float16 with bfloat16."""
    if not torch.is_autocast_enabled(device_type):
        return None if a == b else f"convert one of them ({fix}), or run it under torch.autocast"
    fast = torch.get_autocast_dtype(device_type)
    if a == b == torch.float64 or {a, b} <= {torch.float32, fast}:
        return None
    return (f"under torch.autocast(dtype={fast}) both must be torch.float32 or {fast}, or both torch.float64 "
            f"(autocast never casts float64, and some of its operations refuse float16 with bfloat16): {fix}")


def check_input(x: torch.Tensor, channels: int | None, block: str,
                param_dtype: torch.dtype | None = None) -> None:
    """Raise a clear error unless ``x`` is a non-empty floating-point ``(N, C, H, W)`` tensor with
    ``channels`` channels (``channels=None`` accepts any count).

    With ``param_dtype`` (the block's parameters' dtype), the input's dtype must meet it as
    :func:`dtype_mismatch` says (a ``TypeError`` naming both otherwise).
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{block} expects a torch.Tensor of shape (N, C, H, W), got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(
            f"{block} expects a floating-point tensor, got dtype {x.dtype}; convert it first "
            "(an image: x.float() / 255)")
    if param_dtype is not None and (why := dtype_mismatch(x.dtype, param_dtype, x.device.type,
                                                          f"x.to({param_dtype}) or block.to({x.dtype})")):
        raise TypeError(f"{block} has {param_dtype} parameters but got a {x.dtype} input; {why}")
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


def _call_block(block: AttentionBlock, *args: Any) -> torch.Tensor:
    """Run ``block``'s checked forward. ``torch.fx`` records a call of this function as one node
    (it is wrapped below), so tracing a model that contains blocks works (for instance
    ``torchvision.models.feature_extraction.create_feature_extractor``) without tracing into their
    shape-dependent code; the block and its checks run when the traced module runs."""
    return block._checked_forward(*args)


fx.wrap("_call_block")


def _param_dtype(module: nn.Module) -> torch.dtype | None:
    """The dtype of a parameter of ``module`` (its own, else its children's, breadth first), or
    ``None`` if it has none. Reads the registries directly: ``next(module.parameters())`` costs
    ~25 us per call, this ~1 us."""
    queue = [module]
    for m in queue:
        for p in m._parameters.values():
            if p is not None:
                return p.dtype
        queue.extend(m._modules.values())
    return None


class AttentionBlock(nn.Module):
    """Base class of every visattn block: ``(N, C, H, W) -> (N, C, H, W)``, same dtype and device.

    Subclasses set ``self.channels`` (``None`` for blocks without per-channel weights) and
    implement ``_forward(x, out=None)``; when ``out`` is given the result must be written into it.

    The input must be a floating-point tensor of the parameters' dtype (under ``torch.autocast``:
    see :func:`dtype_mismatch`); anything else is a ``TypeError`` naming both dtypes, never a
    silent cast.
    Under ``torch.fx`` tracing a block is one opaque call (see :func:`_call_block`).
    """

    channels: int | None
    #: Whether inference may run in batch chunks (every block whose samples are independent in
    #: ``eval()`` mode; a subclass can turn it off).
    chunked_inference: bool = True
    #: Set by :mod:`visattn.explain` to a :class:`~visattn.layers._capture.Capture` while it records
    #: this block's attention; ``None`` (no recording, no extra work) otherwise.
    _capture: Capture | None = None

    def _forward(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def _use_chunks(self, x: torch.Tensor) -> bool:
        return (
            self.chunked_inference
            and self._capture is None
            and not self.training
            and not torch.is_grad_enabled()
            and not torch.compiler.is_compiling()
            and x.shape[0] > 1
            and x.numel() * x.element_size() > CHUNK_BYTES
        )

    def _refuse_root_trace(self, x: Any) -> None:
        if isinstance(x, fx.Proxy) and x.tracer.root is self:
            raise TypeError(f"{type(self).__name__} is traced by torch.fx as one call inside a model; "
                            "trace a module that contains it (e.g. nn.Sequential(block)) instead")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._refuse_root_trace(x)
        return _call_block(self, x)

    def _checked_forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.channels, type(self).__name__, _param_dtype(self))
        if (y := fused_forward(self, x)) is not None:  # CUDA: compiled gate kernels (_fused.py)
            return y
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
