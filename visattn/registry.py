"""The block registry: one table from a block's name to its class and the paper it comes from.

Names are how users pick blocks on the command line and in configs (``attention: cbam``). The
table is written out here, not filled by import side effects, so every block is registered as soon
as ``visattn`` is imported.
"""
from __future__ import annotations

import difflib
import inspect
from dataclasses import dataclass

import torch
from torch import nn

from . import layers as L
from .layers._base import MAX_BLOCK_ELEMENTS, check_int

__all__ = ["KINDS", "BlockInfo", "block_info", "create_block", "list_blocks"]

#: The kinds of attention, as used by ``list_blocks(kind=...)``.
KINDS = ("channel", "spatial", "hybrid", "self", "cross")


@dataclass(frozen=True)
class BlockInfo:
    """What the registry knows of a block."""

    name: str
    kind: str
    paper: str
    year: int
    url: str
    cls: type[nn.Module]


_BLOCKS: dict[str, BlockInfo] = {
    info.name: info
    for info in (
        BlockInfo("se", "channel", "Squeeze-and-Excitation Networks", 2018,
                  "https://arxiv.org/abs/1709.01507", L.SqueezeExcite),
        BlockInfo("eca", "channel", "ECA-Net: Efficient Channel Attention for Deep Convolutional "
                  "Neural Networks", 2020, "https://arxiv.org/abs/1910.03151", L.EfficientChannelAttention),
        BlockInfo("sk", "channel", "Selective Kernel Networks", 2019,
                  "https://arxiv.org/abs/1903.06586", L.SelectiveKernel),
        BlockInfo("simam", "spatial", "SimAM: A Simple, Parameter-Free Attention Module for "
                  "Convolutional Neural Networks", 2021,
                  "http://proceedings.mlr.press/v139/yang21o.html", L.SimAM),
        BlockInfo("coord", "spatial", "Coordinate Attention for Efficient Mobile Network Design", 2021,
                  "https://arxiv.org/abs/2103.02907", L.CoordAttention),
        BlockInfo("triplet", "spatial", "Rotate to Attend: Convolutional Triplet Attention Module", 2021,
                  "https://arxiv.org/abs/2010.03045", L.TripletAttention),
        BlockInfo("cbam", "hybrid", "CBAM: Convolutional Block Attention Module", 2018,
                  "https://arxiv.org/abs/1807.06521", L.CBAM),
        BlockInfo("bam", "hybrid", "BAM: Bottleneck Attention Module", 2018,
                  "https://arxiv.org/abs/1807.06514", L.BottleneckAttention),
        BlockInfo("scse", "hybrid", "Concurrent Spatial and Channel 'Squeeze & Excitation' in Fully "
                  "Convolutional Networks", 2018, "https://arxiv.org/abs/1803.02579", L.SpatialChannelSE),
        BlockInfo("gc", "hybrid", "GCNet: Non-local Networks Meet Squeeze-Excitation Networks and "
                  "Beyond", 2019, "https://arxiv.org/abs/1904.11492", L.GlobalContext),
        BlockInfo("danet", "hybrid", "Dual Attention Network for Scene Segmentation", 2019,
                  "https://arxiv.org/abs/1809.02983", L.DualAttention),
        BlockInfo("mhsa", "self", "Attention Is All You Need (multi-head self-attention, 2-D sin-cos "
                  "positions)", 2017, "https://arxiv.org/abs/1706.03762", L.MultiHeadSelfAttention),
        BlockInfo("nonlocal", "self", "Non-local Neural Networks", 2018,
                  "https://arxiv.org/abs/1711.07971", L.NonLocal),
        BlockInfo("window", "self", "Swin Transformer: Hierarchical Vision Transformer using Shifted "
                  "Windows", 2021, "https://arxiv.org/abs/2103.14030", L.WindowAttention),
        BlockInfo("axial", "self", "Axial Attention in Multidimensional Transformers", 2019,
                  "https://arxiv.org/abs/1912.12180", L.AxialAttention),
        BlockInfo("criss_cross", "self", "CCNet: Criss-Cross Attention for Semantic Segmentation", 2019,
                  "https://arxiv.org/abs/1811.11721", L.CrissCrossAttention),
        BlockInfo("linear", "self", "Efficient Attention: Attention with Linear Complexities", 2021,
                  "https://arxiv.org/abs/1812.01243", L.LinearAttention),
        BlockInfo("external", "self", "Beyond Self-attention: External Attention using Two Linear "
                  "Layers for Visual Tasks", 2022, "https://arxiv.org/abs/2105.02358", L.ExternalAttention),
        BlockInfo("sra", "self", "Pyramid Vision Transformer: A Versatile Backbone for Dense "
                  "Prediction without Convolutions", 2021, "https://arxiv.org/abs/2102.12122",
                  L.SpatialReductionAttention),
        BlockInfo("routing", "self", "BiFormer: Vision Transformer with Bi-Level Routing Attention", 2023,
                  "https://arxiv.org/abs/2303.08125", L.BiLevelRoutingAttention),
        BlockInfo("quadtree", "self", "QuadTree Attention for Vision Transformers", 2022,
                  "https://arxiv.org/abs/2201.02767", L.QuadtreeAttention),
        BlockInfo("adaptive", "self", "Adaptively Sparse Transformers (alpha-entmax attention, learned "
                  "alpha per head)", 2019, "https://arxiv.org/abs/1909.00015", L.AdaptiveSparseAttention),
        BlockInfo("deformable", "self", "Deformable DETR: Deformable Transformers for End-to-End Object "
                  "Detection (multi-head deformable attention)", 2021, "https://arxiv.org/abs/2010.04159",
                  L.DeformableAttention),
        BlockInfo("cross", "cross", "Attention Is All You Need (encoder-decoder cross-attention)", 2017,
                  "https://arxiv.org/abs/1706.03762", L.CrossAttention),
    )
}


