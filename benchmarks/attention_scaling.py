"""Time and peak memory of every self-attention block against the number of tokens, next to a
naive attention that materialises the (HW x HW) softmax matrix.

    python benchmarks/attention_scaling.py --out-dir benchmarks/results

Writes attention-scaling-cpu.md (table + goal checks), attention-scaling-cpu.json and
attention-scaling-cpu.png (log-log plot). One forward pass, batch 1, C=64, ``eval()`` under
``no_grad``; time is the best of ``--repeats`` (1 above 96x96); memory is the peak resident memory
the forward adds (Linux: VmHWM after resetting it), measured in a separate call.
"""
import argparse
import platform
from pathlib import Path

import torch

import visattn
from visattn._io import atomic_path, atomic_write_json, atomic_write_text
from visattn.bench import _best_of, peak_memory_mb

NAIVE_LIMIT_GB = 8.0  # skip the naive reference where its matrices alone would exceed this


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
    parser.add_argument("--blocks", nargs="*", default=None, help="default: every 'self' block")
    parser.add_argument("--out-dir", default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    names = (args.blocks or visattn.list_blocks("self")) + ["naive"]
    rows = {}
    for name in names:
        block = NaiveAttention(args.channels) if name == "naive" else visattn.create_block(name, args.channels)
        block.eval()
        rows[name] = {}
        for side in args.sides:
            tokens = side * side
            if name == "naive" and 3 * tokens ** 2 * 4 / 1e9 > NAIVE_LIMIT_GB:
                rows[name][tokens] = None
                continue
            x = torch.randn(1, args.channels, side, side)

            def run():
                with torch.no_grad():
                    return block(x)

            ms = _best_of({"run": run}, args.repeats if side <= 96 else 1, warmup=1 if side <= 96 else 0)["run"]
            mb = peak_memory_mb(run)
            rows[name][tokens] = {"ms": ms, "mb": mb}
            print(f"{name:12s} {side:4d}x{side:<4d} {ms:10.1f} ms {mb:9.1f} MiB", flush=True)

    cmd = "python benchmarks/attention_scaling.py" + (f" --out-dir {args.out_dir}" if args.out_dir else "")
    lines = [
        "# Self-attention scaling on CPU", "", f"Command: `{cmd}`", "",
        f"Batch 1, C={args.channels}, one forward pass in `eval()` under `no_grad`; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {platform.machine()}. Time: best of {args.repeats} up to 96x96, "
        "one run above. Memory: peak resident memory added by the forward (VmHWM). `naive` materialises "
        f"the HW x HW softmax matrix (skipped where that would exceed {NAIVE_LIMIT_GB:.0f} GB).", "",
        "| block | " + " | ".join(f"{s}x{s} ms" for s in args.sides) + " | "
        + " | ".join(f"{s}x{s} MiB" for s in args.sides) + " |",
        "|---|" + "---:|" * (2 * len(args.sides)),
    ]
    for name, by_tokens in rows.items():
        cells = [by_tokens[s * s] for s in args.sides]
        lines.append(f"| {name} | " + " | ".join("–" if c is None else f"{c['ms']:.1f}" for c in cells)
                     + " | " + " | ".join("–" if c is None else f"{c['mb']:.0f}" for c in cells) + " |")

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
            axes[0].plot([t for t, _ in pts], [v["ms"] for _, v in pts], marker="o", label=name, **style)
            axes[1].plot([t for t, _ in pts], [max(v["mb"], 0.1) for _, v in pts], marker="o", label=name, **style)
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
