"""Evaluation for small and occluded objects: exact COCO metrics, finer size bins, occlusion
buckets, occluded recall, per-class AP, a TIDE-style error breakdown, paired bootstrap comparison
and reports.

    >>> from visattn.evaluation import evaluate, compare
    >>> r = evaluate("instances_val.json", "predictions.json")
    >>> r["AP"], r["size"]["tiny"]["AP"], r["occlusion"]["heavy"]["AP"]
"""
from .compare import MatchTables, compare, compare_runs
from .core import (
                   BACKENDS,
                   OCCLUSION_BUCKETS,
                   SIZE_BINS,
                   STANDARD_KEYS,
                   evaluate,
                   load_gt,
                   load_predictions,
                   occluded_recall,
)
from .errors import ERROR_TYPES, error_breakdown
from .report import format_markdown, write_report

__all__ = [
                   "BACKENDS",
                   "ERROR_TYPES",
                   "OCCLUSION_BUCKETS",
                   "SIZE_BINS",
                   "STANDARD_KEYS",
                   "MatchTables",
                   "compare",
                   "compare_runs",
                   "error_breakdown",
                   "evaluate",
                   "format_markdown",
                   "load_gt",
                   "load_predictions",
                   "occluded_recall",
                   "write_report",
]
