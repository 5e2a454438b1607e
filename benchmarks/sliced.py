"""Sliced inference on large synthetic scenes: full image vs sliced vs sliced + full, the
occlusion-safe merge vs SAHI's plain rule, and SAHI itself wrapping the same detector.

AP (overall, by AI-TOD size bin, by occlusion bucket) and images per second, all in one run, on a
large-scene synthetic validation set (``visattn.data.generate_synthetic`` with ``image_size=(W, H)``,
objects drawn at the pixel sizes of the 256 px training set, so the shipped
``fcos_resnet10t_eca.synth256``, trained at 256 px, sees them at its training scale in 256 px tiles).

SAHI is not a dependency of visattn: install it apart and point ``--sahi-path`` at it, e.g.

    .venv/bin/python -m pip install --target /tmp/sahi_site sahi shapely fire requests
    rm -rf /tmp/sahi_site/numpy*      # keep the environment's numpy
    nice .venv/bin/python benchmarks/sliced.py --sahi-path /tmp/sahi_site \\
        --out benchmarks/results/sliced-cpu.md

Speed: every configuration runs over the whole set once (after a warm-up image); images/s is
reported by wall clock and by this process's CPU time (on a shared machine the CPU time is the
fairer comparison). Merge variants that need no new forward pass (NMM / NMS, safe / plain) reuse
the recorded detector outputs of the timed sliced + full run and report AP only.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from visattn._io import atomic_write_json, atomic_write_text
from visattn.data import generate_synthetic, load_coco, read_image
from visattn.data.coco import CategoryMap
from visattn.evaluation import evaluate
from visattn.lit.detection import to_coco_results
from visattn.predict import sliced_predict
from visattn.weights import load_pretrained

SCENE = {"min_size": 4.0, "max_size_frac": 0.18, "min_objects": 20, "max_objects": 45, "max_occluders": 6}


class Recorder(torch.nn.Module):
    """Wraps a detector and remembers its output for every input it has seen (keyed by the input's
    bytes and the detector's resize setting), so that AP of configurations that run the same forward
    passes (merge variants, tiles only, the full image, SAHI's tiles, which are bit-identical to
    ours) costs no second forward. An input not seen before runs the detector. Speed is never
    measured through it."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model, self.transform = model, model.transform
        self.memo: dict = {}
        self.hits = self.misses = 0
        self.eval()

    def _key(self, im: torch.Tensor) -> tuple:
        digest = hashlib.sha1(im.detach().contiguous().numpy().tobytes()).hexdigest()
        return tuple(im.shape), digest, tuple(self.transform.min_size), self.transform.max_size

    def forward(self, images):
        keys = [self._key(im) for im in images]
        todo = [i for i, k in enumerate(keys) if k not in self.memo]
        self.hits += len(keys) - len(todo)
        self.misses += len(todo)
        if todo:
            outs = self.model([images[i] for i in todo])
            self.memo.update({keys[i]: out for i, out in zip(todo, outs, strict=True)})
        return [self.memo[k] for k in keys]


def run_visattn(model, images, slicing: dict | None, native_full: bool = False) -> tuple[list, float, float]:
    """Predict every image; returns (per-image outputs, wall s, CPU s)."""
    outs = []
    t_wall, t_cpu = time.perf_counter(), time.process_time()
    for image in images:
        with torch.no_grad():
            if slicing is not None:
                outs.append(sliced_predict(model, image, **slicing))
            elif native_full:  # the whole image at its own resolution: one tile the size of the image
                outs.append(sliced_predict(model, image, slice_size=tuple(image.shape[2:0:-1]), full_image=False))
            else:
                outs.append(model([image])[0])
    return outs, time.perf_counter() - t_wall, time.process_time() - t_cpu


def run_sahi(model, arrays: list[np.ndarray], slice_size: int, overlap: float, score_threshold: float,
             batch_size: int) -> tuple[list, float, float]:
    from sahi.models.torchvision import TorchVisionDetectionModel
    from sahi.predict import get_sliced_prediction

    inner = getattr(model, "model", model)
    names = {str(i): str(i) for i in range(1, 1 + inner.head.classification_head.num_classes)}
    detection_model = TorchVisionDetectionModel(model=model, confidence_threshold=score_threshold, device="cpu",
                                                category_mapping=names, load_at_init=True)
    outs = []
    t_wall, t_cpu = time.perf_counter(), time.process_time()
    for array in arrays:
        with torch.no_grad():
            res = get_sliced_prediction(array, detection_model, slice_height=slice_size, slice_width=slice_size,
                                        overlap_height_ratio=overlap, overlap_width_ratio=overlap,
                                        perform_standard_pred=True, postprocess_type="GREEDYNMM",
                                        postprocess_match_metric="IOS", postprocess_match_threshold=0.5,
                                        postprocess_class_agnostic=False, verbose=0, batch_size=batch_size,
                                        force_postprocess_type=True)
        preds = res.object_prediction_list
        outs.append({"boxes": torch.tensor([p.bbox.to_xyxy() for p in preds], dtype=torch.float32).reshape(-1, 4),
                     "scores": torch.tensor([float(p.score.value) for p in preds], dtype=torch.float32),
                     "labels": torch.tensor([int(p.category.id) for p in preds], dtype=torch.int64)})
    return outs, time.perf_counter() - t_wall, time.process_time() - t_cpu


def score(gt: dict, infos: list[dict], outs: list[dict], to_category: dict) -> dict:
    preds = []
    for info, out in zip(infos, outs, strict=True):
        hw = (info["height"], info["width"])
        keep = torch.argsort(out["scores"], descending=True)[:100]  # COCO scores the best 100 per image
        out = {k: v[keep] for k, v in out.items()}
        preds += to_coco_results(out, {"image_id": info["id"], "orig_size": hw, "size": hw}, to_category, False)
    r = evaluate(gt, preds, iou_type="bbox", backend="faster_coco_eval")
    row = {"AP": r["AP"], "AP50": r["AP50"], "AR100": r["AR100"], "num_predictions": len(preds)}
    row.update({f"AP_{k}": v["AP"] for k, v in r["size"].items()})
    row.update({f"AP_occ_{k}": v["AP"] for k, v in r["occlusion"].items()})
    row.update({f"AR_occ_{k}": v["AR100"] for k, v in r["occlusion"].items()})
    row["occluded_recall"] = r.get("occluded_recall", {}).get("recall", float("nan"))
    row["counts"] = {**{k: v["count"] for k, v in r["size"].items()},
                     **{f"occ_{k}": v["count"] for k, v in r["occlusion"].items()}}
    return row


def fmt(v) -> str:
    """Percent with one decimal; ``n/a`` where there is nothing to score (COCO's -1, NaN)."""
    return "n/a" if v is None or not np.isfinite(v) or v < 0 else f"{100 * v:.1f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=12, help="validation images")
    ap.add_argument("--size", type=int, nargs=2, default=[1024, 768], metavar=("W", "H"))
    ap.add_argument("--seed", type=int, default=101)
    ap.add_argument("--weights", default="fcos_resnet10t_eca.synth256")
    ap.add_argument("--slice", type=int, default=256)
    ap.add_argument("--overlap", type=float, default=0.2)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--score-threshold", type=float, default=0.05)
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--data", default=None, help="where the validation set goes (default: a cache folder)")
    ap.add_argument("--sahi-path", default=None, help="a folder holding the sahi package (pip --target)")
    ap.add_argument("--speed-images", type=int, default=2,
                    help="images timed for the speed of the other configurations (the main run times all)")
    ap.add_argument("--native-full", action="store_true", help="also the whole image at native resolution")
    ap.add_argument("--out", default="benchmarks/results/sliced-cpu.md")
    ap.add_argument("--render", metavar="JSON", help="only rewrite --out's markdown from a results JSON of this script")
    args = ap.parse_args(argv)
    if args.render:
        saved = json.loads(Path(args.render).read_text())
        atomic_write_text(args.out, markdown(saved["meta"], saved["rows"], saved["goals"]))
        print(Path(args.out).read_text())
        return 0
    torch.set_num_threads(args.threads)
    command = "python benchmarks/sliced.py " + " ".join(sys.argv[1:] if argv is None else argv)

    w, h = args.size
    root = Path(args.data or Path(os.environ.get("VISATTN_CACHE", Path.home() / ".cache" / "visattn"))
                / f"bench-sliced-{w}x{h}-{args.images}-{args.seed}")
    if not (root / "annotations" / "instances.json").is_file():
        generate_synthetic(root, num_images=args.images, image_size=(w, h), seed=args.seed, **SCENE)
    gt = load_coco(root / "annotations" / "instances.json")
    infos = sorted(gt["images"], key=lambda im: im["id"])
    arrays = [read_image(root / "images" / im["file_name"]) for im in infos]
    images = [torch.from_numpy(a).permute(2, 0, 1).float().div(255.0) for a in arrays]
    to_category = CategoryMap(gt["categories"]).to_category

    model = load_pretrained(args.weights)
    model.score_thresh = args.score_threshold
    base = {"slice_size": args.slice, "overlap": args.overlap, "batch_size": args.batch_size,
            "score_threshold": args.score_threshold, "merge": "greedy_nmm", "match": "ios", "threshold": 0.5}
    with torch.no_grad():  # warm-up
        model([images[0][:, :args.slice, :args.slice]])
    rec = Recorder(model)
    speed_images, speed_arrays = images[:args.speed_images], arrays[:args.speed_images]

    rows: dict[str, dict] = {}

    def record(name, outs, timing=None, note=""):
        """AP over every image from ``outs``; speed from ``timing`` = (images, wall s, CPU s)."""
        rows[name] = {**score(gt, infos, outs, to_category), "note": note,
                      "img_per_s_wall": None if timing is None else timing[0] / timing[1],
                      "img_per_s_cpu": None if timing is None else timing[0] / timing[2]}
        speed = "" if timing is None else f", {rows[name]['img_per_s_wall']:.3f} img/s"
        print(f"{name}: AP {fmt(rows[name]['AP'])}{speed}", flush=True)

    def timed(detector, slicing, **kw):
        outs, wall, cpu = run_visattn(detector, speed_images, slicing, **kw)
        return len(outs), wall, cpu

    # the main run, timed on every image: every tile and full-image forward is remembered
    outs, wall, cpu = run_visattn(rec, images, base)
    record("sliced + full, occlusion-safe greedy NMM", outs, (len(outs), wall, cpu))
    record("full image (resized to the model's 256)", run_visattn(rec, images, None)[0],
           timed(model, None), "the detector as configured")
    record("sliced (tiles only), occlusion-safe greedy NMM", run_visattn(rec, images, {**base, "full_image": False})[0],
           timed(model, {**base, "full_image": False}))
    record("sliced + full, occlusion-safe greedy NMM, batch 1", outs, timed(model, {**base, "batch_size": 1}),
           "one tile per forward (the batching effect); same detections as batch 8")
    record("sliced + full, plain greedy NMM (SAHI's rule)",
           run_visattn(rec, images, {**base, "occlusion_safe": False})[0])
    for merge, match in (("nmm", "ios"), ("nms", "iou")):
        for safe in (True, False):
            name = f"sliced + full, {'occlusion-safe' if safe else 'plain'} {merge.upper()} ({match.upper()})"
            record(name, run_visattn(rec, images, {**base, "merge": merge, "match": match, "occlusion_safe": safe})[0])
    if args.native_full:
        outs, wall, cpu = run_visattn(model, images, None, native_full=True)
        record("full image at native resolution", outs, (len(outs), wall, cpu), "one forward of the whole image")
    sahi_version = None
    if args.sahi_path:
        sys.path.append(args.sahi_path)  # after the environment's own packages
        import sahi

        sahi_version = sahi.__version__
        misses = rec.misses
        sahi_outs = run_sahi(rec, arrays, args.slice, args.overlap, args.score_threshold, args.batch_size)[0]
        sahi_new_forwards = rec.misses - misses
        n, wall, cpu = run_sahi(model, speed_arrays, args.slice, args.overlap, args.score_threshold,
                                args.batch_size)
        record(f"SAHI {sahi_version} sliced + full, GREEDYNMM / IOS 0.5, batch {args.batch_size}", sahi_outs,
               (len(n), wall, cpu), "sahi.predict.get_sliced_prediction wrapping the same torchvision detector; "
               f"its tiles were bit-identical to ours ({sahi_new_forwards} forwards not seen before)")

    # goals
    full = rows["full image (resized to the model's 256)"]
    sliced = rows["sliced + full, occlusion-safe greedy NMM"]
    ours_plain = rows["sliced + full, plain greedy NMM (SAHI's rule)"]
    goals = {"sliced AP above full-image on very_tiny and tiny":
             bool(sliced["AP_very_tiny"] > full["AP_very_tiny"] and sliced["AP_tiny"] > full["AP_tiny"])}
    sahi_row = next((r for k, r in rows.items() if k.startswith("SAHI")), None)
    if sahi_row is not None:
        goals["AP within 0.5 of SAHI's with the same merge rule"] = bool(abs(ours_plain["AP"] - sahi_row["AP"]) <= 0.005)
        # speed: the same forward passes; the merge rule costs little next to them
        goals[">= 2x SAHI's images/s at batch 8 (CPU time)"] = bool(
            sliced["img_per_s_cpu"] >= 2 * sahi_row["img_per_s_cpu"])
        goals[">= 2x SAHI's images/s at batch 8 (wall clock)"] = bool(
            sliced["img_per_s_wall"] >= 2 * sahi_row["img_per_s_wall"])
    safe, plain = sliced, rows["sliced + full, plain greedy NMM (SAHI's rule)"]
    goals["occlusion-safe greedy NMM keeps more heavily occluded objects (AR heavy) than plain, at equal or "
          "better AP (>= plain - 0.5)"] = bool(
        safe["AR_occ_heavy"] > plain["AR_occ_heavy"] and safe["AP"] >= plain["AP"] - 0.005)

    meta = {"command": command, "python": platform.python_version(), "torch": torch.__version__,
            "sahi": sahi_version, "threads": args.threads, "cpu": platform.processor() or platform.machine(),
            "load_average": os.getloadavg(), "images": args.images, "size": [w, h], "seed": args.seed,
            "scene": SCENE, "weights": args.weights, "slice": args.slice, "overlap": args.overlap,
            "batch_size": args.batch_size, "score_threshold": args.score_threshold, "counts": full["counts"],
            "speed_images": args.speed_images}
    out = Path(args.out)
    atomic_write_json(out.with_suffix(".json"), {"meta": meta, "rows": rows, "goals": goals}, indent=1)
    atomic_write_text(out, markdown(meta, rows, goals))
    print(out.read_text())
    return 0


def markdown(meta: dict, rows: dict, goals: dict) -> str:
    c = meta["counts"]
    lines = [
        "# Sliced inference on large synthetic scenes (CPU)",
        "",
        f"Command: `{meta['command']}`",
        "",
        (f"{meta['images']} images of {meta['size'][0]} x {meta['size'][1]} (seed {meta['seed']}, generator settings "
        f"`{json.dumps(meta['scene'])}`), {sum(c[k] for k in ('very_tiny', 'tiny', 'small', 'medium', 'large'))} "
        f"objects: very_tiny {c['very_tiny']}, tiny {c['tiny']}, small {c['small']}, medium {c['medium']}, "
        f"large {c['large']}; occlusion none {c['occ_none']}, partial {c['occ_partial']}, heavy {c['occ_heavy']}. "
        f"Detector: the shipped `{meta['weights']}` (FCOS, trained on 256 px images), score threshold "
        f"{meta['score_threshold']}; tiles {meta['slice']} px, overlap {meta['overlap']}, batch {meta['batch_size']}. "
        f"torch {meta['torch']}, SAHI {meta['sahi'] or 'not run'}, {meta['threads']} threads, "
        f"Python {meta['python']}; load average during the run {', '.join(f'{v:.1f}' for v in meta['load_average'])} "
        "(a shared 2-core machine: CPU-time images/s is the fairer speed figure)."),
        "",
        ("AP in percent (COCO AP@[.5:.95], best 100 detections per image); size bins by visible area "
        "(very_tiny < 8², tiny 8²-16², small 16²-32², medium 32²-96², large); occlusion buckets by hidden "
        "fraction (none <= 0.1, partial 0.1-0.5, heavy > 0.5), AR = AR100 of the bucket."),
        "",
        ("| configuration | AP | AP50 | very_tiny | tiny | small | medium | large | occ none | occ partial | occ heavy "
        "| AR occ heavy | occluded recall | img/s (wall) | img/s (CPU) |"),
        "|---|" + "---:|" * 14,
    ]
    for name, r in rows.items():
        speed = ["-" if r["img_per_s_wall"] is None else f"{r['img_per_s_wall']:.3f}",
                 "-" if r["img_per_s_cpu"] is None else f"{r['img_per_s_cpu']:.3f}"]
        cells = [fmt(r[k]) for k in ("AP", "AP50", "AP_very_tiny", "AP_tiny", "AP_small", "AP_medium", "AP_large",
                                     "AP_occ_none", "AP_occ_partial", "AP_occ_heavy", "AR_occ_heavy",
                                     "occluded_recall")]
        lines.append(f"| {name} | " + " | ".join(cells + speed) + " |")
    lines += ["", (f"AP of every row is over all {meta['images']} images. Speed: the occlusion-safe sliced + full "
                   f"run is timed over all images; the other timed rows (SAHI included) on the first "
                   f"{meta['speed_images']} images with the real detector. Rows without a speed run the same forward "
                   "passes as the main run (only the merge differs), so their AP is computed from its recorded "
                   "detector outputs; SAHI's tiles are bit-identical to ours, so its AP is too (its merge is its own)."),
              "", "Notes per row:", ""]
    lines += [f"- {name}: {r['note']}" for name, r in rows.items() if r.get("note")]
    lines += ["", "## Goals", ""]
    lines += [f"- {'PASS' if ok else 'FAIL'}: {goal}" for goal, ok in goals.items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
