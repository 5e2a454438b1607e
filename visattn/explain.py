"""What attention looked at: the maps every visattn block applied, in any model, per detection,
with a test of how faithful they are.

visattn knows every block it inserted, so it reads the attention where it is applied instead of
guessing it from gradients (Grad-CAM) or from softmax nodes of a ViT (timm's ``AttentionExtract``):

* :func:`attention_maps` runs a model once with every :class:`~visattn.layers.AttentionBlock`
  inside it recording its attention (wherever it sits: a ``plug``-ged backbone, a timm
  ``attn_layer``, an FPN neck behind a :class:`~visattn.plug.Blend`, a model of your own) and
  returns one :class:`AttentionMap` per block, keyed by dotted module name (a neck attention
  across the pyramid levels, :class:`~visattn.models.neck.LevelAttention`: one per level, keyed
  ``"<module name>.level<i>"``), optionally in each
  input image's own pixels (undoing a torchvision detector's resize and batch padding);
* :func:`explain_detections` crops, for each kept box, the maps of the pyramid level that
  produced it (the level the head assigns a box of that size to);
* :func:`faithfulness` scores each map by deletion / insertion (Petsiuk et al., "RISE: Randomized
  Input Sampling for Explanation of Black-box Models", BMVC 2018, https://arxiv.org/abs/1806.07421):
  remove (or insert) the most-attended image patches first and follow the detection score or class
  probability, against the same curve for random patch orders;
* :func:`save_overlay`, :func:`save_grid`, :func:`save_detection_crops` draw them, and
  :func:`explain_image` writes all of it for the ``visattn explain`` command.

What each block records (see :mod:`visattn.layers._capture`): channel gates their per-channel
weights ``(N, C)`` (shown as the *gated feature energy*, the RMS over channels of the block's
output); spatial and hybrid gates their spatial gate ``(N, H, W)``; self-attention what each
position receives and, for a query point, what that point attends to. Attention maps show where a
block re-weighted features; they are not a complete explanation of a prediction (the convolutions
and the residual paths around the blocks carry most of the computation), which is why
:func:`faithfulness` is there.
"""
from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ._checks import check_int, check_pathlike, check_real, is_real
from ._io import atomic_path, atomic_write_json
from .layers._base import AttentionBlock
from .layers._capture import Capture

__all__ = [
    "AttentionMap",
    "DetectionExplanation",
    "attention_maps",
    "explain_detections",
    "explain_image",
    "faithfulness",
    "find_blocks",
    "save_detection_crops",
    "save_grid",
    "save_overlay",
]

#: Map keys in the order :attr:`AttentionMap.primary` prefers them (``"query"`` first when a
#: query point was given).
MAP_KEYS = ("spatial", "received", "energy")


# --------------------------------------------------------------------------------------------------
# Results


@dataclass
class AttentionMap:
    """The attention one block applied during one forward pass.

    Attributes:
        name: dotted module name of the block in the model (``"<module name>.level<i>"`` for
            level ``i`` of a neck attention across the pyramid levels).
        block: its registered name (``"cbam"``) or, if unregistered, its class name.
        kind: ``"channel"``, ``"spatial"``, ``"hybrid"``, ``"self"``, ``"cross"``, ``"scale"`` (a
            scalar weight per pyramid level) or ``"unknown"``.
        maps: key -> ``(N, h, w)`` float32 CPU tensor on the block's own grid: ``"spatial"``,
            ``"received"``, ``"query"`` as the block recorded them (:mod:`visattn.layers._capture`)
            and ``"energy"``, the RMS over channels of the block's output (the gated features).
            A cross-attention block's ``"query"`` and ``"context"`` are ``(N, S)`` over its context.
        channel: ``(N, C)`` per-channel weights, for blocks with a channel gate.
        size: ``(h, w)`` of the block's map.
        stride: input pixels per map cell ``(sy, sx)``, relative to the tensor the network saw
            (for a detector: its resized, padded batch).
        image_maps: with ``upsample=True``, one dict per input image: key -> ``(H_i, W_i)`` map in
            that image's own pixels.
        primary: the key shown by default.
        level: for a neck attention across the pyramid levels, the index of the level this map
            belongs to (``None`` for a block).
        weights: name -> ``(N,)`` scalar weights the module applied to this level as a whole (its
            scale-aware attention, :class:`~visattn.models.neck.LevelCapture`); empty for a block.
    """

    name: str
    block: str
    kind: str
    maps: dict[str, torch.Tensor]
    channel: torch.Tensor | None
    size: tuple[int, int]
    stride: tuple[float, float]
    image_maps: list[dict[str, torch.Tensor]] | None = None
    primary: str = "energy"
    level: int | None = None
    weights: dict[str, torch.Tensor] = field(default_factory=dict)

    def map(self, image: int = 0, key: str | None = None) -> torch.Tensor:
        """The ``key`` map (default :attr:`primary`) of input ``image``: in the image's pixels when
        upsampled, else on the block's grid."""
        key = key or self.primary
        if key not in self.maps:
            raise ValueError(f"{self.name}: no {key!r} map; has {', '.join(sorted(self.maps))}")
        count = len(self.maps[key])
        if check_int("image", image, 0) >= count:
            raise ValueError(f"image must be an index < {count} (the maps' batch), got {image}")
        if self.image_maps is not None and key in self.image_maps[image]:
            return self.image_maps[image][key]
        return self.maps[key][image]

    @property
    def level_stride(self) -> int:
        """The stride as a power of two (the pyramid level the map belongs to)."""
        return _pow2(max(self.stride))


@dataclass
class DetectionExplanation:
    """One kept detection and the attention of the pyramid level that produced it.

    Attributes:
        box: ``(x0, y0, x1, y1)`` in the image's pixels; ``score``, ``label`` as the detector gave.
        level: index of the FPN level the head assigns this box to; ``stride`` its stride.
        crop_box: ``(x0, y0, x1, y1)`` integer pixel window around the box (with the margin).
        crops: block name -> its primary map cropped to ``crop_box`` (image pixels).
        image_crop: ``(3, h, w)`` the image cropped to ``crop_box``.
    """

    box: tuple[float, float, float, float]
    score: float
    label: int
    level: int
    stride: int
    crop_box: tuple[int, int, int, int]
    crops: dict[str, torch.Tensor] = field(default_factory=dict)
    image_crop: torch.Tensor | None = None


