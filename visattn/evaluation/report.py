"""Reports: ``report.json``, ``report.md`` (tables) and PNG plots from :func:`evaluate` /
:func:`compare` results. Every file is written to a temporary name and renamed into place
(:mod:`visattn._io`), so a full disk or a crash never leaves a truncated report."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np

from .._io import atomic_path, atomic_write_text
from .core import OCCLUSION_BUCKETS, SIZE_BINS, STANDARD_KEYS

__all__ = ["format_markdown", "write_report"]


def _pct(v: float | None) -> str:
    """A metric in %; -1 (COCOeval's mark for no ground truth) and ``None`` are n/a."""
    return "n/a" if v is None or v < 0 else f"{100 * v:.1f}"


def _delta(v: float | None) -> str:
    """A difference in points (it may be negative); ``None`` (no ground truth) is n/a."""
    return "n/a" if v is None else f"{100 * v:.1f}"


def _signed(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:+.1f}"


def format_markdown(result: dict, comparison: dict | None = None, title: str = "Evaluation") -> str:
    """Markdown tables of an :func:`evaluate` result (and a :func:`compare` result). Values in %.

    A group without ground truth (a metric of -1, a difference of ``None``) reads ``n/a``, never
    0.0; an error type's AP50 difference is shown with its sign (a loss is a number, not n/a)."""
    lines = [f"# {title}", "",
             (f"{result.get('num_images', '?')} images, {result.get('num_predictions', '?')} predictions, "
             f"iou_type={result.get('iou_type')}, backend={result.get('backend')}. All values in %."), "",
             "## COCO (pycocotools definitions)", "",
             "| " + " | ".join(STANDARD_KEYS) + " |", "|" + "---|" * len(STANDARD_KEYS),
             "| " + " | ".join(_pct(result[k]) for k in STANDARD_KEYS) + " |", ""]
    if "size" in result:
        lines += ["## By object size (AI-TOD bins of ground-truth area)", "",
                  f"Area source: {result.get('size_area_source', 'ground-truth area')}.", "",
                  "| bin | area (px) | objects | AP | AR100 |", "|---|---|---|---|---|"]
        for name, (lo, hi) in SIZE_BINS.items():
            r = result["size"][name]
            rng = f"{lo:.0f}-{hi:.0f}" if hi < 1e9 else f">= {lo:.0f}"
            lines.append(f"| {name} | {rng} | {r['count']} | {_pct(r['AP'])} | {_pct(r['AR100'])} |")
        lines.append("")
    if "occlusion" in result:
        lines += ["## By occlusion (hidden fraction; other buckets' objects ignored, as COCO does for size)", "",
                  "| bucket | occlusion | objects | AP | AR100 |", "|---|---|---|---|---|"]
        for name, (lo, hi) in OCCLUSION_BUCKETS.items():
            r = result["occlusion"][name]
            rng = f"<= {hi}" if name == "none" else f"({lo}, {hi}]"
            lines.append(f"| {name} | {rng} | {r['count']} | {_pct(r['AP'])} | {_pct(r['AR100'])} |")
        occ = result.get("occluded_recall")
        if occ:
            lines += ["", (f"Occluded recall (Occluded COCO style: objects > {occ['min_occlusion']} hidden, "
                          f"score >= {occ['score_thr']}, IoU >= {occ['iou_thr']}, no false-positive "
                          f"penalty): **{_pct(occ['recall'])}** of {occ['count']} objects.")]
        lines.append("")
    if "errors" in result:
        err = result["errors"]
        bins = list(SIZE_BINS)
        lines += ["## What costs AP (TIDE-style: AP50 points an oracle fixing only that error would gain)", "",
                  f"AP50 = {_pct(err['AP50'])}; {err['true_positives']} true positives.", "",
                  "| error | count | dAP50 | " + " | ".join(bins) + " |", "|---|---|---|" + "---|" * len(bins)]
        for kind, r in err["types"].items():
            lines.append(f"| {kind} | {r['count']} | {_delta(r['delta_AP50'])} | "
                         + " | ".join(_delta(r['size'][b]) for b in bins) + " |")
        lines.append("")
    if "per_class" in result:
        lines += ["## AP per class", "", "| class | AP |", "|---|---|"]
        lines += [f"| {name} | {_pct(ap)} |" for name, ap in result["per_class"].items()]
        lines.append("")
    if comparison:
        lines += [(f"## Paired comparison (B - A, {int(100 * comparison['confidence'])}% bootstrap interval "
                  f"over {comparison['num_images']} images, {comparison['n_boot']} replicates)"), "",
                  "| group | metric | A | B | B - A | interval | significant |", "|---|---|---|---|---|---|---|"]
        for group, metrics in comparison.items():
            if not isinstance(metrics, dict):
                continue
            for m, r in metrics.items():
                interval = "n/a" if r["low"] is None else f"[{_signed(r['low'])}, {_signed(r['high'])}]"
                lines.append(f"| {group} | {m} | {_pct(r['a'])} | {_pct(r['b'])} | {_signed(r['diff'])} | "
                             f"{interval} | {'yes' if r['significant'] else 'no'} |")
        lines.append("")
    return "\n".join(lines)


def _plot_curves(result: dict, prefix: str, names, path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = {n: result.get("curves", {}).get(f"{prefix}/{n}") for n in names}
    if not any(c is not None for c in curves.values()):
        return  # no group with ground truth: nothing to draw
    rec = np.linspace(0, 1, 101)
    fig, ax = plt.subplots(figsize=(5, 4))
    for name, curve in curves.items():
        if curve is not None:
            ax.plot(rec, curve, label=name)
    ax.set(xlabel="recall", ylabel="precision (IoU 0.5, mean over classes)", xlim=(0, 1), ylim=(0, 1.02), title=title)
    ax.legend()
    fig.tight_layout()
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=110)
    finally:
        plt.close(fig)


def _plot_comparison(comparison: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [g for g, v in comparison.items()
              if isinstance(v, dict) and "AP" in v and v["AP"]["low"] is not None and v["AP"]["diff"] is not None]
    if not groups:
        return  # no group has ground truth to compare on
    diff = np.array([100 * comparison[g]["AP"]["diff"] for g in groups])
    low = np.array([100 * comparison[g]["AP"]["low"] for g in groups])
    high = np.array([100 * comparison[g]["AP"]["high"] for g in groups])
    fig, ax = plt.subplots(figsize=(7, 0.4 * len(groups) + 1.2))
    y = np.arange(len(groups))
    colours = ["tab:green" if lo > 0 else "tab:red" if hi < 0 else "tab:gray" for lo, hi in zip(low, high)]
    for yi, d, lo, hi, c in zip(y, diff, low, high, colours, strict=True):
        ax.errorbar([d], [yi], xerr=[[d - lo], [hi - d]], fmt="o", color=c, capsize=3)
    ax.axvline(0, color="black", lw=0.8)
    ax.set_yticks(y, groups)
    ax.invert_yaxis()
    ax.set(xlabel="AP difference B - A (points), with bootstrap interval", title="AP by bucket")
    fig.tight_layout()
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=110)
    finally:
        plt.close(fig)


def _json_safe(obj, where: str = "result"):
    """``obj`` with numpy scalars and arrays turned into Python numbers and lists and non-finite
    floats (NaN, inf) into ``None`` (JSON ``null``: NaN is not valid JSON); anything else that JSON
    cannot hold is a ``TypeError`` naming where it is."""
    if isinstance(obj, dict):
        return {str(k): _json_safe(v, f"{where}[{k!r}]") for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, np.ndarray | np.generic):
        return _json_safe(obj.tolist(), where)
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if obj is None or isinstance(obj, str | int):
        return obj
    raise TypeError(f"{where}: a {type(obj).__name__} cannot be written to report.json")


def _check_report_args(out_dir, result, comparison, title) -> Path:
    if not isinstance(out_dir, str | os.PathLike):
        raise TypeError(f"out_dir must be a folder path, got {type(out_dir).__name__}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"out_dir {str(out)!r} exists and is not a folder")
    if not isinstance(result, dict):
        raise TypeError(f"result must be the dict evaluate() returns, got {type(result).__name__}")
    missing = [k for k in STANDARD_KEYS if k not in result]
    if missing:
        raise ValueError(f"result lacks {', '.join(missing)}: pass the dict evaluate() returns")
    if comparison is not None and (not isinstance(comparison, dict) or "confidence" not in comparison):
        raise TypeError(f"comparison must be None or the dict compare() returns, got {type(comparison).__name__}")
    if not isinstance(title, str):
        raise TypeError(f"title must be a str, got {type(title).__name__}")
    return out


def write_report(out_dir, result: dict, comparison: dict | None = None, title: str = "Evaluation") -> Path:
    """Write ``report.json``, ``report.md`` and PNG plots into ``out_dir``; return ``report.md``'s path.

    Plots: ``pr_size.png`` and ``pr_occlusion.png`` (precision-recall per size bin / occlusion
    bucket) and, with a comparison, ``ap_by_bucket.png`` (AP difference with its interval).

    Every file is written atomically (a temporary name, then a rename): an error, a kill or a full
    disk leaves each file either as it was or complete. Both texts are built before anything is
    written, and ``report.json`` is written last. ``report.json`` is strict JSON: a non-finite
    number (NaN, inf) is written as ``null``. Bad arguments raise ``TypeError``/``ValueError``
    naming them.
    """
    out = _check_report_args(out_dir, result, comparison, title)
    safe = {"result": _json_safe(result, "result"), "comparison": _json_safe(comparison, "comparison")}
    report = json.dumps(safe, indent=1, allow_nan=False)
    md = format_markdown(result, comparison, title)
    out.mkdir(parents=True, exist_ok=True)
    if "size" in result:
        _plot_curves(result, "size", SIZE_BINS, out / "pr_size.png", "Precision-recall by object size")
    if "occlusion" in result:
        _plot_curves(result, "occlusion", OCCLUSION_BUCKETS, out / "pr_occlusion.png", "Precision-recall by occlusion")
    if comparison:
        _plot_comparison(comparison, out / "ap_by_bucket.png")
    atomic_write_text(out / "report.md", md)
    atomic_write_text(out / "report.json", report)
    return out / "report.md"
