"""A LightningDataModule over the synthetic benchmark, generated into a cache on first use."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from .coco import CategoryMap, CocoDataModule
from .synthetic import CLASSES, generate_synthetic

__all__ = ["SyntheticDataModule", "default_cache_dir"]


def default_cache_dir() -> Path:
    """``$VISATTN_CACHE`` or ``$XDG_CACHE_HOME/visattn`` (default ``~/.cache/visattn``)."""
    if os.environ.get("VISATTN_CACHE"):
        return Path(os.environ["VISATTN_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "visattn"


class SyntheticDataModule(CocoDataModule):
    """Train and validation splits of :func:`~visattn.data.generate_synthetic`, cached.

    The splits are written once under ``root`` (default: the cache dir, in a folder named by the
    generator settings) by ``prepare_data``, which Lightning runs on one process; a split is
    generated into a temporary folder and renamed into place when complete, so an interrupted run
    never leaves a half-written cache that a later run would trust.

    Args:
        num_train / num_val: images per split (different seeds: ``seed`` and ``seed + 1``).
        image_size: side of the generated images; also the loader's resize.
        root: where the splits go (default: cache). Other arguments as :class:`CocoDataModule`.
    """

    def __init__(self, num_train: int = 1000, num_val: int = 200, image_size: int = 256, seed: int = 0,
                 root: str | None = None, *, batch_size: int = 8, num_workers: int = 0,
                 augment: str | None = "flip", masks: bool = False, semantic: bool = False,
                 val_batch_size: int | None = None, gen_workers: int = 1) -> None:
        key = hashlib.sha1(json.dumps([num_train, num_val, image_size, seed]).encode()).hexdigest()[:10]
        self.root = Path(root) if root else default_cache_dir() / f"synthetic-{key}"
        self.splits = {"train": (num_train, seed), "val": (num_val, seed + 1)}
        self.gen_image_size, self.gen_workers = image_size, gen_workers
        super().__init__(str(self.root / "train" / "images"), str(self.root / "train" / "annotations" / "instances.json"),
                         str(self.root / "val" / "images"), str(self.root / "val" / "annotations" / "instances.json"),
                         batch_size=batch_size, num_workers=num_workers, image_size=image_size, augment=augment,
                         masks=masks, semantic=semantic, val_batch_size=val_batch_size)

    @property
    def categories(self) -> CategoryMap:
        # known without the files, so num_classes can be linked before prepare_data runs
        return CategoryMap([{"id": i + 1, "name": n} for i, n in enumerate(CLASSES)])

    def prepare_data(self) -> None:
        for split, (n, seed) in self.splits.items():
            final = self.root / split
            if (final / "annotations" / "instances.json").is_file():
                continue
            tmp = self.root / f".{split}.partial-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            generate_synthetic(tmp, num_images=n, image_size=self.gen_image_size, seed=seed,
                               workers=self.gen_workers, progress=True)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