# --------------------------------------------------------------------------------------------------
# Finding blocks and the detector's geometry


def _pow2(x: float) -> int:
    return 2 ** max(0, round(math.log2(max(x, 1e-9))))


def _registry_names() -> dict[type, tuple[str, str]]:
    from .registry import block_info, list_blocks

    return {block_info(n).cls: (n, block_info(n).kind) for n in list_blocks()}


def find_blocks(model: nn.Module) -> list[tuple[str, AttentionBlock]]:
    """Every visattn block inside ``model`` as ``(dotted name, module)``, in module order."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return [(n, m) for n, m in model.named_modules() if isinstance(m, AttentionBlock)]


def _find_level_attentions(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every neck attention across pyramid levels (:class:`~visattn.models.neck.LevelAttention`)
    inside ``model`` as ``(dotted name, module)``, in module order."""
    from .models.neck import LevelAttention

    return [(n, m) for n, m in model.named_modules() if isinstance(m, LevelAttention)]


def _is_detector(model: nn.Module) -> bool:
    from torchvision.models.detection.transform import GeneralizedRCNNTransform

    return isinstance(getattr(model, "transform", None), GeneralizedRCNNTransform)


@dataclass
class _Geometry:
    """Where each input image sits in the tensor the network saw."""

    batch: tuple[int, int] = (0, 0)  # (Hb, Wb) of the (padded) batch tensor
    content: list[tuple[int, int]] = field(default_factory=list)  # resized image sizes in it
    original: list[tuple[int, int]] = field(default_factory=list)  # the input images' sizes
    levels: list[tuple[int, int]] = field(default_factory=list)  # FPN level sizes (detectors)


def _check_images(images: Any, detector: bool) -> tuple[Any, list[tuple[int, int]]]:
    if detector:
        if isinstance(images, torch.Tensor) and images.ndim == 3:
            images = [images]
        if isinstance(images, torch.Tensor) and images.ndim == 4:
            images = list(images)
        if not isinstance(images, (list, tuple)) or not images:
            raise TypeError("images must be a non-empty list of (3, H, W) float tensors for a detector, "
                            f"got {type(images).__name__}")
        for i, im in enumerate(images):
            if (not isinstance(im, torch.Tensor) or im.ndim != 3 or im.shape[0] != 3 or not im.is_floating_point()
                    or im.numel() == 0):
                what = f"a {tuple(im.shape)} {im.dtype} tensor" if isinstance(im, torch.Tensor) else type(im).__name__
                raise TypeError(f"images[{i}] must be a (3, H, W) float tensor (values 0..1), got {what}")
        return list(images), [tuple(im.shape[-2:]) for im in images]
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or not images.is_floating_point():
        what = f"a {images.ndim}-D {images.dtype} tensor" if isinstance(images, torch.Tensor) else type(images).__name__
        raise TypeError(f"images must be an (N, C, H, W) float tensor for a classification model, got {what}")
    if images.numel() == 0:
        raise ValueError(f"images is empty: shape {tuple(images.shape)}")
    return images, [tuple(images.shape[-2:])] * images.shape[0]


def _check_query(query: Any) -> tuple[float, float] | None:
    if query is None:
        return None
    what = "query must be (y, x), fractions of the image's height and width in 0..1"
    if not isinstance(query, (tuple, list)) or not all(is_real(v) for v in query):
        raise TypeError(f"{what}, got {type(query).__name__} {query!r:.60}")
    if len(query) != 2 or not all(0.0 <= float(v) <= 1.0 for v in query):
        raise ValueError(f"{what}, got {query!r}")
    return float(query[0]), float(query[1])


# --------------------------------------------------------------------------------------------------
# Running a model with every block recording


def _energy(out: Any) -> torch.Tensor | None:
    if isinstance(out, torch.Tensor) and out.ndim == 4:
        return out.detach().float().square().mean(1).sqrt()  # (N, H, W): RMS over channels
    return None


def _cell_stride(total: int, cells: int) -> int | None:
    """Input pixels per map cell along a side of ``total`` pixels with ``cells`` cells: the power of
    two ``s`` with ``ceil(total / s) == cells`` (strided convolutions and poolings, on any input
    size: 40 px at stride 32 give 2 cells, not cells of 20 px), else ``total // cells`` when it
    divides (a patch embedding of stride 14), else ``None`` (no stride grid)."""
    if 1 < cells < total:
        s = 2 ** math.ceil(math.log2(total / cells))  # the smallest power of two >= total / cells
        if (cells - 1) * s < total:
            return s
    return total // cells if total % cells == 0 else None


def _upsample(m: torch.Tensor, geo: _Geometry) -> list[torch.Tensor]:
    """``(N, h, w)`` on the batch grid -> one ``(H_i, W_i)`` map per input image: expand each cell
    to its ``stride x stride`` pixels (:func:`_cell_stride`), cut the image's own (resized) region
    out of the padded batch, and resize that to the image's original size."""
    _, h, w = m.shape
    hb, wb = geo.batch
    sy, sx = _cell_stride(hb, h), _cell_stride(wb, w)
    if sy is not None and sx is not None:
        up = F.interpolate(m[:, None].float(), size=(h * sy, w * sx), mode="bilinear", align_corners=False)
    else:  # no stride grid: stretch
        up = F.interpolate(m[:, None].float(), size=(hb, wb), mode="bilinear", align_corners=False)
    out = []
    for i, ((ch, cw), (oh, ow)) in enumerate(zip(geo.content, geo.original, strict=True)):
        region = up[i:i + 1, :, :ch, :cw]
        if (ch, cw) != (oh, ow):
            region = F.interpolate(region, size=(oh, ow), mode="bilinear", align_corners=False)
        out.append(region[0, 0])
    return out


