"""What attention costs on a GPU (issue 16): one command, one results file.

    python benchmarks/gpu.py                 # CUDA machine: writes benchmarks/results/gpu-<device>.md
    python benchmarks/gpu.py --device cpu --quick --out /tmp/gpu-dry-run.md   # dry run of the script

Sections (each written to the results file as soon as it is done; one that the time budget
``--budget-s`` leaves no room for is listed as not run):

- ``train``: ``python train.py fit --config configs/gpu.yaml`` on a short schedule, then
  ``validate`` on its last checkpoint: images/s, GPU memory, AP and the log tail;
- ``blocks``: the memory-bound gates (se, eca, cbam, scse, gc) at bf16, (32, 256, 56, 56) and
  (32, 1024, 14, 14), NCHW and channels-last: forward and forward+backward ms of the fused path,
  of the plain path and of timm's counterpart (scSE has none), against a measured tensor copy;
- ``detector``: training images/s of a ResNet-50 FPN detector (FCOS, bf16-mixed, channels-last)
  without attention and with se / eca / cbam in every bottleneck, eager (fused and plain gates)
  and with the backbone compiled;
- ``timm``: the same for timm's resnet50 vs seresnet50 / ecaresnet50d classification training,
  the reference gap;
- ``self``: self-attention blocks at 64x64 and 128x128 tokens: time and peak memory.

Timing: CUDA events around ``inner`` back-to-back calls (enough for about a millisecond), after
warm-up (which includes any compiling), median of ``repeats``. A row whose host-side enqueue time
is about its GPU time is marked launch-bound: the CPU, not the GPU, set its pace.
Without CUDA the script stops with an error unless ``--device cpu --quick`` is given (tiny shapes,
to check the script end to end; its file says DRY RUN and holds no GPU numbers).
"""
from __future__ import annotations

import argparse
import datetime
import functools
import json
import math
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import lightning as L
import torch

ROOT = Path(__file__).resolve().parents[1]
GATES = ("se", "eca", "cbam", "scse", "gc")
# forward floor of each gate, in tensor copies (reads + writes of the map; see visattn/layers/_fused.py)
FLOOR = {"se": 1.5, "eca": 1.5, "cbam": 2.0, "scse": 2.0, "gc": 2.0}


# --------------------------------------------------------------------------------------------------
# Timing


class Clock:
    """Median milliseconds per call on ``device`` (CUDA events there, a wall clock on CPU)."""

    def __init__(self, device: torch.device, warmup: int, repeats: int) -> None:
        self.device, self.warmup, self.repeats = device, warmup, repeats
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def time(self, fn: Callable[[], object], target_ms: float = 1.0, max_inner: int = 50) -> dict:
        """``{"ms": per call, "host_ms": per call enqueue time, "launch_bound": bool}``."""
        for _ in range(self.warmup):
            fn()
        self.sync()
        t0 = time.perf_counter()
        fn()
        self.sync()
        one = (time.perf_counter() - t0) * 1e3
        inner = max(1, min(max_inner, math.ceil(target_ms / max(one, 1e-3))))
        gpu, host = [], []
        for _ in range(self.repeats):
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            host.append((time.perf_counter() - t0) * 1e3 / inner)
            if self.cuda:
                end.record()
                end.synchronize()
                gpu.append(start.elapsed_time(end) / inner)
            else:
                gpu.append(host[-1])
        ms, host_ms = statistics.median(gpu), statistics.median(host)
        return {"ms": ms, "host_ms": host_ms, "launch_bound": self.cuda and host_ms >= 0.9 * ms}


