"""One validator for COCO instances ground truth.

The data loaders (:func:`visattn.data.check_coco`, :func:`~visattn.data.load_coco`, the datasets)
and the evaluation (:func:`visattn.evaluation.load_gt`, hence ``evaluate``, ``compare``, the
LightningModule's validation) all check ground truth here, so a file one accepts the other accepts
too, and a file one refuses the other refuses at load time with the same message, instead of
after a training epoch. Imports neither torch nor Lightning.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from .._checks import is_int, is_real
from .._io import read_json
from .._rle import rle_problem

__all__ = ["IOU_TYPES", "check_gt", "read_gt"]

IOU_TYPES = ("bbox", "segm")


def _finite(v) -> bool:
    return is_real(v) and math.isfinite(v)


def _polygons_ok(segm: list) -> bool:
    return bool(segm) and all(isinstance(poly, list | tuple) and len(poly) >= 6 and len(poly) % 2 == 0
                              and all(_finite(v) for v in poly) for poly in segm)


def check_gt(data, source: str, *, iou_type: str | None = None, name_ids: bool = False) -> None:
    """Check a parsed COCO instances object; a fault is a ``ValueError`` ``"{source}: {what}"``
    naming the first bad entry (``annotations[3]``). Nothing is changed.

    Checked: ``images`` and ``categories`` are lists (``annotations`` too, when present); image,
    category and annotation ids are unique ints (booleans are not numbers here); every image has a
    str ``file_name`` and either both ``width``/``height`` as positive ints or neither; every
    annotation has an int ``id``, an ``image_id`` and ``category_id`` that exist, a ``bbox`` of 4
    finite numbers ``[x, y, w, h]`` with ``w, h >= 0``, a finite ``area >= 0`` (COCO's size
    ranges read it), ``iscrowd`` 0 or 1 (or absent) and, where present, a finite ``occlusion`` in
    [0, 1] and a ``segmentation`` that is polygons (a list) or a valid RLE of its image's size.
    With ``iou_type="segm"`` every image needs ``width``/``height`` and every annotation a
    ``segmentation``, whose polygons must each be >= 3 finite x, y pairs.

    ``name_ids`` also names an annotation's id and image id (``annotations[2] (id=12,
    image_id=1) bbox ...``; a repeat reads ``repeats id 10``), as the evaluation does for ground
    truth given as a dict or ``COCO``; files are named by index alone (``annotations[2] bbox ...``,
    ``repeats annotation id 10``), by the data loaders and the evaluation alike.
    """
    def fail(what: str):
        raise ValueError(f"{source}: {what}")

    def repeats(key: str, noun: str, i: int, first: int, value) -> None:
        fail(f"{key}[{i}] repeats {'' if name_ids else noun + ' '}id {value} of {key}[{first}]")

    if iou_type is not None and iou_type not in IOU_TYPES:
        raise ValueError(f"iou_type must be one of {', '.join(map(repr, IOU_TYPES))}, got {iou_type!r}")
    if not isinstance(data, dict):
        fail(f"top level must be an object with 'images', 'annotations', 'categories', got {type(data).__name__}")
    for key in ("images", "categories"):
        if key not in data:
            fail(f"missing list '{key}'")
        if not isinstance(data[key], list):
            fail(f"'{key}' must be a list, got {type(data[key]).__name__}")
    anns = data.get("annotations", [])
    if not isinstance(anns, list):
        fail(f"'annotations' must be a list, got {type(anns).__name__}")

    images: dict[int, int] = {}
    for i, im in enumerate(data["images"]):
        if not isinstance(im, dict) or not is_int(im.get("id")) or not isinstance(im.get("file_name"), str):
            fail(f"images[{i}] needs an int 'id' and a str 'file_name', got {im!r:.120}")
        if im["id"] in images:
            repeats("images", "image", i, images[im["id"]], im["id"])
        images[im["id"]] = i
        has = [k for k in ("width", "height") if k in im]
        if has and (len(has) == 1 or not all(is_int(im[k]) and im[k] > 0 for k in has)):
            fail(f"images[{i}] (id {im['id']}) needs both 'width' and 'height' as positive ints (or neither), "
                 f"got width={im.get('width')!r}, height={im.get('height')!r}")
        if not has and iou_type == "segm":
            fail(f"images[{i}] (id {im['id']}) needs 'width' and 'height' (positive ints) for iou_type='segm'")
    categories: dict[int, int] = {}
    for i, cat in enumerate(data["categories"]):
        if not isinstance(cat, dict) or not is_int(cat.get("id")):
            fail(f"categories[{i}] needs an int 'id', got {cat!r:.120}")
        if cat["id"] in categories:
            repeats("categories", "category", i, categories[cat["id"]], cat["id"])
        categories[cat["id"]] = i

    ann_ids: dict[int, int] = {}
    for i, a in enumerate(anns):
        if not isinstance(a, dict):
            fail(f"annotations[{i}] must be an object (a dict), got {type(a).__name__}")
        if "id" not in a:
            fail(f"annotations[{i}] has no 'id' (each annotation needs a unique int 'id')")
        if not is_int(a["id"]):
            fail(f"annotations[{i}] 'id' must be an int (each annotation needs a unique int 'id'), got {a['id']!r:.60}")
        if a["id"] in ann_ids:
            repeats("annotations", "annotation", i, ann_ids[a["id"]], a["id"])
        ann_ids[a["id"]] = i
        where = f"annotations[{i}]" + (f" (id={a['id']}, image_id={a.get('image_id')!r})" if name_ids else "")
        for key in ("image_id", "category_id", "bbox", "area"):
            if key not in a:
                fail(f"{where} has no '{key}'" + (" (a finite number >= 0; COCO's size ranges read it)"
                                                  if key == "area" else ""))
        for key, noun, listed, known in (("image_id", "image", "an image id not in 'images'", images),
                                         ("category_id", "category", "a category id not in 'categories'",
                                          categories)):
            if not is_int(a[key]):
                fail(f"{where} refers to {noun} id {a[key]!r}, which is not an int")
            if a[key] not in known:
                fail(f"{where} refers to {noun} id {a[key]!r}, {listed}")
        box = a["bbox"]
        if not (isinstance(box, list | tuple) and len(box) == 4 and all(_finite(v) for v in box)
                and box[2] >= 0 and box[3] >= 0):
            fail(f"{where} bbox must be 4 finite numbers [x, y, w, h] with w, h >= 0, got {box!r:.120}")
        if not (_finite(a["area"]) and a["area"] >= 0):
            fail(f"{where} area must be a finite number >= 0, got {a['area']!r:.60}")
        crowd = a.get("iscrowd", 0)
        if not (isinstance(crowd, bool | np.bool_) or is_int(crowd)) or crowd not in (0, 1):
            fail(f"{where} iscrowd must be 0 or 1, got {crowd!r:.60}")
        if "occlusion" in a and not (_finite(a["occlusion"]) and 0 <= a["occlusion"] <= 1):
            fail(f"{where} occlusion must be a finite number in [0, 1], got {a['occlusion']!r:.60}")
        if "segmentation" not in a:
            if iou_type == "segm":
                fail(f"{where} has no 'segmentation' (needed for iou_type='segm')")
            continue
        segm = a["segmentation"]
        if isinstance(segm, dict):
            problem = rle_problem(segm)
            if problem is not None:
                fail(f"{where} segmentation is not a valid RLE: {problem}")
            im = data["images"][images[a["image_id"]]]
            if "height" in im and list(segm["size"]) != [im["height"], im["width"]]:
                fail(f"{where} segmentation size {list(segm['size'])} differs from its image's [height, width] "
                     f"{[im['height'], im['width']]}")
        elif not isinstance(segm, list):
            fail(f"{where} segmentation must be polygons (a list) or an RLE (an object), got {type(segm).__name__}")
        elif iou_type == "segm" and not _polygons_ok(segm):
            fail(f"{where} segmentation must be polygons (lists of >= 3 finite x, y pairs) or an RLE dict with "
                 f"'size' and 'counts', got {segm!r:.120}")


def read_gt(path: str | os.PathLike, *, iou_type: str | None = None) -> dict:
    """Read a COCO instances JSON file and :func:`check_gt` it; errors name the file (and the entry).
    ``FileNotFoundError`` when there is no such file, ``ValueError`` when it is not valid JSON."""
    data = read_json(path, "COCO annotation file")
    check_gt(data, str(Path(path)), iou_type=iou_type)
    return data