def _run(model: nn.Module, images: Any, *, query: Any = None,
         upsample: bool = True) -> tuple[dict[str, AttentionMap], Any, _Geometry]:
    """Run ``model`` once with every block recording; return the maps, the model's output and the
    geometry. Everything set on the model is removed again, also when the forward pass raises."""
    from .models.neck import LevelCaptures

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(upsample, bool):
        raise TypeError(f"upsample must be True or False, got {upsample!r}")
    query = _check_query(query)
    detector = _is_detector(model)
    images, original = _check_images(images, detector)
    blocks = find_blocks(model)
    across = _find_level_attentions(model)
    kinds = _registry_names()
    geo = _Geometry(original=original)
    energies: dict[str, torch.Tensor] = {}
    captures: dict[str, Capture | LevelCaptures] = {}
    handles = []

    def keep_energy(name: str):
        def hook(module, args, out):
            e = _energy(out)
            if e is not None and name not in energies:  # a block run twice: its first call, as Capture
                energies[name] = e.cpu()
        return hook

    def keep_level_energies(name: str):
        def hook(module, args, out):
            if isinstance(out, (list, tuple)):  # one map per level
                for i, o in enumerate(out):
                    e = _energy(o)
                    if e is not None and f"{name}.level{i}" not in energies:
                        energies[f"{name}.level{i}"] = e.cpu()
        return hook

    def on_transform(module, args, out):
        image_list = out[0]
        geo.batch = tuple(image_list.tensors.shape[-2:])
        geo.content = [tuple(s) for s in image_list.image_sizes]
        if query is not None:
            if len(set(geo.content)) > 1:
                raise ValueError("query: the detector resized these images to different sizes "
                                 f"({geo.content}); explain them one at a time to use a query point")
            (ch, cw), (hb, wb) = geo.content[0], geo.batch
            q = (min(query[0] * ch / hb, 1.0), min(query[1] * cw / wb, 1.0))
            for c in captures.values():
                c.query = q

    def on_backbone(module, args, out):
        if isinstance(out, dict):
            geo.levels = [tuple(t.shape[-2:]) for t in out.values()]

    training = {m: m.training for m in model.modules()}
    try:
        for name, block in blocks:
            captures[name] = block._capture = Capture(query=None if detector else query)
            handles.append(block.register_forward_hook(keep_energy(name)))
        for name, module in across:
            captures[name] = module._capture = LevelCaptures(query=None if detector else query)
            handles.append(module.register_forward_hook(keep_level_energies(name)))
        if detector:
            handles.append(model.transform.register_forward_hook(on_transform))
            if isinstance(getattr(model, "backbone", None), nn.Module):
                handles.append(model.backbone.register_forward_hook(on_backbone))
        else:
            geo.batch, geo.content = original[0], list(original)
        model.eval()
        with torch.no_grad():
            output = model(images)
    finally:
        for h in handles:
            h.remove()
        for _, block in (*blocks, *across):
            block._capture = None
        for m, mode in training.items():
            m.train(mode)

    # (entry name, registered name, kind, level, capture) in module order
    entries: list[tuple[str, str, str, int | None, Capture]] = []
    for name, module in model.named_modules():
        capture = captures.get(name)
        if isinstance(capture, LevelCaptures):
            entries += [(f"{name}.level{i}", module.attention_name, module.attention_kind, i, capture.levels[i])
                        for i in sorted(capture.levels)]
        elif capture is not None:
            entries.append((name, *kinds.get(type(module), (type(module).__name__, "unknown")), None, capture))
    maps: dict[str, AttentionMap] = {}
    for name, reg_name, kind, level, capture in entries:
        rec = {k: v.cpu() for k, v in capture.maps.items()}
        if name in energies:
            rec["energy"] = energies[name]
        channel = rec.pop("channel", None)
        grids = [v for k, v in rec.items() if v.ndim == 3]
        if not grids:
            continue  # the block did not run in this forward pass
        size = tuple(grids[0].shape[-2:])
        stride = tuple(float(_cell_stride(b, c) or b / c) for b, c in zip(geo.batch, size, strict=True))
        order = (("query",) if query is not None else ()) + MAP_KEYS
        primary = next(k for k in order if k in rec and rec[k].ndim == 3)
        amap = AttentionMap(name=name, block=reg_name, kind=kind, maps=rec, channel=channel, size=size,
                            stride=stride, primary=primary, level=level,
                            weights={k: v.cpu() for k, v in getattr(capture, "weights", {}).items()})
        if upsample:
            per_key = {k: _upsample(v, geo) for k, v in rec.items() if v.ndim == 3}
            amap.image_maps = [{k: per_key[k][i] for k in per_key} for i in range(len(original))]
        maps[name] = amap
    return maps, output, geo


def attention_maps(model: nn.Module, images: torch.Tensor | Sequence[torch.Tensor], *,
                   query: tuple[float, float] | None = None,
                   upsample: bool = False) -> dict[str, AttentionMap]:
    """Run ``model`` once and return the attention every visattn block in it applied.

    Args:
        model: any ``nn.Module`` containing visattn blocks (found by walking its modules): a
            classifier taking ``(N, C, H, W)``, or a torchvision detector (from
            :func:`visattn.models.build_detector` or any with a ``GeneralizedRCNNTransform``) taking
            a list of ``(3, H, W)`` images of any sizes, values 0..1. Run in ``eval()`` mode under
            ``torch.no_grad()``; its train/eval state is restored afterwards.
        images: the input, as the model takes it.
        query: ``(y, x)``, a point as fractions of the image's height and width; self-attention
            blocks then also record ``"query"``: what that point attended to. For a detector all
            images must be resized to the same size (one at a time otherwise).
        upsample: also give every map in each input image's own pixels
            (:attr:`AttentionMap.image_maps`); for a detector this undoes its resize and cuts away
            the batch padding.

    Returns:
        dotted module name -> :class:`AttentionMap`, one per block that ran, and one per level for
        each neck attention across the levels (:class:`~visattn.models.neck.LevelAttention`:
        scale-aware weights, DyHead, Deformable DETR's encoder), keyed ``"<module name>.level<i>"``.

    Every block's recording and every hook is removed when this returns, also if the forward pass
    raises. Capturing does not change what the model computes (self-attention on the fused path
    forms its probabilities separately, in plain math, for the captured layers only).

    Example:
        >>> det = build_detector("fcos", backbone="resnet10t", num_classes=3, attention="cbam")
        >>> maps = attention_maps(det.eval(), [torch.rand(3, 200, 300)], upsample=True)
        >>> maps["backbone.body.features.layer1.0.bn2.attn.block"].map(0).shape
        torch.Size([200, 300])
    """
    return _run(model, images, query=query, upsample=upsample)[0]


