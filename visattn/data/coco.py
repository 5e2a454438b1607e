"""COCO-format detection data: a validated loader, a Dataset and a LightningDataModule.

Batches follow torchvision's detection convention: ``(list[Tensor(3, H, W) float 0..1],
list[dict])`` where each target has ``boxes`` (xyxy, float32, in the transformed image's pixels),
``labels`` (int64, contiguous ``1..K``), ``image_id``, ``orig_size`` and ``size`` (``(H, W)``
before and after the transform, to map predictions back) and, when asked for, ``masks``
(``(n, H, W)`` uint8).
"""
from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import numpy as np
import torch
from pycocotools import mask as mask_utils
from torch.utils.data import DataLoader, Dataset

from .._checks import check_bool, check_int, check_pathlike
from .images import read_image, resolve_image
from .transforms import build_transform
from .validate import check_gt, read_gt

__all__ = ["CategoryMap", "CocoDataModule", "CocoDetectionDataset", "check_coco", "collate", "load_coco",
           "resolve_image"]


def check_coco(data, source: str = "the annotations") -> dict:
    """Check a parsed COCO instances object in place and return it (``annotations`` defaults to
    ``[]``); errors are ``ValueError`` naming ``source`` and the offending entry.

    This is the evaluation's check too (:func:`visattn.data.validate.check_gt`), so a file accepted
    here is accepted by :func:`visattn.evaluation.load_gt` and ``evaluate`` after training, and a
    refused one is refused by both with the same message. Checked: the three lists; int, unique
    image, category and annotation ids (every annotation needs an ``id``); each image's str
    ``file_name`` and ``width``/``height`` both positive ints or both absent; every annotation's
    image and category exist, ``bbox`` is four finite numbers with ``w, h >= 0``, ``area`` is
    present, finite and ``>= 0``, ``iscrowd`` 0 or 1, ``occlusion`` (where present) in [0, 1],
    ``segmentation`` (where present) polygons or a valid RLE of its image's size. Booleans are not
    numbers here.
    """
    check_gt(data, str(source))
    data.setdefault("annotations", [])
    return data


def load_coco(path: str | os.PathLike) -> dict:
    """Load and check a COCO instances file (:func:`check_coco`); errors name the file and the
    offending entry, exactly as :func:`visattn.evaluation.load_gt` names them for the same file."""
    if not isinstance(path, str | os.PathLike):
        raise TypeError(f"load_coco: path must be a str or os.PathLike, got {type(path).__name__}")
    data = read_gt(path)
    data.setdefault("annotations", [])
    return data


class CategoryMap:
    """Dataset category ids (sparse, any order) <-> contiguous labels ``1..K`` (0 is background).

    Labels follow the ascending order of category ids, so they do not depend on the file's order.
    Ids must be unique ints.
    """

    def __init__(self, categories: Sequence[dict]) -> None:
        if isinstance(categories, str | bytes | dict) or not isinstance(categories, Sequence):
            raise TypeError(f"CategoryMap: categories must be a list of {{'id': int, 'name': str}} objects, "
                            f"got {type(categories).__name__}")
        check_coco({"images": [], "categories": list(categories)}, "CategoryMap")
        cats = sorted(categories, key=lambda c: c["id"])
        self.category_ids: list[int] = [c["id"] for c in cats]
        self.names: list[str] = [str(c.get("name", c["id"])) for c in cats]
        self.to_label = {cid: i + 1 for i, cid in enumerate(self.category_ids)}
        self.to_category = {i + 1: cid for i, cid in enumerate(self.category_ids)}

    def __len__(self) -> int:
        return len(self.category_ids)

    def __repr__(self) -> str:
        return f"CategoryMap({len(self)} categories: {dict(zip(self.category_ids, self.names))!r:.200})"


def _decode_mask(segm, h: int, w: int) -> np.ndarray:
    if isinstance(segm, list):  # polygons
        rles = mask_utils.frPyObjects(segm, h, w)
        rle = mask_utils.merge(rles)
    elif isinstance(segm, dict) and isinstance(segm.get("counts"), list):  # uncompressed RLE
        rle = mask_utils.frPyObjects(segm, h, w)
    else:
        rle = segm
    return mask_utils.decode(rle).astype(np.uint8)


