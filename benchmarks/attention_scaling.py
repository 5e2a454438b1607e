"""Time and peak memory of every self-attention block against the number of tokens, next to a
naive attention that materialises the (HW x HW) softmax matrix.

    python benchmarks/attention_scaling.py --out-dir benchmarks/results

Writes attention-scaling-cpu.md (table + goal checks), attention-scaling-cpu.json and
attention-scaling-cpu.png (log-log plot). One forward pass, batch 1, C=64, ``eval()`` under
``no_grad``; time is the best of ``--repeats`` (``--large-repeats`` above 96x96); memory is the peak
resident memory the forward adds (Linux: VmHWM after resetting it), measured in a separate call.
A block's sizes are timed interleaved (each round times every size once), so a slow phase of a
shared machine falls on all sizes alike and the growth ratios compare runs made side by side.

Blocks in ``--backward-blocks`` (the learned-sparse ones by default) are also timed in training:
a forward with autograd and the backward of ``y.sum()``, each the best of the same repeats.
A block may be given with keyword arguments, ``routing:regions=7``. With ``--update``, only the
blocks named by ``--blocks`` are measured and the other rows are kept from the existing JSON:

    OMP_WAIT_POLICY=PASSIVE nice python benchmarks/attention_scaling.py --out-dir benchmarks/results \
        --update --cpu-time --large-repeats 2 --blocks deformable routing routing:regions=7 quadtree adaptive

``--cpu-time`` also records the process's CPU time, which on a shared machine (other jobs holding
the cores) is far steadier than wall time; ``OMP_WAIT_POLICY=PASSIVE`` keeps idle OpenMP threads
from spinning, so that CPU time is work, not waiting.
"""
import argparse
import ast
import json
import os
import platform
import time
from pathlib import Path

import torch

import visattn
from visattn._io import atomic_path, atomic_write_json, atomic_write_text
from visattn.bench import peak_memory_mb

NAIVE_LIMIT_GB = 8.0  # skip the naive reference where its matrices alone would exceed this
# dense-cost blocks that also run an iterative normalisation: skipped above this many tokens (adaptive's
# alpha-entmax makes 3-7 Newton passes over every (HW x HW) score: ~31 s of CPU per forward at 96x96,
# minutes at 128x128)
DENSE_LIMIT_TOKENS = {"adaptive": 96 * 96}
BACKWARD_BLOCKS = ("deformable", "routing", "quadtree", "adaptive")


def parse_spec(spec: str) -> tuple[str, dict]:
    """``"routing:regions=7,topk=4"`` -> ``("routing", {"regions": 7, "topk": 4})``."""
    name, _, args = spec.partition(":")
    kwargs = {}
    for item in filter(None, args.split(",")):
        key, _, value = item.partition("=")
        kwargs[key] = ast.literal_eval(value)
    return name, kwargs


def _clocks() -> tuple[float, float]:
    """Wall time and this process's CPU time (all its threads), in ms."""
    return time.perf_counter() * 1e3, time.process_time() * 1e3


def time_eval(block, x, repeats: int, warmup: int) -> tuple[float, float]:
    """Best wall and best process-CPU time (ms) of one ``no_grad`` forward. CPU time counts only
    the work of this process, so on a shared machine it is far steadier than wall time."""
    wall, cpu = float("inf"), float("inf")
    for i in range(warmup + repeats):
        w0, c0 = _clocks()
        with torch.no_grad():
            block(x)
        w1, c1 = _clocks()
        if i >= warmup:
            wall, cpu = min(wall, w1 - w0), min(cpu, c1 - c0)
    return wall, cpu


def time_train(block, x, repeats: int, warmup: int) -> dict[str, float]:
    """Best forward-with-autograd and backward times (ms, wall and process CPU) on ``x``."""
    block.train()
    x = x.clone().requires_grad_()
    best = dict(train_fwd_ms=float("inf"), bwd_ms=float("inf"), train_fwd_cpu_ms=float("inf"),
                bwd_cpu_ms=float("inf"))
    for i in range(warmup + repeats):
        block.zero_grad(set_to_none=True)
        x.grad = None
        w0, c0 = _clocks()
        y = block(x)
        w1, c1 = _clocks()
        y.sum().backward()
        w2, c2 = _clocks()
        if i >= warmup:
            for key, value in (("train_fwd_ms", w1 - w0), ("bwd_ms", w2 - w1),
                               ("train_fwd_cpu_ms", c1 - c0), ("bwd_cpu_ms", c2 - c1)):
                best[key] = min(best[key], value)
    block.eval()
    return best


