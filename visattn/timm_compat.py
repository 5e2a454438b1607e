"""timm counterparts of visattn blocks, and weight transfer between them.

Where timm implements the same paper, :func:`timm_counterpart` builds timm's module with the
settings that make it the same function as ours, and :func:`load_timm_weights` copies its weights
into our block (a timm-trained attention layer keeps working in visattn). Used by the parity tests
and by ``benchmarks/blocks.py``.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .registry import block_info

__all__ = ["TIMM_COUNTERPARTS", "load_timm_weights", "timm_counterpart"]


def _timm_cbam(channels: int) -> nn.Module:
    from timm.layers import cbam

    module = cbam.CbamModule(channels)
    module.spatial.conv.bn.momentum = 0.01  # ours (and the authors') spatial BatchNorm momentum
    return module


def _timm_factories() -> dict[str, Callable[[int], nn.Module]]:
    from timm.layers import eca, global_context, selective_kernel, squeeze_excite

    return {
        "se": lambda c: squeeze_excite.SEModule(c),
        "eca": lambda c: eca.EcaModule(c),
        "sk": lambda c: selective_kernel.SelectiveKernel(c),
        "cbam": _timm_cbam,
        # timm's default fuses by scaling; the paper's (and our) default adds
        "gc": lambda c: global_context.GlobalContext(c, fuse_add=True, fuse_scale=False),
    }


#: Our block names that have a timm counterpart.
TIMM_COUNTERPARTS = ("cbam", "eca", "gc", "se", "sk")

# timm key prefix -> our key prefix, where the layouts differ
_RENAMES = {
    "cbam": {"spatial.conv.conv.": "spatial.conv.", "spatial.conv.bn.": "spatial.bn."},
}


def _cbam_pool_order(state: dict[str, torch.Tensor]) -> None:
    """timm's CBAM convolves ``[mean, max]``, ours (the authors') ``[max, mean]``: swap the two
    input channels of the spatial conv."""
    w = state.get("spatial.conv.weight")
    if w is not None and w.ndim == 4 and w.shape[1] == 2:
        state["spatial.conv.weight"] = w[:, [1, 0]].contiguous()


# our key layout -> in-place fix of values whose layout differs from timm's
_CONVERSIONS: dict[str, Callable[[dict[str, torch.Tensor]], None]] = {"cbam": _cbam_pool_order}


def _check_name(name: object) -> str:
    if not isinstance(name, str) or name not in TIMM_COUNTERPARTS:
        raise ValueError(f"timm has no counterpart of block {name!r}; blocks with one: "
                         f"{', '.join(TIMM_COUNTERPARTS)}")
    return name


def timm_counterpart(name: str, channels: int) -> nn.Module:
    """timm's implementation of block ``name`` configured as our default; ``KeyError`` if none."""
    factories = _timm_factories()
    if name not in factories:
        raise KeyError(f"timm has no counterpart of {name!r}; blocks with one: {', '.join(TIMM_COUNTERPARTS)}")
    return factories[name](channels)


def load_timm_weights(block: nn.Module, timm_module: nn.Module, name: str) -> None:
    """Copy ``timm_module``'s parameters and buffers into our ``block`` (strict: every key must map).

    ``name`` is the block's registry name (one of :data:`TIMM_COUNTERPARTS`); ``block`` must be that
    block and ``timm_module`` an ``nn.Module``, else a ``TypeError``/``ValueError`` naming the
    argument.
    """
    _check_name(name)
    cls = block_info(name).cls
    if not isinstance(block, cls):
        raise TypeError(f"load_timm_weights: block must be a {cls.__name__} (block {name!r}), got "
                        f"{type(block).__name__}")
    if not isinstance(timm_module, nn.Module):
        raise TypeError(f"load_timm_weights: timm_module must be an nn.Module, got {type(timm_module).__name__}")
    renames = _RENAMES.get(name, {})
    state = {}
    for key, value in timm_module.state_dict().items():
        for old, new in renames.items():
            if key.startswith(old):
                key = new + key[len(old):]
                break
        state[key] = value
    if name in _CONVERSIONS:
        _CONVERSIONS[name](state)
    block.load_state_dict(state, strict=True)