# --------------------------------------------------------------------------------------------------
# Per detection: the level that produced each box


def _box_levels(detector: nn.Module, boxes: torch.Tensor, strides: list[int]) -> list[int]:
    """The FPN level index a head assigns each box (``(K, 4)`` in the detector's resized image
    coordinates) to, by the head's own rule:

    * FCOS (torchvision ``FCOS.compute_loss``): a location of level ``l`` (anchor size ``a_l``) is
      responsible when its largest distance to the box's sides lies in ``(4 a_l, 8 a_l)``, the
      lowest level open below and the highest above; for the box centre that distance is half the
      box's longer side.
    * RetinaNet: anchors are matched by IoU, so a box goes to the level whose anchor scale is
      nearest its own ``sqrt(w h)`` (in log scale).
    * Faster / Mask R-CNN: torchvision's :class:`~torchvision.ops.poolers.LevelMapper` (FPN paper
      eq. 1, the rule ``MultiScaleRoIAlign`` pools each box from).
    """
    from torchvision.models.detection import FCOS, RetinaNet
    from torchvision.ops.poolers import LevelMapper

    if len(boxes) == 0:
        return []
    wh = (boxes[:, 2:] - boxes[:, :2]).clamp_min(1e-6)
    sizes = getattr(getattr(detector, "anchor_generator", None), "sizes", None)
    if isinstance(detector, FCOS) and sizes:
        a = torch.tensor([s[0] for s in sizes], dtype=torch.float32)
        d = wh.max(1).values / 2  # (K,)
        lower, upper = 4 * a, 8 * a
        lower[0], upper[-1] = 0.0, float("inf")
        inside = (d[:, None] > lower) & (d[:, None] < upper)  # (K, L)
        nearest = (d[:, None].log() - (6 * a).log()).abs().argmin(1)
        return [int(row.nonzero()[0]) if row.any() else int(j) for row, j in zip(inside, nearest)]
    if isinstance(detector, RetinaNet) and sizes:
        a = torch.tensor([math.prod(s) ** (1 / len(s)) for s in sizes], dtype=torch.float32)
        return (wh.prod(1).sqrt()[:, None].log() - a.log()).abs().argmin(1).tolist()
    pool = getattr(getattr(detector, "roi_heads", None), "box_roi_pool", None)
    if pool is not None:
        names = list(pool.featmap_names)
        k_min = int(math.log2(strides[0]))
        mapper = LevelMapper(k_min, k_min + len(names) - 1, canonical_scale=pool.canonical_scale,
                             canonical_level=pool.canonical_level)
        return mapper([boxes.float()]).tolist()
    # any other detector: the level whose stride * 8 is nearest the box's scale
    s = torch.tensor(strides, dtype=torch.float32) * 8
    return (wh.prod(1).sqrt()[:, None].log() - s.log()).abs().argmin(1).tolist()


def _check_detector(detector: Any) -> None:
    if not isinstance(detector, nn.Module) or not _is_detector(detector):
        raise TypeError("detector must be a torchvision detector (with a GeneralizedRCNNTransform, e.g. "
                        f"from visattn.models.build_detector), got {type(detector).__name__}")


def _check_image(image: Any, name: str = "image") -> torch.Tensor:
    if not isinstance(image, torch.Tensor) or image.ndim != 3 or image.shape[0] != 3 or not image.is_floating_point():
        what = f"a {tuple(image.shape)} {image.dtype} tensor" if isinstance(image, torch.Tensor) else type(image).__name__
        raise TypeError(f"{name} must be a (3, H, W) float tensor with values 0..1, got {what}")
    if image.numel() == 0:
        raise ValueError(f"{name} is empty: shape {tuple(image.shape)}")
    return image


def _explain(detector: nn.Module, image: torch.Tensor, maps: dict[str, AttentionMap], output: Any,
             geo: _Geometry, top_k: int, margin: float, score_thresh: float) -> list[DetectionExplanation]:
    det = output[0]
    keep = (det["scores"] >= score_thresh).nonzero().flatten()[:top_k]  # scores come sorted
    boxes = det["boxes"][keep].detach().float().cpu()
    if not len(boxes):
        return []
    (ch, cw), (oh, ow) = geo.content[0], geo.original[0]
    scale = torch.tensor([cw / ow, ch / oh, cw / ow, ch / oh])
    level_sizes = geo.levels or sorted({m.size for m in maps.values()}, reverse=True)
    strides = [_pow2(geo.batch[0] / h) for h, _ in level_sizes]
    levels = _box_levels(detector, boxes * scale, strides)
    out = []
    for i, (box, lvl) in enumerate(zip(boxes, levels)):
        stride = strides[lvl]
        at = [m for m in maps.values() if m.level_stride == stride]
        if not at and maps:  # no block at that stride: the nearest one(s)
            best = min(abs(math.log2(m.level_stride / stride)) for m in maps.values())
            at = [m for m in maps.values() if abs(math.log2(m.level_stride / stride)) == best]
        x0, y0, x1, y1 = box.tolist()
        mx, my = margin * (x1 - x0), margin * (y1 - y0)
        # a degenerate box on the right / bottom edge (x0 == width) still gets a one-pixel crop
        cx0, cy0 = min(max(0, math.floor(x0 - mx)), ow - 1), min(max(0, math.floor(y0 - my)), oh - 1)
        cx1, cy1 = min(ow, max(cx0 + 1, math.ceil(x1 + mx))), min(oh, max(cy0 + 1, math.ceil(y1 + my)))
        out.append(DetectionExplanation(
            box=(x0, y0, x1, y1), score=float(det["scores"][keep[i]]), label=int(det["labels"][keep[i]]),
            level=int(lvl), stride=int(stride), crop_box=(cx0, cy0, cx1, cy1),
            crops={m.name: m.map(0)[cy0:cy1, cx0:cx1] for m in at},
            image_crop=image[:, cy0:cy1, cx0:cx1].detach().cpu()))
    return out