class NaiveAttention(torch.nn.Module):
    """Single-head softmax attention that materialises the full matrix: the quadratic baseline."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.qkv = torch.nn.Conv2d(channels, 3 * channels, 1)

    def forward(self, x):
        n, c, h, w = x.shape
        q, k, v = self.qkv(x).flatten(2).chunk(3, 1)  # (N, C, HW) each
        a = torch.softmax(q.transpose(1, 2) @ k / c ** 0.5, -1)  # (N, HW, HW)
        return x + (v @ a.transpose(1, 2)).view(n, c, h, w)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sides", nargs="+", type=int, default=[32, 64, 96, 128, 256])
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--large-repeats", type=int, default=1, help="repeats above 96x96 (no warm-up)")
    parser.add_argument("--blocks", nargs="*", default=None,
                        help="default: every 'self' block and naive; 'name:key=value,...' passes arguments")
    parser.add_argument("--backward-blocks", nargs="*", default=list(BACKWARD_BLOCKS),
                        help="block names also timed forward+backward in training")
    parser.add_argument("--update", action="store_true",
                        help="measure only --blocks, keep the other rows of the existing JSON in --out-dir")
    parser.add_argument("--cpu-time", action="store_true",
                        help="also record process CPU time (steadier than wall time on a shared machine); "
                             "the issue-14 goals then use it")
    parser.add_argument("--out-dir", default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    specs = args.blocks or (visattn.list_blocks("self") + ["naive"])
    rows = {}
    if args.update:
        if not args.out_dir or not args.blocks:
            parser.error("--update needs --out-dir (with an existing JSON) and --blocks")
        old = json.loads((Path(args.out_dir) / "attention-scaling-cpu.json").read_text())
        rows = {n: {int(t): v for t, v in r.items()} for n, r in old.items()}
    for spec in specs:
        name, kwargs = parse_spec(spec)
        block = NaiveAttention(args.channels) if name == "naive" else visattn.create_block(
            name, args.channels, **kwargs)
        block.eval()
        rows[spec] = {}
        plans = {}  # side -> (input, repeats, warm-up runs)
        for side in args.sides:
            tokens = side * side
            if (name == "naive" and 3 * tokens ** 2 * 4 / 1e9 > NAIVE_LIMIT_GB) or \
                    tokens > DENSE_LIMIT_TOKENS.get(name, tokens):
                rows[spec][tokens] = None
                continue
            repeats, warmup = (args.repeats, 1) if side <= 96 else (args.large_repeats, 0)
            if name in DENSE_LIMIT_TOKENS and side > 32:
                repeats, warmup = 1, 0
            plans[side] = (torch.randn(1, args.channels, side, side), repeats, warmup)
        train = name in args.backward_blocks
        best: dict[int, dict[str, float]] = {side: {} for side in plans}
        # interleaved: every round times each size once, so a slow phase of a shared machine
        # falls on all sizes alike and the growth ratios compare runs made side by side
        for i in range(max((r + w for _, r, w in plans.values()), default=0)):
            for side, (x, repeats, warmup) in plans.items():
                if i >= repeats + warmup:
                    continue
                block.eval()
                wall, cpu = time_eval(block, x, 1, 0)
                t = time_train(block, x, 1, 0) if train else {}
                if i >= warmup:
                    for key, value in {"ms": wall, "cpu_ms": cpu, **t}.items():
                        best[side][key] = min(best[side].get(key, float("inf")), value)
        block.eval()
        for side, (x, _, _) in plans.items():
            def run(block=block, x=x):
                with torch.no_grad():
                    return block(x)

            got = best[side]
            rows[spec][side * side] = row = {"ms": got["ms"], "mb": peak_memory_mb(run)}
            line = f"{spec:20s} {side:4d}x{side:<4d} {row['ms']:10.1f} ms {row['mb']:9.1f} MiB"
            if args.cpu_time:
                row["cpu_ms"] = got["cpu_ms"]
                line += f" cpu {row['cpu_ms']:10.1f} ms"
            if train:
                row.update({k: got[k] for k in ("train_fwd_ms", "bwd_ms", "train_fwd_cpu_ms", "bwd_cpu_ms")})
                line += (f"   train cpu: fwd {row['train_fwd_cpu_ms']:9.1f} ms  bwd {row['bwd_cpu_ms']:9.1f} ms "
                         f"({row['bwd_cpu_ms'] / row['train_fwd_cpu_ms']:.2f}x)")
            print(line, flush=True)
    if "naive" in rows:  # the quadratic reference last
        rows["naive"] = rows.pop("naive")

    cmd = "python benchmarks/attention_scaling.py" + (f" --out-dir {args.out_dir}" if args.out_dir else "")
    note = ""
    if args.update:
        env = " ".join(f"{k}={os.environ[k]}" for k in ("OMP_WAIT_POLICY",) if k in os.environ)
        cmd = ((env + " " if env else "") + "nice " + cmd + f" --update{' --cpu-time' if args.cpu_time else ''} "
               f"--large-repeats {args.large_repeats} --blocks " + " ".join(args.blocks))
        note = (f" for the rows {', '.join(args.blocks)}; the other rows are kept from an earlier "
                "full run (no `--blocks`), in another environment (torch version, machine load)")
    lines = [
        "# Self-attention scaling on CPU", "", f"Command: `{cmd}`{note}", "",
        f"Batch 1, C={args.channels}, one forward pass in `eval()` under `no_grad`; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {platform.machine()}. Time: best of {args.repeats} up to 96x96, "
        f"{args.large_repeats} above, the sizes of a block timed interleaved (blocks with a dense-size limit: one run above 32x32). Memory: peak resident memory added by the forward (VmHWM). `naive` materialises "
        f"the HW x HW softmax matrix (skipped where that would exceed {NAIVE_LIMIT_GB:.0f} GB).", "",
        "| block | " + " | ".join(f"{s}x{s} ms" for s in args.sides) + " | "
        + " | ".join(f"{s}x{s} MiB" for s in args.sides) + " |",
        "|---|" + "---:|" * (2 * len(args.sides)),
    ]
    for name, by_tokens in rows.items():
        cells = [by_tokens.get(s * s) for s in args.sides]
        lines.append(f"| {name} | " + " | ".join("–" if c is None else f"{c['ms']:.1f}" for c in cells)
                     + " | " + " | ".join("–" if c is None else f"{c['mb']:.0f}" for c in cells) + " |")
    timed = [n for n, r in rows.items() if any(v and "cpu_ms" in v for v in r.values())]
    if timed:
        lines += ["", "### Process CPU time of the forward (ms, `eval()`, `no_grad`; both threads summed)",
                  "", "Wall time on a shared machine counts the time other jobs hold the cores; the "
                  "process's CPU time counts only its own work, so the growth goals below use it.", "",
                  "| block | " + " | ".join(f"{s}x{s} ms" for s in args.sides) + " |",
                  "|---|" + "---:|" * len(args.sides)]
        for name in timed:
            cells = [rows[name].get(s * s) for s in args.sides]
            lines.append(f"| {name} | " + " | ".join(
                "–" if not c or "cpu_ms" not in c else f"{c['cpu_ms']:.1f}" for c in cells) + " |")
    trained = [n for n, r in rows.items() if any(v and "bwd_cpu_ms" in v for v in r.values())]
    if trained:
        lines += ["", "### Training: forward with autograd and backward of `y.sum()` (process CPU ms; "
                  f"batch 1, C={args.channels}, best of the same repeats)", "",
                  "| block | " + " | ".join(f"{s}x{s} fwd / bwd (bwd/fwd)" for s in args.sides) + " |",
                  "|---|" + "---:|" * len(args.sides)]
        for name in trained:
            cells = [rows[name].get(s * s) for s in args.sides]
            lines.append(f"| {name} | " + " | ".join(
                "–" if not c or "bwd_cpu_ms" not in c else
                f"{c['train_fwd_cpu_ms']:.1f} / {c['bwd_cpu_ms']:.1f} "
                f"({c['bwd_cpu_ms'] / c['train_fwd_cpu_ms']:.2f}x)"
                for c in cells) + " |")

    def get(name, side):
        return rows.get(name, {}).get(side * side)

    lines += ["", "## Goals (issue #3)", ""]
    if get("mhsa", 96):
        mb = get("mhsa", 96)["mb"]
        lines.append(f"- mhsa at 96x96 adds < 400 MB: {mb:.0f} MiB: {'PASS' if mb * 1.048576 < 400 else 'FAIL'}")
    if get("linear", 128) and get("linear", 256):
        ratio = get("linear", 256)["ms"] / get("linear", 128)["ms"]
        lines.append(f"- linear: 4x tokens (128x128 -> 256x256) < 8x time: {ratio:.2f}x: "
                     f"{'PASS' if ratio < 8 else 'FAIL'}")
        mb = get("linear", 256)["mb"]
        lines.append(f"- linear at 256x256 adds < 600 MB: {mb:.0f} MiB: {'PASS' if mb * 1.048576 < 600 else 'FAIL'}")
    if get("window", 256):
        mb = get("window", 256)["mb"]
        lines.append(f"- window at 256x256 adds < 800 MB: {mb:.0f} MiB: {'PASS' if mb * 1.048576 < 800 else 'FAIL'}")
    lines += ["", "## Goals (issue #14)", ""]
    pairs = [(a, 2 * a) for a in args.sides if 2 * a in args.sides]  # 4x the tokens

    def t(c):  # process CPU time where measured, else wall
        return c.get("cpu_ms", c["ms"])

    for name in ("deformable", "quadtree", "routing"):
        ratios = [(a, b, t(get(name, b)) / t(get(name, a))) for a, b in pairs if get(name, a) and get(name, b)]
        if ratios:
            ok = all(r < 5 for *_, r in ratios)
            lines.append(f"- {name} grows linearly: 4x tokens < 5x time: "
                         + ", ".join(f"{a}->{b}: {r:.2f}x" for a, b, r in ratios) + f": {'PASS' if ok else 'FAIL'}")
    for name in ("deformable", "quadtree", "routing"):
        c = get(name, 256)
        if c:
            lines.append(f"- {name} at 256x256 adds < 1 GB: {c['mb']:.0f} MiB: "
                         f"{'PASS' if c['mb'] * 1.048576 < 1000 else 'FAIL'}")
    for name in ("routing",):
        for side in args.sides:
            c = get(name, side)
            if c and "bwd_cpu_ms" in c and side == max(args.sides):
                ratios = [v["bwd_cpu_ms"] / v["train_fwd_cpu_ms"] for v in rows[name].values()
                          if v and "bwd_cpu_ms" in v]
                r = c["bwd_cpu_ms"] / c["train_fwd_cpu_ms"]
                lines.append(f"- {name} backward <= 3x its forward (CPU time) at {side}x{side}: {r:.2f}x: "
                             f"{'PASS' if r <= 3 else 'FAIL'} (from the smallest size up: "
                             + ", ".join(f"{r:.2f}x" for r in ratios) + ")")
    report = "\n".join(lines) + "\n"
    print(report)
    if args.out_dir:
        out = Path(args.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "attention-scaling-cpu.md", report)
        atomic_write_json(out / "attention-scaling-cpu.json",
                          {n: {str(t): v for t, v in r.items()} for n, r in rows.items()}, indent=1)
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
        for name, by_tokens in rows.items():
            pts = [(t, v) for t, v in by_tokens.items() if v is not None]
            style = dict(color="black", linestyle="--", linewidth=2) if name == "naive" else {}
            if parse_spec(name)[0] in BACKWARD_BLOCKS:  # the learned-sparse blocks
                style = dict(linestyle=":", linewidth=2.2, marker="s")
            style.setdefault("marker", "o")
            axes[0].plot([t for t, _ in pts], [v["ms"] for _, v in pts], label=name, **style)
            axes[1].plot([t for t, _ in pts], [max(v["mb"], 0.1) for _, v in pts], label=name, **style)
        for ax, label in zip(axes, ["forward time (ms)", "peak memory added (MiB)"]):
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("tokens (H x W)")
            ax.set_ylabel(label)
            ax.grid(True, which="both", alpha=0.3)
        axes[1].legend(fontsize=8, ncol=2)
        fig.suptitle(f"Self-attention blocks on CPU, C={args.channels}, batch 1")
        fig.tight_layout()
        with atomic_path(out / "attention-scaling-cpu.png") as tmp:
            fig.savefig(tmp, dpi=110)


if __name__ == "__main__":
    main()
