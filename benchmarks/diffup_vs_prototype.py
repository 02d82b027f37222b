"""Benchmark: DiffUp against the training-free prototype method on identical episodes, paired per episode
and per class, with the time per episode of both measured in the same run (results:
docs/bench/diffup_vs_prototype.md).

    # Weizmann horses: 'tune' = the first 128 images (for choosing settings), 'test' = the other 200
    python benchmarks/diffup_vs_prototype.py run --dataset horses --part test --shots 1 --support mask --out runs/dvp/h-test-mask-1
    # coco-mini, interleaved COCO-20i fold F (HSNet protocol seed 0, --skip-small-classes as in fsdiff eval)
    python benchmarks/diffup_vs_prototype.py run --dataset coco --fold 0 --shots 1 --episodes 1000 --out runs/dvp/c0-1
    # choose the prior check threshold on validation runs, then tabulate held-out runs
    python benchmarks/diffup_vs_prototype.py sweep runs/dvp/h-tune-* runs/dvp/c*-trn-*
    python benchmarks/diffup_vs_prototype.py table runs/dvp/h-test-* runs/dvp/c[0-3]-[15]
    python benchmarks/diffup_vs_prototype.py table --pool "coco, 1-shot, folds 0-3" runs/dvp/c[0-3]-1

``run`` scores every query with both methods (episode by episode, prototype first, each with its own
feature cache, as two ``fsdiff eval`` runs would) and writes ``episodes.csv`` (per query: class, areas of
both methods, seconds of both, DiffUp's prior check score, whether its decoder ran, and with
``--record-decoder`` the areas of the decoder's own sample on every query, untimed) plus ``summary.json``.
Horse episodes: each image of the part is a query once, its supports drawn from the same part (seed 0,
without replacement); ``--save-episodes FILE`` writes them as an fsdiff episode list, so
``fsdiff eval --dataset folder --episode-list FILE`` scores the same episodes. ``sweep`` re-scores DiffUp
for a range of prior check thresholds from recorded runs; ``table`` prints the paired comparison: mIoU of
both, the mean difference with a seeded 95% bootstrap interval (over episodes for the one-class horses,
ratio of summed areas; over classes for coco, as benchmarks/paired.py) and the time ratio DiffUp / prototype.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch

HORSES = Path(os.environ.get("FSDIFF_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
TUNE_IMAGES = 128
"""The first 128 horse images (sorted names) form the tuning part; the rest (200) the test part."""
FIELDS = ["episode", "class_id", "query", "p_inter", "p_union", "p_bg_inter", "p_bg_union", "d_inter", "d_union",
          "d_bg_inter", "d_bg_union", "p_seconds", "d_seconds", "check", "decoded", "dec_inter", "dec_union",
          "dec_bg_inter", "dec_bg_union"]


def horse_specs(source, part: str, shots: int, seed: int = 0) -> list:
    """Episodes of one horse part: every image once as the query, ``shots`` others of the part as supports."""
    from fsdiff.data.sampler import EpisodeSpec

    keys = source.images_of_class(0)
    sub = keys[:TUNE_IMAGES] if part == "tune" else keys[TUNE_IMAGES:]
    rng = np.random.RandomState(seed)
    specs = []
    for i, q in enumerate(sub):
        others = [k for k in sub if k != q]
        sup = tuple(others[j] for j in rng.choice(len(others), shots, replace=False))
        specs.append(EpisodeSpec(f"{part}-{i:05d}", 0, (q,), sup))
    return specs


def open_episodes(args) -> tuple[object, list, dict]:
    """(source, episode specs, benchmark dict for the DiffUp checkpoint choice)."""
    from fsdiff.api import open_source
    from fsdiff.data.sampler import episode_meta, sample_episodes, save_episode_list

    if args.dataset == "horses":
        source = open_source("folder", args.data or HORSES / "weizmann-horse")
        specs = horse_specs(source, args.part, args.shots)
        bench = dict(dataset="folder")
    else:
        source = open_source("coco", args.data or HORSES / "coco-mini", fold=args.fold, split=args.split)
        source.classes = [(c, n) for c, n in source.classes if len(source.images_of_class(c)) > args.shots]
        specs = sample_episodes(source, "hsnet", args.episodes, args.shots, 0)
        bench = dict(dataset="coco", fold=args.fold, convention="interleaved")
    if args.episodes and args.dataset == "horses":
        specs = specs[: args.episodes]
    if args.save_episodes:
        save_episode_list(args.save_episodes, specs, episode_meta(source, "hsnet", args.shots, 0,
                                                                  part=getattr(args, "part", None)))
    return source, specs, bench


def _areas(prob: np.ndarray, gt: np.ndarray, threshold: float) -> tuple[int, int, int, int]:
    """(fg inter, fg union, bg inter, bg union) of one query, as ``fsdiff eval`` scores it."""
    from fsdiff.metrics import intersection_and_union, resize_for_scoring

    p, g = resize_for_scoring(prob, gt, "original")
    inter, union = intersection_and_union(p > threshold, g)
    return int(inter[1]), int(union[1]), int(inter[0]), int(union[0])


def run(args) -> int:
    """Score both methods on the episodes; write episodes.csv and summary.json."""
    from fsdiff.api import build_segmenter
    from fsdiff.data.sampler import build_episode
    from fsdiff.synth import convert_supports

    torch.set_num_threads(args.threads)
    extra = {}
    for kv in args.method_arg:
        k, v = kv.split("=", 1)
        extra[k] = json.loads(v) if v[:1] in "0123456789-[{tfn" else v
    source, specs, bench = open_episodes(args)
    proto = build_segmenter("prototype", benchmark=bench)
    diffup = build_segmenter("diffup", benchmark=bench, **extra)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    warm = convert_supports(build_episode(source, specs[0]), args.support, 0)
    for seg in (proto, diffup):  # first-call costs (weights to memory, kernels) are not per-episode costs
        seg.predict(warm)
        seg.cache.clear()
    rows = []
    load = [os.getloadavg()[0]]
    t_run = time.perf_counter()
    for n, spec in enumerate(specs):
        ep = convert_supports(build_episode(source, spec), args.support, 0)
        t0 = time.perf_counter()
        p_probs = proto.predict(ep)
        t1 = time.perf_counter()
        d_preds = diffup.predict_with_uncertainty(ep)
        t2 = time.perf_counter()
        nq = len(ep.queries)
        dec = [None] * nq
        if args.record_decoder:  # the decoder's own sample where the prior check skipped it (untimed)
            skipped = [i for i, p in enumerate(d_preds) if not p.decoded]
            if skipped:
                import dataclasses

                sub = dataclasses.replace(ep, queries=tuple(ep.queries[i] for i in skipped))
                for i, pred in zip(skipped, diffup._decode(sub)):
                    dec[i] = pred.prob
            for i, p in enumerate(d_preds):
                if p.decoded:
                    dec[i] = p.prob
        for i, q in enumerate(ep.queries):
            pa = _areas(p_probs[i], q.gt, proto.threshold)
            da = _areas(d_preds[i].prob, q.gt, diffup.threshold)
            ca = _areas(dec[i], q.gt, diffup.threshold) if dec[i] is not None else ("", "", "", "")
            rows.append(dict(zip(FIELDS, [spec.episode_id, int(ep.class_id), q.image_id, *pa, *da,
                                          f"{(t1 - t0) / nq:.5f}", f"{(t2 - t1) / nq:.5f}",
                                          "" if d_preds[i].check is None else f"{d_preds[i].check:.4f}",
                                          int(d_preds[i].decoded), *ca])))
        if n % 25 == 0:
            load.append(os.getloadavg()[0])
            if args.progress:
                print(f"{n}/{len(specs)}", file=sys.stderr, flush=True)
    load.append(os.getloadavg()[0])
    with (out / "episodes.csv").open("w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=FIELDS)
        w.writeheader()
        w.writerows(rows)
    summary = dict(
        date=str(date.today()), command=" ".join(sys.argv), args=vars(args), seconds=time.perf_counter() - t_run,
        machine=f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
                f"{torch.get_num_threads()} thread(s)",
        load_average=[round(v, 2) for v in (min(load), max(load))],
        diffup_settings=dict(checkpoint=str(diffup.checkpoint), steps=diffup.steps, input_size=diffup.input_size,
                             prior_gate=diffup.prior_gate),
        **score(rows),
    )
    (out / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    print(json.dumps({k: summary[k] for k in ("prototype", "diffup", "time_ratio", "decoded")}))
    return 0


# ----------------------------------------------------------------------------------------------------
# scoring
# ----------------------------------------------------------------------------------------------------
def _num(rows: list[dict], key: str) -> np.ndarray:
    return np.array([float(r[key]) for r in rows], np.float64)


def miou_of(rows: list[dict], prefix: str) -> float:
    """mIoU (%) as FssMeter computes it: per class summed fg inter / union, mean over the classes present."""
    classes = sorted({int(r["class_id"]) for r in rows})
    cls = np.array([int(r["class_id"]) for r in rows])
    inter, union = _num(rows, prefix + "_inter"), _num(rows, prefix + "_union")
    return float(np.mean([100 * inter[cls == c].sum() / max(union[cls == c].sum(), 1) for c in classes]))


def fbiou_of(rows: list[dict], prefix: str) -> float:
    """FB-IoU (%): mean of the pooled bg and fg IoU."""
    fg = _num(rows, prefix + "_inter").sum() / max(_num(rows, prefix + "_union").sum(), 1)
    bg = _num(rows, prefix + "_bg_inter").sum() / max(_num(rows, prefix + "_bg_union").sum(), 1)
    return float(50 * (fg + bg))


def paired(rows: list[dict], a: str = "p", b: str = "d", resamples: int = 10000, seed: int = 0) -> dict:
    """b − a in mIoU with a seeded percentile bootstrap 95% interval: over classes when there are several
    (per-class IoU pairs), else over episodes (ratio of summed areas recomputed per resample)."""
    cls = np.array([int(r["class_id"]) for r in rows])
    classes = sorted(set(cls.tolist()))
    rng = np.random.default_rng(seed)
    if len(classes) > 1:
        def per_class(p: str) -> np.ndarray:
            i, u = _num(rows, p + "_inter"), _num(rows, p + "_union")
            return np.array([100 * i[cls == c].sum() / max(u[cls == c].sum(), 1) for c in classes])
        da, db = per_class(a), per_class(b)
        diff = db - da
        means = diff[rng.integers(0, diff.size, size=(resamples, diff.size))].mean(axis=1)
        unit, wins, losses = "classes", int((diff > 0).sum()), int((diff < 0).sum())
        n = diff.size
    else:
        ep = np.array([r["episode"] for r in rows])
        eps = sorted(set(ep.tolist()))
        idx = {e: k for k, e in enumerate(eps)}
        k = np.array([idx[e] for e in ep])
        sums = {}
        for p in (a, b):
            sums[p] = (np.bincount(k, _num(rows, p + "_inter"), len(eps)), np.bincount(k, _num(rows, p + "_union"), len(eps)))
        pick = rng.integers(0, len(eps), size=(resamples, len(eps)))
        ratio = {p: 100 * s[0][pick].sum(1) / np.maximum(s[1][pick].sum(1), 1) for p, s in sums.items()}
        means = ratio[b] - ratio[a]
        per_a = sums[a][0] / np.maximum(sums[a][1], 1)
        per_b = sums[b][0] / np.maximum(sums[b][1], 1)
        unit, wins, losses, n = "episodes", int((per_b > per_a).sum()), int((per_b < per_a).sum()), len(eps)
        diff = np.array([miou_of(rows, b) - miou_of(rows, a)])
    low, high = np.percentile(means, [2.5, 97.5])
    return dict(diff=float(diff.mean()), low=float(low), high=float(high), unit=unit, n=int(n), wins=wins,
                losses=losses)


def score(rows: list[dict]) -> dict:
    """Both methods' mIoU / FB-IoU, the paired difference, the time ratio and the decoded share."""
    pt, dt = _num(rows, "p_seconds").sum(), _num(rows, "d_seconds").sum()
    out = dict(
        queries=len(rows), episodes=len({r["episode"] for r in rows}),
        prototype=dict(miou=miou_of(rows, "p"), fbiou=fbiou_of(rows, "p"), seconds_per_query=pt / len(rows)),
        diffup=dict(miou=miou_of(rows, "d"), fbiou=fbiou_of(rows, "d"), seconds_per_query=dt / len(rows)),
        paired=paired(rows), time_ratio=float(dt / max(pt, 1e-9)),
        decoded=float(np.mean([int(r["decoded"]) for r in rows])),
    )
    if all(r.get("dec_inter", "") != "" for r in rows):
        out["decoder_always"] = dict(miou=miou_of(rows, "dec"), fbiou=fbiou_of(rows, "dec"), paired=paired(rows, "p", "dec"))
    return out


