"""FPN neck with optional attention on each level, and attention across the levels.

Across the levels, every one starting as the identity (the untrained neck returns the FPN's
output exactly):

* ``"scale"``, :class:`ScaleAwareAttention`: DyHead's scale-aware attention, each pyramid level
  re-weighted by a scalar; here the weights of all levels come from the pooled features of all
  levels, so a level is weighted against the others.
* ``"dyhead"``, :class:`DynamicHead`: the full DyHead block, scale-, spatial- and task-aware
  attention, stacked. Dai, Chen, Xiao, Chen, Liu, Yuan, Zhang. "Dynamic Head: Unifying Object
  Detection Heads with Attentions", CVPR 2021. https://arxiv.org/abs/2106.08322
* ``"deformable"``, :class:`DeformableEncoder`: the encoder of Deformable DETR, every position of
  every level a query sampling all levels. Zhu, Su, Lu, Li, Wang, Dai. "Deformable DETR: Deformable
  Transformers for End-to-End Object Detection", ICLR 2021. https://arxiv.org/abs/2010.04159

For :mod:`visattn.explain`, the modules that apply attention across the levels
(:class:`ScaleAwareAttention`, :class:`DyHeadBlock`, the encoder layers of
:class:`DeformableEncoder`) are :class:`LevelAttention` modules: while ``_capture`` holds a
:class:`LevelCaptures` they record, per pyramid level, the attention they applied to it, under the
keys of :mod:`visattn.layers._capture`; with ``_capture`` at ``None`` (always, outside
:func:`visattn.explain.attention_maps`) they record and compute nothing extra.
"""
from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import FeaturePyramidNetwork, deform_conv2d
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock

from .._checks import check_int
from ..layers._capture import Capture
from ..layers.deformable import MultiScaleDeformableAttention, reference_points, splat
from ..plug import Blend
from ..registry import create_block

__all__ = ["ACROSS_LEVELS", "DeformableEncoder", "DynamicHead", "FPNNeck", "LevelAttention", "LevelCapture",
           "LevelCaptures", "ScaleAwareAttention"]


# --------------------------------------------------------------------------------------------------
# Recording attention per pyramid level, for visattn.explain


@dataclass
class LevelCapture(Capture):
    """What a :class:`LevelAttention` module recorded for one pyramid level: the standard keys of
    :class:`~visattn.layers._capture.Capture` on that level's map, and ``weights``: scalar weights
    ``(N,)`` the module applied to the level as a whole (scale-aware attention), by name."""

    weights: dict[str, torch.Tensor] = field(default_factory=dict)

    def add_weight(self, name: str, value: torch.Tensor) -> None:
        """Store the ``(N,)`` weight ``name`` (detached, float32); a second recording of the same
        name multiplies (two weights applied one after the other)."""
        value = value.detach().float().reshape(len(value))
        old = self.weights.get(name)
        self.weights[name] = value if old is None else old * value


@dataclass
class LevelCaptures:
    """One :class:`LevelCapture` per pyramid level, made when a level first records.

    Attributes:
        query: the query point as for :attr:`Capture.query`, given to every level's capture.
        levels: level index -> its capture.
    """

    query: tuple[float, float] | None = None
    levels: dict[int, LevelCapture] = field(default_factory=dict)

    def level(self, index: int) -> LevelCapture:
        """The capture of level ``index`` (made on first use)."""
        if index not in self.levels:
            self.levels[index] = LevelCapture(query=self.query)
        return self.levels[index]


class LevelAttention(nn.Module):
    """Base of the modules that apply attention across pyramid levels (over the features of all
    levels at once). :mod:`visattn.explain` finds them as it finds
    :class:`~visattn.layers.AttentionBlock` modules and reports one map per (module, level).

    Attributes:
        attention_name: the ``neck_attention`` name the module belongs to.
        attention_kind: the kind of its maps (as :attr:`visattn.explain.AttentionMap.kind`).
    """

    attention_name: str = "unknown"
    attention_kind: str = "unknown"
    #: Set by :mod:`visattn.explain` while it records; ``None`` (no recording, no extra work) otherwise.
    _capture: LevelCaptures | None = None