def list_blocks(kind: str | None = None) -> list[str]:
    """Sorted names of the registered blocks, optionally only those of one ``kind``
    (``"channel"``, ``"spatial"``, ``"hybrid"``, ``"self"`` or ``"cross"``)."""
    if kind is not None and kind not in KINDS:
        raise ValueError(f"unknown block kind {kind!r}; valid kinds: {', '.join(KINDS)}")
    return sorted(name for name, info in _BLOCKS.items() if kind is None or info.kind == kind)


def block_info(name: str) -> BlockInfo:
    """The :class:`BlockInfo` of a registered block; ``ValueError`` naming the valid blocks if unknown."""
    try:
        return _BLOCKS[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown block {name!r}; registered blocks: {', '.join(list_blocks())}"
        ) from None


def _check_size(info: BlockInfo, channels: int, kwargs: dict) -> None:
    """Build the block on the ``meta`` device (no memory) and refuse it if its parameters and
    buffers would exceed :data:`~visattn.layers._base.MAX_BLOCK_ELEMENTS` elements."""
    args = "".join(f", {k}={v!r}" for k, v in kwargs.items() if k not in ("device", "dtype"))
    try:
        with torch.device("meta"):
            probe = info.cls(channels, **{**kwargs, "device": "meta"})
    except (RuntimeError, OverflowError) as e:  # sizes past int64 (torch: "numel: ... overflow")
        raise ValueError(f"create_block({info.name!r}, channels={channels}{args}) cannot be built: "
                         f"{e}; check channels and the size arguments") from None
    elements = sum(t.numel() for t in (*probe.parameters(), *probe.buffers()))
    if elements > MAX_BLOCK_ELEMENTS:
        raise ValueError(
            f"create_block({info.name!r}, channels={channels}{args}) would hold {elements:.3g} "
            f"parameter elements (about {elements * 4 / 2**30:.3g} GiB in float32), more than the "
            f"limit of {MAX_BLOCK_ELEMENTS:.3g}; check channels and the size arguments")


def create_block(name: str, channels: int, **kwargs) -> nn.Module:
    """Build the block ``name`` for ``channels`` input channels.

    Every block maps ``(N, C, H, W)`` to ``(N, C, H, W)`` with the input's dtype and device.
    Keyword arguments go to the block's constructor; one it does not take is a ``TypeError``
    that lists the ones it does. ``channels`` and every size argument are checked before anything
    is allocated: a wrong type is a ``TypeError``, a value out of range a ``ValueError``, and a
    block that would hold more than ``MAX_BLOCK_ELEMENTS`` (2**31) parameter elements
    (``create_block("se", 10**9)``) a ``ValueError``; each names the argument.

    Example:
        >>> block = create_block("cbam", 256, rd_ratio=1 / 8)
        >>> block(torch.randn(2, 256, 32, 32)).shape
        torch.Size([2, 256, 32, 32])
    """
    info = block_info(name)
    check_int(channels, "channels", name)
    params = inspect.signature(info.cls).parameters
    unknown = sorted(set(kwargs) - set(params) - {"channels"})
    if unknown:
        valid = [p for p in params if p != "channels"]
        close = sorted({m for k in unknown for m in difflib.get_close_matches(k, valid, n=2)})
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise TypeError(
            f"{name} ({info.cls.__name__}) got unexpected keyword argument(s) {', '.join(unknown)}{hint}; "
            f"it takes: {', '.join(valid)}"
        )
    _check_size(info, channels, kwargs)
    return info.cls(channels, **kwargs)
