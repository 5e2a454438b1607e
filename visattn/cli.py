"""The ``visattn`` command line: ``blocks``, ``synth``, ``eval``, ``weights``, ``predict``, ``bench``, ``demo``.

A user error (a bad argument, a missing or malformed file, an output path that cannot be written)
prints one line, ``visattn <command>: error: <what is wrong>``, on stderr and exits with status 2,
as argparse does for a bad option; set ``VISATTN_DEBUG=1`` to see the traceback instead. Output
paths are checked before any long work starts, and every file is written atomically.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from ._io import atomic_write_text
from .registry import KINDS, block_info, list_blocks

# Exceptions that mean "the user asked for something that cannot be done" rather than a bug.
USER_ERRORS = (ValueError, TypeError, OSError)


def _int_at_least(minimum: int):
    """argparse type: an int >= ``minimum`` (the message names the value; argparse adds the option)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {value}")
        return value
    return parse


_positive_int, _non_negative_int = _int_at_least(1), _int_at_least(0)


def _probe_writable(folder: Path, what: str) -> None:
    """Raise ``OSError`` naming ``what`` unless a file can be created in ``folder``."""
    try:
        fd, name = tempfile.mkstemp(prefix=".visattn-probe-", dir=folder)
    except OSError as e:
        raise OSError(f"{what}: cannot write in {folder}: {e.strerror or e}") from None
    os.close(fd)
    os.unlink(name)


def check_output_file(path: str, option: str) -> Path:
    """Check up front that ``path`` can be written as a file (its folder exists and is writable,
    and it is not a folder), so a long run does not fail at the end."""
    out = Path(path)
    if out.is_dir():
        raise IsADirectoryError(f"{option} {path!r} is a folder; give a file name")
    parent = out.parent
    if parent.exists() and not parent.is_dir():
        raise NotADirectoryError(f"{option} {path!r}: {str(parent)!r} is a file, not a folder")
    if not parent.is_dir():
        raise FileNotFoundError(f"{option} {path!r}: folder {str(parent)!r} does not exist")
    _probe_writable(parent, f"{option} {path!r}")
    return out


