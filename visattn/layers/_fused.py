"""Fused GPU paths for the memory-bound gate blocks: SE, ECA, CBAM, scSE and Global Context.

A gate block does almost no arithmetic; its cost is the passes it makes over the feature map. In
eager PyTorch every operation is its own kernel that reads (and often writes) the whole map: the
pooling, the multiply, CBAM's channel-scaled intermediate ``x * Mc(x)`` and its channel pooling,
and in backward the same again. Here each block's forward is written once more as a *pure
function* of the input and the block's parameters, and ``torch.compile`` (Inductor, Triton on CUDA)
turns it into a few fused kernels, each reading the map once:

=========  ==========================================================  ===========================
block      passes over ``x`` (forward)                                  reads + writes of the map
=========  ==========================================================  ===========================
se, eca    mean over HW | ``x * g``                                     2 reads + 1 write
cbam       mean & max over HW | max & mean over C of ``x * gc`` |       3 reads + 1 write
           ``x * gc * gs``
scse       mean over HW, and ``w . x`` over C | ``x * (gc + gs)``       3 reads + 1 write
gc         logits ``w . x`` over C | softmax-weighted sum over HW |      3 reads + 1 write
           ``x + t``
=========  ==========================================================  ===========================

A plain tensor copy is 1 read + 1 write, so the floors are 1.5x a copy (SE, ECA) and 2x a copy
(CBAM, scSE, GC): a gate depends on a reduction over the whole map, which must finish before the
map can be scaled. (The eager path of CBAM makes 6 reads and 3 writes.)

When it is used: :meth:`AttentionBlock._checked_forward` asks :func:`fused_forward` first. The
fused path runs when the input is on CUDA, ``torch.compile`` with Triton is usable, the block is
one of the five (with activations this module knows), nothing records attention (the block's
``_capture`` is ``None``; :mod:`visattn.explain` needs the plain path, which records) and no outer
``torch.compile`` is tracing (it fuses the plain path itself). Everywhere else, CPUs included, the
plain path runs. ``VISATTN_FUSED=0`` in the environment, or :func:`set_fused(False)
<set_fused>`, turns the fused paths off. If compiling fails, a warning says so once and that block
kind takes the plain path from then on: a failure never changes a result.

Each pure function computes exactly the block's math from its parameters, in training mode too:
CBAM's spatial BatchNorm uses (and updates) the batch statistics as ``SafeBatchNorm2d`` does,
falling back to the running statistics for a single value per channel. Results equal the plain
path's within the dtype's rounding (the fused kernels keep intermediates in float32).
"""
from __future__ import annotations

import functools
import os
import threading
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils import _pytree

from ._double_backward import twice_differentiable

__all__ = ["FUSED_BLOCKS", "PURE", "fused_enabled", "fused_forward", "pure_function", "set_fused"]

#: Block names (as in :func:`visattn.list_blocks`) that have a fused GPU path (see :data:`PURE`).
FUSED_BLOCKS = ("cbam", "eca", "gc", "scse", "se")

_ENV = "VISATTN_FUSED"
_switch: bool | None = None  # set_fused's choice; None follows the environment
_failed: set[str] = set()  # block kinds whose compile failed: plain path from then on
_lock = threading.Lock()
_OOM = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


def set_fused(enabled: bool | None) -> None:
    """Turn the fused GPU paths on (``True``) or off (``False``) for this process, or follow the
    ``VISATTN_FUSED`` environment variable again (``None``, the default state: on unless it is
    ``0``, ``false``, ``no`` or ``off``).

    Raises ``TypeError`` for anything but a bool or ``None``.
    """
    global _switch
    if enabled is not None and not isinstance(enabled, bool):
        raise TypeError(f"set_fused(enabled) takes True, False or None, got {enabled!r} "
                        f"({type(enabled).__name__})")
    _switch = enabled


