"""Benchmark: does edge-aware refinement (fsdiff.refine) of a method's probability maps help, and what does it cost?

``run`` predicts every episode once with a method (default ``prototype``, efficientnet-lite0) and scores the
raw map and every refinement config on it, so all configs are compared on identical predictions. Per episode
it records the foreground / background intersection and union of each config, the method's predict time and
each refinement's time, wall-clock and process CPU time (same process, one torch and one OpenCV thread). ``report`` pools the records into mIoU and FB-IoU per
setting, each config's paired difference to ``off`` with a seeded 95% bootstrap interval (over classes for
the mIoU of a multi-class benchmark, over episodes for a one-class folder and for FB-IoU), and the refinement
time as a fraction of the predict time.

    python benchmarks/refine.py run --dataset horses --shots 1 5 --supports mask box scribble --episodes 200 \\
        --configs off guided guided:domain=logit --out runs/refine/horses --threads 1
    python benchmarks/refine.py run --dataset coco --folds 0 1 2 3 --shots 1 5 --episodes 300 \\
        --configs off guided --out runs/refine/coco --threads 1
    python benchmarks/refine.py report runs/refine/horses runs/refine/coco
    python benchmarks/refine.py cost --configs guided grabcut     # CPU time on one photo at 0.1 to 12 megapixels

``--split trn`` scores coco's base classes (a validation set to choose the config on); ``--method diffup``
uses the shipped checkpoint that never saw the benchmark fold's classes (``--fold-checkpoint 1`` for the
horses: horse is COCO-20i class 17, in interleaved fold 1).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import cv2
import numpy as np
import torch

from fsdiff.api import build_segmenter, open_source
from fsdiff.data import FolderSource, build_episode, sample_episodes
from fsdiff.metrics import intersection_and_union
from fsdiff.refine import parse_refine, refine
from fsdiff.synth import convert_supports

sys.path.insert(0, str(Path(__file__).resolve().parent))
from paired import paired_stats  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
DEFAULT_CONFIGS = ["off", "guided"]


def _source(args, fold: int):
    if args.dataset == "horses":
        return FolderSource(args.data or DATA / "weizmann-horse")
    return open_source("coco", args.data or DATA / "coco-mini", fold=fold, split=args.split)


def run(args) -> int:
    """Predict every episode once, refine with every config, and write one JSON of records per setting."""
    torch.set_num_threads(args.threads)
    cv2.setNumThreads(args.threads)
    configs = [parse_refine(c) for c in args.configs]
    specs_text = [c.spec() for c in configs]
    if "off" not in specs_text:
        raise SystemExit("refine run: --configs must include 'off' (the unrefined baseline).")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    folds = [0] if args.dataset == "horses" else args.folds
    seg = None
    for fold in folds:
        ckpt_fold = args.fold_checkpoint if args.fold_checkpoint is not None else fold
        if seg is None or args.method == "diffup":
            bench = dict(dataset="coco", fold=ckpt_fold) if (args.dataset == "coco" or args.fold_checkpoint is not None) else None
            seg = build_segmenter(args.method, encoder=args.encoder, benchmark=bench)
        threshold = float(getattr(seg, "threshold", 0.5))
        for shots in args.shots:
            source = _source(args, fold)
            if args.dataset == "coco":  # as benchmarks/coco_mini.py: skip classes with <= shots images
                source.classes = [(c, n) for c, n in source.classes if len(source.images_of_class(c)) > shots]
            specs = sample_episodes(source, "hsnet", args.episodes, shots, args.seed)
            names = {c: source.class_name(c) for c in source.class_ids()}
            for kind in args.supports:
                path = out / f"{args.dataset}-{args.method}-{kind}-{shots}shot-fold{fold}.json"
                cache = getattr(seg, "cache", None)
                if cache is not None:  # each setting starts cold (the supports loop replays the same images)
                    cache.clear()
                    if args.no_cache:
                        cache.max_bytes = 0
                records = []
                t_start = time.perf_counter()
                for spec in specs:
                    ep = convert_supports(build_episode(source, spec, names.get(spec.class_id)), kind, args.seed)
                    t0, c0 = time.perf_counter(), time.process_time()
                    probs = seg.predict(ep)
                    t_pred, c_pred = time.perf_counter() - t0, time.process_time() - c0
                    iu = np.zeros((len(configs), 4), np.int64)
                    t_ref = np.zeros(len(configs))
                    c_ref = np.zeros(len(configs))
                    for q, prob in zip(ep.queries, probs):
                        for k, cfg in enumerate(configs):
                            t0, c0 = time.perf_counter(), time.process_time()
                            r = refine(q.image, prob, cfg)
                            t_ref[k] += time.perf_counter() - t0
                            c_ref[k] += time.process_time() - c0
                            inter, union = intersection_and_union(r > threshold, q.gt)
                            iu[k] += [inter[1], union[1], inter[0], union[0]]
                    records.append({"id": spec.episode_id, "class_id": int(spec.class_id), "predict_s": t_pred,
                                    "refine_s": [round(float(t), 6) for t in t_ref], "predict_cpu_s": c_pred,
                                    "refine_cpu_s": [round(float(t), 6) for t in c_ref], "iu": iu.tolist()})
                doc = {
                    "dataset": args.dataset, "method": args.method, "encoder": getattr(seg, "encoder_name", args.encoder),
                    "support": kind, "shots": shots, "fold": fold, "split": args.split or "val", "seed": args.seed,
                    "threshold": threshold, "feature_cache": not args.no_cache, "configs": specs_text, "classes": {int(c): n for c, n in names.items()},
                    "seconds": time.perf_counter() - t_start, "machine": _machine(args.threads),
                    "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "load_avg": os.getloadavg(),
                    "records": records,
                }
                path.write_text(json.dumps(doc))
                print(f"{path.name}: {len(records)} episodes, {doc['seconds']:.0f} s, load {doc['load_avg'][0]:.2f}",
                      file=sys.stderr, flush=True)
    return 0


def cost(args) -> int:
    """Time predict (1-shot, features not cached) and refine on one real photo resized to each size; print a table."""
    from fsdiff.episode import Episode, MaskAnnotation, Query, Shot
    from fsdiff.io import read_image, read_mask

    torch.set_num_threads(args.threads)
    cv2.setNumThreads(args.threads)
    root = Path(args.data or DATA / "weizmann-horse")
    names = sorted(p.stem for p in (root / "images").iterdir())[:2]
    imgs = [read_image(root / "images" / f"{n}.jpg") for n in names]
    masks = [read_mask(root / "masks" / f"{n}.png") for n in names]
    seg = build_segmenter("prototype", encoder=args.encoder)
    seg.cache.max_bytes = 0  # a segment call encodes every image
    configs = [parse_refine(c) for c in args.configs]
    print(f"machine: {_machine(args.threads)}; load {os.getloadavg()[0]:.2f}; median of {args.reps} runs (CPU ms)\n")
    print("| query size | predict | " + " | ".join(c.spec() for c in configs) + " |")
    print("|---|---|" + "---|" * len(configs))
    for size in args.sizes:
        w, h = (int(v) for v in size.split("x"))
        q_img = cv2.resize(imgs[1], (w, h), interpolation=cv2.INTER_LINEAR)
        ep = Episode(0, "horse", (Shot(imgs[0], MaskAnnotation(masks[0])),), (Query(q_img),))
        t_pred, t_ref = [], [[] for _ in configs]
        for _ in range(args.reps):
            c0 = time.process_time()
            prob = seg.predict(ep)[0]
            t_pred.append(time.process_time() - c0)
            for k, cfg in enumerate(configs):
                c0 = time.process_time()
                refine(q_img, prob, cfg)
                t_ref[k].append(time.process_time() - c0)
        pm = 1000 * float(np.median(t_pred))
        cells = [f"{1000 * float(np.median(t)):.0f} ({np.median(t) / np.median(t_pred):.2f})" for t in t_ref]
        print(f"| {w}x{h} | {pm:.0f} | " + " | ".join(cells) + " |")
    return 0


def _machine(threads: int) -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {threads} thread(s)"


def _iou(inter: np.ndarray, union: np.ndarray) -> np.ndarray:
    return 100.0 * inter / np.maximum(union, 1)


def _group(docs: list[dict]) -> dict:
    groups: dict = {}
    for d in docs:
        groups.setdefault((d["dataset"], d["method"], d["split"], d["support"], d["shots"]), []).append(d)
    return groups


def summarise(docs: list[dict], resamples: int = 10000, seed: int = 0) -> list[dict]:
    """One row per (setting, config): mIoU, FB-IoU, paired differences to 'off' with bootstrap intervals, cost."""
    rows = []
    rng_seed = seed
    for key, group in sorted(_group(docs).items()):
        configs = group[0]["configs"]
        if any(d["configs"] != configs for d in group):
            raise SystemExit(f"report: the runs of {key} used different config lists.")
        base = configs.index("off")
        # per fold arrays: iu (episodes, configs, 4), class ids, times
        folds = []
        for d in sorted(group, key=lambda d: d["fold"]):
            iu = np.array([r["iu"] for r in d["records"]], np.int64)
            cls = np.array([r["class_id"] for r in d["records"]])
            folds.append({"fold": d["fold"], "iu": iu, "cls": cls, "classes": sorted(int(c) for c in d["classes"]),
                          "pred": np.array([r["predict_s"] for r in d["records"]]),
                          "ref": np.array([r["refine_s"] for r in d["records"]]),
                          "pred_cpu": np.array([r.get("predict_cpu_s", np.nan) for r in d["records"]]),
                          "ref_cpu": np.array([r.get("refine_cpu_s", [np.nan] * len(configs)) for r in d["records"]])})
        multi_class = sum(len(f["classes"]) for f in folds) > 1

        def per_class(f, iu):
            """{(fold, class): IoU of every config} pooled over the class's episodes (classes with episodes only)."""
            out = {}
            for c in f["classes"]:
                sel = f["cls"] == c
                if sel.any():
                    out[(f["fold"], c)] = _iou(iu[sel, :, 0].sum(0), iu[sel, :, 1].sum(0))
            return out

        def fbiou(f, iu):
            s = iu.sum(0)
            return 0.5 * (_iou(s[:, 0], s[:, 1]) + _iou(s[:, 2], s[:, 3]))

        pcs = {}
        for f in folds:
            pcs.update(per_class(f, f["iu"]))
        keys = sorted(pcs)
        pc = np.array([pcs[k] for k in keys])  # (classes, configs)
        miou = pc.mean(0)
        fb = np.mean([fbiou(f, f["iu"]) for f in folds], axis=0)
        rng = np.random.default_rng(rng_seed)
        # episode bootstrap, stratified by fold: FB-IoU (and mIoU of a one-class benchmark)
        boot_fb, boot_mi = [], []
        for _ in range(resamples // 5):
            fbs, pcb = [], {}
            for f in folds:
                idx = rng.integers(0, len(f["iu"]), len(f["iu"]))
                iu = f["iu"][idx]
                fbs.append(fbiou(f, iu))
                if not multi_class:
                    pcb.update(per_class({**f, "cls": f["cls"][idx]}, iu))
            fb_b = np.mean(fbs, axis=0)
            boot_fb.append(fb_b - fb_b[base])
            if not multi_class:
                m = np.array([pcb.get(k, pc[0] * 0) for k in keys]).mean(0)
                boot_mi.append(m - m[base])
        boot_fb, boot_mi = np.array(boot_fb), np.array(boot_mi) if boot_mi else None
        pred = np.concatenate([f["pred"] for f in folds])
        ref = np.concatenate([f["ref"] for f in folds])
        pred_cpu = np.concatenate([f["pred_cpu"] for f in folds])
        ref_cpu = np.concatenate([f["ref_cpu"] for f in folds])
        for k, spec in enumerate(configs):
            row = {"dataset": key[0], "method": key[1], "split": key[2], "support": key[3], "shots": key[4],
                   "config": spec, "folds": [f["fold"] for f in folds], "episodes": int(len(pred)),
                   "classes": len(keys), "miou": float(miou[k]), "fbiou": float(fb[k]),
                   "d_fbiou": float(fb[k] - fb[base]),
                   "fbiou_low": float(np.percentile(boot_fb[:, k], 2.5)), "fbiou_high": float(np.percentile(boot_fb[:, k], 97.5)),
                   "predict_ms": 1000 * float(pred.mean()), "refine_ms": 1000 * float(ref[:, k].mean()),
                   "cost_ratio": float(ref[:, k].sum() / pred.sum()),
                   "cost_ratio_cpu": float(ref_cpu[:, k].sum() / pred_cpu.sum())}
            if multi_class:
                st = paired_stats(pc[:, base], pc[:, k], resamples=resamples, seed=seed)
                row.update(d_miou=st["diff"], miou_low=st["low"], miou_high=st["high"], wins=st["wins"], losses=st["losses"],
                           interval="classes")
            else:
                d = boot_mi[:, k]
                ep_diff = np.concatenate([_iou(f["iu"][:, k, 0], f["iu"][:, k, 1]) - _iou(f["iu"][:, base, 0], f["iu"][:, base, 1])
                                          for f in folds])
                row.update(d_miou=float(miou[k] - miou[base]), miou_low=float(np.percentile(d, 2.5)),
                           miou_high=float(np.percentile(d, 97.5)), wins=int((ep_diff > 0).sum()),
                           losses=int((ep_diff < 0).sum()), interval="episodes")
            rows.append(row)
    return rows


def report(args) -> int:
    """Print the markdown table of every setting in the given run folders (and write it as JSON with --json)."""
    docs = []
    for folder in args.folders:
        found = sorted(Path(folder).glob("*.json"))
        if not found:
            raise SystemExit(f"report: {folder} holds no run JSON; give folders written by 'refine.py run'.")
        for p in found:
            d = json.loads(p.read_text())
            if "records" in d:
                docs.append(d)
    rows = summarise(docs, resamples=args.resamples)
    if args.only:
        rows = [r for r in rows if r["config"] in args.only]
    print("| data | method | split | support | shots | config | episodes | mIoU | Δ mIoU [95% CI] | W/L | FB-IoU | Δ FB-IoU [95% CI] | refine ms | predict ms | cost (wall) | cost (CPU) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        off = r["config"] == "off"
        dm = "" if off else f"{r['d_miou']:+.2f} [{r['miou_low']:+.2f}, {r['miou_high']:+.2f}]"
        df = "" if off else f"{r['d_fbiou']:+.2f} [{r['fbiou_low']:+.2f}, {r['fbiou_high']:+.2f}]"
        wl = "" if off else f"{r['wins']}/{r['losses']}"
        cost = "" if off else f"{r['cost_ratio']:.2f} | {r['cost_ratio_cpu']:.2f}"
        print(f"| {r['dataset']} | {r['method']} | {r['split']} | {r['support']} | {r['shots']} | {r['config']} | "
              f"{r['episodes']} | {r['miou']:.2f} | {dm} | {wl} | {r['fbiou']:.2f} | {df} | {r['refine_ms']:.1f} | "
              f"{r['predict_ms']:.0f} | {cost if cost else ' | '} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Parse the sub-command and run it."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="predict, refine with every config, record per-episode scores and times")
    r.add_argument("--dataset", choices=["horses", "coco"], required=True)
    r.add_argument("--data", default=None, help="data root (default: ../shared/data/weizmann-horse or coco-mini)")
    r.add_argument("--method", default="prototype")
    r.add_argument("--encoder", default="efficientnet-lite0")
    r.add_argument("--fold-checkpoint", type=int, default=None,
                   help="horses with a trained method: the COCO-20i fold whose checkpoint to use (1 never saw horses)")
    r.add_argument("--shots", type=int, nargs="+", default=[1, 5])
    r.add_argument("--supports", nargs="+", default=["mask"], choices=["mask", "box", "scribble"])
    r.add_argument("--folds", type=int, nargs="+", default=[0, 1, 2, 3])
    r.add_argument("--split", choices=["trn"], default=None, help="coco: score the base classes (validation)")
    r.add_argument("--episodes", type=int, default=200)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS, help="refine specs, e.g. off guided:radius=16")
    r.add_argument("--out", required=True)
    r.add_argument("--threads", type=int, default=1)
    r.add_argument("--no-cache", action="store_true",
                   help="encode every image in every episode (a segment call's cost) instead of caching features as eval does")
    p = sub.add_parser("report", help="markdown table of run folders")
    p.add_argument("folders", nargs="+")
    p.add_argument("--only", nargs="+", default=None, help="configs to show")
    p.add_argument("--resamples", type=int, default=10000)
    p.add_argument("--json", default=None)
    c = sub.add_parser("cost", help="CPU time of predict and refine on one photo resized to several sizes")
    c.add_argument("--data", default=None, help="a folder dataset (default: ../shared/data/weizmann-horse)")
    c.add_argument("--encoder", default="efficientnet-lite0")
    c.add_argument("--sizes", nargs="+", default=["400x300", "640x480", "1600x1200", "4000x3000"], help="WxH")
    c.add_argument("--configs", nargs="+", default=["guided"])
    c.add_argument("--reps", type=int, default=5)
    c.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    return {"run": run, "report": report, "cost": cost}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
