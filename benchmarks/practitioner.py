"""The practitioner's table (issue #13): every method and support kind, with and without edge refinement, on
identical episodes, paired.

``run`` samples each fold's episodes once (HSNet protocol, seed 0), turns every support mask into each
support kind with :func:`fsdiff.synth.convert_supports` (the same labels for every method), estimates the
weak supports' masks once (:class:`fsdiff.weaklabel.SupportMaskStep`, shared by the methods), predicts once
per method and kind, and scores the raw map and the refined one (:func:`fsdiff.refine.refine`) from that
same prediction. It writes one JSON line per (method, kind, episode) with the per-query intersections and
unions and the times. ``table`` turns the lines into markdown tables with paired bootstrap intervals
(over classes for coco-mini, over episodes for the one-class horses)::

    python benchmarks/practitioner.py run --dataset horse --shots 1 5 --episodes 120 --out runs/prac-horse
    python benchmarks/practitioner.py run --dataset coco --folds 0 1 2 3 --shots 1 5 --episodes 200 --out runs/prac-coco
    python benchmarks/practitioner.py table runs/prac-horse runs/prac-coco
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections import defaultdict
from datetime import date
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from paired import paired_stats  # noqa: E402

DATA = Path(os.environ.get("FSDIFF_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
KINDS = ("mask", "box", "scribble", "scribble-fgbg", "points")
LABEL = ":label"
"""Suffix of a kind run with ``--support-masks off``: the weak label used as it is (a box = its whole inside)."""
ROWS = KINDS + tuple(k + LABEL for k in KINDS[1:])


def _source(dataset: str, fold: int):
    from fsdiff.api import open_source

    if dataset == "horse":
        return open_source("folder", DATA / "weizmann-horse")
    return open_source("coco", DATA / "coco-mini", fold=fold)


def _methods(names, dataset: str, fold: int) -> dict:
    """The methods without support step or refiner (the benchmark applies both itself)."""
    from fsdiff.api import Segmenter

    bench = None if dataset == "horse" else {"dataset": "coco", "fold": fold}
    return {m: Segmenter(m, benchmark=bench, support_masks="off", refine="off") for m in names}


def _areas(prob: np.ndarray, gt: np.ndarray, threshold: float) -> list[int]:
    """[inter_bg, inter_fg, union_bg, union_fg] of one query at the original resolution."""
    from fsdiff.metrics import intersection_and_union, resize_for_scoring

    p, g = resize_for_scoring(prob, gt, "original")
    inter, union = intersection_and_union(p > threshold, g)
    return [int(inter[0]), int(inter[1]), int(union[0]), int(union[1])]


def run(args) -> None:
    """Predict and score every (fold, shots, kind, method) episode; append JSON lines to ``args.out``."""
    import torch

    from fsdiff.data import build_episode, sample_episodes
    from fsdiff.features import FeatureCache
    from fsdiff.refine import RefineConfig, refine
    from fsdiff.synth import convert_supports
    from fsdiff.weaklabel import SupportMaskStep

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    done = {_key(r) for r in _load([out])} if (out / "episodes.jsonl").exists() else set()
    log = open(out / "episodes.jsonl", "a", encoding="utf-8")  # a rerun resumes: finished episodes are skipped
    # off = no support step at all, exactly as Segmenter(support_masks='off') runs
    step = SupportMaskStep(memo=4096) if args.support_masks == "grabcut" else None
    config = RefineConfig()
    suffix = LABEL if args.support_masks == "off" else ""
    kinds = [k for k in args.kinds if not (suffix and k == "mask")]  # a mask is the same either way
    folds = [0] if args.dataset == "horse" else args.folds
    for fold in folds:
        source = _source(args.dataset, fold)
        source.classes = [(c, n) for c, n in source.classes if len(source.images_of_class(c)) > max(args.shots)]
        names = {c: source.class_name(c) for c in source.class_ids()}
        methods = _methods(args.methods, args.dataset, fold)
        for shots in args.shots:
            specs = sample_episodes(source, "hsnet", args.episodes, shots, 0)
            for kind in kinds:
                for seg in methods.values():  # each kind starts cold, as a separate `fsdiff eval` run would
                    seg.method.cache = FeatureCache()
                for spec in specs:
                    todo = {n: s for n, s in methods.items()
                            if _key({"fold": fold, "shots": shots, "kind": kind + suffix, "method": n,
                                     "episode": spec.episode_id}) not in done}
                    if not todo:
                        continue
                    episode = convert_supports(build_episode(source, spec, names.get(spec.class_id)), kind, 0)
                    t0 = time.process_time()
                    prepared = step(episode) if step is not None else episode
                    t_est = time.process_time() - t0
                    for name, seg in todo.items():
                        t0 = time.process_time()
                        probs = seg.predict_prepared(prepared)
                        t_pred = time.process_time() - t0
                        t0 = time.process_time()
                        refined = [refine(q.image, p, config) for q, p in zip(prepared.queries, probs)]
                        t_ref = time.process_time() - t0
                        thr = seg.threshold
                        rec = {"dataset": args.dataset, "fold": fold, "shots": shots, "kind": kind + suffix, "method": name,
                               "episode": spec.episode_id, "class": int(spec.class_id),
                               "raw": [_areas(p, q.gt, thr) for p, q in zip(probs, prepared.queries)],
                               "refined": [_areas(p, q.gt, thr) for p, q in zip(refined, prepared.queries)],
                               "t_estimate": t_est, "t_predict": t_pred, "t_refine": t_ref}
                        log.write(json.dumps(rec) + "\n")
                    log.flush()
                print(f"fold {fold} {shots}-shot {kind}: {len(specs)} episodes", file=sys.stderr, flush=True)
    meta = {"date": str(date.today()), "machine": f"{platform.processor() or platform.machine()}, "
            f"{os.cpu_count()} cores, torch {torch.__version__}, {args.threads} thread(s)",
            "loadavg": os.getloadavg(), "args": vars(args), "refine": config.spec(),
            "support_masks": step.spec if step is not None else "off"}
    (out / f"meta-{int(time.time())}.json").write_text(json.dumps(meta, indent=2))


# ----------------------------------------------------------------------------------------------------
# tables
# ----------------------------------------------------------------------------------------------------
def _key(rec: dict) -> tuple:
    return rec["fold"], rec["shots"], rec["kind"], rec["method"], rec["episode"]


def _load(folders) -> list[dict]:
    recs = []
    for folder in folders:
        for line in (Path(folder) / "episodes.jsonl").read_text().splitlines():
            recs.append(json.loads(line))
    return recs


def _unit_scores(recs: list[dict], field: str, per: str) -> dict:
    """Scores per unit: per class (summed areas -> IoU %, HSNet) or per episode (mean query fg IoU %)."""
    if per == "episode":
        return {(r["fold"], r["episode"]): float(np.mean([100 * a[1] / max(a[3], 1) for a in r[field]])) for r in recs}
    sums: dict = defaultdict(lambda: np.zeros(4, np.int64))
    for r in recs:
        for a in r[field]:
            sums[(r["fold"], r["class"])] += np.asarray(a)
    return {k: 100.0 * v[1] / max(v[3], 1) for k, v in sums.items()}


def _paired(a: dict, b: dict, seed: int = 0) -> tuple[float, float, float]:
    """Mean of b - a over shared units with the seeded bootstrap 95% interval of ``benchmarks/paired.py``."""
    keys = sorted(set(a) & set(b))
    st = paired_stats(np.array([a[k] for k in keys]), np.array([b[k] for k in keys]), seed=seed)
    return st["diff"], st["low"], st["high"]


def _fmt(t: tuple[float, float, float]) -> str:
    return f"{t[0]:+.2f} ({t[1]:+.2f} .. {t[2]:+.2f})"


def _group(recs: list[dict]) -> dict:
    """{(method, kind): {(fold, episode): record}} of one (dataset, shots) group."""
    out: dict = defaultdict(dict)
    for r in recs:
        out[r["method"], r["kind"]][r["fold"], r["episode"]] = r
    return out


def _compare(g: dict, a: tuple, b: tuple, per: str, field: str = "refined") -> tuple[float, float, float]:
    """Paired b - a over the units of the episodes both settings ran (identical episodes only)."""
    common = sorted(set(g[a]) & set(g[b]))
    sa = _unit_scores([g[a][e] for e in common], field, per)
    sb = _unit_scores([g[b][e] for e in common], field, per)
    return _paired(sa, sb)


def _miou(rows: list[dict], field: str, per: str) -> float:
    return float(np.mean(list(_unit_scores(rows, field, per).values())))


def table(folders) -> str:
    """Markdown tables: mIoU per method x kind (raw / refined), paired differences, time ratios."""
    recs = _load(folders)
    lines = []
    for dataset, shots in sorted({(r["dataset"], r["shots"]) for r in recs}):
        sel = [r for r in recs if r["dataset"] == dataset and r["shots"] == shots]
        per = "episode" if dataset == "horse" else "class"
        g = _group(sel)
        methods = sorted({m for m, _ in g})
        kinds = [k for k in ROWS if any(k == kk for _, kk in g)]
        lines += [f"### {dataset}, {shots}-shot (folds {sorted({r['fold'] for r in sel})}; identical episodes, "
                  f"paired per {per})", ""]
        lines += ["| method | support | episodes | mIoU refined | mIoU raw | refine gain | vs mask (refined) | "
                  "predict s/ep | refine / predict | estimate s/ep |", "|---|---|---|---|---|---|---|---|---|---|"]
        for m in methods:
            for k in kinds:
                rs = list(g[m, k].values())
                gain = _paired(_unit_scores(rs, "raw", per), _unit_scores(rs, "refined", per))
                vs = _fmt(_compare(g, (m, "mask"), (m, k), per)) if k != "mask" and (m, "mask") in g else ""
                tp, tr, te = (float(np.mean([r[f] for r in rs])) for f in ("t_predict", "t_refine", "t_estimate"))
                lines.append(f"| {m} | {k} | {len(rs)} | {_miou(rs, 'refined', per):.2f} | {_miou(rs, 'raw', per):.2f} "
                             f"| {_fmt(gain)} | {vs} | {tp:.3f} | {tr / tp:.2f} | {te:.3f} |")
        lines.append("")
        for m in methods:
            for k in (k for k in KINDS if k + LABEL in kinds and k in kinds):
                lines.append(f"- {m}, {k}: estimated support mask vs the label as it is: "
                             f"{_fmt(_compare(g, (m, k + LABEL), (m, k), per))}")
            if "scribble" in kinds and "scribble-fgbg" in kinds:
                lines.append(f"- {m}: background strokes vs foreground-only strokes: "
                             f"{_fmt(_compare(g, (m, 'scribble'), (m, 'scribble-fgbg'), per))}")
        if {"prototype", "diffup"} <= set(methods):
            for k in kinds:
                common = sorted(set(g["prototype", k]) & set(g["diffup", k]))
                t = {m: sum(g[m, k][e]["t_predict"] + g[m, k][e]["t_refine"] for e in common) for m in methods}
                lines.append(f"- {k}: diffup - prototype {_fmt(_compare(g, ('prototype', k), ('diffup', k), per))}; "
                             f"time ratio diffup / prototype {t['diffup'] / t['prototype']:.2f}x")
        lines.append("")
    return "\n".join(lines)


def main() -> int:
    """Command line: ``run`` or ``table``."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--dataset", choices=["horse", "coco"], required=True)
    r.add_argument("--folds", type=int, nargs="+", default=[0, 1, 2, 3])
    r.add_argument("--shots", type=int, nargs="+", default=[1, 5])
    r.add_argument("--episodes", type=int, default=120)
    r.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    r.add_argument("--support-masks", default="grabcut", choices=["grabcut", "off"],
                   help="off: use each weak label as it is (rows KIND:label)")
    r.add_argument("--methods", nargs="+", default=["prototype", "diffup"])
    r.add_argument("--threads", type=int, default=1)
    r.add_argument("--out", required=True)
    t = sub.add_parser("table")
    t.add_argument("folders", nargs="+")
    args = ap.parse_args()
    if args.cmd == "run":
        run(args)
    else:
        print(table(args.folders))
    return 0


if __name__ == "__main__":
    sys.exit(main())
