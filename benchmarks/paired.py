"""Is method B better than method A on the same episodes? A paired per-class comparison of two benchmark runs.

Reads the ``per_class.csv`` files that ``benchmarks/coco_mini.py`` (and ``fsdiff eval --out``) write, one
folder per setting (``ENCODER-SUPPORT-Kshot-foldF``), pairs the classes of the same setting and fold, and
reports per setting (encoder, support, shots) over all folds: the number of paired classes, both mIoUs
(mean of the per-class IoUs), the mean per-class difference B - A with a seeded 95% bootstrap interval
over classes, and how many classes B wins / loses. With the same episodes for both runs (the HSNet
protocol with one seed) the per-class pairing removes the episode sampling noise that separates folds.

    python benchmarks/paired.py runs/bp-main runs/bd-main01 runs/bd-main23 --split 1

``--split N``: the first N folders are run A, the rest run B (default: one folder each).
"""

from __future__ import annotations

import argparse
import csv
import re
import sys
from pathlib import Path

import numpy as np

SETTING_RE = re.compile(r"^(?P<encoder>.+)-(?P<support>[a-z]+)-(?P<shots>\d+)shot-fold(?P<fold>\d+)$")


def read_run(folders: list[Path]) -> dict[tuple[str, str, int], dict[tuple[int, int], float]]:
    """Per-class IoUs of benchmark folders: {(encoder, support, shots): {(fold, class_id): iou}}."""
    out: dict[tuple[str, str, int], dict[tuple[int, int], float]] = {}
    for folder in folders:
        if not folder.is_dir():
            raise SystemExit(f"paired: {folder} is not a folder; give benchmark output folders (with */per_class.csv).")
        found = sorted(folder.glob("*/per_class.csv"))
        if not found:
            raise SystemExit(f"paired: {folder} holds no */per_class.csv; is it a benchmarks/coco_mini.py --out folder?")
        for path in found:
            m = SETTING_RE.match(path.parent.name)
            if m is None:
                raise SystemExit(f"paired: {path.parent} is not named ENCODER-SUPPORT-Kshot-foldF.")
            key = (m["encoder"], m["support"], int(m["shots"]))
            fold = int(m["fold"])
            with path.open(newline="", encoding="utf-8") as fh:
                for row in csv.DictReader(fh):
                    out.setdefault(key, {})[(fold, int(row["class_id"]))] = float(row["iou"])
    return out


def paired_stats(a: np.ndarray, b: np.ndarray, *, resamples: int = 10000, seed: int = 0) -> dict[str, float]:
    """Mean of a and b, mean difference b - a with its percentile bootstrap 95% interval, wins and losses."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise ValueError(f"need two equal-length non-empty 1-D arrays, got {a.shape} and {b.shape}")
    diff = b - a
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, diff.size, size=(int(resamples), diff.size))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return {"n": int(diff.size), "a": float(a.mean()), "b": float(b.mean()), "diff": float(diff.mean()),
            "low": float(low), "high": float(high), "wins": int((diff > 0).sum()), "losses": int((diff < 0).sum())}


def compare(run_a: dict, run_b: dict, *, seed: int = 0) -> list[dict]:
    """One row per setting present in both runs (classes paired by fold and class id)."""
    rows = []
    for key in sorted(set(run_a) & set(run_b)):
        common = sorted(set(run_a[key]) & set(run_b[key]))
        if not common:
            continue
        stats = paired_stats(np.array([run_a[key][c] for c in common]), np.array([run_b[key][c] for c in common]),
                             seed=seed)
        folds = sorted({f for f, _ in common})
        rows.append({"encoder": key[0], "support": key[1], "shots": key[2], "folds": folds, **stats})
    return rows


def main(argv: list[str] | None = None) -> int:
    """Print the paired comparison as a markdown table."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folders", nargs="+", type=Path, help="benchmark output folders: run A's, then run B's")
    p.add_argument("--split", type=int, default=1, help="how many of the folders belong to run A (default 1)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    args = p.parse_args(argv)
    if not 1 <= args.split < len(args.folders):
        p.error(f"--split {args.split}: need at least one folder for each run, got {len(args.folders)} folders.")
    run_a, run_b = read_run(args.folders[:args.split]), read_run(args.folders[args.split:])
    rows = compare(run_a, run_b, seed=args.seed)
    if not rows:
        print("paired: the two runs share no setting (encoder, support, shots) and fold.", file=sys.stderr)
        return 1
    print("| encoder | support | shots | folds | classes | mIoU A | mIoU B | B - A (95% CI) | B wins / loses |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['encoder']} | {r['support']} | {r['shots']} | {','.join(map(str, r['folds']))} | {r['n']} | "
              f"{r['a']:.1f} | {r['b']:.1f} | {r['diff']:+.2f} ({r['low']:+.2f} .. {r['high']:+.2f}) | "
              f"{r['wins']} / {r['losses']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
