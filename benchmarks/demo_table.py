"""Benchmark: the IoU table of the bundled demo (fsdiff.demo.run_demo) for several methods, side by side.

Every method segments the identical cases (same photos, same derived box / scribble / clicks), so the
per-case differences are paired; with five cases they illustrate, they do not rank methods (the
benchmarks in docs/BENCHMARKS.md do that).

    python benchmarks/demo_table.py --methods prototype diffup --out /tmp/demo-table --threads 1
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from fsdiff.api import Segmenter
from fsdiff.demo import run_demo


def main() -> int:
    """Run the demo once per method and print a Markdown table (IoU in percent per case, and the mean)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", nargs="+", default=["prototype", "diffup"])
    ap.add_argument("--out", type=Path, default=Path("runs/demo-table"))
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    results = {m: run_demo(args.out / m, Segmenter(m)) for m in args.methods}
    first = results[args.methods[0]]
    print("| case | annotation | shots | query | " + " | ".join(f"{m} IoU %" for m in args.methods) + " |")
    print("| --- | --- | ---: | --- | " + " | ".join("---:" for _ in args.methods) + " |")
    for i, rec in enumerate(first):
        cells = " | ".join(f"{results[m][i].iou:.1f}" for m in args.methods)
        print(f"| {rec.name} | {rec.annotation} | {len(rec.shots)} | {rec.query} | {cells} |")
    means = " | ".join(f"**{sum(r.iou for r in results[m]) / len(results[m]):.1f}**" for m in args.methods)
    print(f"| mean | | | | {means} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