def _ann_order(ann: dict) -> tuple:
    """Annotations of one image in id order (content order where ids are absent), so targets do
    not depend on the order of the file."""
    return (ann.get("id", math.inf), ann["category_id"], tuple(ann["bbox"]))


class CocoDetectionDataset(Dataset):
    """One split of a COCO-format dataset, with targets ready for torchvision detectors.

    Crowd annotations are left out of the targets (the evaluation handles them from the JSON);
    images without annotations are kept (empty targets). Boxes are converted to xyxy, clipped to
    the image, and dropped when they have no area. Images are in id order and each image's
    annotations in annotation-id order, whatever the order of the file.

    Every ``file_name`` must stay inside ``images`` (:func:`~visattn.data.resolve_image`) and
    exist: both are checked here, naming the entries. Each image is checked against its JSON
    ``width``/``height`` when it is loaded (:func:`~visattn.data.images.orient_image`: EXIF is
    applied only where that is what makes the sizes agree) and decoded in its real range
    (:func:`~visattn.data.images.decode_image`: images deeper than 8 bits stay float, not clipped).
    """

    def __init__(self, images: str | os.PathLike, annotations: str | os.PathLike | dict, *,
                 transform=None, masks: bool = False, semantic: bool = False,
                 categories: CategoryMap | None = None, source: str | None = None) -> None:
        check_pathlike("images", images)
        check_bool("masks", masks)
        check_bool("semantic", semantic)
        if categories is not None and not isinstance(categories, CategoryMap):
            raise TypeError(f"categories must be a CategoryMap or None, got {type(categories).__name__}")
        if transform is not None and not callable(transform):
            raise TypeError(f"transform must be callable (an albumentations Compose) or None, got "
                            f"{type(transform).__name__}")
        self.root = Path(images)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder not found (or not a folder): {self.root}")
        # how errors name the annotations: the file, also when it was passed already parsed
        if isinstance(annotations, dict):
            self.source = source or "the annotations"
            data = check_coco(annotations, self.source)
        else:
            check_pathlike("annotations", annotations)
            self.source = source or str(annotations)
            data = load_coco(annotations)
        self.categories = categories or CategoryMap(data["categories"])
        unknown = sorted({c["id"] for c in data["categories"]} - set(self.categories.category_ids))
        if unknown:
            raise ValueError(f"{self.source}: category ids {unknown} are not in the training categories "
                             f"{self.categories.category_ids}")
        self.images = sorted(data["images"], key=lambda im: im["id"])
        self.paths = [resolve_image(self.root, im["file_name"], image_id=im["id"], source=self.source)
                      for im in self.images]
        missing = [im["file_name"] for im, p in zip(self.images, self.paths, strict=True) if not p.is_file()]
        if missing:
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            raise FileNotFoundError(f"image file(s) listed in {self.source} not found under {self.root}: "
                                    f"{', '.join(missing[:5])}{more}")
        self.anns: dict[int, list[dict]] = {im["id"]: [] for im in self.images}
        for ann in data["annotations"]:
            if not ann.get("iscrowd", 0):
                self.anns[ann["image_id"]].append(ann)
        for anns in self.anns.values():
            anns.sort(key=_ann_order)
        self.transform = transform
        self.return_masks = masks
        self.semantic = semantic

    def __len__(self) -> int:
        return len(self.images)

    def load_image(self, index: int) -> np.ndarray:
        """Image ``index``, oriented and checked against its JSON size: ``(H, W, 3)`` uint8, or
        float32 in 0..1 for images deeper than 8 bits (see :mod:`visattn.data.images`)."""
        info = self.images[index]
        try:
            return read_image(self.paths[index], width=info.get("width"), height=info.get("height"),
                              image_id=info["id"])
        except ValueError as e:
            raise ValueError(f"{self.source}: {e}") from None

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict]:
        info = self.images[index]
        image = self.load_image(index)
        h, w = image.shape[:2]
        boxes, labels, masks, sem_masks = [], [], [], []
        if self.semantic:  # every instance paints the label map, degenerate boxes included
            for ann in sorted(self.anns[info["id"]], key=lambda a: -a.get("area", 0)):  # stable: id order on ties
                if "segmentation" in ann:
                    sem_masks.append((self.categories.to_label[ann["category_id"]],
                                      _decode_mask(ann["segmentation"], h, w)))
        for ann in self.anns[info["id"]]:
            x, y, bw, bh = ann["bbox"]
            x0, y0, x1, y1 = max(x, 0.0), max(y, 0.0), min(x + bw, w), min(y + bh, h)
            if x1 <= x0 or y1 <= y0:
                continue  # degenerate, or entirely outside the image
            boxes.append([x0, y0, x1, y1])
            labels.append(self.categories.to_label[ann["category_id"]])
            if self.return_masks:
                if "segmentation" not in ann:
                    raise ValueError(f"annotation {ann.get('id')} of {info['file_name']} has no 'segmentation' "
                                     "but masks were asked for")
                masks.append(_decode_mask(ann["segmentation"], h, w))
        n_inst = len(masks)
        masks = masks + [m for _, m in sem_masks]
        if self.transform is not None:
            kw = {"masks": masks} if masks else {}
            out = self.transform(image=image, bboxes=np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
                                 labels=labels, index=list(range(len(boxes))), **kw)
            image, keep = out["image"], [int(i) for i in out["index"]]
            boxes, labels = np.asarray(out["bboxes"], dtype=np.float32).reshape(-1, 4), list(out["labels"])
            sem_out = list(out["masks"][n_inst:]) if masks else []
            if self.return_masks:
                masks = [out["masks"][i] for i in keep]
        else:
            sem_out = masks[n_inst:]
            masks = masks[:n_inst]
        boxes_t = torch.as_tensor(np.asarray(boxes, dtype=np.float32).reshape(-1, 4))
        ok = (boxes_t[:, 2] > boxes_t[:, 0]) & (boxes_t[:, 3] > boxes_t[:, 1])
        if self.return_masks:
            stacked = torch.as_tensor(np.stack([np.asarray(m) for m in masks]) if masks
                                      else np.zeros((0, *image.shape[:2]), dtype=np.uint8), dtype=torch.uint8)
            if self.transform is not None and len(stacked):
                # a crop keeps a box while 30% of it is in view, yet the object's visible pixels
                # may all lie outside the crop: an instance needs at least one mask pixel
                ok &= (stacked.flatten(1) > 0).any(1)
        target = {
            "boxes": boxes_t[ok],
            "labels": torch.as_tensor(labels, dtype=torch.int64).reshape(-1)[ok],
            "image_id": int(info["id"]),
            "orig_size": (h, w),
            "size": tuple(image.shape[:2]),
        }
        if self.return_masks:
            target["masks"] = stacked[ok]
        if self.semantic:  # larger objects first, so smaller ones stay visible on top
            sem = np.zeros(image.shape[:2], dtype=np.int64)
            for (label, _), m in zip(sem_masks, sem_out, strict=True):
                sem[np.asarray(m) > 0] = label
            target["semantic"] = torch.from_numpy(sem)
        tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float()
        if image.dtype == np.uint8:
            tensor.div_(255.0)
        return tensor, target


