"""Detectors from torchvision's detection heads on a timm or torchvision backbone with FPN.

``build_detector`` keeps torchvision's detection API: in training ``model(images, targets)``
returns a dict of losses, in eval ``model(images)`` returns one dict of ``boxes`` (xyxy, input
pixels), ``labels`` and ``scores`` (and ``masks`` for Mask R-CNN) per image. ``images`` is a list of
``(3, H, W)`` float tensors in 0..1; labels are ``1..num_classes`` (0 is background).
"""
from __future__ import annotations

from collections.abc import Sequence

from torch import nn
from torchvision.models.detection import FCOS, FasterRCNN, MaskRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7

from .backbone import build_body
from .neck import FPNNeck

__all__ = ["ARCHS", "build_detector"]

ARCHS = ("fasterrcnn", "retinanet", "fcos", "maskrcnn")
_TWO_STAGE = ("fasterrcnn", "maskrcnn")
_CLASSES = {"fasterrcnn": FasterRCNN, "maskrcnn": MaskRCNN, "retinanet": RetinaNet, "fcos": FCOS}


def _as_list(names: str | Sequence[str] | None) -> list[str]:
    if names is None:
        return []
    return [names] if isinstance(names, str) else list(names)


def default_anchor_sizes(arch: str, strides: Sequence[int]) -> tuple[tuple[float, ...], ...]:
    """Anchor sizes per level as torchvision's COCO models use them, generalised to any strides:
    two-stage: ``8 * stride``; RetinaNet: ``4 * stride * 2^(0, 1/3, 2/3)``; FCOS: ``stride`` (one
    location per pixel; FCOS has no anchors)."""
    if arch in _TWO_STAGE:
        return tuple((8.0 * s,) for s in strides)
    if arch == "retinanet":
        return tuple(tuple(4.0 * s * 2 ** (i / 3) for i in range(3)) for s in strides)
    return tuple((float(s),) for s in strides)


def build_detector(arch: str, *, backbone: str, num_classes: int, attention: str | None = None,
                   neck_attention: str | Sequence[str] | None = None, pretrained_backbone: bool = False,
                   p2: bool | None = None, anchor_sizes: Sequence[Sequence[float]] | None = None,
                   aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0), fpn_channels: int = 256,
                   attention_stages: Sequence[int] | None = None, attention_kwargs: dict | None = None,
                   frozen_bn: bool | None = None, detector_kwargs: dict | None = None, **kw) -> nn.Module:
    """Build a torchvision detector on a timm / torchvision backbone with an FPN neck.

    Args:
        arch: ``"fasterrcnn"``, ``"retinanet"``, ``"fcos"`` or ``"maskrcnn"``.
        backbone: a timm model with ``features_only`` support or a torchvision ResNet name
            (``"torchvision:resnet50"``; see :func:`visattn.models.backbone.resolve_backbone`).
        num_classes: number of object classes, without background; labels are ``1..num_classes``.
        attention: block plugged into the backbone's residual blocks (:func:`visattn.plug`).
        neck_attention: block name(s) applied to every FPN level, in order; ``"scale"`` is
            DyHead-style scale-aware attention across levels.
        pretrained_backbone: load the backbone's ImageNet weights (downloads; off by default).
        p2: include the stride-4 level (P2) in the FPN. Default: on for Faster/Mask R-CNN (as in
            torchvision), off for RetinaNet and FCOS (P3-P7). Turn it on for small objects.
        anchor_sizes: one tuple of sizes (pixels) per FPN level, smallest stride first. Default:
            :func:`default_anchor_sizes` (32 px on P2 for R-CNN; 16 px on P2 for RetinaNet with
            ``p2=True``). For objects under 16 px, shrink them, e.g. ``((16,), (32,), ...)``.
        fpn_channels: FPN width (256 in torchvision; 64-128 trains much faster on CPU).
        detector_kwargs, **kw: passed to the torchvision class (``min_size``, ``max_size``,
            ``box_score_thresh``, ``detections_per_img``, ...); configs use ``detector_kwargs``.

    Example:
        >>> model = build_detector("fcos", backbone="resnet18", num_classes=8, attention="cbam",
        ...                        min_size=256, max_size=256)
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown detector arch {arch!r}; choose from {', '.join(ARCHS)}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int (object classes, no background), got {num_classes!r}")
    if arch == "fcos" and fpn_channels % 32:
        raise ValueError(f"fcos: fpn_channels must be a multiple of 32 (torchvision's FCOS head uses "
                         f"GroupNorm with 32 groups), got {fpn_channels}")
    two_stage = arch in _TWO_STAGE
    p2 = two_stage if p2 is None else p2
    levels = [4, 8, 16, 32] if p2 else [8, 16, 32]
    body = build_body(backbone, levels=levels, pretrained=pretrained_backbone, frozen_bn=frozen_bn,
                      attention=attention, attention_kwargs=attention_kwargs,
                      attention_stages=attention_stages)
    if two_stage:
        extra, num_extra = LastLevelMaxPool(), 1
    else:
        extra, num_extra = LastLevelP6P7(fpn_channels, fpn_channels), 2
    neck = FPNNeck(body, fpn_channels, extra, num_extra, _as_list(neck_attention), attention_kwargs)
    strides = list(body.strides) + [body.strides[-1] * 2 ** (i + 1) for i in range(num_extra)]
    sizes = tuple(tuple(s) for s in anchor_sizes) if anchor_sizes is not None else default_anchor_sizes(arch, strides)
    if len(sizes) != len(strides):
        raise ValueError(f"anchor_sizes has {len(sizes)} levels but the FPN has {len(strides)} "
                         f"(strides {strides})")
    ratios = (1.0,) if arch == "fcos" else tuple(aspect_ratios)
    anchors = AnchorGenerator(sizes, (ratios,) * len(sizes))
    classes = num_classes + 1  # index 0 is background in every torchvision head
    kw = {**(detector_kwargs or {}), **kw}
    if two_stage:
        names = [str(i) for i in range(len(levels))]
        kw.setdefault("box_roi_pool", MultiScaleRoIAlign(names, output_size=7, sampling_ratio=2))
        if arch == "maskrcnn":
            kw.setdefault("mask_roi_pool", MultiScaleRoIAlign(names, output_size=14, sampling_ratio=2))
        kw["rpn_anchor_generator"] = anchors
    else:
        kw["anchor_generator"] = anchors
    try:
        return _CLASSES[arch](neck, num_classes=classes, **kw)
    except TypeError as e:
        raise TypeError(f"{arch}: bad detector keyword argument(s) for torchvision's "
                        f"{_CLASSES[arch].__name__}: {e}") from None
