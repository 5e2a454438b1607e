"""Multi-head deformable attention: each query attends to a few sampling points around a reference
point, at offsets and with weights that it predicts from its own features, on one or several
feature maps.

Paper: Zhu, Su, Lu, Li, Wang, Dai. "Deformable DETR: Deformable Transformers for End-to-End Object
Detection", ICLR 2021. https://arxiv.org/abs/2010.04159

The sampling is the authors' pure-PyTorch path (one ``grid_sample`` per level), so it needs no
compiled extension, runs on any device and dtype, and traces with ``torch.compile``. Cost: time and
memory O(P * heads * levels * points * C / heads) for P queries, linear in the number of positions.

:func:`deformable_sample` and :class:`MultiScaleDeformableAttention` are the multi-scale core (used
by the detector neck, :mod:`visattn.models.neck`); :class:`DeformableAttention` is the single-scale
block of the registry.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ._attention import GATHER_BYTES, check_heads, check_pos_embed, sincos_2d
from ._base import AttentionBlock, check_int

__all__ = ["DeformableAttention", "MultiScaleDeformableAttention", "deformable_sample",
           "reference_points", "splat"]


def reference_points(h: int, w: int, *, device=None, dtype=None) -> torch.Tensor:
    """Centres of the pixels of an ``h x w`` map as ``(h * w, 2)`` ``(x, y)`` fractions of its width and
    height (``(0.5 / w, 0.5 / h)`` first, row-major), the encoder's reference points (float32
    unless ``dtype`` says otherwise)."""
    dtype = dtype or torch.float32
    ys = (torch.arange(h, device=device, dtype=dtype) + 0.5) / h
    xs = (torch.arange(w, device=device, dtype=dtype) + 0.5) / w
    return torch.stack([xs.repeat(h), ys.repeat_interleave(w)], -1)  # (h*w, 2)


def deformable_sample(values: Sequence[torch.Tensor], locations: torch.Tensor,
                      weights: torch.Tensor) -> torch.Tensor:
    """The weighted sum of bilinear samples that deformable attention computes.

    Args:
        values: one map per level, each ``(N * heads, D, H_l, W_l)`` (the projected values, split by
            head, head-major within a sample).
        locations: ``(N, Q, heads, levels, points, 2)`` sampling points as ``(x, y)`` fractions of
            each level's width and height (``0`` is the left / top edge, ``1`` the right / bottom
            edge; pixel ``i`` spans ``[i / W, (i + 1) / W]``). Points outside read zeros.
        weights: ``(N, Q, heads, levels, points)`` attention weights.

    Returns:
        ``(N, heads * D, Q)``: per query and head, ``sum_{l, p} weights * value_l(location)``.

    Samples in the promoted dtype of ``values`` and ``locations`` (under bf16 autocast the
    locations stay float32, so the points keep their sub-pixel precision).
    """
    n, q, _, levels = locations.shape[:4]  # (N, Q, heads, levels, points, 2)
    if len(values) != levels:
        raise ValueError(f"deformable_sample: {len(values)} value maps for {levels} levels")
    dtype = torch.promote_types(values[0].dtype, locations.dtype)
    grids = (2 * locations.to(dtype) - 1).transpose(1, 2).flatten(0, 1)  # (N*heads, Q, levels, points, 2)
    weights = weights.to(dtype).transpose(1, 2).flatten(0, 1)  # (N*heads, Q, levels, points)
    out = None
    for lvl, value in enumerate(values):
        sampled = F.grid_sample(value.to(dtype), grids[:, :, lvl], mode="bilinear",
                                padding_mode="zeros", align_corners=False)  # (N*heads, D, Q, points)
        term = (sampled * weights[:, None, :, lvl]).sum(-1)  # (N*heads, D, Q)
        out = term if out is None else out + term
    return out.reshape(n, -1, q)  # (N, heads*D, Q)


def splat(locations: torch.Tensor, weights: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Spread each weight bilinearly onto the ``h x w`` map at its location (the adjoint of the
    bilinear sampling in :func:`deformable_sample`; mass falling outside the map is dropped).

    Args:
        locations: ``(N, K, 2)`` ``(x, y)`` fractions of the map's width and height.
        weights: ``(N, K)``.

    Returns:
        ``(N, h * w)`` float32: for every pixel, the sum of the weights times its bilinear
        coefficient for each location.
    """
    n = locations.shape[0]
    # pixel coordinates, centres at integers; a non-finite point lands off the map
    px = torch.nan_to_num(locations[..., 0].float() * w - 0.5, nan=-2.0, posinf=w + 1.0, neginf=-2.0)
    py = torch.nan_to_num(locations[..., 1].float() * h - 0.5, nan=-2.0, posinf=h + 1.0, neginf=-2.0)
    x0, y0 = px.floor(), py.floor()
    fx, fy = px - x0, py - y0
    weights = weights.float()
    out = torch.zeros(n, h * w, device=locations.device)
    for dx, dy, coef in ((0, 0, (1 - fx) * (1 - fy)), (1, 0, fx * (1 - fy)),
                         (0, 1, (1 - fx) * fy), (1, 1, fx * fy)):
        xi, yi = x0 + dx, y0 + dy
        inside = (xi >= 0) & (xi <= w - 1) & (yi >= 0) & (yi <= h - 1)
        index = (yi.clamp(0, h - 1) * w + xi.clamp(0, w - 1)).long()
        out.scatter_add_(1, index, torch.where(inside, coef * weights, 0.0))
    return out


