"""FPN neck with optional attention on each level and DyHead-style scale-aware attention.

Scale-aware attention follows "Dynamic Head: Unifying Object Detection Heads with Attentions"
(Dai et al., CVPR 2021, https://arxiv.org/abs/2106.08322): each pyramid level is re-weighted by a
scalar computed from the pooled features; here the weights of all levels come from the pooled
features of all levels, so a level is weighted against the others.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock

from ..plug import Blend
from ..registry import create_block

__all__ = ["FPNNeck", "ScaleAwareAttention"]


class ScaleAwareAttention(nn.Module):
    """Re-weight ``L`` pyramid levels of ``channels`` channels by ``2 * hard_sigmoid(fc(pooled))``.

    The ``fc`` is zero-initialised, so every weight starts at exactly 1 (identity) and the layer
    still receives a gradient from the first step.
    """

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
        return [f * weights[:, i, None, None, None].to(f.dtype) for i, f in enumerate(feats)]


class FPNNeck(nn.Module):
    """Backbone body + torchvision FPN (+ extra levels) + optional attention per output level.

    Args:
        body: returns ``OrderedDict[str, Tensor]`` and has ``channels`` (per level).
        out_channels: FPN width.
        extra_blocks: torchvision extra FPN block (``LastLevelMaxPool``, ``LastLevelP6P7``) or None.
        num_extra: how many levels ``extra_blocks`` adds.
        attention: block names applied in order to each output level: a registered block
            (its own instance per level, behind a zero-initialised :class:`~visattn.plug.Blend`), or
            ``"scale"`` for :class:`ScaleAwareAttention` across levels.
    """

    def __init__(self, body: nn.Module, out_channels: int, extra_blocks: ExtraFPNBlock | None,
                 num_extra: int, attention: Sequence[str] = (), attention_kwargs: dict | None = None) -> None:
        super().__init__()
        self.body = body
        self.fpn = FeaturePyramidNetwork(list(body.channels), out_channels, extra_blocks=extra_blocks)
        self.out_channels = out_channels
        self.num_levels = len(body.channels) + num_extra
        self.attention = nn.ModuleList()
        for name in attention:
            if name == "scale":
                self.attention.append(ScaleAwareAttention(out_channels, self.num_levels))
            else:
                self.attention.append(nn.ModuleList(
                    Blend(create_block(name, out_channels, **(attention_kwargs or {})))
                    for _ in range(self.num_levels)))

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        feats = self.fpn(self.body(x))
        names, levels = list(feats.keys()), list(feats.values())
        for attn in self.attention:
            if isinstance(attn, ScaleAwareAttention):
                levels = attn(levels)
            else:
                levels = [blk(f) for blk, f in zip(attn, levels, strict=True)]
        return OrderedDict(zip(names, levels, strict=True))