def read_rows(folder: Path) -> list[dict]:
    """The per-query rows of one run folder."""
    with (folder / "episodes.csv").open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def gated(rows: list[dict], tau: float | None) -> list[dict]:
    """Rows re-scored as DiffUp with prior check threshold ``tau`` (None: decoder on every query)."""
    out = []
    for r in rows:
        r = dict(r)
        use_dec = tau is None or float(r["check"] or 0.0) < tau
        for k in ("inter", "union", "bg_inter", "bg_union"):
            r["d_" + k] = r["dec_" + k] if use_dec else r["p_" + k]
        r["decoded"] = int(use_dec)
        out.append(r)
    return out


def sweep(args) -> int:
    """DiffUp − prototype per validation run for a range of thresholds (runs need --record-decoder)."""
    taus = [None] + [round(t, 2) for t in np.arange(0.0, 1.0001, 0.05)]
    runs = {Path(f).name: read_rows(Path(f)) for f in args.folders}
    print("| threshold | " + " | ".join(runs) + " | worst | mean |")
    print("|---" * (len(runs) + 3) + "|")
    for tau in taus:
        diffs = [paired(gated(rows, tau), resamples=1)["diff"] for rows in runs.values()]
        dec = [np.mean([int(r["decoded"]) for r in gated(rows, tau)]) for rows in runs.values()]
        cells = [f"{d:+.2f} ({100 * s:.0f}%)" for d, s in zip(diffs, dec)]
        print(f"| {'off' if tau is None else tau} | " + " | ".join(cells) + f" | {min(diffs):+.2f} | {np.mean(diffs):+.2f} |")
    return 0


