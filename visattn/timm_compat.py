"""timm counterparts of visattn blocks, and weight transfer between them.

Where timm implements the same paper, :func:`timm_counterpart` builds timm's module with the
settings that make it the same function as ours, and :func:`load_timm_weights` copies its weights
into our block (a timm-trained attention layer keeps working in visattn). Used by the parity tests
and by ``benchmarks/blocks.py``.
"""
from __future__ import annotations

from collections.abc import Callable

from torch import nn

__all__ = ["TIMM_COUNTERPARTS", "load_timm_weights", "timm_counterpart"]


def _timm_factories() -> dict[str, Callable[[int], nn.Module]]:
    from timm.layers import cbam, eca, global_context, selective_kernel, squeeze_excite

    return {
        "se": lambda c: squeeze_excite.SEModule(c),
        "eca": lambda c: eca.EcaModule(c),
        "sk": lambda c: selective_kernel.SelectiveKernel(c),
        "cbam": lambda c: cbam.CbamModule(c),
        # timm's default fuses by scaling; the paper's (and our) default adds
        "gc": lambda c: global_context.GlobalContext(c, fuse_add=True, fuse_scale=False),
    }


#: Our block names that have a timm counterpart.
TIMM_COUNTERPARTS = ("cbam", "eca", "gc", "se", "sk")

# timm key prefix -> our key prefix, where the layouts differ
_RENAMES = {
    "cbam": {"spatial.conv.conv.": "spatial.conv.", "spatial.conv.bn.": "spatial.bn."},
}


def timm_counterpart(name: str, channels: int) -> nn.Module:
    """timm's implementation of block ``name`` configured as our default; ``KeyError`` if none."""
    factories = _timm_factories()
    if name not in factories:
        raise KeyError(f"timm has no counterpart of {name!r}; blocks with one: {', '.join(TIMM_COUNTERPARTS)}")
    return factories[name](channels)


def load_timm_weights(block: nn.Module, timm_module: nn.Module, name: str) -> None:
    """Copy ``timm_module``'s parameters and buffers into our ``block`` (strict: every key must map)."""
    renames = _RENAMES.get(name, {})
    state = {}
    for key, value in timm_module.state_dict().items():
        for old, new in renames.items():
            if key.startswith(old):
                key = new + key[len(old):]
                break
        state[key] = value
    block.load_state_dict(state, strict=True)
