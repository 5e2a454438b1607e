"""Speed of every block vs timm's counterpart and a plain copy, on a tensor larger than the LLC.

    python benchmarks/blocks.py --out benchmarks/results/blocks-cpu.md

Thin wrapper over ``visattn bench`` (the code lives in ``visattn/bench.py``).
"""
import sys

from visattn.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]], prog="python benchmarks/blocks.py"))
