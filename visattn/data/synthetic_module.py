"""A LightningDataModule over the synthetic benchmark, generated into a cache on first use."""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path

from .._checks import check_int, check_pathlike
from .coco import CategoryMap, CocoDataModule
from .synthetic import CLASSES, SynthConfig, check_image_size, generate_synthetic, image_wh, locked

__all__ = ["SyntheticDataModule", "default_cache_dir"]

# bump when the generator's output changes for the same settings, so old caches are not reused
GENERATOR_VERSION = 1


def default_cache_dir() -> Path:
    """``$VISATTN_CACHE`` or ``$XDG_CACHE_HOME/visattn`` (default ``~/.cache/visattn``)."""
    if os.environ.get("VISATTN_CACHE"):
        return Path(os.environ["VISATTN_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "visattn"


def _expected_info(num_images: int, seed: int, cfg: SynthConfig) -> dict:
    # as it reads back from instances.json (a (width, height) tuple is a JSON list)
    return json.loads(json.dumps({"seed": seed, "num_images": num_images, "config": asdict(cfg)}))


class SyntheticDataModule(CocoDataModule):
    """Train and validation splits of :func:`~visattn.data.generate_synthetic`, cached.

    The splits are written once under ``root`` (default: the cache dir, in a folder named by a
    hash of every generator setting and the generator's version) by ``prepare_data``, which
    Lightning runs on one process. :func:`~visattn.data.generate_synthetic` stages each split and
    swaps it in whole, so an interrupted run never leaves a half-written cache that a later run
    would trust; concurrent runs on one cache take turns (a POSIX lock on ``root``) and the second
    finds the split made. A split already in ``root`` is used only when its recorded settings
    (``info`` of its ``instances.json``) are the ones asked for; otherwise it is an error naming
    the folder, never a silent reuse of a different set.

    Args:
        num_train / num_val: images per split (different seeds: ``seed`` and ``seed + 1``).
        image_size: side of the generated images (>= 32), or ``(width, height)`` for non-square
            large scenes (e.g. ``[1536, 1024]``); its longer side is also the loader's resize
            (so generated images are never resized).
        root: where the splits go (default: cache). Other arguments as :class:`CocoDataModule`.
        gen_workers: generator processes.
        crop_size: train on random ``crop_size`` x ``crop_size`` crops of the training images
            (sliced training, see :class:`CocoDataModule`); validation sees whole images.
        synth: further :class:`~visattn.data.SynthConfig` settings for both splits (e.g.
            ``{"min_size": 4, "max_size_frac": 0.1, "min_objects": 40, "max_objects": 80}`` for
            large scenes of tiny objects); part of the cache key.

    Example (large scenes, trained on 256 px crops, evaluated sliced by
    ``DetectionModule(slicing=...)``):
        >>> dm = SyntheticDataModule(200, 20, image_size=(1536, 1024), crop_size=256,
        ...                          synth={"min_size": 4, "max_size_frac": 0.1, "max_objects": 60})
    """

    def __init__(self, num_train: int = 1000, num_val: int = 200, image_size: int | tuple[int, int] = 256,
                 seed: int = 0, root: str | None = None, *, batch_size: int = 8, num_workers: int = 0,
                 augment: str | None = "flip", masks: bool = False, semantic: bool = False,
                 val_batch_size: int | None = None, gen_workers: int = 1, crop_size: int | None = None,
                 synth: dict | None = None) -> None:
        check_int("num_train", num_train, minimum=1)
        check_int("num_val", num_val, minimum=1)
        image_size = check_image_size("image_size", image_size)
        check_int("seed", seed, minimum=0)
        check_int("gen_workers", gen_workers, minimum=1)
        check_pathlike("root", root, optional=True)
        if synth is not None and not isinstance(synth, dict):
            raise TypeError(f"synth must be a dict of SynthConfig settings or None, got {type(synth).__name__}")
        synth = dict(synth or {})
        unknown = sorted(set(synth) - set(SynthConfig.__dataclass_fields__) | ({"image_size"} & set(synth)))
        if unknown:
            raise ValueError(f"synth: unknown or misplaced setting(s) {unknown} (image_size is its own argument); "
                             f"valid: {sorted(set(SynthConfig.__dataclass_fields__) - {'image_size'})}")
        self.gen_config = SynthConfig(image_size=image_size, **synth)
        self.splits = {"train": (num_train, seed), "val": (num_val, seed + 1)}
        settings = {split: _expected_info(n, s, self.gen_config) for split, (n, s) in self.splits.items()}
        key = hashlib.sha1(json.dumps([GENERATOR_VERSION, settings], sort_keys=True).encode()).hexdigest()[:10]
        self.root = Path(root) if root else default_cache_dir() / f"synthetic-{key}"
        self.gen_image_size, self.gen_workers = image_size, gen_workers
        super().__init__(str(self.root / "train" / "images"), str(self.root / "train" / "annotations" / "instances.json"),
                         str(self.root / "val" / "images"), str(self.root / "val" / "annotations" / "instances.json"),
                         batch_size=batch_size, num_workers=num_workers, image_size=max(image_wh(image_size)),
                         augment=augment, masks=masks, semantic=semantic, val_batch_size=val_batch_size,
                         crop_size=crop_size)

    @property
    def categories(self) -> CategoryMap:
        # known without the files, so num_classes can be linked before prepare_data runs
        return CategoryMap([{"id": i + 1, "name": n} for i, n in enumerate(CLASSES)])

    def _is_made(self, split: str) -> bool:
        """Whether ``split`` is in ``root`` with the settings asked for (error if with others)."""
        ann = self.root / split / "annotations" / "instances.json"
        if not ann.is_file():
            return False
        n, seed = self.splits[split]
        want = _expected_info(n, seed, self.gen_config)
        try:
            info = json.loads(ann.read_text()).get("info", {})
        except (OSError, ValueError, AttributeError) as e:
            raise ValueError(f"{ann}: cannot read the cached synthetic split ({e}); delete {self.root / split}") from None
        got = {k: info.get(k) for k in want}
        if got != want:
            diff = {k: (got[k], want[k]) for k in want if got[k] != want[k]}
            raise ValueError(f"{self.root / split} holds a synthetic split made with other settings "
                             f"(found, wanted: {diff!r:.300}); delete it or choose another root")
        return True

    def prepare_data(self) -> None:
        with locked(self.root):
            for split, (n, seed) in self.splits.items():
                if not self._is_made(split):
                    settings = {k: v for k, v in asdict(self.gen_config).items() if k != "image_size"}
                    generate_synthetic(self.root / split, num_images=n, image_size=self.gen_image_size,
                                       seed=seed, workers=self.gen_workers, progress=True, **settings)
