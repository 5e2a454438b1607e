"""Backbone bodies from timm or torchvision, returning ``{"0": C_a, "1": C_b, ...}`` feature maps.

A backbone name is a timm model name with ``features_only`` support (``"resnet18"``,
``"resnext26ts"``, ``"efficientnet_b0"``) or a torchvision ResNet name. A bare name that both
libraries know (``"resnet50"``) means timm's; prefix ``"torchvision:"`` (or ``"timm:"``) to choose.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import timm
import torch
import torchvision
from torch import nn
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.ops.misc import FrozenBatchNorm2d

from ..layers._base import check_int
from ..plug import check_gate, plug

__all__ = ["Body", "build_body", "resolve_backbone"]

TORCHVISION_RESNETS = (
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d",
    "resnext101_32x8d", "resnext101_64x4d", "wide_resnet50_2", "wide_resnet101_2",
)


def resolve_backbone(name: str) -> tuple[str, str]:
    """``(library, model_name)`` for a backbone name; ``ValueError`` naming the choices otherwise."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"backbone must be a model name, got {name!r}")
    lib, sep, model = name.partition(":")
    if sep and lib in ("timm", "torchvision"):
        known = timm.is_model(model) if lib == "timm" else model in TORCHVISION_RESNETS
        if not known:
            hint = ", ".join(TORCHVISION_RESNETS) if lib == "torchvision" else "see timm.list_models()"
            raise ValueError(f"unknown {lib} backbone {model!r}; {hint}")
        return lib, model
    if timm.is_model(name):
        return "timm", name
    if name in TORCHVISION_RESNETS:
        return "torchvision", name
    raise ValueError(f"unknown backbone {name!r}: not a timm model (timm.list_models()) nor a torchvision "
                     f"ResNet ({', '.join(TORCHVISION_RESNETS)})")


class Body(nn.Module):
    """Run a feature extractor and keep the levels ``keep``, renamed ``"0"``, ``"1"``, ...

    Attributes:
        channels: channels of each kept level.
        strides: stride (input pixels per feature pixel) of each kept level.
    """

    def __init__(self, features: nn.Module, keep: Sequence[int], channels: Sequence[int],
                 strides: Sequence[int]) -> None:
        super().__init__()
        self.features = features
        self.keep = list(keep)
        self.channels = list(channels)
        self.strides = list(strides)

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        feats = self.features(x)
        feats = list(feats.values()) if isinstance(feats, dict) else list(feats)
        return OrderedDict((str(i), feats[j]) for i, j in enumerate(self.keep))


def _all_levels(lib: str, model: str, pretrained: bool, output_stride: int | None,
                frozen_bn: bool) -> tuple[nn.Module, list[int], list[int]]:
    """A feature extractor over every stage, with each stage's channels and stride. ImageNet
    weights (``pretrained``) come from timm / torchvision, downloaded on first use; a failure to
    get them is an ``OSError`` that says so (and whether offline mode is set)."""
    if not pretrained:
        return _build_levels(lib, model, False, output_stride, frozen_bn)
    try:
        return _build_levels(lib, model, True, output_stride, frozen_bn)
    except ValueError:
        raise
    except Exception as e:  # hub / HTTP / cache errors of two libraries
        from ..weights import is_offline

        offline = (" Offline mode (VISATTN_OFFLINE / HF_HUB_OFFLINE) is set, so only weights already in "
                   "the timm / torch hub cache can load.") if is_offline() else ""
        raise OSError(f"could not get the ImageNet weights of backbone {model!r} from {lib} "
                      f"({type(e).__name__}: {e}). They are downloaded on first use and need the network."
                      f"{offline} Use pretrained_backbone=False to train from scratch, or a published "
                      "visattn model (visattn.weights.load_pretrained).") from e