def explain_detections(detector: nn.Module, image: torch.Tensor, *, top_k: int = 5, margin: float = 0.5,
                       score_thresh: float = 0.0,
                       query: tuple[float, float] | None = None) -> list[DetectionExplanation]:
    """For each of the ``top_k`` highest-scoring detections in ``image``, the maps of the pyramid
    level that produced it, cropped around the box.

    Args:
        detector: a torchvision detector with visattn blocks (:func:`visattn.models.build_detector`).
        image: ``(3, H, W)`` float tensor, values 0..1.
        top_k: most detections to explain (highest score first).
        margin: context kept around each box, as a fraction of its width / height per side.
        score_thresh: skip detections scoring below this.
        query: as for :func:`attention_maps`.

    The level is the one the detector's head assigns a box of that size to (see
    :func:`_box_levels`: FCOS's size ranges, RetinaNet's anchor scales, torchvision's
    ``LevelMapper`` for Faster / Mask R-CNN); the maps shown are those of every block whose map has
    that level's stride (neck blocks on the level, backbone blocks at that stride), else of the
    blocks nearest to it. All coordinates are the image's own pixels.
    """
    _check_detector(detector)
    image = _check_image(image)
    check_int("top_k", top_k, 1)
    check_real("margin", margin, 0.0, 10.0)
    check_real("score_thresh", score_thresh, 0.0, 1.0)
    maps, output, geo = _run(detector, [image], query=query, upsample=True)
    return _explain(detector, image, maps, output, geo, top_k, margin, score_thresh)


# --------------------------------------------------------------------------------------------------
# Faithfulness: deletion and insertion against random orders


def _box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    from torchvision.ops import box_iou

    return box_iou(a, b)


