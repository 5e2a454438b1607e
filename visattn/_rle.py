"""Checking COCO run-length encodings before pycocotools reads them.

pycocotools trusts an RLE's ``counts``: a truncated or corrupted compressed string, or runs that do
not add up to ``height * width``, make it read past the data, loop for a long time or return a
mask of the wrong area, all without an error. :func:`rle_problem` decodes the runs the way
pycocotools does (``rleFrString`` in its ``maskApi.c``: 5 bits per character from ``'0'``, a
continuation bit, a sign bit in the last character, and each run after the second stored as the
difference from the run two before) and says what is wrong, if anything.
"""
from __future__ import annotations

from typing import Any

__all__ = ["rle_problem"]


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _decode_runs(counts: str | bytes) -> list[int] | str:
    """The runs of a compressed ``counts`` string, or a sentence saying why it is not one."""
    data = counts.encode("ascii", "replace") if isinstance(counts, str) else bytes(counts)
    runs: list[int] = []
    p = 0
    while p < len(data):
        x, k, more = 0, 0, True
        while more:
            if p >= len(data):
                return "it ends in the middle of a run (truncated)"
            c = data[p] - 48
            if not 0 <= c < 64:
                return f"character {chr(data[p])!r} at position {p} is not an RLE character"
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)
        if len(runs) > 2:
            x += runs[-2]
        if x < 0:
            return f"run {len(runs)} is negative ({x})"
        runs.append(x)
    return runs


def rle_problem(segm: Any) -> str | None:
    """``None`` if ``segm`` is a well-formed COCO RLE ``{"size": [h, w], "counts": ...}`` whose runs
    cover exactly ``h * w`` pixels (``counts`` a compressed string/bytes or a list of ints >= 0);
    otherwise a short sentence naming what is wrong."""
    if not isinstance(segm, dict):
        return f"an RLE must be a dict with 'size' and 'counts', got {type(segm).__name__}"
    size, counts = segm.get("size"), segm.get("counts")
    if not (isinstance(size, list | tuple) and len(size) == 2 and all(_is_int(v) and v >= 0 for v in size)):
        return f"'size' must be [height, width] with ints >= 0, got {size!r:.60}"
    if isinstance(counts, list):
        if not all(_is_int(v) and v >= 0 for v in counts):
            return "uncompressed 'counts' must be ints >= 0"
        runs = counts
    elif isinstance(counts, str | bytes):
        runs = _decode_runs(counts)
        if isinstance(runs, str):
            return f"compressed 'counts' is corrupt: {runs}"
    else:
        return f"'counts' must be a compressed string or a list of ints, got {type(counts).__name__}"
    total, pixels = sum(runs), size[0] * size[1]
    if total != pixels:
        return f"its runs cover {total} pixels, not height * width = {pixels}"
    return None
