"""Data: a synthetic small/occluded-object benchmark and a COCO-format LightningDataModule.

    >>> from visattn.data import generate_synthetic, CocoDataModule

Names are imported on first use, so ``visattn.data.synthetic`` and ``visattn.data.images`` load
without Lightning.
"""
from __future__ import annotations

import importlib

_WHERE = {
    "CategoryMap": "coco",
    "CocoDataModule": "coco",
    "CocoDetectionDataset": "coco",
    "check_coco": "coco",
    "collate": "coco",
    "load_coco": "coco",
    "decode_image": "images",
    "read_image": "images",
    "resolve_image": "images",
    "CLASSES": "synthetic",
    "SynthConfig": "synthetic",
    "generate_synthetic": "synthetic",
    "preview": "synthetic",
    "render_image": "synthetic",
    "SyntheticDataModule": "synthetic_module",
    "default_cache_dir": "synthetic_module",
    "PRESETS": "transforms",
    "build_transform": "transforms",
}

__all__ = [
    "CLASSES",
    "PRESETS",
    "CategoryMap",
    "CocoDataModule",
    "CocoDetectionDataset",
    "SynthConfig",
    "SyntheticDataModule",
    "build_transform",
    "check_coco",
    "collate",
    "decode_image",
    "default_cache_dir",
    "generate_synthetic",
    "load_coco",
    "preview",
    "read_image",
    "render_image",
    "resolve_image",
]


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))
