"""Cost of the data-side input checks (issue #12 hardening) on the normal evaluation path.

Opens coco-mini and builds the episodes of ``fsdiff eval --dataset coco --fold 0 --episodes 300``
(HSNet protocol, seed 0): every image read, every mask rasterised. Each repetition runs twice, in turn:
with the checks, and with them replaced by what the code did before (no path containment, no id/size
validation, polygons only converted to floats, RLE passed to pycocotools unchecked). Both variants use
the same episodes in the same process; the ratio is taken pair by pair. The whole-process before/after
comparison of ``fsdiff eval`` is in ``docs/bench/hardening.md``.

    OMP_NUM_THREADS=1 python benchmarks/hardening_overhead.py --root ../shared/data/coco-mini --reps 5
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from collections.abc import Iterator
from pathlib import Path

import fsdiff.data.coco as coco_mod
import fsdiff.io as io_mod
from fsdiff.data import CocoSource, build_episode, sample_episodes


@contextlib.contextmanager
def checks_disabled() -> Iterator[None]:
    """Replace the added checks by the behaviour before the hardening, for the 'before' variant."""
    saved = (coco_mod.resolve_inside, io_mod.check_image_size, CocoSource._polygons, CocoSource.__dict__["_rle"],
             CocoSource._int)

    def old_rle(segm, h, w):
        from pycocotools import mask as mask_utils

        counts = segm["counts"]
        if isinstance(counts, list):
            return mask_utils.frPyObjects(segm, h, w)
        return {"size": [h, w], "counts": counts.encode("ascii") if isinstance(counts, str) else counts}

    coco_mod.resolve_inside = lambda path, root, what: Path(path)
    io_mod.check_image_size = lambda *a, **k: None
    CocoSource._polygons = lambda self, segm, h, w: [[float(v) for v in p] for p in segm]
    CocoSource._rle = staticmethod(old_rle)
    CocoSource._int = lambda self, value, where, field: int(value)
    try:
        yield
    finally:
        (coco_mod.resolve_inside, io_mod.check_image_size, CocoSource._polygons, CocoSource._rle,
         CocoSource._int) = saved


def run(root: str, fold: int, specs: list) -> float:
    """CPU seconds of this process to open the json and build every episode (a fresh source: no cached masks).

    CPU time, not wall time: on a shared machine it does not count the time other processes hold the core.
    """
    t0 = time.process_time()
    source = CocoSource(root=root, fold=fold)
    for spec in specs:
        build_episode(source, spec)
    return time.process_time() - t0


def main(argv: list[str] | None = None) -> int:
    """Time both variants in turn; print a JSON summary."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", required=True, help="coco-mini folder (instances.json + images/)")
    ap.add_argument("--fold", type=int, default=0)
    ap.add_argument("--episodes", type=int, default=300)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args(argv)

    specs = sample_episodes(CocoSource(root=args.root, fold=args.fold), "hsnet", args.episodes, 1, 0)
    run(args.root, args.fold, specs)  # warm the page cache
    with_checks, without = [], []
    for _ in range(args.reps):
        with_checks.append(run(args.root, args.fold, specs))
        with checks_disabled():
            without.append(run(args.root, args.fold, specs))
    ratios = [a / b for a, b in zip(with_checks, without)]
    out = {
        "episodes": len(specs), "reps": args.reps,
        "with_checks_cpu_s": {"min": round(min(with_checks), 3), "median": round(statistics.median(with_checks), 3)},
        "before_cpu_s": {"min": round(min(without), 3), "median": round(statistics.median(without), 3)},
        "ratio_with_over_before": {"min": round(min(ratios), 4), "median": round(statistics.median(ratios), 4),
                                   "max": round(max(ratios), 4)},
        "added_ms_per_episode_median": round(1e3 * statistics.median(
            [a - b for a, b in zip(with_checks, without)]) / len(specs), 3),
    }
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