class ScaleAwareAttention(LevelAttention):
    """Re-weight ``L`` pyramid levels of ``channels`` channels by ``2 * hard_sigmoid(fc(pooled))``.

    The ``fc`` is zero-initialised, so every weight starts at exactly 1 (identity) and the layer
    still receives a gradient from the first step.

    Recorded for :mod:`visattn.explain` (only while capturing): per level, its weight ``(N,)`` as
    ``"scale"`` (:attr:`LevelCapture.weights`); a scalar has no map, so the level is shown as its
    feature energy after re-weighting.
    """

    attention_name, attention_kind = "scale", "scale"

    def __init__(self, channels: int, num_levels: int) -> None:
        super().__init__()
        self.num_levels = num_levels
        self.fc = nn.Linear(channels * num_levels, num_levels)
        nn.init.zeros_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        if len(feats) != self.num_levels:
            raise ValueError(f"ScaleAwareAttention was built for {self.num_levels} levels, got {len(feats)}")
        pooled = torch.cat([f.mean(dim=(2, 3)) for f in feats], dim=1)  # (N, L*C)
        weights = 2.0 * F.hardsigmoid(self.fc(pooled))                  # (N, L)
        if self._capture is not None:
            for i in range(len(feats)):
                self._capture.level(i).add_weight("scale", weights[:, i])
        return [f * weights[:, i, None, None, None].to(f.dtype) for i, f in enumerate(feats)]


def _check_levels(module: nn.Module, feats: Sequence[torch.Tensor]) -> None:
    if len(feats) != module.num_levels:
        raise ValueError(f"{type(module).__name__} was built for {module.num_levels} levels, got {len(feats)}")


# --------------------------------------------------------------------------------------------------
# DyHead: scale-, spatial- and task-aware attention