def _scorer(model: nn.Module, image: torch.Tensor, top_k: int):
    """``score(images: (B, 3, H, W)) -> (B,)`` relative to the unmodified image (1.0 there), and a
    description of the target. A detector: the mean over its ``top_k`` best detections of the best
    score of a detection of the same label overlapping it (IoU >= 0.5), over the original score; a
    classifier: the softmax probability of its top class, over the original."""
    model.eval()
    if _is_detector(model):
        with torch.no_grad():
            det = model([image])[0]
        boxes, labels, scores = det["boxes"][:top_k], det["labels"][:top_k], det["scores"][:top_k]
        if not len(boxes):
            return None, "no detections"

        def score(batch: torch.Tensor) -> torch.Tensor:
            vals = []
            with torch.no_grad():
                outs = [o for start in range(0, len(batch), 8) for o in model(list(batch[start:start + 8]))]
            for o in outs:
                if not len(o["boxes"]):
                    vals.append(0.0)
                    continue
                match = (_box_iou(boxes, o["boxes"]) >= 0.5) & (labels[:, None] == o["labels"][None])
                best = (o["scores"][None] * match).max(1).values  # (K,)
                vals.append(float((best / scores).mean()))
            return torch.tensor(vals)

        return score, f"top-{len(boxes)} detection scores (labels {labels.tolist()})"
    with torch.no_grad():
        logits = model(image[None])
    logits = logits[0] if isinstance(logits, (tuple, list)) else logits
    if not isinstance(logits, torch.Tensor) or logits.ndim != 2:
        what = f"a {tuple(logits.shape)} tensor" if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise TypeError(f"model: a classifier must return (N, classes) logits (or a tuple starting with "
                        f"them) for the faithfulness test, got {what}")
    cls = int(logits[0].argmax())
    p0 = float(logits[0].float().softmax(-1)[cls])

    def score(batch: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            out = model(batch)
        out = out[0] if isinstance(out, (tuple, list)) else out
        return out.float().softmax(-1)[:, cls] / p0

    return score, f"probability of class {cls}"


def _patch_order(m: torch.Tensor, patch: int) -> torch.Tensor:
    """Patch indices, most attended first (ties broken in a fixed random order)."""
    pooled = F.avg_pool2d(m[None, None].float(), patch, ceil_mode=True).flatten()
    perm = torch.randperm(len(pooled), generator=torch.Generator().manual_seed(0))
    return perm[pooled[perm].argsort(descending=True, stable=True)]


def _curves(score, image: torch.Tensor, blurred: torch.Tensor, order: torch.Tensor, patch: int,
            steps: int) -> tuple[list[float], list[float]]:
    """Deletion and insertion curves of one patch order (``steps + 1`` points each)."""
    _, h, w = image.shape
    gh, gw = -(-h // patch), -(-w // patch)
    rank = torch.empty(gh * gw, dtype=torch.long)
    rank[order] = torch.arange(gh * gw)
    rank = rank.view(1, 1, gh, gw).float()
    rank = F.interpolate(rank, scale_factor=patch, mode="nearest")[0, 0, :h, :w]
    fractions = [round(i * gh * gw / steps) for i in range(steps + 1)]
    masks = torch.stack([(rank < f) for f in fractions])[:, None].to(image.device)  # (S+1, 1, H, W): chosen
    deleted = torch.where(masks, blurred, image)
    inserted = torch.where(masks, image, blurred)
    return score(deleted).tolist(), score(inserted).tolist()


def _auc(curve: Sequence[float]) -> float:
    """Area under a curve sampled at evenly spaced fractions 0..1 (trapezoids)."""
    c = list(curve)
    return float(sum((a + b) / 2 for a, b in pairwise(c)) / (len(c) - 1))


def faithfulness(model: nn.Module, image: torch.Tensor, maps: dict[str, AttentionMap] | None = None, *,
                 steps: int = 8, seeds: int = 3, top_k: int = 1, patches: int = 16) -> dict[str, dict]:
    """Deletion / insertion scores of each block's map on one image.

    The image is cut into about ``patches x patches`` patches, ranked by the map's mean over each
    patch. *Deletion* replaces the most-attended patches first by a heavily blurred copy, in
    ``steps`` steps, and records the target score (see below) after each; *insertion* starts from
    the blurred image and puts the most-attended patches back first. The area under the deletion
    curve is low and under the insertion curve high when the map points at what the model uses.
    The same curves for ``seeds`` random patch orders give the baseline.

    Target: for a detector, its ``top_k`` best detections on the image (each step's score is the
    best score of a detection of the same label with IoU >= 0.5, relative to the original score);
    for a classifier (called on ``image[None]``), the probability of its top class relative to the
    original.

    Args:
        model: the model ``maps`` came from (a detector or a classifier).
        image: ``(3, H, W)`` float tensor, values 0..1.
        maps: from :func:`attention_maps` with ``upsample=True`` on this image (computed if ``None``).
        steps: points per curve after the first (each costs one forward pass per curve).
        seeds: random orders for the baseline.
        top_k: detections followed (detectors).
        patches: patches per side.

    Returns:
        block name -> ``{"deletion_auc", "insertion_auc", "random_deletion_auc",
        "random_insertion_auc", "random_std", "gain", "verdict", "deletion", "insertion"}``, where
        ``gain = (insertion - deletion) - mean over random orders of (insertion - deletion)`` and the
        verdict says "better than random" only when ``gain`` exceeds twice the spread of the random
        orders (and 0.02); otherwise "no better than random". Empty when a detector finds nothing.
        Cost: ``2 (steps + 1) (blocks + seeds)`` forward passes.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    image = _check_image(image)
    check_int("steps", steps, 1)
    check_int("seeds", seeds, 1)
    check_int("top_k", top_k, 1)
    check_int("patches", patches, 1)
    if maps is None:
        maps = _run(model, [image] if _is_detector(model) else image[None], upsample=True)[0]
    if not isinstance(maps, dict) or not all(isinstance(m, AttentionMap) for m in maps.values()):
        raise TypeError("maps must be the dict attention_maps returns")
    if any(m.image_maps is None for m in maps.values()):
        raise ValueError("maps: compute them with attention_maps(..., upsample=True) on this image")
    wrong = next((n for n, m in maps.items() if tuple(m.map(0).shape) != tuple(image.shape[-2:])), None)
    if wrong is not None:
        raise ValueError(f"maps[{wrong!r}] is {tuple(maps[wrong].map(0).shape)} pixels, but image is "
                         f"{tuple(image.shape[-2:])}: compute the maps on this image")
    training = {m: m.training for m in model.modules()}
    try:
        score, target = _scorer(model, image, top_k)
        if score is None:
            return {}
        _, h, w = image.shape
        patch = max(1, -(-max(h, w) // patches))
        k = min(max(3, (min(h, w) // 8) | 1), 2 * min(h, w) - 1)  # reflect padding needs k // 2 < h, w
        blurred = _blur(image, k)
        rand = []
        for seed in range(seeds):
            g = torch.Generator().manual_seed(seed)
            order = torch.randperm(-(-h // patch) * -(-w // patch), generator=g)
            d, i = _curves(score, image, blurred, order, patch, steps)
            rand.append((_auc(d), _auc(i)))
        rd = sum(r[0] for r in rand) / seeds
        ri = sum(r[1] for r in rand) / seeds
        spread = torch.tensor([r[1] - r[0] for r in rand]).std().item() if seeds > 1 else 0.0
        result = {}
        for name, m in maps.items():
            d, i = _curves(score, image, blurred, _patch_order(m.map(0), patch), patch, steps)
            gain = (_auc(i) - _auc(d)) - (ri - rd)
            better = gain > max(2 * spread, 0.02)
            result[name] = {
                "block": m.block, "map": m.primary, "target": target,
                "deletion_auc": round(_auc(d), 4), "insertion_auc": round(_auc(i), 4),
                "random_deletion_auc": round(rd, 4), "random_insertion_auc": round(ri, 4),
                "random_std": round(spread, 4), "gain": round(gain, 4),
                "verdict": "better than random" if better else
                "no better than random: removing what this map attends to hurts the prediction no "
                "more than removing random patches",
                "deletion": [round(v, 4) for v in d], "insertion": [round(v, 4) for v in i],
            }
        return result
    finally:
        for m, mode in training.items():
            m.train(mode)


def _blur(image: torch.Tensor, k: int) -> torch.Tensor:
    from torchvision.transforms.functional import gaussian_blur

    return gaussian_blur(image[None], [k, k], [k / 3, k / 3])[0]


# --------------------------------------------------------------------------------------------------
# Drawing (matplotlib's Agg canvas: no display, no global pyplot state)


def _hwc(image: Any) -> Any:
    """``(3, H, W)`` float tensor in 0..1 -> ``(H, W, 3)`` numpy array."""
    image = _check_image(image)
    return image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy()


def _map_2d(amap: Any, name: str = "map") -> torch.Tensor:
    if isinstance(amap, AttentionMap):
        amap = amap.map(0)
    if not isinstance(amap, torch.Tensor) or amap.ndim != 2 or amap.numel() == 0:
        what = f"a {amap.ndim}-D tensor" if isinstance(amap, torch.Tensor) else type(amap).__name__
        raise TypeError(f"{name} must be a 2-D tensor (H, W) or an AttentionMap, got {what}")
    if not torch.isfinite(amap).all():
        raise ValueError(f"{name} has NaN or infinite values")
    return amap.detach().float().cpu()


def _fit(m: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(m.shape) == tuple(size):
        return m
    return F.interpolate(m[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]


def _save(fig, path: Path, dpi: int) -> Path:
    """Render ``fig`` and write it as a 256-colour PNG (a third of the bytes of a full-colour one
    for photographs under heat maps), atomically."""
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from PIL import Image

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, dpi=dpi, format="png")
    buf.seek(0)
    with Image.open(buf) as im:
        small = im.convert("RGB").quantize(256, method=Image.Quantize.MEDIANCUT)
    with atomic_path(path) as tmp:
        small.save(tmp, format="PNG", optimize=True)
    return path


def save_overlay(image: torch.Tensor, amap: torch.Tensor | AttentionMap, path: str | os.PathLike, *,
                 alpha: float = 0.5, cmap: str = "jet", title: str | None = None) -> Path:
    """Write ``path`` (PNG): ``image`` at its own size (W x H pixels), ``amap`` resized onto it as a
    heat map, with a colour bar of the map's values inside the right edge.

    Args:
        image: ``(3, H, W)`` float tensor, values 0..1.
        amap: an ``(h, w)`` map (any size; resized to the image) or an :class:`AttentionMap`
            (its primary map of the first image, upsampled).
        alpha: heat map opacity in 0..1.
    """
    from matplotlib.figure import Figure

    img = _hwc(image)
    m = _fit(_map_2d(amap), img.shape[:2]).numpy()
    check_real("alpha", alpha, 0.0, 1.0)
    path = Path(check_pathlike("path", path))
    h, w = img.shape[:2]
    dpi = 100
    fig = Figure(figsize=(w / dpi, h / dpi), dpi=dpi)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.imshow(img, interpolation="nearest")
    heat = ax.imshow(m, cmap=cmap, alpha=alpha, interpolation="bilinear")
    ax.set_axis_off()
    cax = fig.add_axes((0.92, 0.1, 0.025, 0.8))
    bar = fig.colorbar(heat, cax=cax)
    bar.ax.tick_params(labelsize=max(4, min(8, h // 40)), colors="white", length=2)
    if title:
        ax.text(0.01, 0.99, title, transform=ax.transAxes, va="top", fontsize=max(5, min(9, h // 30)),
                color="white", bbox={"facecolor": "black", "alpha": 0.5, "pad": 1, "linewidth": 0})
    return _save(fig, path, dpi)


def _draw_boxes(ax, detections: Sequence[DetectionExplanation] | None, names: dict[int, str] | None,
                offset: tuple[int, int] = (0, 0)) -> None:
    from matplotlib.patches import Rectangle

    for d in detections or ():
        x0, y0, x1, y1 = d.box
        ax.add_patch(Rectangle((x0 - offset[0], y0 - offset[1]), x1 - x0, y1 - y0, fill=False,
                               edgecolor="white", linewidth=1.2))
        label = (names or {}).get(d.label, str(d.label))
        ax.text(x0 - offset[0] + 1, y0 - offset[1] + 1, f"{label} {d.score:.2f}", fontsize=5, color="black",
                va="top", bbox={"facecolor": "white", "alpha": 0.7, "pad": 0.5, "linewidth": 0})


def save_grid(image: torch.Tensor, maps: dict[str, AttentionMap], path: str | os.PathLike, *,
              detections: Sequence[DetectionExplanation] | None = None, key: str | None = None,
              cols: int = 3, panel: int = 220, label_names: dict[int, str] | None = None,
              title: str | None = None) -> Path:
    """Write ``path`` (PNG): the image with its detections, then every block's map (upsampled onto
    the image; :attr:`AttentionMap.primary` unless ``key``) as a heat map, one panel each, titled
    with the block's module name, kind, map and stride; the detections are drawn in every panel.

    Args:
        image: ``(3, H, W)`` float tensor, values 0..1 (the image ``maps`` were computed on).
        maps: from :func:`attention_maps` with ``upsample=True``.
        detections: boxes to draw (e.g. from :func:`explain_detections`).
        cols: panels per row; ``panel``: the longer side of a panel in pixels.
    """
    from matplotlib.figure import Figure

    img = _hwc(image)
    if not isinstance(maps, dict) or not all(isinstance(m, AttentionMap) for m in maps.values()):
        raise TypeError("maps must be the dict attention_maps returns")
    check_int("cols", cols, 1)
    check_int("panel", panel, 32)
    path = Path(check_pathlike("path", path))
    h, w = img.shape[:2]
    n = len(maps) + 1
    cols = min(cols, n)
    rows = -(-n // cols)
    scale = panel / max(h, w)
    short = min(48, panel)  # a very thin image is letterboxed in a panel at least this wide / high
    pw, ph = max(w * scale, short) / 100, max(h * scale, short) / 100 + 0.32
    height = rows * ph + (0.3 if title else 0)
    fig = Figure(figsize=(cols * pw, height), dpi=100)
    if title:
        fig.suptitle(title, fontsize=8, y=1 - 0.04 / height, va="top")
    top = 1 - (0.3 / (rows * ph + 0.3) if title else 0)
    for i in range(rows * cols):
        r, c = divmod(i, cols)
        ax = fig.add_axes((c / cols, top - (r + 1) * top / rows, 1 / cols, top / rows * (1 - 0.32 / ph)))
        ax.set_axis_off()
        if i >= n:
            continue
        ax.imshow(img)
        if i == 0:
            ax.set_title(f"image {w}x{h}, {len(detections or [])} detections", fontsize=6, pad=2)
        else:
            m = list(maps.values())[i - 1]
            k = key if key and key in m.maps and m.maps[key].ndim == 3 else m.primary
            ax.imshow(_fit(m.map(0, k), (h, w)).numpy(), cmap="jet", alpha=0.5)
            short = m.name if len(m.name) <= 34 else "..." + m.name[-31:]
            scale = f", scale {m.weights['scale'][0]:.2f}" if "scale" in m.weights else ""
            ax.set_title(f"{short}\n{m.block} ({m.kind}) {k}, stride {m.level_stride}{scale}", fontsize=5.5, pad=2)
        _draw_boxes(ax, detections, label_names)
    return _save(fig, path, 100)


def save_detection_crops(explanations: Sequence[DetectionExplanation], out_dir: str | os.PathLike, *,
                         maps: dict[str, AttentionMap] | None = None, panel: int = 160,
                         label_names: dict[int, str] | None = None) -> list[Path]:
    """Write one PNG per detection into ``out_dir`` (``det_00.png``, ...): the image crop around the
    box, then each of its level's maps over the crop."""
    from matplotlib.figure import Figure

    check_pathlike("out_dir", out_dir)
    check_int("panel", panel, 32)
    out_dir = Path(out_dir)
    paths = []
    for j, d in enumerate(explanations):
        if not isinstance(d, DetectionExplanation):
            raise TypeError(f"explanations[{j}] must be a DetectionExplanation, got {type(d).__name__}")
        crop = _hwc(d.image_crop)
        h, w = crop.shape[:2]
        n = len(d.crops) + 1
        scale = panel / max(h, w)
        short = min(48, panel)  # a very thin crop is letterboxed
        pw, ph = max(w * scale, short) / 100, max(h * scale, short) / 100 + 0.3
        fig = Figure(figsize=(n * pw, ph), dpi=100)
        for i in range(n):
            ax = fig.add_axes((i / n, 0, 1 / n, 1 - 0.3 / ph))
            ax.set_axis_off()
            ax.imshow(crop)
            if i == 0:
                ax.set_title(f"det {j}: label {(label_names or {}).get(d.label, d.label)} {d.score:.2f}\n"
                             f"level {d.level} (stride {d.stride})", fontsize=5.5, pad=2)
            else:
                name, m = list(d.crops.items())[i - 1]
                ax.imshow(m.numpy(), cmap="jet", alpha=0.5)
                block = maps[name].block if maps and name in maps else ""
                ax.set_title(f"{'...' + name[-24:] if len(name) > 27 else name}\n{block}", fontsize=5.5, pad=2)
            _draw_boxes(ax, [d], label_names, offset=d.crop_box[:2])
        paths.append(_save(fig, out_dir / f"det_{j:02d}.png", 100))
    return paths


# --------------------------------------------------------------------------------------------------
# The `visattn explain` command's work


def explain_image(model: nn.Module, image: torch.Tensor, out_dir: str | os.PathLike, *, top_k: int = 5,
                  query: tuple[float, float] | None = None, steps: int = 8, seeds: int = 3,
                  faithful: bool = True, note: str = "") -> dict[str, Any]:
    """Write ``grid.png`` (all blocks' maps with the detections), ``detections/det_NN.png`` (per
    detection, its level's maps around the box; an earlier run's surplus ``det_NN.png`` files are
    removed) and ``faithfulness.json`` for one image.

    Args:
        model: a torchvision detector with visattn blocks.
        image: ``(3, H, W)`` float tensor, values 0..1.
        out_dir: output folder (created).
        top_k: detections to explain and follow in the faithfulness test.
        query, steps, seeds: as for :func:`attention_maps` / :func:`faithfulness`.
        faithful: run the faithfulness test (costs ``2 (steps + 1) (blocks + seeds)`` passes).
        note: a line for the JSON and the grid's title (e.g. that the model is untrained).

    Returns the summary written to ``faithfulness.json`` (with the paths written).
    """
    _check_detector(model)
    image = _check_image(image)
    check_pathlike("out_dir", out_dir)
    check_int("top_k", top_k, 1)
    out = Path(out_dir)
    maps, output, geo = _run(model, [image], query=query, upsample=True)
    if not maps:
        raise ValueError("the model has no visattn attention blocks to explain")
    dets = _explain(model, image, maps, output, geo, top_k, 0.5, 0.0)
    grid = save_grid(image, maps, out / "grid.png", detections=dets, title=note or None)
    crops = save_detection_crops(dets, out / "detections", maps=maps)
    for stale in set((out / "detections").glob("det_*.png")) - set(crops):  # an earlier run's extras
        if re.fullmatch(r"det_\d+\.png", stale.name):
            stale.unlink()
    scores = faithfulness(model, image, maps, steps=steps, seeds=seeds, top_k=top_k) if faithful else {}
    summary = {
        "note": note,
        "image_size": list(image.shape[-2:]),
        "blocks": {n: {"block": m.block, "kind": m.kind, "map": m.primary, "stride": m.level_stride,
                       **({"weights": {k: round(float(v[0]), 4) for k, v in m.weights.items()}} if m.weights else {}),
                       "size": list(m.size)} for n, m in maps.items()},
        "detections": [{"box": [round(v, 1) for v in d.box], "score": round(d.score, 4), "label": d.label,
                        "level": d.level, "stride": d.stride, "blocks": list(d.crops)} for d in dets],
        "faithfulness": scores,
        "files": {"grid": str(grid), "detections": [str(p) for p in crops]},
    }
    atomic_write_json(out / "faithfulness.json", summary, indent=1)
    return summary


def load_model(*, config: str | os.PathLike | None = None, weights: str | None = None,
               ckpt: str | os.PathLike | None = None) -> tuple[nn.Module, str]:
    """The model for ``visattn explain``: published ``weights`` by name, or the model of a
    LightningCLI ``config`` (``model.init_args.model``), with a Lightning ``ckpt``'s weights if
    given (verified, loaded without unpickling code) and untrained otherwise. Returns the model in
    ``eval()`` mode and a note saying where its weights came from."""
    from . import weights as W

    if (config is None) == (weights is None):
        raise ValueError("give exactly one of config and weights")
    if weights is not None:
        if ckpt is not None:
            raise ValueError("ckpt goes with config, not with weights")
        return W.load_pretrained(weights), f"published weights {weights}"
    path = Path(check_pathlike("config", config))
    if not path.is_file():
        raise FileNotFoundError(f"config {str(path)!r} does not exist")
    model = W.build_from_config(W._model_config(path))
    if ckpt is None:
        return model.eval(), f"UNTRAINED model of {path.name} (no --ckpt): its attention is random"
    state = W._state_dict_from_checkpoint(Path(check_pathlike("ckpt", ckpt)))
    model.load_state_dict(state, strict=True)
    return model.eval(), f"{path.name} with weights from {Path(ckpt).name}"


def read_image_tensor(path: str | os.PathLike) -> torch.Tensor:
    """An image file as a ``(3, H, W)`` float tensor in 0..1 (EXIF orientation applied)."""
    from .data.images import read_image

    a = read_image(path)
    t = torch.from_numpy(a).permute(2, 0, 1).contiguous()
    return t.float() / 255 if not t.is_floating_point() else t.float()