class MultiScaleDeformableAttention(nn.Module):
    """Multi-scale deformable attention (the paper's eq. 3): for query ``q`` with reference point
    ``p`` (fractions of the width and height, the same point on every level),

    ``out(q) = W_o sum_m sum_{l,k} A_{mlk}(q) W_v x_l(p + Δp_{mlk}(q) / (W_l, H_l))``,

    with offsets ``Δp`` (in pixels of level ``l``) and weights ``A`` (a softmax over the
    ``levels * points`` samples of each head) both linear in the query. Initialised as the authors
    do: zero offset and weight projections, offset biases pointing each head in its own direction
    on a square around the reference (``k + 1`` pixels for point ``k``), so every weight starts at
    ``1 / (levels * points)``; Xavier value and output projections with zero biases.

    Args:
        channels: model width C.
        levels: number of feature maps sampled.
        heads: number of heads (must divide C); default: the most of 8/4/2 with >= 16 channels each.
        points: sampling points per head and level (the paper: 4).
    """

    def __init__(self, channels: int, *, levels: int = 1, heads: int | None = None, points: int = 4,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        block = type(self).__name__
        check_int(levels, "levels", block)
        check_int(points, "points", block)
        dd = {"device": device, "dtype": dtype}
        self.channels = channels
        self.heads = check_heads(channels, heads, block)
        self.levels = levels
        self.points = points
        self.sampling_offsets = nn.Linear(channels, self.heads * levels * points * 2, **dd)
        self.attention_weights = nn.Linear(channels, self.heads * levels * points, **dd)
        self.value_proj = nn.Linear(channels, channels, **dd)
        self.output_proj = nn.Linear(channels, channels, **dd)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The authors' initialisation (see the class docstring)."""
        nn.init.zeros_(self.sampling_offsets.weight)
        angle = torch.arange(self.heads, dtype=torch.float32) * (2 * math.pi / self.heads)
        direction = torch.stack([angle.cos(), angle.sin()], -1)  # (heads, 2) as (x, y)
        direction = direction / direction.abs().amax(-1, keepdim=True)  # onto the square's border
        steps = torch.arange(1, self.points + 1, dtype=torch.float32)  # point k at k + 1 pixels
        grid = direction[:, None, None, :] * steps[None, None, :, None]  # (heads, 1, points, 2)
        grid = grid.expand(self.heads, self.levels, self.points, 2)
        self.sampling_offsets.bias.copy_(grid.reshape(-1))
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for lin in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)

    def sampling(self, query: torch.Tensor, reference: torch.Tensor,
                 shapes: Sequence[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Where and how much each query samples.

        Args:
            query: ``(N, Q, C)``.
            reference: ``(Q, 2)`` or ``(N, Q, 2)`` reference points, ``(x, y)`` fractions, the same
                on every level; or ``(N, Q, levels, 2)``, one per level.
            shapes: ``(H_l, W_l)`` of each level.

        Returns:
            ``locations (N, Q, heads, levels, points, 2)`` (fractions, float32 or wider) and
            ``weights (N, Q, heads, levels, points)`` summing to 1 over levels and points.
        """
        n, q, _ = query.shape
        m, lv, p = self.heads, self.levels, self.points
        offsets = self.sampling_offsets(query).view(n, q, m, lv, p, 2)  # pixels of each level
        logits = self.attention_weights(query).view(n, q, m, lv * p)
        weights = logits.softmax(-1).view(n, q, m, lv, p)
        size = torch.tensor([[w, h] for h, w in shapes], device=query.device)  # (levels, 2) as (W, H)
        dtype = torch.promote_types(offsets.dtype, torch.float32)
        per_level = reference.ndim == 4  # (N, Q, levels, 2)
        ref = reference.to(dtype).reshape(-1, q, 1, lv if per_level else 1, 1, 2)
        locations = ref + offsets.to(dtype) / size.to(dtype)[:, None, :]  # (N, Q, heads, levels, points, 2)
        return locations, weights

    def forward(self, query: torch.Tensor, reference: torch.Tensor, value: torch.Tensor,
                shapes: Sequence[tuple[int, int]], padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Attend from ``query`` to the levels of ``value``.

        Args:
            query: ``(N, Q, C)`` query features (with their position embedding added).
            reference: ``(Q, 2)`` or ``(N, Q, 2)`` reference points, ``(x, y)`` fractions of the
                width and height, the same on every level; or ``(N, Q, levels, 2)``, one per
                level (the authors' form, for maps padded differently per image).
            value: ``(N, S, C)`` the levels' positions, flattened row-major and concatenated
                (``S = sum H_l * W_l``).
            shapes: ``(H_l, W_l)`` of each of the ``levels`` maps, as Python ints.
            padding_mask: ``(N, S)`` bool, ``True`` at positions that are batch padding: their
                projected values are zero, as off the map (the authors' ``input_padding_mask``).

        Returns:
            ``(N, Q, C)``.

        The queries run in chunks whose samples take about ``GATHER_BYTES`` (one chunk when
        compiling), so the sampled values are summed while still in cache on large maps; a query's
        result does not depend on the chunking.
        """
        n, s, c = value.shape
        if len(shapes) != self.levels or sum(h * w for h, w in shapes) != s:
            raise ValueError(f"{type(self).__name__}: value has {s} positions, shapes {list(shapes)} "
                             f"(built for {self.levels} levels)")
        d = c // self.heads
        v = self.value_proj(value)
        if padding_mask is not None:
            v = v.masked_fill(padding_mask[..., None], 0.0)
        v = v.view(n, s, self.heads, d)
        maps, start = [], 0
        for h, w in shapes:  # (N*heads, D, H_l, W_l)
            maps.append(v[:, start:start + h * w].permute(0, 2, 3, 1).reshape(n * self.heads, d, h, w))
            start += h * w
        q = query.shape[1]
        step = q
        if not torch.compiler.is_compiling():
            # per query: the sampled values (C * levels * points) plus offsets, weights and points
            per_query = (c + 8 * self.heads) * self.levels * self.points * max(v.element_size(), 4)
            step = max(1, GATHER_BYTES // (n * per_query))
        outs = []
        for start in range(0, q, step):  # queries in cache-sized chunks; each query's result is the same
            ref = reference[:, start:start + step] if reference.ndim == 4 else reference[..., start:start + step, :]
            locations, weights = self.sampling(query[:, start:start + step], ref, shapes)
            out = deformable_sample(maps, locations, weights).to(v.dtype)  # (N, C, Q')
            outs.append(self.output_proj(out.transpose(1, 2)))  # (N, Q', C)
        return outs[0] if len(outs) == 1 else torch.cat(outs, 1)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, levels={self.levels}, heads={self.heads}, points={self.points}"


class DeformableAttention(AttentionBlock):
    """``x + W_o DeformAttn(x + p)``: single-scale multi-head deformable attention, each position a
    query whose reference point is its own centre, sampling ``points`` positions per head from
    the value map ``W_v x`` at offsets predicted from ``x + p`` (``p`` the 2-D sin-cos encoding of
    the position, on the query only, as in the paper's encoder).

    Each position reads ``heads * points`` bilinear samples: time and memory are linear in H*W.
    The offsets start at ``1..points`` pixels along one direction per head and the weights
    uniform (:class:`MultiScaleDeformableAttention`). Samples falling off the map read zeros.

    Recorded for :mod:`visattn.explain` (only while capturing): ``"received"``, the sampling
    weights splatted bilinearly onto the map, summed over queries and points, averaged over heads
    and divided by the number of queries (its sum over the map is 1 minus the weight that fell off
    the map); ``"query"``, the same for the query position alone.

    Args:
        channels: input channels C.
        heads: number of heads (must divide C); default: the most of 8/4/2 with >= 16 channels each.
        points: sampling points per head (the paper: 4).
        pos_embed: ``"sincos"`` or ``"none"``.
    """

    def __init__(self, channels: int, *, heads: int | None = None, points: int = 4,
                 pos_embed: str = "sincos", device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        check_pos_embed(pos_embed, "DeformableAttention")
        self.channels = channels
        self.pos_embed = pos_embed
        self.attn = MultiScaleDeformableAttention(channels, levels=1, heads=heads, points=points,
                                                  device=device, dtype=dtype)
        self.heads, self.points = self.attn.heads, self.attn.points

    def _forward(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        n, c, h, w = x.shape
        tokens = x.flatten(2).transpose(1, 2)  # (N, HW, C)
        query = tokens
        if self.pos_embed == "sincos":
            query = tokens + sincos_2d(h, w, c, device=x.device, dtype=x.dtype)
        ref = reference_points(h, w, device=x.device,
                               dtype=torch.promote_types(x.dtype, torch.float32))  # (HW, 2)
        y = self.attn(query, ref, tokens, [(h, w)])  # (N, HW, C)
        if self._capture is not None:
            self._record(query, ref, h, w)
        return torch.add(x, y.transpose(1, 2).reshape(n, c, h, w).to(x.dtype), out=out)

    @torch.no_grad()
    def _record(self, query: torch.Tensor, ref: torch.Tensor, h: int, w: int) -> None:
        """Store the ``"received"`` and ``"query"`` maps (see the class docstring)."""
        n, q = query.shape[:2]
        locations, weights = self.attn.sampling(query, ref, [(h, w)])  # (N, Q, M, 1, P, 2), (N, Q, M, 1, P)
        heads = self.heads
        received = splat(locations.reshape(n, -1, 2), weights.reshape(n, -1), h, w)
        self._capture.add("received", (received / (heads * q)).view(n, h, w))
        index = self._capture.query_index(h, w)
        if index is not None:
            at = splat(locations[:, index].reshape(n, -1, 2), weights[:, index].reshape(n, -1), h, w)
            self._capture.add("query", (at / heads).view(n, h, w))

    def extra_repr(self) -> str:
        return (f"channels={self.channels}, heads={self.heads}, points={self.points}, "
                f"pos_embed={self.pos_embed!r}")
