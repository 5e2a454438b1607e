"""Block speed benchmark: forward and forward+backward time of every registered block, side by
side with timm's counterpart and with a plain tensor copy (the memory-bandwidth floor).

Timing is best-of-``repeats`` with the candidates interleaved inside each repeat, so a noisy
neighbour slows all of them alike. Forward is inference (``eval()`` under ``no_grad``); forward+
backward is training mode, gradient of the output w.r.t. the input and every parameter.
Run ``python benchmarks/blocks.py`` (or ``visattn bench``) to reproduce the committed table.
"""
from __future__ import annotations

import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from .registry import block_info, create_block, list_blocks
from .timm_compat import TIMM_COUNTERPARTS, load_timm_weights, timm_counterpart

__all__ = ["BlockTiming", "benchmark_blocks", "format_markdown"]


@dataclass
class BlockTiming:
    name: str
    kind: str
    params: int
    fwd_ms: float
    fwd_bwd_ms: float
    timm_params: int | None = None
    timm_fwd_ms: float | None = None
    timm_fwd_bwd_ms: float | None = None
    extra: dict = field(default_factory=dict)


def _best_of(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, float]:
    """Best wall time in ms of each callable, interleaving the callables within each repeat."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    best = {k: float("inf") for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            best[k] = min(best[k], (time.perf_counter() - t0) * 1e3)
    return best


def _fwd(module: nn.Module, x: torch.Tensor) -> Callable[[], object]:
    def run():
        with torch.no_grad():
            return module(x)
    return run


def _fwd_bwd(module: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> Callable[[], object]:
    def run():
        module.zero_grad(set_to_none=True)
        x.grad = None
        module(x).backward(grad)
    return run


def benchmark_blocks(
    names: list[str] | None = None,
    shape: tuple[int, int, int, int] = (16, 256, 56, 56),
    repeats: int = 7,
    backward_repeats: int = 3,
    seed: int = 0,
) -> tuple[dict[str, float], list[BlockTiming]]:
    """Time every block in ``names`` (default: all). Returns the copy floor (``{"fwd_ms": ...}``)
    and one :class:`BlockTiming` per block.

    Raises ``ValueError`` for an unknown block name, a shape that is not four ints >= 1, or
    ``repeats`` / ``backward_repeats`` < 1 (no timing would be taken)."""
    for arg, value in (("repeats", repeats), ("backward_repeats", backward_repeats)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{arg} must be an int >= 1, got {value!r}")
    shape = tuple(shape)
    if len(shape) != 4 or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in shape):
        raise ValueError(f"shape must be four ints >= 1 (N, C, H, W), got {shape!r}")
    names = list(names) if names else list_blocks()
    unknown = [n for n in names if n not in list_blocks()]
    if unknown:
        raise ValueError(f"unknown block(s) {unknown}; valid: {', '.join(list_blocks())}")
    torch.manual_seed(seed)
    x = torch.randn(shape)
    xg = x.clone().requires_grad_()
    grad = torch.randn(shape)
    floor = _best_of({"copy": lambda: x * 1.0}, repeats)
    results = []
    for name in names:
        ours = create_block(name, shape[1])
        ref = None
        if name in TIMM_COUNTERPARTS:
            ref = timm_counterpart(name, shape[1])
            load_timm_weights(ours, ref, name)
        fwd = {"copy": lambda: x * 1.0, "ours": _fwd(ours.eval(), x)}
        if ref is not None:
            fwd["timm"] = _fwd(ref.eval(), x)
        f = _best_of(fwd, repeats)
        ours.train()
        bwd = {"ours": _fwd_bwd(ours, xg, grad)}
        if ref is not None:
            ref.train()
            bwd["timm"] = _fwd_bwd(ref, xg, grad)
        b = _best_of(bwd, backward_repeats)
        results.append(BlockTiming(
            name=name, kind=block_info(name).kind,
            params=sum(p.numel() for p in ours.parameters()),
            fwd_ms=f["ours"], fwd_bwd_ms=b["ours"],
            timm_params=None if ref is None else sum(p.numel() for p in ref.parameters()),
            timm_fwd_ms=f.get("timm"), timm_fwd_bwd_ms=b.get("timm"),
            extra={"copy_ms_same_round": f["copy"]},
        ))
    return {"fwd_ms": floor["copy"]}, results


def _fmt(v: float | None, spec: str = ".1f") -> str:
    return "–" if v is None else format(v, spec)


def format_markdown(floor: dict[str, float], results: list[BlockTiming], shape, command: str) -> str:
    """The committed report: environment, one row per block, and the goal checks of issue #2."""
    lines = [
        "# Block speed on CPU",
        "",
        f"Command: `{command}`",
        "",
        f"Input {tuple(shape)} fp32 ({torch.Size(shape).numel() * 4 / 2**20:.0f} MiB), "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, "
        f"Python {platform.python_version()}.",
        "Forward = `eval()` under `no_grad`; fwd+bwd = training mode, backward of a random output "
        "gradient to the input and all parameters. Best of N, candidates interleaved. "
        "`copy` is `x * 1.0` (read + write of the tensor: the memory-bandwidth floor), timed in the "
        "same round as each block.",
        "",
        "| block | kind | params | fwd ms | fwd / copy | timm fwd ms | fwd vs timm | fwd+bwd ms "
        "| timm fwd+bwd ms | fwd+bwd vs timm |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        copy = r.extra["copy_ms_same_round"]
        rf = None if r.timm_fwd_ms is None else r.fwd_ms / r.timm_fwd_ms
        rb = None if r.timm_fwd_bwd_ms is None else r.fwd_bwd_ms / r.timm_fwd_bwd_ms
        lines.append(
            f"| {r.name} | {r.kind} | {r.params:,} | {r.fwd_ms:.1f} | {r.fwd_ms / copy:.2f}x "
            f"| {_fmt(r.timm_fwd_ms)} | {_fmt(rf, '.2f')}{'x' if rf else ''} | {r.fwd_bwd_ms:.1f} "
            f"| {_fmt(r.timm_fwd_bwd_ms)} | {_fmt(rb, '.2f')}{'x' if rb else ''} |"
        )
    lines += ["", f"Copy floor alone: {floor['fwd_ms']:.1f} ms.", "", "## Goals (issue #2)", ""]
    for r in results:
        if r.timm_fwd_ms is not None:
            ok = r.fwd_ms <= 1.10 * r.timm_fwd_ms and r.fwd_bwd_ms <= 1.10 * r.timm_fwd_bwd_ms
            lines.append(f"- {r.name}: within 10% of timm (fwd {r.fwd_ms / r.timm_fwd_ms:.2f}x, "
                         f"fwd+bwd {r.fwd_bwd_ms / r.timm_fwd_bwd_ms:.2f}x): {'PASS' if ok else 'FAIL'}")
    cbam = next((r for r in results if r.name == "cbam"), None)
    if cbam is not None and cbam.timm_fwd_ms is not None:
        copy = cbam.extra["copy_ms_same_round"]
        lines += [
            f"- cbam fwd <= 2.0x copy: {cbam.fwd_ms / copy:.2f}x: {'PASS' if cbam.fwd_ms <= 2 * copy else 'FAIL'}",
            f"- cbam fwd >= 20% faster than timm: {1 - cbam.fwd_ms / cbam.timm_fwd_ms:.0%} faster: "
            f"{'PASS' if cbam.fwd_ms <= 0.8 * cbam.timm_fwd_ms else 'FAIL'}",
            f"- cbam fwd+bwd no slower than timm: {cbam.fwd_bwd_ms / cbam.timm_fwd_bwd_ms:.2f}x: "
            f"{'PASS' if cbam.fwd_bwd_ms <= cbam.timm_fwd_bwd_ms else 'FAIL'}",
        ]
    return "\n".join(lines) + "\n"


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def peak_memory_mb(fn: Callable[[], object]) -> float:
    """Peak resident memory ``fn()`` adds above the current level, in MiB (Linux only).

    Freed heap is returned to the OS first (``malloc_trim``) and the kernel's high-water mark is
    reset (``/proc/self/clear_refs``), so the reading is this call's own peak, not an earlier one.
    """
    import ctypes

    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _status_kib("VmRSS")
    result = fn()
    peak = _status_kib("VmHWM")
    del result
    return (peak - base) / 1024
