"""Semantic segmenters from torchvision's DeepLabV3 and FCN heads on a timm / torchvision backbone."""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn
from torchvision.models.segmentation import DeepLabV3
from torchvision.models.segmentation.deeplabv3 import DeepLabHead
from torchvision.models.segmentation.fcn import FCN, FCNHead

from .backbone import build_body

__all__ = ["SEGMENTER_ARCHS", "build_segmenter"]

SEGMENTER_ARCHS = ("deeplabv3", "fcn")


class _SegBody(nn.Module):
    """Adapt a :class:`~visattn.models.backbone.Body` to torchvision's ``{"out", "aux"}`` contract."""

    def __init__(self, body: nn.Module, aux: bool) -> None:
        super().__init__()
        self.body = body
        self.aux = aux

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        feats = list(self.body(x).values())
        out = OrderedDict(out=feats[-1])
        if self.aux:
            out["aux"] = feats[-2]
        return out


def build_segmenter(arch: str, *, backbone: str, num_classes: int, attention: str | None = None,
                    pretrained_backbone: bool = False, output_stride: int | None = 8,
                    aux_loss: bool = False, attention_stages=None, attention_kwargs: dict | None = None,
                    frozen_bn: bool | None = None, attention_gate: str = "zero") -> nn.Module:
    """Build a DeepLabV3 or FCN segmenter; ``model(x)["out"]`` is ``(N, num_classes, H, W)``,
    at the input's resolution.

    Args:
        arch: ``"deeplabv3"`` or ``"fcn"``.
        backbone: a timm model or torchvision ResNet name, as for :func:`build_detector`.
        num_classes: output channels, background included if you have one.
        attention: block plugged into the backbone (:func:`visattn.plug`).
        attention_gate: how ``attention`` is wired: ``"zero"`` (default) behind a zero-initialised
            blend (identity at insertion, for a pretrained backbone), ``"none"`` as its paper applies
            it (training from scratch); see :func:`visattn.plug`.
        output_stride: 8 (the papers' dilated setting, default), 16, or None for the backbone's
            own stride (usually 32; cheapest).
        aux_loss: add torchvision's auxiliary FCN head on the second-deepest stage (``"aux"``).

    Every argument is checked before the backbone is built; a bad one is a ``TypeError`` or
    ``ValueError`` naming it (Python itself refuses a misspelt keyword: there is no ``**kwargs``).

    Example:
        >>> m = build_segmenter("deeplabv3", backbone="resnet18", num_classes=21, attention="eca")
        >>> m(torch.rand(1, 3, 64, 64))["out"].shape
        torch.Size([1, 21, 64, 64])
    """
    if not isinstance(arch, str) or arch not in SEGMENTER_ARCHS:
        raise ValueError(f"unknown segmenter arch {arch!r}; choose from {', '.join(SEGMENTER_ARCHS)}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    if not isinstance(aux_loss, bool):
        raise TypeError(f"aux_loss must be True or False, got {aux_loss!r}")
    if not isinstance(pretrained_backbone, bool):
        raise TypeError(f"pretrained_backbone must be True or False, got {pretrained_backbone!r}")
    if output_stride not in (None, 8, 16, 32):
        raise ValueError(f"output_stride must be 8, 16, 32 or None (the backbone's own), got {output_stride!r}")
    body = build_body(backbone, last=2, pretrained=pretrained_backbone, output_stride=output_stride,
                      frozen_bn=frozen_bn, attention=attention, attention_kwargs=attention_kwargs,
                      attention_stages=attention_stages, attention_gate=attention_gate)
    channels = body.channels
    aux = FCNHead(channels[-2], num_classes) if aux_loss else None
    wrapped = _SegBody(body, aux_loss)
    if arch == "deeplabv3":
        return DeepLabV3(wrapped, DeepLabHead(channels[-1], num_classes), aux)
    return FCN(wrapped, FCNHead(channels[-1], num_classes), aux)
