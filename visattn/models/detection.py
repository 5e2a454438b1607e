"""Detectors from torchvision's detection heads on a timm or torchvision backbone with FPN.

``build_detector`` keeps torchvision's detection API: in training ``model(images, targets)``
returns a dict of losses, in eval ``model(images)`` returns one dict of ``boxes`` (xyxy, input
pixels), ``labels`` and ``scores`` (and ``masks`` for Mask R-CNN) per image. ``images`` is a list of
``(3, H, W)`` float tensors in 0..1; labels are ``1..num_classes`` (0 is background).
"""
from __future__ import annotations

import difflib
import inspect
from collections.abc import Sequence

import torch
from torch import nn
from torchvision.models.detection import FCOS, FasterRCNN, MaskRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7

from .._checks import MAX_IMAGE_SIDE, check_real
from ..layers._base import MAX_BLOCK_ELEMENTS, check_float, check_int
from ..registry import create_block, list_blocks
from .backbone import build_body
from .neck import ACROSS_LEVELS, FPNNeck

__all__ = ["ARCHS", "build_detector"]

ARCHS = ("fasterrcnn", "retinanet", "fcos", "maskrcnn")
_TWO_STAGE = ("fasterrcnn", "maskrcnn")
_CLASSES = {"fasterrcnn": FasterRCNN, "maskrcnn": MaskRCNN, "retinanet": RetinaNet, "fcos": FCOS}


#: Largest ``fpn_channels`` accepted: FPN and head weights grow with its square (2048 already
#: needs about 1.5 GB of float32 weights; torchvision uses 256).
MAX_FPN_CHANNELS = 2048
#: Detector keywords that ``build_detector`` sets itself from its own arguments.
_RESERVED = {
    "backbone": "backbone", "num_classes": "num_classes",
    "anchor_generator": "anchor_sizes and aspect_ratios",
    "rpn_anchor_generator": "anchor_sizes and aspect_ratios",
}


def _neck_attention(names: object) -> list[str]:
    """``neck_attention`` as a list of names, each one of ``ACROSS_LEVELS`` (``"scale"``,
    ``"dyhead"``, ``"deformable"``) or a registered block."""
    if names is None:
        return []
    if isinstance(names, str):
        names = [names]
    elif not isinstance(names, Sequence):
        raise TypeError(f"neck_attention must be a block name or a list of them, got {names!r}")
    valid = [*ACROSS_LEVELS, *(b for b in list_blocks() if b not in ACROSS_LEVELS)]
    for name in names:
        if not isinstance(name, str):
            raise TypeError(f"neck_attention entries must be block names (str), got {name!r}")
        if name not in valid:
            close = difflib.get_close_matches(name, valid, n=2)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ValueError(f"neck_attention: unknown block {name!r}{hint}; valid: {', '.join(valid)}")
    return list(names)


def _neck_options(names: list[str], options: object, channels: int, num_levels: int) -> dict[str, dict]:
    """``neck_attention_kwargs`` checked: a dict from names in ``neck_attention`` to their options.

    Each attention is built on the ``meta`` device (nothing allocated), so an unknown option is a
    ``TypeError`` listing the ones it takes, and a bad value the error of the attention's own
    check, before the backbone is built."""
    if options is None:
        return {}
    if not (isinstance(options, dict)
            and all(isinstance(k, str) and isinstance(v, dict) and all(isinstance(o, str) for o in v)
                    for k, v in options.items())):
        raise TypeError("neck_attention_kwargs must map a neck_attention name to a dict of its options, "
                        f"e.g. {{'deformable': {{'points': 4, 'blocks': 2}}}}, got {options!r}")
    for name, kwargs in options.items():
        if name not in names:
            raise ValueError(f"neck_attention_kwargs has options for {name!r}, which is not in "
                             f"neck_attention {names}")
        if name not in ACROSS_LEVELS:
            create_block(name, channels, device="meta", **kwargs)  # the registry's checks
            continue
        cls = ACROSS_LEVELS[name]
        valid = [p for p in inspect.signature(cls).parameters if p not in ("channels", "num_levels")]
        unknown = sorted(set(kwargs) - set(valid))
        if unknown:
            close = sorted({m for k in unknown for m in difflib.get_close_matches(k, valid, n=2)})
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise TypeError(f"neck_attention {name!r} takes no option(s) {', '.join(unknown)}{hint}; "
                            f"it takes: {', '.join(valid) or 'none'}")
        with torch.device("meta"):
            probe = cls(channels, num_levels, **kwargs)
        elements = sum(p.numel() for p in probe.parameters())
        if elements > MAX_BLOCK_ELEMENTS:
            raise ValueError(f"neck_attention {name!r} with {kwargs} would hold {elements:.3g} parameter "
                             f"elements, more than the limit of {MAX_BLOCK_ELEMENTS:.3g}")
    return dict(options)