def _build_levels(lib: str, model: str, pretrained: bool, output_stride: int | None,
                  frozen_bn: bool) -> tuple[nn.Module, list[int], list[int]]:
    if lib == "timm":
        kw = {} if output_stride is None else {"output_stride": output_stride}
        features = timm.create_model(model, features_only=True, pretrained=pretrained, **kw)
        if frozen_bn:
            features = timm.layers.freeze_batch_norm_2d(features)
        return features, features.feature_info.channels(), features.feature_info.reduction()
    dilate = {None: [False, False, False], 32: [False, False, False], 16: [False, False, True],
              8: [False, True, True]}
    if output_stride not in dilate:
        raise ValueError(f"torchvision ResNets support output_stride 8, 16 or 32, got {output_stride}")
    if model in ("resnet18", "resnet34") and any(dilate[output_stride]):
        raise ValueError(f"torchvision {model} (BasicBlock) cannot dilate; output_stride "
                         f"{output_stride} needs a Bottleneck ResNet (resnet50 and up) or a timm model")
    net = torchvision.models.get_model(
        model, weights="DEFAULT" if pretrained else None,
        replace_stride_with_dilation=dilate[output_stride],
        norm_layer=FrozenBatchNorm2d if frozen_bn else nn.BatchNorm2d)
    features = IntermediateLayerGetter(net, {f"layer{i}": str(i - 1) for i in range(1, 5)})
    features.eval()
    with torch.no_grad():  # read each level's width and stride off a dummy image
        probe = features(torch.zeros(1, 3, 128, 128))
    features.train()
    channels = [f.shape[1] for f in probe.values()]
    strides = [128 // f.shape[-1] for f in probe.values()]
    return features, channels, strides


def _check_body_args(levels, last, pretrained, output_stride, frozen_bn, attention, attention_kwargs,
                     attention_stages) -> None:
    """Type and range checks of :func:`build_body`'s arguments, each error naming its argument."""
    if levels is not None:
        if isinstance(levels, (str, bytes)) or not isinstance(levels, Sequence) or not levels:
            raise TypeError(f"levels must be a non-empty sequence of strides, got {levels!r}")
        for s in levels:
            check_int(s, "levels (a stride)")
    check_int(last, "last", optional=True)
    check_int(output_stride, "output_stride", optional=True)
    for name, flag, optional in (("pretrained", pretrained, False), ("frozen_bn", frozen_bn, True)):
        if not (isinstance(flag, bool) or (optional and flag is None)):
            raise TypeError(f"{name} must be True or False{' or None' if optional else ''}, got {flag!r}")
    if attention is not None and not isinstance(attention, str) and not callable(attention):
        raise TypeError(f"attention must be a block name (visattn.list_blocks()) or None, got {attention!r}")
    if attention_kwargs is not None and not isinstance(attention_kwargs, dict):
        raise TypeError(f"attention_kwargs must be a dict or None, got {attention_kwargs!r}")
    if attention_stages is not None and attention is None:
        raise ValueError(f"attention_stages={attention_stages!r} given without attention; it would be "
                         "ignored")
    if attention_kwargs and attention is None:
        raise ValueError(f"attention_kwargs={attention_kwargs!r} given without attention; they would be "
                         "ignored")


def build_body(backbone: str, *, levels: Sequence[int] | None = None, last: int | None = None,
               pretrained: bool = False, output_stride: int | None = None,
               frozen_bn: bool | None = None, attention: str | None = None,
               attention_kwargs: dict | None = None, attention_stages: Sequence[int] | None = None,
               attention_gate: str = "zero") -> Body:
    """Build a backbone body that returns the feature maps at the strides ``levels`` (e.g.
    ``[8, 16, 32]``), or its ``last`` deepest stages.

    ``frozen_bn`` (default: ``pretrained``) freezes batch-norm statistics, as torchvision does for
    pretrained detection backbones. ``attention`` is plugged into the body's residual blocks with
    :func:`visattn.plug`, wired by ``attention_gate`` (``"zero"``: behind a zero-initialised blend,
    identity at insertion; ``"none"``: as its paper applies it). Each argument is checked first; a bad one is a
    ``TypeError`` or ``ValueError`` naming it (``attention_stages`` or ``attention_kwargs`` without
    ``attention`` too, as they would be ignored).
    """
    _check_body_args(levels, last, pretrained, output_stride, frozen_bn, attention, attention_kwargs,
                     attention_stages)
    check_gate(attention_gate, "attention_gate")
    if attention is None and attention_gate != "zero":
        raise ValueError(f"attention_gate={attention_gate!r} given without attention; it would be ignored")
    lib, model = resolve_backbone(backbone)
    frozen_bn = pretrained if frozen_bn is None else frozen_bn
    features, channels, strides = _all_levels(lib, model, pretrained, output_stride, frozen_bn)
    if levels is not None:
        keep = []
        for s in levels:
            idx = [i for i, r in enumerate(strides) if r == s]
            if not idx:
                raise ValueError(f"backbone {backbone!r} has no feature map at stride {s}; "
                                 f"its strides are {strides}")
            keep.append(idx[-1])  # the deepest stage at that stride
    else:
        if last is not None and last > len(strides):
            raise ValueError(f"last={last}, but backbone {backbone!r} has only {len(strides)} stages")
        keep = list(range(len(strides)))[-(last or 1):]
    if attention is not None:
        try:
            plug(features, attention, stages=attention_stages, gate=attention_gate, **(attention_kwargs or {}))
        except (TypeError, ValueError) as e:  # name the builder's arguments, not plug's
            raise type(e)(f"backbone {backbone!r}, attention={attention!r}, attention_stages="
                          f"{attention_stages!r}, attention_kwargs={attention_kwargs!r}: {e}") from e
    return Body(features, keep, [channels[i] for i in keep], [strides[i] for i in keep])