def check_output_dir(path: str, option: str) -> Path:
    """Check up front that ``path`` is (or can be created as) a writable folder; creates it."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{option} {path!r} exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OSError(f"{option} {path!r}: cannot create the folder: {e.strerror or e}") from None
    _probe_writable(out, f"{option} {path!r}")
    return out


def _check_input_file(path: str, option: str) -> None:
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{option} {path!r} does not exist")
    if not p.is_file():
        raise IsADirectoryError(f"{option} {path!r} is not a file")


def _cmd_blocks(args: argparse.Namespace) -> int:
    names = list_blocks(args.kind)
    rows = [(n, block_info(n)) for n in names]
    width = max((len(n) for n in names), default=4)
    print(f"{'block':<{width}}  {'kind':<8} {'year':<5} paper")
    for name, info in rows:
        print(f"{name:<{width}}  {info.kind:<8} {info.year:<5} {info.paper}  <{info.url}>")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from .bench import benchmark_blocks, format_markdown

    if args.out:
        check_output_file(args.out, "--out")
    shape = tuple(args.shape)
    floor, results = benchmark_blocks(args.blocks or None, shape=shape, repeats=args.repeats,
                                      backward_repeats=args.backward_repeats)
    command = args.command_line or " ".join(args.invocation)
    report = format_markdown(floor, results, shape, command)
    print(report)
    if args.out:
        atomic_write_text(args.out, report)
    return 0


def _cmd_synth(args: argparse.Namespace) -> int:
    from .data.synthetic import generate_synthetic, preview

    check_output_dir(str(Path(args.out).parent), "out")
    root = generate_synthetic(args.out, num_images=args.num_images, image_size=args.image_size,
                              seed=args.seed, workers=args.workers, progress=True)
    print(f"wrote {args.num_images} images and {root / 'annotations' / 'instances.json'}")
    if args.preview:
        png = preview(root, root / "preview.png")
        print(f"preview: {png}")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from .evaluation import compare, evaluate, write_report

    _check_input_file(args.gt, "--gt")
    _check_input_file(args.pred, "--pred")
    if args.compare:
        _check_input_file(args.compare, "--compare")
    check_output_dir(args.out, "--out")
    result = evaluate(args.gt, args.pred, iou_type=args.iou_type, backend=args.backend, errors=not args.no_errors)
    comparison = None
    if args.compare:
        comparison = compare(args.gt, args.compare, args.pred, iou_type=args.iou_type, n_boot=args.n_boot,
                             seed=args.seed)
    md = write_report(args.out, result, comparison, title=f"Evaluation of {args.pred}"
                      + (f" against {args.compare}" if args.compare else ""))
    print(md.read_text())
    print(f"report: {md.parent}/report.json, report.md and plots")
    return 0


def _cmd_weights(args: argparse.Namespace) -> int:
    import json

    from . import weights

    if args.action == "list":
        names = weights.list_pretrained(args.pattern)
        if not names:
            print("no published models" + (f" match {args.pattern!r}" if args.pattern else ""))
            return 0
        print(f"{'name':<34} {'params':>10}  {'evaluated on':<20} {'AP':>5} {'APs':>5} {'AP_occ_heavy':>12}  source")
        for name in names:
            e = weights.pretrained_info(name)
            split, m = next(iter(sorted(e["metrics"].items())))
            source = "shipped" if e.get("path") else "mirrors" if e.get("mirrors") else "hf"
            occ = m.get("AP_occ_heavy")
            print(f"{name:<34} {e['num_params']:>10,}  {split:<20} {m.get('AP', float('nan')):>5.1f} "
                  f"{m.get('APs', float('nan')):>5.1f} {'-' if occ is None else f'{occ:.1f}':>12}  {source}")
        return 0
    if args.action == "table":
        print(weights.format_table(), end="")
        return 0
    if args.action == "info":
        print(json.dumps({args.name: weights.pretrained_info(args.name)}, indent=1))
        return 0
    if args.action == "download":
        print(weights.weight_file(args.name))
        return 0
    if args.action == "verify":
        if not args.all and not args.name:
            raise ValueError("verify: give a NAME or --all")
        names = weights.list_pretrained() if args.all else [args.name]
        failed = 0
        for name in names:
            try:
                print(f"{name}: OK ({weights.verify(name)})")
            except (ValueError, OSError) as e:
                failed += 1
                print(f"{name}: FAILED: {e}")
        return 1 if failed else 0
    entry = weights.publish(args.checkpoint, name=args.name, config=args.config, report=args.report,
                            command=args.recipe_command, seed=args.seed, fp16=not args.fp32,
                            fp16_overflow=args.fp16_overflow,
                            metrics_set=args.metrics_set, eval_command=args.eval_command,
                            recipe_config=args.recipe_config, license=args.license, notes=args.notes)
    print(json.dumps({args.name: entry}, indent=1))
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from ._checks import check_real
    from ._io import atomic_write_json
    from .predict import SlicingConfig, load_detector, predict_folder

    check_output_file(args.out, "--out")
    if not Path(args.images).is_dir():
        raise NotADirectoryError(f"--images {args.images!r} does not exist or is not a folder")
    for option, path in (("--ckpt", args.ckpt), ("--config", args.config), ("--gt", args.gt)):
        if path:
            _check_input_file(path, option)
    if args.config and not args.ckpt:
        raise ValueError("--config goes with --ckpt (published --weights carry their own config)")
    if args.ckpt and not args.config:
        raise ValueError("--ckpt needs --config: the run's config.yaml (lightning_logs/version_N), to build the model")
    options = {"--overlap": ("overlap", args.overlap), "--merge": ("merge", args.merge),
               "--match": ("match", args.match), "--threshold": ("threshold", args.threshold),
               "--batch-size": ("batch_size", args.batch_size),
               "--no-full-image": ("full_image", None if args.no_full_image is None else False),
               "--plain-merge": ("occlusion_safe", None if args.plain_merge is None else False)}
    given = {option: field_value for option, field_value in options.items() if field_value[1] is not None}
    check_real("--score-threshold", args.score_threshold, 0.0, 1.0, hi_open=True)
    slicing = None
    if args.slice:
        slicing = SlicingConfig(slice_size=args.slice, score_threshold=args.score_threshold,
                                **dict(given.values()))
    elif given:
        raise ValueError(f"{', '.join(given)} set(s) how tiles are cut and merged: give --slice PX too "
                         "(without it the detector runs on whole images)")
    model = load_detector(weights=args.weights, ckpt=args.ckpt, config=args.config)
    seen: list[int] = []  # image ids, one per image predicted (with or without detections)
    results = predict_folder(model, args.images, slicing=slicing, gt=args.gt, score_threshold=args.score_threshold,
                             on_image=lambda image_id, path, found: seen.append(image_id))
    atomic_write_json(args.out, results)
    kept = f"{len(results)} detection(s) kept"
    if args.score_threshold:
        kept += f" (score > {args.score_threshold:g})"
    print(f"predicted {len(seen)} image(s), {kept}"
          + (f", sliced in {args.slice} px tiles" if args.slice else "") + f"; wrote {args.out}")
    return 0


def _cmd_explain(args: argparse.Namespace) -> int:
    from .explain import explain_image, load_model, read_image_tensor

    _check_input_file(args.image, "--image")
    for path, option in ((args.config, "--config"), (args.ckpt, "--ckpt")):
        if path:
            _check_input_file(path, option)
    if args.ckpt and not args.config:
        raise ValueError("--ckpt goes with --config (--weights names published weights)")
    out = check_output_dir(args.out, "--out")
    image = read_image_tensor(args.image)
    query = None
    if args.query:
        (y, x), (h, w) = args.query, image.shape[-2:]
        if not (0 <= y < h and 0 <= x < w):
            raise ValueError(f"--query {y:g} {x:g} is outside the {w}x{h} image (give row, column in pixels)")
        query = (y / h, x / w)
    model, note = load_model(config=args.config, weights=args.weights, ckpt=args.ckpt)
    print(f"model: {note}")
    orders = {} if args.seeds is None else {"seeds": args.seeds}
    summary = explain_image(model, image, out, top_k=args.top_k, query=query, steps=args.steps,
                            faithful=not args.no_faithfulness, note=note, seed=args.seed, **orders)
    for name, s in summary["faithfulness"].items():
        lo, hi = s["gain_interval"]
        print(f"{name}: deletion {s['deletion_auc']:.3f} insertion {s['insertion_auc']:.3f} "
              f"(random {s['random_deletion_auc']:.3f} / {s['random_insertion_auc']:.3f}); gain interval "
              f"[{lo:+.3f}, {hi:+.3f}], beats {100 * s['beats_random']:.0f}% of random orders: {s['verdict']}")
    print(f"wrote {summary['files']['grid']}, {len(summary['files']['detections'])} detection crops "
          f"and {out / 'faithfulness.json'}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    _cmd_blocks(argparse.Namespace(kind=None))
    print("\nQuick speed check (small tensor; `make bench` runs the full benchmark):\n")
    return _cmd_bench(argparse.Namespace(blocks=None, shape=[4, 64, 56, 56], repeats=3,
                                         backward_repeats=1, out=None, command_line="visattn demo"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="visattn", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("blocks", help="list every registered block with its kind and paper")
    p.add_argument("--kind", choices=KINDS, help="only blocks of this kind")
    p.set_defaults(fn=_cmd_blocks)

    p = sub.add_parser("bench", help="time every block against timm and a plain copy")
    p.add_argument("--blocks", nargs="*", choices=list_blocks(), metavar="BLOCK",
                   help="block names (default: all)")
    p.add_argument("--shape", nargs=4, type=_positive_int, default=[16, 256, 56, 56], metavar=("N", "C", "H", "W"))
    p.add_argument("--repeats", type=_positive_int, default=7, help="forward timings per candidate (best is kept)")
    p.add_argument("--backward-repeats", type=_positive_int, default=3)
    p.add_argument("--out", help="also write the markdown report here")
    p.set_defaults(fn=_cmd_bench, command_line=None)

    p = sub.add_parser("synth", help="generate the synthetic small/occluded-object dataset (COCO format)")
    p.add_argument("out", help="output folder (gets images/ and annotations/instances.json)")
    p.add_argument("--num-images", type=_positive_int, default=500)
    p.add_argument("--image-size", type=_positive_int, default=256)
    p.add_argument("--seed", type=_non_negative_int, default=0)
    p.add_argument("--workers", type=_positive_int, default=1, help="processes (output is identical for any count)")
    p.add_argument("--preview", action="store_true",
                   help="also write preview.png: boxes coloured by occlusion (green/orange/red)")
    p.set_defaults(fn=_cmd_synth)

    p = sub.add_parser("eval", help="COCO metrics + size bins, occlusion buckets, errors; report with plots")
    p.add_argument("--gt", required=True, help="ground-truth COCO instances JSON")
    p.add_argument("--pred", required=True, help="predictions (COCO results JSON)")
    p.add_argument("--compare", metavar="BASELINE",
                   help="baseline predictions: adds a paired bootstrap of (pred - baseline) per metric")
    p.add_argument("--out", required=True, help="folder for report.json, report.md and PNG plots")
    p.add_argument("--iou-type", choices=["bbox", "segm"], default="bbox")
    p.add_argument("--backend", choices=["pycocotools", "faster_coco_eval"], default="pycocotools")
    p.add_argument("--n-boot", type=_positive_int, default=1000, help="bootstrap replicates for --compare")
    p.add_argument("--seed", type=_non_negative_int, default=0)
    p.add_argument("--no-errors", action="store_true", help="skip the TIDE-style error breakdown (7 extra passes)")
    p.set_defaults(fn=_cmd_eval)

    p = sub.add_parser("weights", help="published pretrained models: list, info, download, verify, publish")
    wsub = p.add_subparsers(dest="action", required=True)
    w = wsub.add_parser("list", help="published models with their metrics")
    w.add_argument("pattern", nargs="?", help="shell-style filter, e.g. 'fcos_*'")
    wsub.add_parser("table", help="the README's markdown table of published models")
    w = wsub.add_parser("info", help="the manifest entry of one model")
    w.add_argument("name")
    w = wsub.add_parser("download", help="fetch (or find) a model's file, verified; prints its path")
    w.add_argument("name")
    w = wsub.add_parser("verify", help="check a model's file (or --all) against the manifest's sha256")
    w.add_argument("name", nargs="?")
    w.add_argument("--all", action="store_true")
    w = wsub.add_parser("publish", help="checkpoint -> weights/<name>.safetensors + manifest entry")
    w.add_argument("checkpoint", help="a Lightning .ckpt of your own run")
    w.add_argument("--name", required=True, help="arch_backbone_attn.tag, e.g. fcos_resnet10t_eca.synth256")
    w.add_argument("--config", required=True, help="the run's config.yaml (in its lightning_logs/version_N)")
    w.add_argument("--report", required=True, help="report.json of `train.py validate` on these weights")
    w.add_argument("--recipe-command", required=True, help="the command that trained the model")
    w.add_argument("--seed", type=_non_negative_int, required=True)
    w.add_argument("--metrics-set", default="synthetic-val", help="name of the evaluation set")
    w.add_argument("--eval-command", help="the command that wrote --report (recorded per evaluation set)")
    w.add_argument("--recipe-config", help="the recipe's config file, e.g. configs/quickstart.yaml")
    w.add_argument("--fp32", action="store_true", help="keep float32 (default: fp16, half the size)")
    w.add_argument("--fp16-overflow", choices=("raise", "float32"), default="raise",
                   help="a tensor with values float16 cannot hold: refuse the publish (default) or keep that "
                        "tensor in float32")
    w.add_argument("--license", default="Apache-2.0")
    w.add_argument("--notes", help="free text for the recipe (device, wall time, ...)")
    p.set_defaults(fn=_cmd_weights)

    p = sub.add_parser("predict", help="detect in a folder of images, optionally sliced (SAHI); COCO results JSON")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--weights", metavar="NAME", help="a published model (`visattn weights list`)")
    src.add_argument("--ckpt", metavar="PATH", help="a Lightning checkpoint of your own run (needs --config)")
    p.add_argument("--config", help="with --ckpt: the run's config.yaml")
    p.add_argument("--images", required=True, help="folder of images")
    p.add_argument("--gt", help="COCO instances JSON: predict its images with its image and category ids; its "
                                "number of categories must be the model's num_classes (default: every image in "
                                "the folder, ids 1.. by file name, turned upright by EXIF, category = label)")
    p.add_argument("--out", required=True, help="COCO results JSON to write")
    p.add_argument("--slice", type=_non_negative_int, default=0, metavar="PX",
                   help="tile side in pixels (0: no slicing, the detector as configured)")
    # slicing options: None when not given, so that one given without --slice is an error, not ignored
    p.add_argument("--overlap", type=float, help="with --slice: fraction of a tile shared with its neighbour "
                                                 "(default 0.2)")
    p.add_argument("--merge", choices=["nms", "greedy_nmm", "nmm"], help="with --slice (default nms)")
    p.add_argument("--match", choices=["iou", "ios"], help="with --slice (default iou)")
    p.add_argument("--threshold", type=float, help="with --slice: match threshold of the merge (default 0.5)")
    p.add_argument("--batch-size", type=_positive_int, help="with --slice: tiles per forward pass (default 8)")
    p.add_argument("--score-threshold", type=float, default=0.0,
                   help="drop detections scoring at or below this (sliced or not)")
    p.add_argument("--no-full-image", action="store_true", default=None,
                   help="with --slice: tiles only (no full-image pass for large objects)")
    p.add_argument("--plain-merge", action="store_true", default=None,
                   help="with --slice: SAHI's merge rule instead of the occlusion-safe one (may fuse "
                        "neighbouring occluded objects)")
    p.set_defaults(fn=_cmd_predict)

    p = sub.add_parser("explain", help="attention maps of every block on one image: grid, per-detection "
                       "crops, faithfulness scores")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--config", help="a training config (model.init_args.model); untrained unless --ckpt")
    src.add_argument("--weights", help="a published model (`visattn weights list`)")
    p.add_argument("--ckpt", help="a Lightning checkpoint with the weights for --config")
    p.add_argument("--image", required=True, help="the image to explain")
    p.add_argument("--out", default="explain", help="output folder (grid.png, detections/, faithfulness.json)")
    p.add_argument("--top-k", type=_positive_int, default=5, help="detections to explain")
    p.add_argument("--query", nargs=2, type=float, metavar=("Y", "X"),
                   help="a point (row, column in image pixels): self-attention blocks show what it attends to")
    p.add_argument("--steps", type=_positive_int, default=8, help="deletion / insertion steps")
    p.add_argument("--seeds", type=_positive_int, default=None,
                   help="random patch orders for the faithfulness baseline (default 40; at least 10 for a verdict)")
    p.add_argument("--seed", type=_non_negative_int, default=0, help="RNG seed of the random orders (default 0)")
    p.add_argument("--no-faithfulness", action="store_true", help="skip the deletion / insertion test")
    p.set_defaults(fn=_cmd_explain)

    p = sub.add_parser("demo", help="list the blocks and time them on a small tensor")
    p.set_defaults(fn=_cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None, prog: str = "visattn") -> int:
    """Run the command line; ``prog`` is how the invocation is reported (benchmarks pass their path).

    Returns the exit status: 0 on success, 2 on a user error (one line on stderr), 130 on Ctrl-C.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.invocation = [prog, *argv] if prog == "visattn" else [prog, *argv[1:]]
    try:
        return args.fn(args)
    except USER_ERRORS as e:
        if os.environ.get("VISATTN_DEBUG"):
            raise
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"{prog} {args.cmd}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog} {args.cmd}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