def _peak_memory_mib(device: torch.device, fn: Callable[[], object]) -> float | None:
    """Peak memory ``fn()`` allocates on the GPU above what was allocated before (None on CPU)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def _fwd(module: torch.nn.Module, x: torch.Tensor) -> Callable[[], torch.Tensor]:
    """Inference: ``module(x)`` under ``no_grad``."""
    def run():
        with torch.no_grad():
            return module(x)
    return run


def _fwd_bwd(module: torch.nn.Module, x: torch.Tensor, grad: torch.Tensor | None = None) -> Callable[[], None]:
    """Training: forward, then backward of ``grad`` (default: of the sum) to ``x`` and every parameter."""
    def run():
        module.zero_grad(set_to_none=True)
        x.grad = None
        y = module(x)
        (y.backward(grad) if grad is not None else y.sum().backward())
    return run


def _copy(out: torch.Tensor, x: torch.Tensor) -> Callable[[], torch.Tensor]:
    return lambda: out.copy_(x)


def _train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, dev: torch.device,
                loss_fn: Callable[[], torch.Tensor]) -> Callable[[], None]:
    """One bf16-autocast optimiser step of ``loss_fn()``."""
    def step():
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            loss = loss_fn()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def _fmt(v, spec: str = ".3f") -> str:
    return "–" if v is None else format(v, spec)


def _ms(t: dict | None, spec: str = ".3f") -> str:
    if t is None:
        return "–"
    return format(t["ms"], spec) + (" †" if t.get("launch_bound") else "")


def _ips(v: float) -> str:
    return f"{v:.1f}" if v >= 10 else f"{v:.3g}"


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


# --------------------------------------------------------------------------------------------------
# Sections


def bench_blocks(dev: torch.device, clock: Clock, quick: bool, deadline: float) -> list[str]:
    """The five gates: fused / plain / timm, forward and forward+backward, bf16."""
    import torch._dynamo

    import visattn
    from visattn.layers import _fused, set_fused
    from visattn.timm_compat import TIMM_COUNTERPARTS, load_timm_weights, timm_counterpart

    # every (shape, memory format, train/eval) is its own graph: room for all of one block's
    cfg = torch._dynamo.config
    key = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
    setattr(cfg, key, max(getattr(cfg, key), 32))
    shapes = [(2, 32, 12, 12), (2, 64, 6, 6)] if quick else [(32, 256, 56, 56), (32, 1024, 14, 14)]
    dtype = torch.bfloat16
    fused_usable = dev.type == "cuda" and _fused._compile_usable("cuda")
    rows, goals = [], []
    lines = ["## Gate blocks: fused vs plain vs timm (bf16)", "",
             "Forward: `eval()` under `no_grad`. Forward+backward: training mode, backward of a random "
             "output gradient to the input and every parameter. `copy` is `out.copy_(x)` (one read + one "
             "write of the map); GB/s counts one read and one write of the map per call. `path` is the "
             "path the block took by default (fused on CUDA). Plain = the same block with "
             "`visattn.layers.set_fused(False)`. timm = `timm.layers` counterpart with the same weights "
             "(scSE: timm has no counterpart). † = launch-bound (host enqueue time >= 90% of GPU time). "
             f"Floor = the fewest passes the math allows, in copies: {FLOOR}.", ""]
    header = ("| block | shape | layout | path | copy ms | fwd ms | fwd / copy | GB/s | plain fwd | timm fwd "
              "| fwd vs timm | fwd+bwd ms | plain fwd+bwd | timm fwd+bwd | fwd+bwd vs timm | max abs diff vs plain |")
    lines += [header, "|" + "---|" * (header.count("|") - 1)]
    for shape in shapes:
        for layout in ("nchw", "channels_last"):
            if time.monotonic() > deadline:
                lines.append(f"| (not run: time budget) | {shape} | {layout} |" + " |" * 13)
                continue
            fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
            torch.manual_seed(0)
            x = torch.randn(shape, device=dev, dtype=dtype).contiguous(memory_format=fmt)
            out = torch.empty_like(x)
            copy = clock.time(_copy(out, x))
            nbytes = 2 * x.numel() * x.element_size()
            for name in GATES:
                if time.monotonic() > deadline:
                    lines.append(f"| {name} | {tuple(shape)} | {layout} | not run: time budget |" + " |" * 12)
                    continue
                torch._dynamo.reset()
                ours = visattn.create_block(name, shape[1]).to(dev, dtype)
                ref = None
                if name in TIMM_COUNTERPARTS:
                    ref = timm_counterpart(name, shape[1]).to(dev, dtype)
                    load_timm_weights(ours, ref, name)
                xg = x.detach().clone().requires_grad_()
                g = torch.randn_like(x)
                res = {}
                for label, fused in (("fused", True), ("plain", False)):
                    set_fused(fused)
                    ours.eval()
                    res[label + "_fwd"] = clock.time(_fwd(ours, x))
                    ours.train()
                    res[label + "_bwd"] = clock.time(_fwd_bwd(ours, xg, g))
                set_fused(None)
                with torch.no_grad():
                    ours.eval()
                    y_fused = ours(x)
                    set_fused(False)
                    y_plain = ours(x)
                    set_fused(None)
                diff = (y_fused.float() - y_plain.float()).abs().max().item()
                if ref is not None:
                    ref.eval()
                    res["timm_fwd"] = clock.time(_fwd(ref, x))
                    ref.train()
                    res["timm_bwd"] = clock.time(_fwd_bwd(ref, xg, g))
                path = "fused" if fused_usable and name not in _fused._failed else "plain"
                f, b = res["fused_fwd"], res["fused_bwd"]
                tf, tb = res.get("timm_fwd"), res.get("timm_bwd")
                vs_f = None if tf is None else tf["ms"] / f["ms"]
                vs_b = None if tb is None else tb["ms"] / b["ms"]
                lines.append(
                    f"| {name} | {tuple(shape)} | {layout} | {path} | {_ms(copy)} | {_ms(f)} | "
                    f"{f['ms'] / copy['ms']:.2f}x | {nbytes / f['ms'] / 1e6:.0f} | {_ms(res['plain_fwd'])} | "
                    f"{_ms(tf)} | {_fmt(vs_f, '.2f')}{'x faster' if vs_f else ''} | {_ms(b)} | "
                    f"{_ms(res['plain_bwd'])} | {_ms(tb)} | {_fmt(vs_b, '.2f')}{'x faster' if vs_b else ''} "
                    f"| {diff:.2e} |")
                rows.append((name, shape, layout, path, copy, res))
                print(f"[gpu.py]   {name} {tuple(shape)} {layout}: {path} fwd {f['ms']:.3f} ms, fwd+bwd "
                      f"{b['ms']:.3f} ms, copy {copy['ms']:.3f} ms", flush=True)
                if dev.type != "cuda":
                    continue  # a CPU dry run judges nothing
                if name == "cbam":
                    goals.append(f"- cbam {tuple(shape)} {layout}: fwd {f['ms'] / copy['ms']:.2f}x copy "
                                 f"(goal <= 2x: {'PASS' if f['ms'] <= 2 * copy['ms'] else 'FAIL'}), "
                                 f"{vs_f:.2f}x faster than timm (goal >= 2x: "
                                 f"{'PASS' if vs_f >= 2 else 'FAIL'})")
                if tf is not None:
                    ok = vs_f >= 1 and vs_b >= 1
                    goals.append(f"- {name} {tuple(shape)} {layout}: no slower than timm (fwd {vs_f:.2f}x, "
                                 f"fwd+bwd {vs_b:.2f}x faster): {'PASS' if ok else 'FAIL'}")
                del ours, ref
    lines += ["", "Copy GB/s (read + write) per shape and layout: " + ", ".join(
        sorted({f"{tuple(s)} {lay} {2 * math.prod(s) * 2 / c['ms'] / 1e6:.0f}" for _, s, lay, _, c, _ in rows}))]
    lines += ["", "### Goals (issue 16)", ""] + (goals or [
        "- not judged: CPU dry run" if dev.type != "cuda" else "- no timings (time budget)"])
    return lines


def _detector_batch(dev: torch.device, batch: int, size: int, num_classes: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = [torch.rand(3, size, size, generator=g).to(dev) for _ in range(batch)]
    targets = []
    for _ in range(batch):
        xy = torch.rand(12, 2, generator=g) * (size * 0.8)
        wh = 8 + torch.rand(12, 2, generator=g) * (size * 0.15)
        targets.append({"boxes": torch.cat([xy, xy + wh], 1).to(dev),
                        "labels": torch.randint(1, num_classes + 1, (12,), generator=g).to(dev)})
    return images, targets


def _detector_loss(model, images, targets) -> torch.Tensor:
    return sum(model(images, targets).values())


def _classification_loss(model, x, y) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(model(x), y)


def _train_throughput(step: Callable[[], object], clock: Clock, batch: int, dev: torch.device) -> dict:
    t = clock.time(step, target_ms=0.0, max_inner=1)
    mem = _peak_memory_mib(dev, step)
    return {"ips": batch / t["ms"] * 1e3, "ms": t["ms"], "mem": mem}


def bench_detector(dev: torch.device, clock: Clock, quick: bool, deadline: float, backend: str,
                   runs: list[tuple[str, str]], title: str) -> list[str]:
    """Training images/s of the FCOS ResNet-50 FPN detector for each ``(attention, mode)`` in
    ``runs``; mode ``"eager"`` (fused gates on CUDA), ``"eager, plain gates"`` or ``"compiled"``."""
    from visattn.layers import set_fused
    from visattn.lit import DetectionModule
    from visattn.models import build_detector

    backbone, size, batch = ("resnet18", 128, 2) if quick else ("resnet50", 512, 16)
    lines = [f"## {title}", "",
             f"FCOS, {backbone} + FPN (256 channels), {size}x{size} images, batch {batch}, bf16 autocast, "
             "channels-last backbone (as `DetectionModule(channels_last=True)`), AdamW; the attention block "
             "plugged into every residual block (`build_detector(attention=...)`). images/s = batch / median step time (steps after warm-up). "
             f"Compiled = `model.backbone.compile(backend={backend!r})` (the head and losses stay eager); "
             "inside a compiled backbone the gates take the plain path, which the compiler fuses. "
             "Gap = throughput lost against no attention in the same mode.", "",
             "| attention | mode | images/s | step ms | peak memory MiB | gap vs none |",
             "|---|---|---:|---:|---:|---:|"]
    base: dict[str, float] = {}
    for attention, mode in runs:
        if time.monotonic() > deadline:
            lines.append(f"| {attention} | {mode} | not run: time budget | | | |")
            continue
        torch._dynamo.reset()
        try:
            torch.manual_seed(0)
            model = build_detector("fcos", backbone=backbone, num_classes=8,
                                   attention=None if attention == "none" else attention,
                                   min_size=size, max_size=size)
            model = DetectionModule(model, channels_last=True).model.to(dev).train()
            if mode == "compiled":
                model.backbone.compile(backend=backend)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
            images, targets = _detector_batch(dev, batch, size, 8)
            step = _train_step(model, opt, dev, functools.partial(_detector_loss, model, images, targets))
            set_fused(False if mode == "eager, plain gates" else None)
            r = _train_throughput(step, clock, batch, dev)
        except Exception as e:  # noqa: BLE001 - the results file says what broke
            lines.append(f"| {attention} | {mode} | {'OOM' if _is_oom(e) else 'error'}: "
                         f"{type(e).__name__}: {str(e)[:150]} | | | |")
            continue
        finally:
            set_fused(None)
        key = "compiled" if mode == "compiled" else "eager"
        if attention == "none":
            base[key] = r["ips"]
        gap = None if attention == "none" or key not in base else 1 - r["ips"] / base[key]
        print(f"[gpu.py]   detector {attention} {mode}: {_ips(r['ips'])} images/s", flush=True)
        lines.append(f"| {attention} | {mode} | {_ips(r['ips'])} | {r['ms']:.1f} | {_fmt(r['mem'], '.0f')} | "
                     f"{'–' if gap is None else f'{gap:.1%}'} |")
        del model, opt
    return lines


def bench_timm(dev: torch.device, clock: Clock, quick: bool, deadline: float, backend: str,
               modes: tuple[str, ...], title: str) -> list[str]:
    """Training images/s of timm's resnet50, seresnet50 and ecaresnet50d in each mode
    (``"eager"``, ``"compiled"``)."""
    import timm

    size, batch = (64, 2) if quick else (224, 128)
    names = ("resnet50", "seresnet50", "ecaresnet50d")
    lines = [f"## {title}", "",
             f"`timm.create_model(name, pretrained=False)`, {size}x{size}, batch {batch}, channels-last, bf16 "
             "autocast, SGD; images/s = batch / median step. Gap vs resnet50 in the same mode "
             "(ecaresnet50d also has a deep stem and average-pool downsampling, so its gap is not only ECA).",
             "", "| model | mode | images/s | step ms | peak memory MiB | gap vs resnet50 |",
             "|---|---|---:|---:|---:|---:|"]
    base = {}
    for mode in modes:
        for name in names:
            if time.monotonic() > deadline:
                lines.append(f"| {name} | {mode} | not run: time budget | | | |")
                continue
            torch._dynamo.reset()
            try:
                torch.manual_seed(0)
                model = timm.create_model(name, pretrained=False).to(dev).to(memory_format=torch.channels_last)
                if mode == "compiled":
                    model.compile(backend=backend)
                opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
                x = torch.randn(batch, 3, size, size, device=dev).contiguous(memory_format=torch.channels_last)
                y = torch.randint(0, 1000, (batch,), device=dev)
                step = _train_step(model, opt, dev, functools.partial(_classification_loss, model, x, y))
                r = _train_throughput(step, clock, batch, dev)
            except Exception as e:  # noqa: BLE001
                lines.append(f"| {name} | {mode} | error: {type(e).__name__}: {str(e)[:150]} | | | |")
                continue
            if name == "resnet50":
                base[mode] = r["ips"]
            gap = None if name == "resnet50" or mode not in base else 1 - r["ips"] / base[mode]
            print(f"[gpu.py]   timm {name} {mode}: {_ips(r['ips'])} images/s", flush=True)
            lines.append(f"| {name} | {mode} | {_ips(r['ips'])} | {r['ms']:.1f} | {_fmt(r['mem'], '.0f')} | "
                         f"{'–' if gap is None else f'{gap:.1%}'} |")
            del model, opt
    return lines


def bench_self(dev: torch.device, clock: Clock, quick: bool, deadline: float) -> list[str]:
    import visattn
    from visattn.bench import peak_memory_mb

    channels, batch = (32, 1) if quick else (256, 4)
    sides = (8, 16) if quick else (64, 128)
    lines = ["## Self-attention blocks", "",
             f"Input ({batch}, {channels}, S, S) bf16, S x S tokens; forward in `eval()` under `no_grad`, "
             "forward+backward in training mode. Peak memory: what the call allocates above its input "
             "(GPU allocator; on CPU, resident memory).", "",
             "| block | tokens | fwd ms | fwd peak MiB | fwd+bwd ms | fwd+bwd peak MiB |",
             "|---|---|---:|---:|---:|---:|"]
    for side in sides:
        for name in visattn.list_blocks(kind="self"):
            tokens = f"{side}x{side}"
            if time.monotonic() > deadline:
                lines.append(f"| {name} | {tokens} | not run: time budget | | | |")
                continue
            try:
                torch.manual_seed(0)
                block = visattn.create_block(name, channels).to(dev, torch.bfloat16)
                x = torch.randn(batch, channels, side, side, device=dev, dtype=torch.bfloat16)
                xg = x.clone().requires_grad_()
                fwd, fwd_bwd = _fwd(block, x), _fwd_bwd(block, xg)
                block.eval()
                f = clock.time(fwd)
                fm = _peak_memory_mib(dev, fwd) if dev.type == "cuda" else peak_memory_mb(fwd)
                block.train()
                b = clock.time(fwd_bwd)
                bm = _peak_memory_mib(dev, fwd_bwd) if dev.type == "cuda" else peak_memory_mb(fwd_bwd)
            except Exception as e:  # noqa: BLE001
                lines.append(f"| {name} | {tokens} | {'OOM' if _is_oom(e) else 'error'}: "
                             f"{type(e).__name__}: {str(e)[:120]} | | | |")
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            lines.append(f"| {name} | {tokens} | {_ms(f)} | {fm:.0f} | {_ms(b)} | {bm:.0f} |")
            print(f"[gpu.py]   {name} {tokens}: fwd {f['ms']:.2f} ms, fwd+bwd {b['ms']:.2f} ms", flush=True)
            del block
    return lines


# --------------------------------------------------------------------------------------------------
# The trainer run: python train.py fit / validate, with a callback that measures throughput.


class TrainThroughput(L.Callback):
    """Measures training and validation images/s and peak GPU memory, and writes them to ``out``
    (JSON). The first ``skip_steps`` training steps and the first two validation batches
    (compiling, allocator warm-up) are not timed; validation time excludes the COCO evaluation.
    Added to ``python train.py`` as ``--trainer.callbacks+=gpu.TrainThroughput`` with
    ``benchmarks/`` on ``PYTHONPATH``."""

    def __init__(self, out: str, skip_steps: int = 5) -> None:
        self.out, self.skip = out, skip_steps
        self.steps, self.images, self.t0 = 0, 0, None
        self.result: dict = {}
        self.val_images, self.val_t0 = 0, None

    @staticmethod
    def _sync(trainer) -> None:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize(trainer.strategy.root_device)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.steps == self.skip:
            self._sync(trainer)
            self.t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.steps += 1
        if self.t0 is not None:
            self.images += len(batch[0])

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self.t0 is not None and self.images:
            self._sync(trainer)
            dt = time.perf_counter() - self.t0
            self.result.update(train_images_per_s=self.images / dt, train_steps_timed=self.steps - self.skip,
                               train_images_timed=self.images)
        self.t0, self.images = None, 0
        self._write(trainer)

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        # the first batches compile the eval-mode kernels: not timed
        if not trainer.sanity_checking and batch_idx == min(2, self.skip):
            self._sync(trainer)
            self.val_t0, self.val_images = time.perf_counter(), 0

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if self.val_t0 is not None:
            self.val_images += len(batch[0])

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        # runs before the module's COCO evaluation hook: this times the forward passes only
        if self.val_t0 is not None and self.val_images:
            self._sync(trainer)
            self.result["val_images_per_s"] = self.val_images / (time.perf_counter() - self.val_t0)
        self.val_t0 = None

    def on_validation_end(self, trainer, pl_module) -> None:
        self._write(trainer)

    def on_fit_end(self, trainer, pl_module) -> None:
        self._write(trainer)

    def _write(self, trainer) -> None:
        from visattn._io import atomic_write_json

        dev = trainer.strategy.root_device
        if dev.type == "cuda":
            self.result.update(peak_allocated_gib=torch.cuda.max_memory_allocated(dev) / 2**30,
                               peak_reserved_gib=torch.cuda.max_memory_reserved(dev) / 2**30,
                               device=torch.cuda.get_device_name(dev))
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        if metrics:
            self.result["val_metrics"] = metrics
        if trainer.is_global_zero:
            atomic_write_json(self.out, self.result, indent=1)


def _run(cmd: list[str], env: dict, timeout: float) -> tuple[int | str, float, str]:
    t0 = time.monotonic()
    try:
        p = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True, timeout=max(1.0, timeout), check=False)
        return p.returncode, time.monotonic() - t0, p.stdout
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        return f"timed out after {timeout:.0f} s", time.monotonic() - t0, out


def _tail(text: str, n: int) -> str:
    """The last ``n`` non-empty lines; a progress bar redraws with carriage returns, so each line
    keeps its last state."""
    lines = [ln.rsplit("\r", 1)[-1].rstrip() for ln in text.replace("\r\n", "\n").split("\n")]
    return "\n".join([ln[:400] for ln in lines if ln.strip()][-n:])


def bench_train(dev: torch.device, quick: bool, deadline: float, work: Path, train_images: int,
                val_images: int, log_lines: int, timeout_s: float) -> list[str]:
    """``train.py fit`` then ``validate`` (its last checkpoint) in subprocesses, both together
    stopped after ``timeout_s`` (and at ``deadline``)."""
    deadline = min(deadline, time.monotonic() + timeout_s)
    work.mkdir(parents=True, exist_ok=True)
    overrides = [f"--trainer.default_root_dir={work / 'runs'}", "--trainer.max_epochs=1",
                 f"--checkpoint.dirpath={work / 'ckpt'}",
                 f"--data.init_args.num_train={train_images}", f"--data.init_args.num_val={val_images}",
                 f"--data.init_args.root={work / 'data'}"]
    if quick:  # CPU dry run: a tiny model, tiny images, fp32
        overrides += ["--trainer.accelerator=cpu", "--trainer.precision=32",
                      "--model.init_args.model.init_args.backbone=resnet18",
                      "--model.init_args.model.init_args.fpn_channels=32",
                      "--model.init_args.model.init_args.detector_kwargs={min_size: 64, max_size: 64}",
                      "--data.init_args.image_size=64", "--data.init_args.batch_size=2",
                      "--data.init_args.num_workers=0", "--data.init_args.gen_workers=1"]
    else:
        overrides += [f"--data.init_args.gen_workers={max(1, min(16, os.cpu_count() or 1))}"]
    stats = work / "train-throughput.json"
    callback = ["--trainer.callbacks+=gpu.TrainThroughput", f"--trainer.callbacks.out={stats}",
                f"--trainer.callbacks.skip_steps={1 if quick else 5}"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "benchmarks"), str(ROOT),
                                                        os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
           "PYTHONUNBUFFERED": "1"}
    fit = [sys.executable, "train.py", "fit", "--config", "configs/gpu.yaml", *overrides, *callback]
    lines = ["## `python train.py fit --config configs/gpu.yaml`, then `validate`", ""]
    rc, secs, log = _run(fit, env, deadline - time.monotonic())
    fit_stats = json.loads(stats.read_text()) if stats.is_file() else {}
    stats.unlink(missing_ok=True)
    shown = [c if not c.startswith(str(ROOT)) else os.path.relpath(c, ROOT) for c in fit]
    shown[0] = "python"
    lines += [f"fit: `{shlex.join(shown)}`", "",
              f"exit status {rc}, {secs:.0f} s wall (synthetic data generation, compiling and evaluation "
              "included).", ""]
    val_stats, vrc = {}, None
    ckpt = work / "ckpt" / "last.ckpt"
    if rc == 0 and ckpt.is_file() and time.monotonic() < deadline:
        val = [sys.executable, "train.py", "validate", "--config", "configs/gpu.yaml", *overrides, *callback,
               f"--ckpt_path={ckpt}"]
        vrc, vsecs, vlog = _run(val, env, deadline - time.monotonic())
        val_stats = json.loads(stats.read_text()) if stats.is_file() else {}
        shown = [c if not c.startswith(str(ROOT)) else os.path.relpath(c, ROOT) for c in val]
        shown[0] = "python"
        lines += [f"validate: `{shlex.join(shown)}`", "", f"exit status {vrc}, {vsecs:.0f} s wall.", ""]
    else:
        vlog = "(validate not run: " + ("fit failed" if rc != 0 else "no last.ckpt" if rc == 0 and not ckpt.is_file()
                                        else "time budget") + ")"
    lines += ["| measure | value |", "|---|---|"]
    for label, st in (("fit", fit_stats), ("validate", val_stats)):
        for k, v in st.items():
            if k == "val_metrics":
                for mk, mv in sorted(v.items()):
                    if mk in ("val/AP", "val/AP50", "val/APs", "val/AP_tiny", "val/AP_small"):
                        lines.append(f"| {label} {mk} | {mv:.4f} |")
            else:
                lines.append(f"| {label} {k} | {v:.3g} |" if isinstance(v, float) else f"| {label} {k} | {v} |")
    lines += ["", "fit log (tail):", "", "```", _tail(log, log_lines), "```", "",
              "validate log (tail):", "", "```", _tail(vlog, log_lines), "```"]
    return lines


# --------------------------------------------------------------------------------------------------


def _device_slug(dev: torch.device) -> str:
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "gpu"


def _csv(value: str, allowed: tuple[str, ...], flag: str) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in items if v not in allowed]
    if bad:
        raise argparse.ArgumentTypeError(f"{flag}: unknown {bad}; choose from {', '.join(allowed)}")
    return items


def main(argv: list[str] | None = None) -> int:
    sections = ("train", "blocks", "detector", "timm", "self", "compiled")
    p = argparse.ArgumentParser(prog="python benchmarks/gpu.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--quick", action="store_true", help="tiny shapes and few repeats (the only way on CPU)")
    p.add_argument("--out", help="results file (default RESULTS_DIR/gpu-<device>.md)")
    p.add_argument("--results-dir", default=None,
                   help="folder of the results file (default benchmarks/results; a CPU dry run: the temp dir)")
    p.add_argument("--sections", default=",".join(sections), help=f"comma list of {', '.join(sections)}")
    p.add_argument("--budget-s", type=float, default=3600.0, help="stop starting work after this many seconds")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats (median); default 15 (quick: 2)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls first; default 5 (quick: 1)")
    p.add_argument("--detector-attention", default="none,se,eca,cbam", help="eager detector runs")
    p.add_argument("--detector-compiled", default="none,se,eca,cbam",
                   help="compiled detector runs, section 'compiled' ('' for none)")
    p.add_argument("--timm-compiled", action=argparse.BooleanOptionalAction, default=True,
                   help="compiled timm runs in section 'compiled'")
    p.add_argument("--compile-backend", default=None, help="torch.compile backend (default inductor; quick: eager)")
    p.add_argument("--train-images", type=int, default=None, help="synthetic training images (default 512)")
    p.add_argument("--val-images", type=int, default=None, help="synthetic validation images (default 128)")
    p.add_argument("--train-timeout-s", type=float, default=300.0,
                   help="section 'train': fit and validate together stop after this long")
    p.add_argument("--work-dir", default=None, help="where the trainer writes data and runs (default: a temp dir)")
    args = p.parse_args(argv)
    try:
        chosen = _csv(args.sections, sections, "--sections")
        attn = _csv(args.detector_attention, ("none", "se", "eca", "cbam"), "--detector-attention")
        comp = _csv(args.detector_compiled, ("none", "se", "eca", "cbam"), "--detector-compiled")
    except argparse.ArgumentTypeError as e:
        p.error(str(e))
    for flag, v in (("--repeats", args.repeats), ("--warmup", args.warmup), ("--train-images", args.train_images),
                    ("--val-images", args.val_images)):
        if v is not None and v < 1:
            p.error(f"{flag} must be >= 1, got {v}")
    if args.budget_s <= 0:
        p.error(f"--budget-s must be > 0, got {args.budget_s}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("no CUDA GPU is available (torch.cuda.is_available() is False): this benchmark measures a "
                "GPU. To check the script end to end on CPU: --device cpu --quick")
    if args.device == "cpu" and not args.quick:
        p.error("--device cpu is only a dry run of the script: add --quick (its numbers are not GPU numbers)")

    dev = torch.device(args.device)
    quick = args.quick
    clock = Clock(dev, warmup=args.warmup or (1 if quick else 5), repeats=args.repeats or (2 if quick else 15))
    backend = args.compile_backend or ("eager" if quick and dev.type == "cpu" else "inductor")
    deadline = time.monotonic() + args.budget_s
    slug = _device_slug(dev)
    if args.out:
        out = Path(args.out)
    elif dev.type == "cuda":
        out = Path(args.results_dir or ROOT / "benchmarks" / "results") / f"gpu-{slug}.md"
    else:  # never beside the GPU results: a dry run measures nothing
        out = Path(args.results_dir or tempfile.gettempdir()) / "gpu-cpu-dry-run.md"
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
    import timm

    from visattn._io import atomic_write_text

    command = "python benchmarks/gpu.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU ({platform.processor() or platform.machine()})"
    head = [f"# visattn on {name}" + (" — DRY RUN on CPU, not GPU numbers" if dev.type == "cpu" else ""), "",
            f"Command: `{command.strip()}`", "",
            f"Date {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; torch {torch.__version__} "
            f"(CUDA {torch.version.cuda}), timm {timm.__version__}, lightning {L.__version__}, Python "
            f"{platform.python_version()}; {os.cpu_count()} CPU threads. "
            f"Median of {clock.repeats} timed repeats after {clock.warmup} warm-up calls.", ""]
    if quick:
        head += ["`--quick`: tiny shapes and models; checks that every section runs, measures nothing "
                 "worth quoting.", ""]
    body: dict[str, list[str]] = {s: [f"## {s}", "", "(not run: not in --sections)"] for s in sections}

    def write() -> None:
        text = "\n".join(head + [ln for s in sections for ln in [*body[s], ""]])
        atomic_write_text(out, text)

    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="visattn-gpu-"))
    for s in sections:
        if s not in chosen:
            continue
        if time.monotonic() > deadline:
            body[s] = [f"## {s}", "", "(not run: time budget)"]
            write()
            continue
        t0 = time.monotonic()
        print(f"[gpu.py] {s} ...", flush=True)
        try:
            if s == "train":
                body[s] = bench_train(dev, quick, deadline, work, args.train_images or (8 if quick else 512),
                                      args.val_images or (4 if quick else 128), 40, args.train_timeout_s)
            elif s == "blocks":
                body[s] = bench_blocks(dev, clock, quick, deadline)
            elif s == "detector":
                runs = [(a, "eager") for a in attn] + [(a, "eager, plain gates") for a in attn if a != "none"]
                body[s] = bench_detector(dev, clock, quick, deadline, backend, runs,
                                         "Detector training throughput (eager)")
            elif s == "timm":
                body[s] = bench_timm(dev, clock, quick, deadline, backend, ("eager",),
                                     "timm classification training: the reference gap (eager)")
            elif s == "self":
                body[s] = bench_self(dev, clock, quick, deadline)
            elif s == "compiled":
                body[s] = bench_detector(dev, clock, quick, deadline, backend, [(a, "compiled") for a in comp],
                                         "Detector training throughput (compiled backbone)")
                if args.timm_compiled:
                    body[s] += [""] + bench_timm(dev, clock, quick, deadline, backend, ("compiled",),
                                                 "timm classification training (compiled)")
        except Exception as e:  # noqa: BLE001 - one broken section must not lose the others
            import traceback

            body[s] = [f"## {s}", "", f"FAILED: {type(e).__name__}: {e}", "", "```",
                       traceback.format_exc()[-3000:], "```"]
        body[s].append(f"\n({s}: {time.monotonic() - t0:.0f} s)")
        write()
        print(f"[gpu.py] {s} done in {time.monotonic() - t0:.0f} s -> {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
