"""Evaluation speed: visattn.evaluation.evaluate with both backends against plain pycocotools,
on a synthetic ground truth of many images with 100 predictions each. Checks the 12 numbers are
identical and reports time ratios (all three measured in this one run).

    python benchmarks/eval_speed.py --images 5000 --out benchmarks/results/eval-speed-cpu.md
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import io
import os
import platform
import sys
import time

import numpy as np

from visattn._io import atomic_write_text
from visattn.evaluation import STANDARD_KEYS, evaluate


def make_case(n_images: int, per_image: int, seed: int = 0) -> tuple[dict, list[dict]]:
    """Ground truth with 1-15 objects per image (sizes skewed small) and ``per_image`` predictions:
    jittered true boxes, some relabelled, and the rest random clutter with low scores."""
    rng = np.random.default_rng(seed)
    size = 512
    images, anns, preds = [], [], []
    for i in range(1, n_images + 1):
        images.append({"id": i, "file_name": f"{i:06d}.jpg", "width": size, "height": size})
        first = len(anns)
        for _ in range(int(rng.integers(1, 16))):
            w, h = np.exp(rng.uniform(np.log(4), np.log(200), 2))
            x, y = rng.uniform(0, size - w), rng.uniform(0, size - h)
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": int(rng.integers(1, 9)),
                         "bbox": [x, y, w, h], "area": float(w * h), "iscrowd": 0})
        own = anns[first:]
        for a in own:
            x, y, w, h = a["bbox"]
            preds.append({"image_id": i, "score": float(rng.random()),
                          "category_id": a["category_id"] if rng.random() > 0.1 else int(rng.integers(1, 9)),
                          "bbox": [x + rng.normal(0, w / 8), y + rng.normal(0, h / 8), w, h]})
        for _ in range(per_image - len(own)):
            w, h = rng.uniform(4, 150, 2)
            preds.append({"image_id": i, "category_id": int(rng.integers(1, 9)), "score": float(rng.random() * 0.6),
                          "bbox": [rng.uniform(0, size - w), rng.uniform(0, size - h), w, h]})
    cats = [{"id": c, "name": f"class{c}"} for c in range(1, 9)]
    return {"images": images, "annotations": anns, "categories": cats}, preds


def plain_pycocotools(gt: dict, preds: list[dict]) -> np.ndarray:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    with contextlib.redirect_stdout(io.StringIO()):
        g = COCO()
        g.dataset = gt
        g.createIndex()
        ev = COCOeval(g, g.loadRes(copy.deepcopy(preds)), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev.stats[:12]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--per-image", type=int, default=100)
    parser.add_argument("--out")
    args = parser.parse_args()
    gt, preds = make_case(args.images, args.per_image)
    runs = {}
    start = time.perf_counter()
    runs["plain pycocotools"] = (plain_pycocotools(gt, preds), time.perf_counter() - start)
    for backend in ("pycocotools", "faster_coco_eval"):
        start = time.perf_counter()
        r = evaluate(gt, preds, backend=backend, size_bins=False, occlusion=False, per_class=False, errors=False)
        runs[f"evaluate(backend={backend!r})"] = (np.array([r[k] for k in STANDARD_KEYS]), time.perf_counter() - start)
    start = time.perf_counter()
    full = evaluate(gt, preds, backend="faster_coco_eval", errors=False)
    t_full = time.perf_counter() - start
    ref, t_ref = runs["plain pycocotools"]
    lines = ["# Evaluation speed (CPU)", "", f"`python benchmarks/eval_speed.py {' '.join(sys.argv[1:])}`", "",
             f"{args.images} images, {len(gt['annotations'])} objects, {len(preds)} predictions "
             f"({args.per_image} per image), bbox. Machine: {platform.machine()}, {os.cpu_count()} cores. "
             "One run each, same process.", "",
             "| evaluator | seconds | time / plain pycocotools | max abs diff of the 12 stats vs plain |",
             "|---|---|---|---|"]
    for name, (stats, t) in runs.items():
        lines.append(f"| {name} | {t:.1f} | {t / t_ref:.2f} | {np.abs(stats - ref).max():.1e} |")
    fast = runs["evaluate(backend='faster_coco_eval')"][1]
    lines += ["", f"faster_coco_eval backend is {t_ref / fast:.1f}x faster than plain pycocotools "
                  f"({'PASS' if fast < t_ref else 'FAIL'}: measured faster); identical numbers: "
                  f"{'PASS' if all(np.abs(s - ref).max() < 1e-6 for s, _ in runs.values()) else 'FAIL'}.", "",
              f"With size bins, occlusion buckets and per-class AP (no error breakdown), faster_coco_eval: "
              f"{t_full:.1f} s. AP={100 * full['AP']:.1f}.", ""]
    report = "\n".join(lines)
    print(report)
    if args.out:
        atomic_write_text(args.out, report)


if __name__ == "__main__":
    main()