def fused_enabled() -> bool:
    """Whether the fused paths may run: :func:`set_fused`'s choice, else ``VISATTN_FUSED``."""
    if _switch is not None:
        return _switch
    return os.environ.get(_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


# --------------------------------------------------------------------------------------------------
# Activations as plain functions. A block's activation is a module built from a name or a class;
# the pure functions take the matching function (a constant for torch.compile, so one compiled
# graph serves every block with the same activations). Unknown activations take the plain path.


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _activation(module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor] | None:
    kind = type(module)
    if kind is nn.GELU:
        return F.gelu if module.approximate == "none" else None
    return {
        nn.ReLU: F.relu, nn.ReLU6: F.relu6, nn.SiLU: F.silu, nn.Sigmoid: torch.sigmoid,
        nn.Hardsigmoid: F.hardsigmoid, nn.Hardswish: F.hardswish, nn.Tanh: torch.tanh,
        nn.Identity: _identity,
    }.get(kind)


def _mlp(fc1: nn.Conv2d, fc2: nn.Conv2d) -> tuple:
    """The weights of a 1x1-conv MLP as linear layers: ``(w1, b1, w2, b2)``."""
    return (fc1.weight.flatten(1), fc1.bias, fc2.weight.flatten(1), fc2.bias)


# --------------------------------------------------------------------------------------------------
# The pure functions: (x, parameters, constants) -> y, each the math of one block's _forward.


def se_fused(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor,
             b2: torch.Tensor | None, act: Callable, gate: Callable) -> torch.Tensor:
    """SE (Hu et al., CVPR 2018, arXiv:1709.01507): ``x * gate(W2 act(W1 mean_hw(x)))``."""
    s = x.mean((2, 3))  # (N, C)
    g = gate(F.linear(act(F.linear(s, w1, b1)), w2, b2))  # (N, C)
    return x * g[:, :, None, None]


def eca_fused(x: torch.Tensor, w: torch.Tensor, pad: int, circular: bool, gate: Callable) -> torch.Tensor:
    """ECA (Wang et al., CVPR 2020, arXiv:1910.03151): ``x * gate(conv1d_k(mean_hw(x)))`` across
    channels, zero- or circularly padded."""
    n, c = x.shape[:2]
    y = x.mean((2, 3)).view(n, 1, c)  # (N, 1, C)
    if circular:
        y = F.pad(y, (pad, pad), mode="circular")
    g = gate(F.conv1d(y, w, padding=0 if circular else pad))  # (N, 1, C)
    return x * g.view(n, c, 1, 1)


def cbam_fused(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor,
               b2: torch.Tensor | None, conv_w: torch.Tensor, bn_mean: torch.Tensor | None,
               bn_var: torch.Tensor | None, bn_w: torch.Tensor | None, bn_b: torch.Tensor | None,
               bn_batch_stats: bool, bn_momentum: float, bn_eps: float, act: Callable,
               gate: Callable, spatial_gate: Callable) -> torch.Tensor:
    """CBAM (Woo et al., ECCV 2018, arXiv:1807.06521): channel gate from an MLP shared by the
    average- and max-pooled maps, then a spatial gate from a conv + BatchNorm over ``[max_c, mean_c]``
    of the channel-gated map; ``x' = x * Mc``, ``y = x' * Ms(x')``."""
    n = x.shape[0]
    pooled = torch.cat([x.mean((2, 3)), x.amax((2, 3))])  # (2N, C): one read of x
    h = F.linear(act(F.linear(pooled, w1, b1)), w2, b2)  # (2N, C)
    gc = gate(h[:n] + h[n:])[:, :, None, None]  # (N, C, 1, 1)
    xc = x * gc  # (N, C, H, W): fused into the two passes below, never stored
    stats = torch.cat([xc.amax(1, keepdim=True), xc.mean(1, keepdim=True)], 1)  # (N, 2, H, W)
    s = F.conv2d(stats, conv_w, padding=conv_w.shape[-1] // 2)  # (N, 1, H, W)
    s = F.batch_norm(s, bn_mean, bn_var, bn_w, bn_b, bn_batch_stats, bn_momentum, bn_eps)
    return xc * spatial_gate(s)


def scse_fused(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor,
               b2: torch.Tensor | None, ws: torch.Tensor, bs: torch.Tensor | None, act: Callable,
               mode_max: bool) -> torch.Tensor:
    """scSE (Roy et al., MICCAI 2018, arXiv:1803.02579): ``x * (cSE + sSE)`` (or the element-wise
    max of the two gated maps), cSE = sigmoid(MLP(mean_hw x)), sSE = sigmoid(conv_1x1 x)."""
    s = x.mean((2, 3))  # (N, C)
    gc = torch.sigmoid(F.linear(act(F.linear(s, w1, b1)), w2, b2))[:, :, None, None]  # (N, C, 1, 1)
    logit = (x * ws.view(1, -1, 1, 1)).sum(1, keepdim=True)  # (N, 1, H, W): the 1x1 conv as a reduction
    if bs is not None:
        logit = logit + bs.view(1, 1, 1, 1)
    gs = torch.sigmoid(logit)
    if mode_max:
        return torch.maximum(x * gc, x * gs)
    return x * (gc + gs)


def _context_mlp(context: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None, ln_w: torch.Tensor | None,
                 ln_b: torch.Tensor | None, ln_eps: float, w2: torch.Tensor, b2: torch.Tensor | None,
                 act: Callable) -> torch.Tensor:
    h = F.linear(context, w1, b1)  # (N, C/r)
    h = act(F.layer_norm(h, (h.shape[1],), ln_w, ln_b, ln_eps))
    return F.linear(h, w2, b2)  # (N, C)


def gc_fused(x: torch.Tensor, attn_w: torch.Tensor | None, attn_b: torch.Tensor | None,
             mlp_add: tuple | None, mlp_scale: tuple | None, act: Callable) -> torch.Tensor:
    """Global Context (Cao et al., ICCVW 2019, arXiv:1904.11492): ``c = sum_j softmax_j(w . x_j) x_j``
    (or the mean), ``t = W2 act(LN(W1 c))``, fused by add and/or sigmoid scale."""
    n, c, h, w = x.shape
    if attn_w is not None:
        logit = (x * attn_w.view(1, c, 1, 1)).sum(1)  # (N, H, W)
        if attn_b is not None:
            logit = logit + attn_b
        p = logit.view(n, h * w).softmax(1).view(n, 1, h, w)  # (N, 1, H, W)
        context = (x * p).sum((2, 3))  # (N, C)
    else:
        context = x.mean((2, 3))  # (N, C)
    if mlp_scale is None:
        return x + _context_mlp(context, *mlp_add, act)[:, :, None, None]
    scale = torch.sigmoid(_context_mlp(context, *mlp_scale, act))[:, :, None, None]
    if mlp_add is None:
        return x * scale
    return _context_mlp(context, *mlp_add, act)[:, :, None, None] + x * scale


#: Block name -> its pure function ``fn(x, *args)``.
PURE: dict[str, Callable[..., torch.Tensor]] = {
    "se": se_fused, "eca": eca_fused, "cbam": cbam_fused, "scse": scse_fused, "gc": gc_fused}

# --------------------------------------------------------------------------------------------------
# Per block: the arguments of its pure function, read from the block (None: take the plain path).


def _se_args(block: Any, x: torch.Tensor) -> tuple | None:
    act, gate = _activation(block.act), _activation(block.gate)
    if act is None or gate is None:
        return None
    return (*_mlp(block.fc1, block.fc2), act, gate)


def _eca_args(block: Any, x: torch.Tensor) -> tuple | None:
    gate = _activation(block.gate)
    if gate is None or block.conv.bias is not None:
        return None
    return (block.conv.weight, block.pad, bool(block.circular), gate)


def _bn_counts(bn: nn.BatchNorm2d, values_per_channel: int) -> bool:
    """Whether ``SafeBatchNorm2d(bn)`` counts this batch in ``num_batches_tracked``."""
    single = bn.training and values_per_channel == 1
    return (bn.training and bn.track_running_stats and bn.num_batches_tracked is not None
            and not single)


def _bn_args(bn: nn.BatchNorm2d, values_per_channel: int) -> tuple | None:
    """``F.batch_norm``'s arguments as ``SafeBatchNorm2d(bn)`` passes them for an input with
    ``values_per_channel`` values per channel: (running mean, running var, weight, bias, use batch
    statistics, momentum, eps); ``None`` for a cumulative average (``momentum=None`` in training),
    left to the plain path. Counting the batch in ``num_batches_tracked`` is the caller's, once the
    fused call has run (:func:`_bn_counts`)."""
    if bn.training and values_per_channel == 1:  # one value per channel: running statistics, as they are
        return (bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, float(bn.eps))
    if _bn_counts(bn, values_per_channel) and bn.momentum is None:
        return None
    momentum = 0.0 if bn.momentum is None else float(bn.momentum)
    batch_stats = bn.training or (bn.running_mean is None and bn.running_var is None)
    keep = not bn.training or bn.track_running_stats
    return (bn.running_mean if keep else None, bn.running_var if keep else None, bn.weight, bn.bias,
            batch_stats, momentum, float(bn.eps))


def _cbam_args(block: Any, x: torch.Tensor) -> tuple | None:
    ch, sp = block.channel, block.spatial
    act, gate, spatial_gate = _activation(ch.act), _activation(ch.gate), _activation(sp.gate)
    if act is None or gate is None or spatial_gate is None or sp.conv.bias is not None:
        return None
    if type(sp.bn).forward is not _safe_bn_forward():
        return None  # a replaced norm layer: the plain path knows what it does
    n, _, h, w = x.shape
    bn = _bn_args(sp.bn, n * h * w)
    if bn is None:
        return None
    return (*_mlp(ch.fc1, ch.fc2), sp.conv.weight, *bn, act, gate, spatial_gate)


def _scse_args(block: Any, x: torch.Tensor) -> tuple | None:
    act = _activation(block.act)
    if act is None:
        return None
    sp = block.spatial
    return (*_mlp(block.fc1, block.fc2), sp.weight.flatten(), sp.bias, act, block.mode == "max")


def _gc_mlp(mlp: Any) -> tuple | None:
    if mlp is None:
        return None
    return (mlp.fc1.weight.flatten(1), mlp.fc1.bias, mlp.norm.weight, mlp.norm.bias, float(mlp.norm.eps),
            mlp.fc2.weight.flatten(1), mlp.fc2.bias)


def _gc_args(block: Any, x: torch.Tensor) -> tuple | None:
    mlps = [m for m in (block.mlp_add, block.mlp_scale) if m is not None]
    acts = {type(m.act) for m in mlps}
    act = _activation(mlps[0].act)
    if act is None or len(acts) != 1:
        return None
    attn = block.conv_attn
    return (None if attn is None else attn.weight.flatten(), None if attn is None else attn.bias,
            _gc_mlp(block.mlp_add), _gc_mlp(block.mlp_scale), act)


def _safe_bn_forward():
    from ._base import SafeBatchNorm2d

    return SafeBatchNorm2d.forward


def _after_cbam(block: Any, x: torch.Tensor) -> None:
    bn = block.spatial.bn
    n, _, h, w = x.shape
    if _bn_counts(bn, n * h * w):
        bn.num_batches_tracked.add_(1)


@functools.cache
def _table() -> dict[type, tuple[str, Callable, Callable, Callable | None]]:
    """Block class -> (name, pure function, argument reader, bookkeeping after a fused call).

    Keyed by exact class: a subclass may change the math, so it takes the plain path."""
    from .cbam import CBAM
    from .eca import EfficientChannelAttention
    from .gc import GlobalContext
    from .scse import SpatialChannelSE
    from .se import SqueezeExcite

    return {
        SqueezeExcite: ("se", PURE["se"], _se_args, None),
        EfficientChannelAttention: ("eca", PURE["eca"], _eca_args, None),
        CBAM: ("cbam", PURE["cbam"], _cbam_args, _after_cbam),
        SpatialChannelSE: ("scse", PURE["scse"], _scse_args, None),
        GlobalContext: ("gc", PURE["gc"], _gc_args, None),
    }


def _known_module(m: nn.Module) -> bool:
    """Whether ``m`` is a part the pure functions model: a plain conv, norm or activation (or a
    container of those from the blocks' own files), with no forward hooks of its own."""
    if m._forward_hooks or m._forward_pre_hooks:
        return False
    kind = type(m)
    return (kind in (nn.Conv1d, nn.Conv2d) or _activation(m) is not None
            or kind.__module__.startswith(__package__) and kind.__name__ in _PARTS)


# The blocks' own sub-modules that the pure functions model (by name: importing them here would
# import the block files while _base is still being imported).
_PARTS = frozenset({"CbamChannelGate", "CbamSpatialGate", "SafeBatchNorm2d", "_LayerNormC", "_ContextMlp"})


def _pure(block: nn.Module, x: torch.Tensor) -> tuple[str, Callable, tuple, Callable | None] | None:
    entry = _table().get(type(block))
    if entry is None:
        return None
    if any(not _known_module(m) for m in block.children()) or any(
            not _known_module(m) for c in block.children() for m in c.children()):
        return None  # a replaced or hooked part: only the plain path runs it as it is
    name, fn, read, after = entry
    args = read(block, x)
    if args is None:
        return None
    return name, fn, args, after


def pure_function(block: nn.Module, x: torch.Tensor) -> tuple[Callable, tuple] | None:
    """``(fn, args)`` such that ``fn(x, *args)`` is ``block``'s forward on ``x``, uncompiled, or
    ``None`` when ``block`` has no fused path (another class, or an activation this module does not
    know). For tests and benchmarks; a block chooses its path itself (:func:`fused_forward`).
    Calling ``fn`` does not count a CBAM training batch in ``num_batches_tracked`` (the block does)."""
    found = _pure(block, x)
    return None if found is None else (found[1], found[2])


# --------------------------------------------------------------------------------------------------
# Compiling and dispatch.


def _on_cuda(x: torch.Tensor) -> bool:
    """The device check of :func:`fused_forward` (a function, so tests can stand a CPU in for it)."""
    return x.is_cuda


def _transformed(x: torch.Tensor) -> bool:
    """Whether a tracer or a function transform is looking: ``torch.jit.trace`` (and the ONNX
    exporter built on it) records operations, ``torch.func`` (vmap, grad) wraps tensors. Both get
    the plain path: a compiled call inside them would fail, or be recorded as one opaque call."""
    return torch.jit.is_tracing() or _is_wrapped(x)


_is_wrapped = getattr(getattr(torch._C, "_functorch", None), "is_functorch_wrapped_tensor", lambda x: False)


@functools.cache
def _compile_usable(device_type: str) -> bool:
    """Whether ``torch.compile`` can build kernels for ``device_type`` here (Triton on CUDA)."""
    if not hasattr(torch, "compile"):
        return False
    if device_type == "cuda":
        try:
            from torch.utils._triton import has_triton
        except ImportError:
            return False
        return bool(has_triton())
    return True


@functools.cache
def _compiled(name: str) -> Callable:
    """The compiled pure function of block kind ``name`` (compiled lazily, on first call, per
    shape / dtype / memory format / training mode; sizes become dynamic once a second shape is seen)."""
    return torch.compile(PURE[name])


def _run_compiled(name: str, x: torch.Tensor, args: tuple) -> torch.Tensor:
    """The compiled pure function of ``name`` on ``(x, *args)``, differentiable twice: a compiled
    backward cannot be differentiated (``torch.compile`` refuses double backward), so a backward
    that builds a graph (a gradient penalty) differentiates the uncompiled pure function instead
    (:func:`~visattn.layers._double_backward.twice_differentiable`, whose recomputations get copies
    of BatchNorm's running statistics: they are updated once, by the forward)."""
    leaves, spec = _pytree.tree_flatten((x, args))
    where = [i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor)]

    def call(fn: Callable, tensors: tuple) -> torch.Tensor:
        filled = list(leaves)
        for i, t in zip(where, tensors):
            filled[i] = t
        x_, args_ = _pytree.tree_unflatten(filled, spec)
        return fn(x_, *args_)

    return twice_differentiable(lambda *ts: call(_compiled(name), ts), lambda *ts: call(PURE[name], ts),
                                *(leaves[i] for i in where))


def fused_forward(block: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """``block(x)`` by a fused kernel when one applies (see the module docstring), else ``None``:
    then the caller runs the plain path. The result has ``x``'s dtype."""
    if not _on_cuda(x) or block._capture is not None or torch.compiler.is_compiling():
        return None
    if not fused_enabled() or not _compile_usable(x.device.type) or _transformed(x):
        return None
    found = _pure(block, x)
    if found is None or found[0] in _failed:
        return None
    name, _, args, after = found
    try:
        y = _run_compiled(name, x, args)
    except _OOM:
        raise
    except Exception as e:  # noqa: BLE001 - any compile failure: the plain path, never a wrong answer
        with _lock:
            first = name not in _failed
            _failed.add(name)
        if first:
            warnings.warn(f"visattn: the fused {name} kernel could not be built or run "
                          f"({type(e).__name__}: {str(e)[:300]}); {name} blocks take the plain path "
                          f"from now on (set VISATTN_FUSED=0 to skip fused kernels)", RuntimeWarning,
                          stacklevel=3)
        return None
    if after is not None:
        after(block, x)
    return y if y.dtype == x.dtype else y.to(x.dtype)
