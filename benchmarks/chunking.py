"""Cache-blocked inference vs the plain whole-batch path, per block, interleaved in one run.

    python benchmarks/chunking.py --out benchmarks/results/chunking-cpu.md

This is the measurement behind each block's ``chunked_inference`` setting (off for ``se`` and
``eca``, where one cheap pooling read is all that chunking could save).
"""
import argparse
import platform

import torch

import visattn
from visattn._io import atomic_write_text
from visattn.bench import _best_of, _fwd


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", nargs=4, type=int, default=[16, 256, 56, 56])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out")
    args = parser.parse_args()
    torch.manual_seed(0)
    x = torch.randn(args.shape)
    lines = [
        "# Chunked vs plain inference on CPU", "",
        "Command: `python benchmarks/chunking.py" + (f" --out {args.out}`" if args.out else "`"), "",
        f"Input {tuple(args.shape)} fp32, `eval()` under `no_grad`, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {platform.machine()}. Best of {args.repeats}, the copy "
        "and both paths interleaved. `default` marks the path the block uses.", "",
        "| block | chunked ms | plain ms | copy ms | plain / chunked | default |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for name in visattn.list_blocks():
        chunked = visattn.create_block(name, args.shape[1]).eval()
        plain = visattn.create_block(name, args.shape[1]).eval()
        default = "chunked" if chunked.chunked_inference else "plain"
        chunked.chunked_inference, plain.chunked_inference = True, False
        t = _best_of({"chunked": _fwd(chunked, x), "plain": _fwd(plain, x),
                      "copy": lambda: x * 1.0}, args.repeats)
        lines.append(f"| {name} | {t['chunked']:.1f} | {t['plain']:.1f} | {t['copy']:.1f} "
                     f"| {t['plain'] / t['chunked']:.2f}x | {default} |")
        print(lines[-1], flush=True)
    report = "\n".join(lines) + "\n"
    if args.out:
        atomic_write_text(args.out, report)


if __name__ == "__main__":
    main()
