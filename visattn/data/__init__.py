"""Data: a synthetic small/occluded-object benchmark and a COCO-format LightningDataModule.

    >>> from visattn.data import generate_synthetic, CocoDataModule
"""
from .coco import CategoryMap, CocoDataModule, CocoDetectionDataset, collate, load_coco
from .synthetic import CLASSES, SynthConfig, generate_synthetic, preview, render_image
from .synthetic_module import SyntheticDataModule, default_cache_dir
from .transforms import PRESETS, build_transform

__all__ = [
    "CLASSES",
    "PRESETS",
    "CategoryMap",
    "CocoDataModule",
    "CocoDetectionDataset",
    "SynthConfig",
    "SyntheticDataModule",
    "build_transform",
    "collate",
    "default_cache_dir",
    "generate_synthetic",
    "load_coco",
    "preview",
    "render_image",
]