class DyReLU(nn.Module):
    """Task-aware attention of DyHead (dynamic ReLU, Chen et al. ECCV 2020, variant B): per sample and
    channel ``max(a1 x + b1, a2 x + b2)``, the four coefficients computed from the pooled features
    by ``Linear -> ReLU -> Linear -> hard sigmoid``, centred so that an output of 1/2 gives
    ``a1 = 1, b1 = 0, a2 = 0, b2 = 0``, a plain ReLU (the authors' ``lambda_a = 1``, init ``[1, 0]``).

    Given a ``capture``, records as ``"channel"`` ``(N, C)`` each channel's gain on large positive
    inputs, ``max(a1, a2)`` (1 for the plain ReLU)."""

    def __init__(self, channels: int, reduction: int = 4) -> None:
        super().__init__()
        hidden = max(1, channels // reduction)
        self.fc1 = nn.Linear(channels, hidden)
        self.fc2 = nn.Linear(hidden, 4 * channels)

    def forward(self, x: torch.Tensor, capture: Capture | None = None) -> torch.Tensor:
        theta = F.hardsigmoid(self.fc2(F.relu(self.fc1(x.mean((2, 3)))))) - 0.5  # (N, 4C)
        a1, b1, a2, b2 = theta[:, :, None, None].chunk(4, 1)  # each (N, C, 1, 1)
        if capture is not None:
            capture.add("channel", torch.maximum(2 * a1 + 1, 2 * a2).flatten(1))  # (N, C)
        return torch.maximum(x * (2 * a1 + 1) + b1, x * (2 * a2) + b2)


class _ModulatedDeformConv(nn.Module):
    """3x3 modulated deformable convolution (DCNv2, ``torchvision.ops.deform_conv2d``) without
    bias, then GroupNorm, as DyHead's spatial convs: 16 groups as the authors where each keeps at
    least 2 channels (a 1x1 level, such as P7 of a small image, leaves one value per channel, which
    GroupNorm cannot normalise), fewer otherwise."""

    def __init__(self, channels: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.weight = nn.Parameter(torch.empty(channels, channels, 3, 3))
        bound = 1 / math.sqrt(channels * 9)
        nn.init.uniform_(self.weight, -bound, bound)
        self.norm = nn.GroupNorm(math.gcd(16, max(1, channels // 2)), channels)

    def forward(self, x: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        dtype = self.weight.dtype  # torchvision has no CPU autocast rule for it: cast here
        # nor a bfloat16 CPU kernel: a bf16 model convolves in float32 (on every device, to be safe)
        compute = torch.float32 if dtype == torch.bfloat16 else dtype
        y = deform_conv2d(x.to(compute), offset.to(compute), self.weight.to(compute), stride=self.stride,
                          padding=1, mask=mask.to(compute))
        return self.norm(y.to(dtype))


class DyHeadBlock(LevelAttention):
    """One DyHead block over ``L`` levels: for level ``l``, the offsets and modulation of a 3x3
    deformable convolution are predicted from level ``l`` (spatial-aware attention); the same
    offsets sample level ``l`` (stride 1), level ``l - 1`` (stride 2) and level ``l + 1`` (resized to
    level ``l`` first), each result is scaled by ``hard_sigmoid(relu(w . mean(f)))`` (scale-aware
    attention), the (up to three) are averaged, and :class:`DyReLU` (task-aware attention) follows.

    Initialised as mmdetection's DyHead: zero offsets (mask 1/2), 0.01-std scale and DyReLU
    weights. The authors' code convolves level ``l + 1`` and then upsamples, with offsets of level
    ``l``'s size (their CUDA op reads them at the smaller size); here level ``l + 1`` is resized first,
    so every offset belongs to the position it moves.

    Recorded for :mod:`visattn.explain` (only while capturing), per output level: ``"spatial"``,
    the deformable convolutions' modulation mask averaged over the 9 kernel points (spatial-aware
    attention); ``"channel"``, DyReLU's per-channel gain (:class:`DyReLU`, task-aware attention);
    and the scale-aware weights ``(N,)`` of the terms from the same, the finer and the coarser level
    as ``"scale"``, ``"scale_finer"``, ``"scale_coarser"`` (:attr:`LevelCapture.weights`).
    """

    attention_name, attention_kind = "dyhead", "hybrid"

    def __init__(self, channels: int, reduction: int = 4) -> None:
        super().__init__()
        self.offset = nn.Conv2d(channels, 27, 3, padding=1)  # 18 offsets + 9 modulation per position
        nn.init.zeros_(self.offset.weight)
        nn.init.zeros_(self.offset.bias)
        self.mid = _ModulatedDeformConv(channels, 1)
        self.low = _ModulatedDeformConv(channels, 2)  # from the finer level
        self.high = _ModulatedDeformConv(channels, 1)  # from the coarser level, resized
        self.scale = nn.Linear(channels, 1)
        self.task = DyReLU(channels, reduction)
        for lin in (self.scale, self.task.fc1, self.task.fc2):
            nn.init.normal_(lin.weight, std=0.01)
            nn.init.zeros_(lin.bias)

    def _scaled(self, f: torch.Tensor, capture: LevelCapture | None = None, name: str = "") -> torch.Tensor:
        weight = F.hardsigmoid(F.relu(self.scale(f.mean((2, 3)))))  # (N, 1)
        if capture is not None:
            capture.add_weight(name, weight[:, 0])
        return f * weight[:, :, None, None]

    def forward(self, feats: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        outs = []
        for lvl, x in enumerate(feats):
            h, w = x.shape[-2:]
            capture = None if self._capture is None else self._capture.level(lvl)
            offset_mask = self.offset(x)  # (N, 27, H, W)
            offset, mask = offset_mask[:, :18], offset_mask[:, 18:].sigmoid()
            if capture is not None:
                capture.add("spatial", mask.mean(1))  # (N, H, W): mean over the 9 kernel points
            total, count = self._scaled(self.mid(x, offset, mask), capture, "scale"), 1
            if lvl > 0:
                finer = feats[lvl - 1]
                if (finer.shape[-2] + 1) // 2 != h or (finer.shape[-1] + 1) // 2 != w:
                    finer = F.interpolate(finer, size=(2 * h, 2 * w), mode="bilinear", align_corners=False)
                total = total + self._scaled(self.low(finer, offset, mask), capture, "scale_finer")
                count += 1
            if lvl < len(feats) - 1:
                coarser = F.interpolate(feats[lvl + 1], size=(h, w), mode="bilinear", align_corners=True)
                total = total + self._scaled(self.high(coarser, offset, mask), capture, "scale_coarser")
                count += 1
            outs.append(self.task(total / count, capture))
        return outs


class DynamicHead(nn.Module):
    """DyHead over the pyramid: ``blocks`` :class:`DyHeadBlock` in sequence (the paper: 6), each behind
    a zero-initialised gate, ``f + g * (block(f) - f)``, so the module starts as the identity.

    Args:
        channels: FPN width.
        num_levels: pyramid levels.
        blocks: DyHead blocks stacked.
        reduction: channel reduction of the DyReLU coefficient MLP.
    """

    def __init__(self, channels: int, num_levels: int, *, blocks: int = 1, reduction: int = 4) -> None:
        super().__init__()
        check_int("dyhead blocks", blocks, 1)
        check_int("dyhead reduction", reduction, 1)
        self.num_levels = num_levels
        self.blocks = nn.ModuleList(DyHeadBlock(channels, reduction) for _ in range(blocks))
        self.gates = nn.Parameter(torch.zeros(blocks))

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        _check_levels(self, feats)
        for block, gate in zip(self.blocks, self.gates, strict=True):
            new = block(feats)
            feats = [f + gate.to(f.dtype) * (o.to(f.dtype) - f) for f, o in zip(feats, new, strict=True)]
        return feats


# --------------------------------------------------------------------------------------------------
# Deformable DETR's encoder across the pyramid


def sine_positions(points: torch.Tensor, dim: int, *, dtype=None, temperature: float = 10000.0) -> torch.Tensor:
    """``(..., dim)`` sine position encoding of ``points`` ``(..., 2)``, ``(x, y)`` fractions of the
    image's (unpadded) width and height, scaled by ``2 pi`` as DETR's ``normalize=True``: the same
    point of the image gets the same code on every level. Half the channels encode y, half x (sin
    and cos interleaved by frequency blocks); ``dim`` not divisible by 4 leaves the last channels
    zero."""
    quarter = dim // 4
    out = points.new_zeros(*points.shape[:-1], dim, dtype=torch.float32)
    if quarter:
        omega = 1.0 / temperature ** (torch.arange(quarter, device=points.device, dtype=torch.float32) / quarter)
        ref = points.float() * (2 * math.pi)
        ay = ref[..., 1:] * omega  # (..., quarter)
        ax = ref[..., :1] * omega
        out[..., :4 * quarter] = torch.cat([ay.sin(), ay.cos(), ax.sin(), ax.cos()], -1)
    return out.to(dtype or torch.get_default_dtype())


class _EncoderLayer(LevelAttention):
    """Deformable DETR's encoder layer (post-norm): ``t = LN(t + MSDA(t + pos, ref, t))``, then
    ``t = LN(t + FFN(t))``.

    Recorded for :mod:`visattn.explain` (only while capturing), per level ``l``: ``"received"``,
    the sampling weights of all queries (the positions of every level) that fall on level ``l``,
    splatted bilinearly onto its map, averaged over heads and divided by the number of queries
    (summed over all levels' maps: 1 less the weight that fell off the maps); with a query point,
    ``"query"``: the same for the point's queries alone, one per level (the position of each level
    holding the point), divided by their number.
    """

    attention_name, attention_kind = "deformable", "self"

    def __init__(self, channels: int, levels: int, heads: int | None, points: int, ffn_ratio: int) -> None:
        super().__init__()
        self.attn = MultiScaleDeformableAttention(channels, levels=levels, heads=heads, points=points)
        self.norm1 = nn.LayerNorm(channels)
        self.ffn = nn.Sequential(nn.Linear(channels, ffn_ratio * channels), nn.ReLU(),
                                 nn.Linear(ffn_ratio * channels, channels))
        self.norm2 = nn.LayerNorm(channels)

    def forward(self, tokens: torch.Tensor, pos: torch.Tensor, ref: torch.Tensor,
                shapes: list[tuple[int, int]], padding: torch.Tensor | None = None) -> torch.Tensor:
        if self._capture is not None:
            self._record(tokens + pos, ref, shapes)
        tokens = self.norm1(tokens + self.attn(tokens + pos, ref, tokens, shapes, padding))
        return self.norm2(tokens + self.ffn(tokens))

    @torch.no_grad()
    def _record(self, query: torch.Tensor, ref: torch.Tensor, shapes: list[tuple[int, int]]) -> None:
        """Store each level's ``"received"`` and ``"query"`` maps (see the class docstring)."""
        n, q = query.shape[:2]
        heads = self.attn.heads
        locations, weights = self.attn.sampling(query, ref, shapes)  # (N, Q, M, L, P, 2), (N, Q, M, L, P)
        starts = [0]
        for h, w in shapes[:-1]:
            starts.append(starts[-1] + h * w)
        points = [self._capture.level(lvl).query_index(h, w) for lvl, (h, w) in enumerate(shapes)]
        at = None if points[0] is None else torch.tensor([s + i for s, i in zip(starts, points, strict=True)],
                                                         device=query.device)  # (L,) the point's queries
        for lvl, (h, w) in enumerate(shapes):
            capture = self._capture.level(lvl)
            loc, wt = locations[:, :, :, lvl], weights[:, :, :, lvl]  # (N, Q, M, P, 2), (N, Q, M, P)
            received = splat(loc.reshape(n, -1, 2), wt.reshape(n, -1), h, w)  # (N, h*w)
            capture.add("received", (received / (heads * q)).view(n, h, w))
            if at is not None:
                paid = splat(loc[:, at].reshape(n, -1, 2), wt[:, at].reshape(n, -1), h, w)
                capture.add("query", (paid / (heads * len(at))).view(n, h, w))


class DeformableEncoder(nn.Module):
    """Deformable DETR's encoder on the FPN: the positions of all levels are the queries, each
    sampling ``points`` points per head on every level around its own centre (multi-scale
    deformable attention); the query carries a normalised sine position encoding plus a learned
    embedding of its level (``N(0, 1)``-initialised, as the authors). ``blocks`` encoder layers (the
    paper: 6), each behind a zero-initialised gate ``t + g * (layer(t) - t)``, so the module starts as
    the identity. Time and memory are linear in the number of positions.

    Images batched with larger ones are padded at the bottom/right; given ``valid`` (each image's
    width and height as fractions of the padded batch), the encoder does what the authors do with
    their padding mask: positions and reference points are fractions of each image's own valid
    region on every level (``ceil(fraction * side)`` positions, as their nearest-resized mask), one
    reference per level, and padded positions give zero values, as off the map. An image's
    output on its own positions then does not depend on what it is batched with (exactly, when
    its padded levels are its own levels plus padding; the FPN's convolutions still see the
    padding near the border). :class:`FPNNeck` passes ``valid`` from the detector's transform.

    Args:
        channels: FPN width.
        num_levels: pyramid levels.
        heads: attention heads (must divide ``channels``); default: the most of 8/4/2 with >= 16
            channels each.
        points: sampling points per head and level (the paper: 4).
        blocks: encoder layers.
        ffn_ratio: hidden width of the feed-forward layer over ``channels`` (the paper: 4).
    """

    def __init__(self, channels: int, num_levels: int, *, heads: int | None = None, points: int = 4,
                 blocks: int = 1, ffn_ratio: int = 4) -> None:
        super().__init__()
        check_int("deformable blocks", blocks, 1)
        check_int("deformable ffn_ratio", ffn_ratio, 1)
        self.num_levels = num_levels
        self.layers = nn.ModuleList(_EncoderLayer(channels, num_levels, heads, points, ffn_ratio)
                                    for _ in range(blocks))
        self.level_embed = nn.Parameter(torch.randn(num_levels, channels))
        self.gates = nn.Parameter(torch.zeros(blocks))

    def forward(self, feats: list[torch.Tensor], valid: torch.Tensor | None = None) -> list[torch.Tensor]:
        """``feats``: the levels ``(N, C, H_l, W_l)``; ``valid``: ``(N, 2)`` each image's ``(width,
        height)`` as fractions in ``(0, 1]`` of the padded batch (``None``: no padding)."""
        _check_levels(self, feats)
        n, c = feats[0].shape[:2]
        shapes = [(f.shape[-2], f.shape[-1]) for f in feats]
        tokens = torch.cat([f.flatten(2) for f in feats], 2).transpose(1, 2)  # (N, S, C)
        level = torch.cat([torch.full((h * w,), lvl, device=tokens.device)
                           for lvl, (h, w) in enumerate(shapes)])  # (S,) level of each position
        ref = torch.cat([reference_points(h, w, device=tokens.device) for h, w in shapes])  # (S, 2)
        if valid is None:
            points, padding = ref, None  # (S, 2)
        else:
            if (not isinstance(valid, torch.Tensor) or valid.shape != (n, 2)
                    or not bool(((valid > 0) & (valid <= 1)).all())):
                got = f"shape {tuple(valid.shape)}" if isinstance(valid, torch.Tensor) else type(valid).__name__
                raise ValueError(f"DeformableEncoder: valid must be ({n}, 2) fractions in (0, 1] (each "
                                 f"image's width and height in the padded batch), got {got}")
            # (N, S, 2) in each image's valid region, (N, S, L, 2) on every level, (N, S)
            points, ref, padding = self._valid_references(ref, level, shapes, valid)
        pos = sine_positions(points, c, dtype=tokens.dtype) + self.level_embed.to(tokens.dtype)[level]
        for layer, gate in zip(self.layers, self.gates, strict=True):
            new = layer(tokens, pos, ref, shapes, padding).to(tokens.dtype)
            tokens = tokens + gate.to(tokens.dtype) * (new - tokens)
        maps = tokens.transpose(1, 2).split([h * w for h, w in shapes], 2)  # each (N, C, H_l*W_l)
        return [m.reshape(n, c, h, w) for m, (h, w) in zip(maps, shapes, strict=True)]

    @staticmethod
    def _ratios(shapes: list[tuple[int, int]], valid: torch.Tensor) -> torch.Tensor:
        """``(N, L, 2)`` each image's valid ``(width, height)`` on each level as a fraction of the
        level: ``ceil(valid * side) / side`` (at least one position)."""
        sides = torch.tensor([[w, h] for h, w in shapes], device=valid.device, dtype=torch.float64)  # (L, 2)
        # a product that is an integer but for the fractions' rounding stays that integer
        slack = 4 * torch.finfo(valid.dtype).eps * sides
        count = (valid.double()[:, None] * sides - slack).ceil().clamp(min=1)
        return (torch.minimum(count, sides) / sides).float()

    def _valid_references(self, ref: torch.Tensor, level: torch.Tensor, shapes: list[tuple[int, int]],
                          valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """From the positions' centres ``ref`` ``(S, 2)`` (fractions of their padded level) and the
        images' ``valid`` fractions: the centres as fractions of each image's valid region
        ``(N, S, 2)``, the reference points on every level ``(N, S, L, 2)`` (fractions of the
        padded levels) and the padding mask ``(N, S)`` (see the class docstring)."""
        ratios = self._ratios(shapes, valid)  # (N, L, 2)
        own = ratios[:, level]  # (N, S, 2): the valid fraction of each position's own level
        points = ref[None] / own
        return points, points[:, :, None] * ratios[:, None], (ref[None] > own).any(-1)


#: Attentions across all pyramid levels, by their ``neck_attention`` name: built as
#: ``cls(channels, num_levels, **options)``.
ACROSS_LEVELS: dict[str, type[nn.Module]] = {
    "scale": ScaleAwareAttention,
    "dyhead": DynamicHead,
    "deformable": DeformableEncoder,
}


class FPNNeck(nn.Module):
    """Backbone body + torchvision FPN (+ extra levels) + optional attention per output level.

    Args:
        body: returns ``OrderedDict[str, Tensor]`` and has ``channels`` (per level).
        out_channels: FPN width.
        extra_blocks: torchvision extra FPN block (``LastLevelMaxPool``, ``LastLevelP6P7``) or None.
        num_extra: how many levels ``extra_blocks`` adds.
        attention: names applied in order: one of :data:`ACROSS_LEVELS` (``"scale"``,
            ``"dyhead"``, ``"deformable"``: one module over all levels), or a registered block (its
            own instance per level, behind a zero-initialised :class:`~visattn.plug.Blend`).
        attention_kwargs: options of the registered blocks without an entry in ``neck_kwargs``.
        neck_kwargs: options by name, e.g. ``{"deformable": {"points": 4, "blocks": 2}}``.
    """

    def __init__(self, body: nn.Module, out_channels: int, extra_blocks: ExtraFPNBlock | None,
                 num_extra: int, attention: Sequence[str] = (), attention_kwargs: dict | None = None,
                 neck_kwargs: dict[str, dict] | None = None) -> None:
        super().__init__()
        self.body = body
        self.fpn = FeaturePyramidNetwork(list(body.channels), out_channels, extra_blocks=extra_blocks)
        self.out_channels = out_channels
        self.num_levels = len(body.channels) + num_extra
        # per thread (replicas of nn.DataParallel share it): noted by note_images, taken by forward
        self._images: dict[int, tuple] = {}
        self.attention = nn.ModuleList()
        neck_kwargs = neck_kwargs or {}
        for name in attention:
            if name in ACROSS_LEVELS:
                self.attention.append(ACROSS_LEVELS[name](out_channels, self.num_levels,
                                                          **neck_kwargs.get(name, {})))
            else:
                kwargs = neck_kwargs.get(name, attention_kwargs or {})
                self.attention.append(nn.ModuleList(
                    Blend(create_block(name, out_channels, **kwargs)) for _ in range(self.num_levels)))

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        valid = self._take_valid(x)
        feats = self.fpn(self.body(x))
        names, levels = list(feats.keys()), list(feats.values())
        for attn in self.attention:
            if isinstance(attn, nn.ModuleList):  # one block per level
                levels = [blk(f) for blk, f in zip(attn, levels, strict=True)]
            elif isinstance(attn, DeformableEncoder):  # uses the images' valid regions
                levels = attn(levels, valid)
            else:  # one module across the levels
                levels = attn(levels)
        return OrderedDict(zip(names, levels, strict=True))

    def note_images(self, _module: nn.Module, _args: tuple, output: tuple) -> None:
        """Forward hook for the detector's transform: remember the batch's padded shape and image
        sizes for this thread's next :meth:`forward` (see :meth:`_take_valid`)."""
        images = output[0]
        self._images[threading.get_ident()] = (tuple(images.tensors.shape),
                                               [tuple(s) for s in images.image_sizes])

    def _take_valid(self, x: torch.Tensor) -> torch.Tensor | None:
        """``(N, 2)`` each image's ``(width, height)`` as fractions of ``x``, from the sizes noted by
        :meth:`note_images` in this thread for a batch of exactly ``x``'s shape (taken once);
        ``None`` otherwise (the neck called on its own: no padding). Float64: fractions such as
        0.3 must give exact products with the levels' sides."""
        noted = self._images.pop(threading.get_ident(), None)
        if noted is None or noted[0] != tuple(x.shape):
            return None
        hp, wp = x.shape[-2:]
        return torch.tensor([[w / wp, h / hp] for h, w in noted[1]], dtype=torch.float64, device=x.device)
