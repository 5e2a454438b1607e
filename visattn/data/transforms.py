"""Albumentations pipelines (box- and mask-aware) for detection, with a small-object preset.

Presets (``augment=`` in :class:`~visattn.data.CocoDataModule`):

- ``"none"``: resize only (the longest side to ``image_size``), as for validation.
- ``"flip"``: resize + horizontal flip.
- ``"small_objects"``: resize, scale jitter (0.75-1.5x, so small objects are also seen larger),
  pad + random crop back to ``image_size``, flip, mild colour jitter. Boxes cut by the crop are
  clipped and kept while at least 30% of them stays in view; a *relative* threshold, so a tiny box
  is never dropped for being tiny (no ``min_area``).

A custom pipeline is any ``albumentations`` transform; it is wrapped with the bbox parameters.

Sliced training (``crop_size=`` in :func:`build_transform` and the data modules): after the resize
and before the preset's own steps, a random ``crop_size`` x ``crop_size`` window of the image
(zero-padded at the bottom/right where the image is smaller), with boxes clipped and kept by the same
30%-in-view rule as ``"small_objects"``, masks cropped alike. A model trained so sees objects at
their native pixel size, as :func:`visattn.predict.sliced_predict` shows them to it.
"""
from __future__ import annotations

import albumentations as A

from .._checks import check_int

__all__ = ["PRESETS", "build_transform"]

PRESETS = ("none", "flip", "small_objects")


def _bbox_params(min_visibility: float) -> A.BboxParams:
    return A.BboxParams(format="pascal_voc", label_fields=["labels", "index"], min_visibility=min_visibility,
                        clip=True, filter_invalid_bboxes=True)


def _crop(size: int) -> list:
    """Pad (bottom/right, zeros) to at least ``size`` and take a random ``size`` x ``size`` window."""
    return [A.PadIfNeeded(min_height=size, min_width=size, position="top_left", fill=0),
            A.RandomCrop(height=size, width=size)]


def build_transform(augment: str | A.BasicTransform | None, image_size: int | None,
                    crop_size: int | None = None) -> A.Compose | None:
    """The pipeline for a preset name (see module docstring) or a custom albumentations transform;
    ``None`` when there is nothing to do (no resize, no augmentation). ``image_size`` is ``None``
    (keep the size) or a positive int, the longest side after resizing. ``crop_size`` (``None`` or
    an int >= 8): train on random crops of that side (see module docstring); with
    ``"small_objects"`` it replaces ``image_size`` as the size the preset crops to.

    Images may be ``uint8`` or, for sources deeper than 8 bits, ``float32`` in 0..1 (see
    :mod:`visattn.data.images`); the presets handle both, a custom transform must too."""
    check_int("image_size", image_size, minimum=1, optional=True)
    check_int("crop_size", crop_size, minimum=8, optional=True)
    resize = [A.LongestMaxSize(max_size=image_size)] if image_size else []
    # a crop cuts boxes: keep those 30% in view, as small_objects does
    crop, visibility = (_crop(crop_size), 0.3) if crop_size else ([], 0.0)
    if augment is None or augment == "none":
        steps = [*resize, *crop]
        return A.Compose(steps, bbox_params=_bbox_params(visibility)) if steps else None
    if augment == "flip":
        return A.Compose([*resize, *crop, A.HorizontalFlip(p=0.5)], bbox_params=_bbox_params(visibility))
    if augment == "small_objects":
        size = crop_size or image_size
        if not size:
            raise ValueError("augment='small_objects' needs image_size or crop_size (the crop size)")
        return A.Compose([
            *resize,
            A.RandomScale(scale_limit=(-0.25, 0.5), p=1.0),
            *_crop(size),
            A.HorizontalFlip(p=0.5),
            A.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.02, p=0.5),
        ], bbox_params=_bbox_params(0.3))
    if isinstance(augment, A.BasicTransform | A.BaseCompose):
        return A.Compose([*resize, *crop, augment], bbox_params=_bbox_params(visibility))
    raise ValueError(f"unknown augment preset {augment!r}; choose from {', '.join(PRESETS)} or pass an "
                     "albumentations transform")
