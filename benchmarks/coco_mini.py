"""Benchmark: a method on coco-mini's four interleaved COCO-20i folds (HSNet protocol, seed 0).

Scores every (fold, shots, encoder) combination on identical episodes, measures episodes per second
(features cached within a run, as in ``fsdiff eval``), and prints a Markdown table for
docs/BENCHMARKS.md. Classes with no more images than the shot count are left out (coco-mini is tiny)
and listed in the JSON.

    python benchmarks/coco_mini.py --method prototype --encoders efficientnet-lite0 efficientnet-lite2 \
        --shots 1 5 --episodes 1000 --out runs/bench-prototype

DiffUp uses the shipped checkpoint of each fold (trained without that fold's classes) unless
``--checkpoint 'runs/diffup-fold{fold}/final'`` names others; ``--support-annotations mask box scribble``
scores weak supports synthesised from the masks (the same boxes/scribbles for every method).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from datetime import date
from pathlib import Path

import torch

from fsdiff.api import build_segmenter, evaluate_benchmark

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "coco-mini"


def main() -> int:
    """Run the grid and print the table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=os.environ.get("FSDIFF_COCO_MINI", str(DEFAULT_DATA)))
    ap.add_argument("--method", default="prototype")
    ap.add_argument("--encoders", nargs="+", default=["efficientnet-lite0"])
    ap.add_argument("--shots", type=int, nargs="+", default=[1, 5])
    ap.add_argument("--folds", type=int, nargs="+", default=[0, 1, 2, 3])
    ap.add_argument("--episodes", type=int, default=1000)
    ap.add_argument("--method-arg", action="append", default=[], metavar="KEY=VALUE", help="extra segmenter argument")
    ap.add_argument("--checkpoint", default=None, help="checkpoint path, '{fold}' is replaced by the fold")
    ap.add_argument("--support-annotations", nargs="+", default=["mask"], choices=["mask", "box", "scribble"])
    ap.add_argument("--split", choices=["trn"], default=None,
                    help="score each fold's base classes instead of its test classes (validation for settings)")
    ap.add_argument("--out", default="runs/bench")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    extra = {}
    for kv in args.method_arg:
        k, v = kv.split("=", 1)
        extra[k] = json.loads(v) if v[:1] in "0123456789-[{tf" else v
    rows = []
    # a trained method needs the checkpoint of each fold; otherwise one segmenter (and feature cache) per encoder
    per_fold = args.method == "diffup" or "{fold}" in (args.checkpoint or "")
    for enc in args.encoders:
        seg = None
        for fold in args.folds:
            if seg is None or per_fold:
                kw = dict(extra)
                if args.checkpoint:
                    kw["checkpoint"] = args.checkpoint.format(fold=fold)
                seg = build_segmenter(args.method, encoder=enc, benchmark=dict(dataset="coco", fold=fold), **kw)
            for kind in args.support_annotations:
                for shots in args.shots:
                    t0 = time.perf_counter()
                    summary, _ = evaluate_benchmark(
                        "coco", args.data, fold=fold, shots=shots, episodes=args.episodes, segmenter=seg,
                        skip_small_classes=True, support_annotation=kind, split=args.split, progress=False,
                        out=Path(args.out) / f"{enc}-{kind}-{shots}shot-fold{fold}",
                    )
                    row = {
                        "encoder": enc, "support": kind, "shots": shots, "fold": fold, "miou": summary["miou"],
                        "fbiou": summary["fbiou"], "episodes_per_second": summary["episodes_per_second"],
                        "seconds": time.perf_counter() - t0, "classes_skipped": summary["classes_skipped"],
                    }
                    rows.append(row)
                    print(json.dumps(row), file=sys.stderr, flush=True)
    machine = f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "bench.json").write_text(json.dumps({"date": str(date.today()), "machine": machine, "args": vars(args), "rows": rows}, indent=2))
    print(f"date {date.today()}; machine {machine}; method {args.method}; episodes/fold {args.episodes}\n")
    print("| encoder | support | shots | fold 0 | fold 1 | fold 2 | fold 3 | mean mIoU | mean FB-IoU | episodes/s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for enc in args.encoders:
        for kind in args.support_annotations:
            for shots in args.shots:
                sel = [r for r in rows if r["encoder"] == enc and r["shots"] == shots and r["support"] == kind]
                per = {r["fold"]: r["miou"] for r in sel}
                cells = [f"{per[f]:.1f}" if f in per else "-" for f in range(4)]
                miou = sum(r["miou"] for r in sel) / len(sel)
                fb = sum(r["fbiou"] for r in sel) / len(sel)
                eps = sum(r["episodes_per_second"] for r in sel) / len(sel)
                print(f"| {enc} | {kind} | {shots} | {' | '.join(cells)} | {miou:.1f} | {fb:.1f} | {eps:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