def table(args) -> int:
    """The paired comparison of held-out runs as a Markdown table."""
    print("| run | queries | prototype mIoU | DiffUp mIoU | DiffUp − prototype (95% CI) | wins / losses | "
          "decoded | time DiffUp / prototype |")
    print("|---|---|---|---|---|---|---|---|")
    runs = [(Path(f).name, read_rows(Path(f))) for f in args.folders]
    if args.pool:  # one row for all the folders (coco folds have disjoint classes)
        runs = [(args.pool, [dict(r, episode=f"{name}/{r['episode']}") for name, rows in runs for r in rows])]
    for name, rows in runs:
        s = score(rows)
        pr = s["paired"]
        print(f"| {name} | {s['queries']} | {s['prototype']['miou']:.2f} | {s['diffup']['miou']:.2f} | "
              f"{pr['diff']:+.2f} ({pr['low']:+.2f} .. {pr['high']:+.2f}) | {pr['wins']} / {pr['losses']} {pr['unit']} | "
              f"{100 * s['decoded']:.0f}% | {s['time_ratio']:.2f}x |")
    return 0


def main() -> int:
    """Parse the subcommand and run it."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--dataset", choices=["horses", "coco"], required=True)
    r.add_argument("--data", default=None, help="dataset folder (default: ../shared/data/<weizmann-horse|coco-mini>)")
    r.add_argument("--part", choices=["tune", "test"], default="test", help="horses: which part of the images")
    r.add_argument("--fold", type=int, default=0)
    r.add_argument("--split", choices=["trn"], default=None, help="coco: score the fold's base classes (validation)")
    r.add_argument("--shots", type=int, default=1)
    r.add_argument("--episodes", type=int, default=None, help="coco: HSNet episodes (default 1000); horses: first N")
    r.add_argument("--support", choices=["mask", "box", "scribble"], default="mask")
    r.add_argument("--method-arg", action="append", default=[], metavar="KEY=VALUE", help="extra DiffUp argument")
    r.add_argument("--record-decoder", action="store_true", help="also record the decoder's sample on every query")
    r.add_argument("--save-episodes", default=None)
    r.add_argument("--threads", type=int, default=1)
    r.add_argument("--progress", action="store_true")
    r.add_argument("--out", required=True)
    for name in ("sweep", "table"):
        s = sub.add_parser(name)
        s.add_argument("folders", nargs="+")
        if name == "table":
            s.add_argument("--pool", default=None, metavar="NAME", help="one pooled row named NAME for all folders")
    args = ap.parse_args()
    if args.cmd == "run" and args.dataset == "coco" and args.episodes is None:
        args.episodes = 1000
    return {"run": run, "sweep": sweep, "table": table}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
