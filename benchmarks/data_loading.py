"""Throughput of the data path: the synthetic generator, and CocoDataModule with and without
augmentation, on coco128 and on generated data.

    python benchmarks/data_loading.py --out benchmarks/results/data-loading-cpu.md
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from visattn._io import atomic_write_text
from visattn.data import CocoDataModule, generate_synthetic

COCO128 = Path(__file__).resolve().parents[2] / "shared" / "data" / "coco128"


def _images_per_s(dm: CocoDataModule, epochs: int) -> float:
    dm.setup("fit")
    loader = dm.train_dataloader()
    n, best = 0, 0.0
    for _ in range(epochs):
        n, start = 0, time.perf_counter()
        for images, _ in loader:
            n += len(images)
        best = max(best, n / (time.perf_counter() - start))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out")
    parser.add_argument("--synth-images", type=int, default=300)
    parser.add_argument("--epochs", type=int, default=3, help="passes per setting; the best is kept")
    args = parser.parse_args()
    torch.set_num_threads(1)
    lines = ["# Data loading throughput (CPU)", "",
             f"`python benchmarks/data_loading.py {' '.join(sys.argv[1:])}`", "",
             f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; torch "
             f"{torch.__version__}. Images/s, best of {args.epochs} passes.", ""]
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        root = generate_synthetic(Path(tmp) / "s", num_images=args.synth_images, image_size=256, seed=0)
        gen = args.synth_images / (time.perf_counter() - start)
        lines += ["## Synthetic generator", "",
                  f"{args.synth_images} images at 256x256, one process: **{gen:.0f} images/s** "
                  f"(goal >= 50: {'PASS' if gen >= 50 else 'FAIL'})", "",
                  "## CocoDataModule (training loader, batch 8)", "",
                  "| dataset | image_size | augment | workers | images/s |", "|---|---|---|---|---|"]
        sets = [("synthetic 256px", root / "images", root / "annotations" / "instances.json", 256)]
        if COCO128.is_dir():
            sets.append(("coco128 (JPEG, ~640px)", COCO128 / "images", COCO128 / "annotations" / "instances.json", 512))
        for name, images, ann, size in sets:
            for workers in (0, 2):
                for augment in ("none", "flip", "small_objects"):
                    dm = CocoDataModule(str(images), str(ann), batch_size=8, num_workers=workers,
                                        image_size=size, augment=augment)
                    rate = _images_per_s(dm, args.epochs)
                    lines.append(f"| {name} | {size} | {augment} | {workers} | {rate:.0f} |")
                    print(lines[-1], flush=True)
    report = "\n".join(lines) + "\n"
    print(report)
    if args.out:
        atomic_write_text(args.out, report)


if __name__ == "__main__":
    main()