def _numbers(values: object, what: str) -> tuple[float, ...]:
    """A non-empty sequence of finite positive numbers, else an error naming ``what``."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
        raise TypeError(f"{what} must be a non-empty sequence of positive numbers, got {values!r}")
    for v in values:
        check_float(v, what)
    return tuple(values)


def _anchor_sizes(anchor_sizes: object) -> tuple[tuple[float, ...], ...]:
    if isinstance(anchor_sizes, (str, bytes)) or not isinstance(anchor_sizes, Sequence) or not anchor_sizes:
        raise TypeError(f"anchor_sizes must be one sequence of sizes per FPN level, e.g. ((16,), (32,)), "
                        f"got {anchor_sizes!r}")
    return tuple(_numbers(level, f"anchor_sizes[{i}]") for i, level in enumerate(anchor_sizes))


def _accepted_keywords(cls: type) -> set[str]:
    """Keywords the torchvision detector ``cls`` acts on: its own ``__init__``'s and those of the
    torchvision detector classes it extends, plus ``GeneralizedRCNNTransform``'s, to which
    torchvision passes every other keyword (and where a typo would vanish). Read from the
    signatures, so the set follows the installed torchvision."""
    names: set[str] = set()
    for klass in cls.__mro__:
        if klass in (GeneralizedRCNN, nn.Module, object):
            break
        if "__init__" in vars(klass):
            names |= _named_parameters(klass.__init__)
    return names | _named_parameters(GeneralizedRCNNTransform.__init__)


def _named_parameters(fn) -> set[str]:
    return {name for name, p in inspect.signature(fn).parameters.items()
            if name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}


def _detector_keywords(arch: str, detector_kwargs: object, kw: dict) -> dict:
    """Merge ``detector_kwargs`` and ``**kw``, refusing a keyword the detector does not take (with
    close matches), one that ``build_detector`` sets itself, and one given in both."""
    if detector_kwargs is None:
        detector_kwargs = {}
    if not isinstance(detector_kwargs, dict) or not all(isinstance(k, str) for k in detector_kwargs):
        raise TypeError(f"detector_kwargs must be a dict of keyword arguments, got {detector_kwargs!r}")
    both = sorted(set(detector_kwargs) & set(kw))
    if both:
        raise ValueError(f"{arch}: {', '.join(both)} given both in detector_kwargs and as keyword "
                         "argument(s); give each once")
    merged = {**detector_kwargs, **kw}
    cls = _CLASSES[arch]
    for key in merged:
        if key in _RESERVED:
            raise TypeError(f"{arch}: {key} is set by build_detector; pass {_RESERVED[key]} instead")
    accepted = _accepted_keywords(cls) - set(_RESERVED)
    unknown = sorted(set(merged) - accepted)
    if unknown:
        close = sorted({m for k in unknown for m in difflib.get_close_matches(k, accepted, n=3)})
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise TypeError(f"{arch}: torchvision's {cls.__name__} takes no keyword argument(s) "
                        f"{', '.join(unknown)}{hint} (it takes: {', '.join(sorted(accepted))})")
    for key, value in merged.items():
        if key == "max_size":
            check_int(value, key, arch, high=MAX_IMAGE_SIDE)  # a larger one only fails in the allocator
        elif key == "size_divisible" or key.endswith(("detections_per_img", "_top_n_train", "_top_n_test",
                                                      "topk_candidates", "_batch_size_per_image")):
            check_int(value, key, arch)  # counts: a 0 or negative one would silently yield nothing
        elif key.endswith(("_thresh", "_fraction")):  # scores, IoUs and fractions live in [0, 1]
            check_real(f"{arch}: {key}", value, 0.0, 1.0)
    if "min_size" in merged:
        sizes = merged["min_size"]
        for v in (sizes if isinstance(sizes, (tuple, list)) and sizes else [sizes]):
            check_int(v, "min_size", arch, high=MAX_IMAGE_SIDE)
    _check_size_order(arch, merged)
    return merged


def _check_size_order(arch: str, merged: dict) -> None:
    """Refuse ``max_size`` below (the largest) ``min_size``, given or torchvision's default: the
    transform scales an image so its short side is ``min_size`` unless its long side would pass
    ``max_size``, so a smaller ``max_size`` silently overrides ``min_size`` for every image."""
    defaults = inspect.signature(_CLASSES[arch].__init__).parameters
    found = {}
    for key in ("min_size", "max_size"):
        if key in merged:
            found[key] = (merged[key], "")
        elif key in defaults and defaults[key].default is not inspect.Parameter.empty:
            found[key] = (defaults[key].default, ", torchvision's default")
    if len(found) < 2:
        return
    (low, low_note), (high, high_note) = found["min_size"], found["max_size"]
    low = max(low) if isinstance(low, (tuple, list)) else low
    if high < low:
        raise ValueError(f"{arch}: max_size ({high}{high_note}) must be >= min_size ({low}{low_note}): "
                         "torchvision resizes an image's short side to min_size unless its long side would "
                         "pass max_size, so a smaller max_size silently overrides min_size; give both")


def _check_flag(value: object, name: str, optional: bool = False) -> None:
    if not (isinstance(value, bool) or (optional and value is None)):
        raise TypeError(f"{name} must be True or False{' or None' if optional else ''}, got {value!r}")


def _check_kwargs_dict(value: object, name: str) -> None:
    if value is not None and (not isinstance(value, dict) or not all(isinstance(k, str) for k in value)):
        raise TypeError(f"{name} must be a dict of keyword arguments or None, got {value!r}")


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
                   aspect_ratios: Sequence[float] | None = None, fpn_channels: int = 256,
                   attention_stages: Sequence[int] | None = None, attention_kwargs: dict | None = None,
                   neck_attention_kwargs: dict | None = None, frozen_bn: bool | None = None,
                   detector_kwargs: dict | None = None, attention_gate: str = "zero", **kw) -> nn.Module:
    """Build a torchvision detector on a timm / torchvision backbone with an FPN neck.

    Args:
        arch: ``"fasterrcnn"``, ``"retinanet"``, ``"fcos"`` or ``"maskrcnn"``.
        backbone: a timm model with ``features_only`` support or a torchvision ResNet name
            (``"torchvision:resnet50"``; see :func:`visattn.models.backbone.resolve_backbone`).
        num_classes: number of object classes, without background; labels are ``1..num_classes``.
        attention: block plugged into the backbone's residual blocks (:func:`visattn.plug`).
        attention_gate: how ``attention`` is wired into the backbone: ``"zero"`` (default) behind a
            zero-initialised blend, ``y + g * (block(y) - y)`` (identity at insertion: for a
            pretrained backbone), ``"none"`` as its paper applies it, ``block(y)`` (training from
            scratch). Neck attentions always start as the identity.
        neck_attention: name(s) applied to the FPN levels, in order, each starting as the
            identity: a registered block (one per level), or an attention across all levels:
            ``"scale"`` (DyHead's scale-aware attention), ``"dyhead"`` (the DyHead block: scale-,
            spatial- (deformable convolution) and task-aware (dynamic ReLU) attention; options
            ``blocks``, ``reduction``), ``"deformable"`` (Deformable DETR's encoder: multi-scale
            deformable attention over all levels; options ``heads``, ``points``, ``blocks``,
            ``ffn_ratio``). See :mod:`visattn.models.neck`.
        neck_attention_kwargs: options per ``neck_attention`` name, e.g.
            ``{"dyhead": {"blocks": 2}}``; a registered block without an entry gets
            ``attention_kwargs``.
        pretrained_backbone: load the backbone's ImageNet weights (downloads; off by default).
        p2: include the stride-4 level (P2) in the FPN. Default: on for Faster/Mask R-CNN (as in
            torchvision), off for RetinaNet and FCOS (P3-P7). Turn it on for small objects.
        anchor_sizes: one tuple of sizes (pixels) per FPN level, smallest stride first. Default:
            :func:`default_anchor_sizes` (32 px on P2 for R-CNN; 16 px on P2 for RetinaNet with
            ``p2=True``). For objects under 16 px, shrink them, e.g. ``((16,), (32,), ...)``.
        aspect_ratios: anchor aspect ratios of every level (default ``(0.5, 1.0, 2.0)``); not for
            FCOS, which has no anchor boxes (giving any other than ``(1.0,)`` is an error).
        fpn_channels: FPN width, 1..2048 (256 in torchvision; 64-128 trains much faster on CPU).
            FCOS needs a multiple of 32; at 32 its head's GroupNorms get 16 groups instead of
            torchvision's 32 (one channel per group cannot normalise the 1x1 top levels).
        detector_kwargs, **kw: passed to the torchvision class (``min_size``, ``max_size``,
            ``box_score_thresh``, ``detections_per_img``, ...); configs use ``detector_kwargs``.
            Each keyword is checked against the signatures of the torchvision class and of its
            ``GeneralizedRCNNTransform`` (which would otherwise swallow a typo): an unknown one is
            a ``TypeError`` naming it and the close matches; one given both ways, or one that
            ``build_detector`` sets itself (``anchor_generator``), is an error too. ``min_size``
            (an int, or a sequence of ints to pick from in training) and ``max_size`` must lie in
            1..8192 (:data:`visattn._checks.MAX_IMAGE_SIDE`), and ``max_size`` must be at least the
            largest ``min_size``, counting torchvision's defaults (800, 1333) for one not given:
            a smaller one would silently override ``min_size``.

    Every argument is checked before the backbone is built; a bad one is a ``TypeError`` or
    ``ValueError`` naming it.

    Example:
        >>> model = build_detector("fcos", backbone="resnet18", num_classes=8, attention="cbam",
        ...                        min_size=256, max_size=256)
    """
    if not isinstance(arch, str) or arch not in ARCHS:
        raise ValueError(f"unknown detector arch {arch!r}; choose from {', '.join(ARCHS)}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int (object classes, no background), got {num_classes!r}")
    check_int(fpn_channels, "fpn_channels", high=MAX_FPN_CHANNELS)
    if arch == "fcos" and fpn_channels % 32:
        raise ValueError(f"fcos: fpn_channels must be a multiple of 32 (torchvision's FCOS head uses "
                         f"GroupNorm with 32 groups), got {fpn_channels}")
    neck_names = _neck_attention(neck_attention)
    _check_flag(pretrained_backbone, "pretrained_backbone")
    _check_flag(p2, "p2", optional=True)
    _check_flag(frozen_bn, "frozen_bn", optional=True)
    _check_kwargs_dict(attention_kwargs, "attention_kwargs")
    if anchor_sizes is not None:
        anchor_sizes = _anchor_sizes(anchor_sizes)
    if aspect_ratios is not None:
        aspect_ratios = _numbers(aspect_ratios, "aspect_ratios")
        if arch == "fcos" and aspect_ratios != (1.0,):
            raise ValueError(f"fcos has no anchor boxes (one point per location), so aspect_ratios "
                             f"{aspect_ratios} would be ignored; leave it out")
    kw = _detector_keywords(arch, detector_kwargs, kw)
    two_stage = arch in _TWO_STAGE
    p2 = two_stage if p2 is None else p2
    levels = [4, 8, 16, 32] if p2 else [8, 16, 32]
    neck_options = _neck_options(neck_names, neck_attention_kwargs, fpn_channels,
                                 len(levels) + (1 if two_stage else 2))
    body = build_body(backbone, levels=levels, pretrained=pretrained_backbone, frozen_bn=frozen_bn,
                      attention=attention, attention_kwargs=attention_kwargs,
                      attention_stages=attention_stages, attention_gate=attention_gate)
    if two_stage:
        extra, num_extra = LastLevelMaxPool(), 1
    else:
        extra, num_extra = LastLevelP6P7(fpn_channels, fpn_channels), 2
    neck = FPNNeck(body, fpn_channels, extra, num_extra, neck_names, attention_kwargs, neck_options)
    strides = list(body.strides) + [body.strides[-1] * 2 ** (i + 1) for i in range(num_extra)]
    sizes = anchor_sizes if anchor_sizes is not None else default_anchor_sizes(arch, strides)
    if len(sizes) != len(strides):
        raise ValueError(f"anchor_sizes has {len(sizes)} levels but the FPN has {len(strides)} "
                         f"(strides {strides})")
    ratios = (1.0,) if arch == "fcos" else (aspect_ratios or (0.5, 1.0, 2.0))
    anchors = AnchorGenerator(sizes, (ratios,) * len(sizes))
    classes = num_classes + 1  # index 0 is background in every torchvision head
    if two_stage:
        names = [str(i) for i in range(len(levels))]
        kw.setdefault("box_roi_pool", MultiScaleRoIAlign(names, output_size=7, sampling_ratio=2))
        if arch == "maskrcnn":
            kw.setdefault("mask_roi_pool", MultiScaleRoIAlign(names, output_size=14, sampling_ratio=2))
        kw["rpn_anchor_generator"] = anchors
    else:
        kw["anchor_generator"] = anchors
    model = _CLASSES[arch](neck, num_classes=classes, **kw)
    if "deformable" in neck_names:  # the encoder masks each image's padding: it needs the sizes
        model.transform.register_forward_hook(neck.note_images)
    if arch == "fcos" and fpn_channels < 64:
        _fcos_head_groups(model.head, fpn_channels // 2)
    return model


def _fcos_head_groups(head: nn.Module, groups: int) -> None:
    """Give every ``GroupNorm`` of a torchvision FCOS head ``groups`` groups (fresh, at its init).
    Its own 32 groups on 32 channels are one channel each: a 1x1 map (P7 of any image resized to
    <= 128 px, P6 at <= 64 px) then has one value per group, which ``group_norm`` refuses with a
    single image ("Expected more than 1 value per channel") and maps to its bias in a batch."""
    for parent in list(head.modules()):
        for name, child in parent.named_children():
            if isinstance(child, nn.GroupNorm):
                setattr(parent, name, nn.GroupNorm(groups, child.num_channels, eps=child.eps,
                                                   affine=child.affine, device=child.weight.device,
                                                   dtype=child.weight.dtype))