def collate(batch):
    """``[(image, target), ...] -> (list[image], list[target])`` (torchvision detection style)."""
    images, targets = zip(*batch, strict=True) if batch else ((), ())
    return list(images), list(targets)


class CocoDataModule(L.LightningDataModule):
    """A LightningDataModule over any COCO-format dataset.

    Args:
        train_images / train_annotations: image folder and instances JSON of the training split.
        val_images / val_annotations: the same for validation (and ``test``); default: the training
            split (useful for a smoke run, not for honest numbers).
        batch_size: images per batch.
        num_workers: DataLoader worker processes.
        image_size: resize so the longest side is this many pixels (None keeps the size).
            Arguments are checked here (a ``TypeError``/``ValueError`` naming the argument); the
            files are checked by ``setup``, whose errors name the missing file or entry.
        augment: training preset (``"none"``, ``"flip"``, ``"small_objects"``) or an albumentations
            transform; validation only resizes.
        crop_size: sliced training: each training image (after the resize) is cut to a random
            ``crop_size`` x ``crop_size`` window, boxes clipped and kept while 30% of them stays in
            view (as ``"small_objects"``), masks cropped alike; validation sees whole images. Train
            at tile size on large images, then evaluate with ``DetectionModule(slicing=...)``.
        masks: also return instance masks (for Mask R-CNN).
        semantic: also return ``semantic``, an ``(H, W)`` int64 label map painted from the instance
            masks (0 = background), for segmenters.

    The mapping from category ids to labels is ``self.categories`` (a :class:`CategoryMap`), taken
    from the training file; ``val_annotations`` is the ground truth for evaluation.

    Example:
        >>> dm = CocoDataModule("coco128/images", "coco128/annotations/instances.json",
        ...                     batch_size=4, image_size=320, augment="small_objects")
    """

    def __init__(self, train_images: str, train_annotations: str, val_images: str | None = None,
                 val_annotations: str | None = None, *, batch_size: int = 4, num_workers: int = 0,
                 image_size: int | None = None, augment: str | None = "flip", masks: bool = False,
                 semantic: bool = False, val_batch_size: int | None = None, crop_size: int | None = None) -> None:
        super().__init__()
        for name, value in (("train_images", train_images), ("train_annotations", train_annotations)):
            check_pathlike(name, value)
        for name, value in (("val_images", val_images), ("val_annotations", val_annotations)):
            check_pathlike(name, value, optional=True)
        check_int("batch_size", batch_size, minimum=1)
        check_int("val_batch_size", val_batch_size, minimum=1, optional=True)
        check_int("num_workers", num_workers, minimum=0)
        check_int("image_size", image_size, minimum=1, optional=True)
        check_int("crop_size", crop_size, minimum=8, optional=True)
        check_bool("masks", masks)
        check_bool("semantic", semantic)
        self.crop_size = crop_size
        self.train_images, self.train_annotations = train_images, train_annotations
        self.val_images = val_images or train_images
        self.val_annotations = val_annotations or train_annotations
        self.batch_size, self.num_workers = batch_size, num_workers
        self.val_batch_size = val_batch_size or batch_size
        self.image_size, self.augment, self.masks, self.semantic = image_size, augment, masks, semantic
        build_transform(augment, image_size, crop_size)  # fail early on a bad preset
        self._categories: CategoryMap | None = None
        self._parsed: dict[str, dict] = {}  # each annotation file is read and checked once
        self.train_set: CocoDetectionDataset | None = None
        self.val_set: CocoDetectionDataset | None = None

    def _load(self, path: str) -> dict:
        if path not in self._parsed:
            self._parsed[path] = load_coco(path)
        return self._parsed[path]

    def val_gt(self) -> dict:
        """The validation ground truth, parsed once (what the evaluation scores against)."""
        return self._load(self.val_annotations)

    @property
    def categories(self) -> CategoryMap:
        if self._categories is None:
            self._categories = CategoryMap(self._load(self.train_annotations)["categories"])
        return self._categories

    @property
    def num_classes(self) -> int:
        return len(self.categories)

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit") and self.train_set is None:
            self.train_set = CocoDetectionDataset(
                self.train_images, self._load(self.train_annotations), source=self.train_annotations,
                masks=self.masks, semantic=self.semantic, categories=self.categories,
                transform=build_transform(self.augment, self.image_size, self.crop_size))
        if stage in (None, "fit", "validate", "test", "predict") and self.val_set is None:
            self.val_set = CocoDetectionDataset(
                self.val_images, self.val_gt(), source=self.val_annotations,
                masks=self.masks, semantic=self.semantic, categories=self.categories,
                transform=build_transform("none", self.image_size))

    def _loader(self, dataset, batch_size: int, shuffle: bool) -> DataLoader:
        return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=self.num_workers,
                          collate_fn=collate, persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, self.val_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    def predict_dataloader(self) -> DataLoader:
        return self.val_dataloader()
