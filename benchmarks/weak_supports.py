"""Benchmark: estimating a support's object mask from a weak label (fsdiff.weaklabel), two ways.

``quality``: the IoU of the estimated support mask (its 1 pixels) with the true mask, per annotation kind
(box, scribble = one foreground stroke, scribble-fgbg = the same stroke plus background strokes, points =
1-3 clicks inside plus 0-2 outside), for several estimator configs and the raw label (``off``: the
label's own foreground region), on every Weizmann horse and on a seeded sample of coco-mini's
(image, class) pairs; with CPU time per support.

``e2e``: the ``prototype`` method (default settings, efficientnet-lite0) on identical episodes, supports
converted to each kind (:func:`fsdiff.synth.convert_supports`) and then left raw, estimated with each
config, or given as the true mask; Weizmann horses (a folder source, HSNet-style sampling) or coco-mini's
COCO-20i folds. Per-episode (horses) or per-class (coco) paired differences with a bootstrap interval;
coco mIoU is the mean over the classes that got at least one episode.

``oracle``: which estimation errors cost mIoU. The same episodes and method, with the default estimate and
edits of it: its missed object pixels or its false object pixels set to ignore using the true mask, or
label-only edits (the box's non-object pixels, a ring around the estimate, an inner band of it) ignored.

    python benchmarks/weak_supports.py quality --dataset horse --configs off default --out runs/wq-horse.json
    python benchmarks/weak_supports.py quality --dataset coco --sample 400 --configs off default
    python benchmarks/weak_supports.py e2e --dataset horse --shots 1 --episodes 120 --configs off default
    python benchmarks/weak_supports.py e2e --dataset coco --folds 0 1 2 3 --shots 1 --episodes 250
    python benchmarks/weak_supports.py e2e --dataset coco --episode-seed 7 --episodes 100 --configs default far_margin=0.1
    python benchmarks/weak_supports.py oracle --dataset coco --episode-seed 7 --episodes 100 --kinds box scribble

Settings are compared on a development draw (``--sample-seed 1``, ``--episode-seed 7``); reports use the
seed-0 draw. ``table --out A.json B.json`` joins the folds of runs split over processes.

A config is ``off``, ``default`` or ``key=value,key=value`` of :class:`fsdiff.weaklabel.WeakLabelConfig`
(values in JSON, e.g. ``features=null,iterations=3``).
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from paired import paired_stats  # noqa: E402

from fsdiff.features import FeatureCache  # noqa: E402
from fsdiff.synth import convert_supports, episode_rng, synthesize_annotation  # noqa: E402
from fsdiff.weaklabel import OFF, WeakLabelConfig, estimate_mask, estimate_supports  # noqa: E402

DATA = Path(os.environ.get("FSDIFF_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
KINDS = ("box", "scribble", "scribble-fgbg", "points")


def parse_config(spec: str) -> WeakLabelConfig:
    """``off``, ``default`` or ``key=value,...`` (JSON values) -> a WeakLabelConfig."""
    if spec == "off":
        return OFF
    if spec == "default":
        return WeakLabelConfig()
    kwargs = {}
    for item in spec.split(","):
        key, value = item.split("=", 1)
        try:
            kwargs[key] = json.loads(value)
        except json.JSONDecodeError:
            kwargs[key] = value
        if isinstance(kwargs[key], list):
            kwargs[key] = tuple(kwargs[key])
    return WeakLabelConfig(**kwargs)


def machine() -> dict:
    """CPU model, flags of interest, load average and date, for the results file."""
    model = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": model, "cores": os.cpu_count(), "loadavg": os.getloadavg(),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "torch_threads": torch.get_num_threads(), "opencv": cv2.__version__}


# ----------------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------------
def horse_items() -> list[tuple[str, np.ndarray, np.ndarray]]:
    """Every Weizmann horse: (key, image, {0,1} mask)."""
    from fsdiff.data.folder import FolderSource

    src = FolderSource(DATA / "weizmann-horse")
    return [(k, *src.load(k, 0)) for k in src.images_of_class(0)]


def coco_items(sample: int, seed: int = 0) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """A seeded sample of coco-mini's (image, class) pairs (all of them for ``sample`` <= 0)."""
    from fsdiff.data.coco import CocoSource

    src = CocoSource(root=DATA / "coco-mini", fold=None)
    pairs = src.query_items()
    if 0 < sample < len(pairs):
        idx = np.sort(np.random.default_rng(seed).choice(len(pairs), size=sample, replace=False))
        pairs = [pairs[i] for i in idx]
    return [(f"{key}:{cid}", *src.load(key, cid)) for key, cid in pairs]


def iou(pred: np.ndarray, gt: np.ndarray) -> float:
    """Foreground IoU of a bool prediction with a {0,1,255} mask (255 not scored)."""
    valid = gt != 255
    p, t = pred & valid, (gt == 1) & valid
    union = int((p | t).sum())
    return float((p & t).sum()) / union if union else 1.0


def precision_recall(pred: np.ndarray, gt: np.ndarray) -> tuple[float, float]:
    """(share of the predicted object pixels that are object, share of the object pixels predicted);
    255 pixels not scored, an empty side counts 1."""
    valid = gt != 255
    p, t = pred & valid, (gt == 1) & valid
    hit = float((p & t).sum())
    return (hit / p.sum() if p.any() else 1.0), (hit / t.sum() if t.any() else 1.0)


# ----------------------------------------------------------------------------------------------------
# quality
# ----------------------------------------------------------------------------------------------------
def run_quality(args) -> dict:
    """Support-mask IoU per (config, kind) and CPU time per support."""
    items = horse_items() if args.dataset == "horse" else coco_items(args.sample, args.sample_seed)
    items = items[:: args.stride]
    cache = FeatureCache(max_bytes=512 * 1024**2)
    anns = {k: [synthesize_annotation(m, k, episode_rng(args.seed, "weak-quality", key)) for key, _, m in items]
            for k in args.kinds}
    results: dict = {"machine": machine(), "dataset": args.dataset, "n": len(items), "rows": [],
                     "area": [float((m == 1).mean()) for _, _, m in items], "keys": [k for k, _, _ in items]}
    for spec in args.configs:
        cfg = parse_config(spec)
        for kind in args.kinds:
            ious, prec, rec, unc, cpu = [], [], [], [], []
            for (key, image, mask), ann in zip(items, anns[kind]):
                t0 = time.process_time()
                est = estimate_mask(image, ann, cfg, seed=0, cache=cache)
                cpu.append(time.process_time() - t0)
                ious.append(iou(est == 1, mask))
                p, r = precision_recall(est == 1, mask)
                prec.append(p)
                rec.append(r)
                unc.append(float((est == 255).mean()))
            row = {"config": spec, "kind": kind, "miou": float(np.mean(ious)), "ious": ious,
                   "precision": float(np.mean(prec)), "recall": float(np.mean(rec)),
                   "uncertain": float(np.mean(unc)), "cpu_s": float(np.mean(cpu)), "cpu_s_max": float(np.max(cpu))}
            results["rows"].append(row)
            print(f"{args.dataset} {kind:14s} {spec:40s} IoU {100 * row['miou']:5.1f}  "
                  f"P {100 * row['precision']:5.1f}  R {100 * row['recall']:5.1f}  ignore {row['uncertain']:.2f}  "
                  f"cpu {row['cpu_s']:.3f} s (max {row['cpu_s_max']:.2f})", flush=True)
    return results


def quality_table(results: dict) -> str:
    """Markdown: IoU (percent) per kind and config, with the paired difference to ``off``."""
    rows = results["rows"]
    kinds = list(dict.fromkeys(r["kind"] for r in rows))
    lines = ["| config | " + " | ".join(kinds) + " | CPU s / support |", "|---|" + "---|" * (len(kinds) + 1)]
    base = {r["kind"]: r for r in rows if r["config"] == "off"}
    for spec in dict.fromkeys(r["config"] for r in rows):
        cells, cpu = [], []
        for k in kinds:
            r = next((x for x in rows if x["config"] == spec and x["kind"] == k), None)
            if r is None:
                cells.append("")
                continue
            cell = f"{100 * r['miou']:.1f}"
            if k in base and spec != "off":
                s = paired_stats(np.array(base[k]["ious"]) * 100, np.array(r["ious"]) * 100)
                cell += f" ({s['diff']:+.1f}, {s['low']:+.1f}..{s['high']:+.1f})"
            cells.append(cell)
            cpu.append(r["cpu_s"])
        lines.append(f"| `{spec}` | " + " | ".join(cells) + f" | {np.mean(cpu):.2f} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# end to end
# ----------------------------------------------------------------------------------------------------
def _episodes(args, fold):
    from fsdiff.data.sampler import build_episode, sample_episodes

    if args.dataset == "horse":
        from fsdiff.data.folder import FolderSource

        source = FolderSource(DATA / "weizmann-horse")
    else:
        from fsdiff.api import open_source

        source = open_source("coco", DATA / "coco-mini", fold=fold)
        source.classes = [(c, n) for c, n in source.classes if len(source.images_of_class(c)) > args.shots]
    specs = sample_episodes(source, "hsnet", args.episodes, args.shots, args.episode_seed)
    names = dict(source.classes)
    return [build_episode(source, s, names.get(s.class_id)) for s in specs], source.class_ids()


def _score(seg, episode) -> list[tuple[int, int]]:
    """(intersection, union) of the foreground of every query of ``episode``."""
    out = []
    for q, prob in zip(episode.queries, seg.predict(episode)):
        valid = q.gt != 255
        p, t = (prob > seg.threshold) & valid, (q.gt == 1) & valid
        out.append((int((p & t).sum()), int((p | t).sum())))
    return out


def run_e2e(args) -> dict:
    """Prototype mIoU per (kind, support variant) on identical episodes; per-episode I/U kept for pairing."""
    from fsdiff.methods.prototype import PrototypeSegmenter

    seg = PrototypeSegmenter("efficientnet-lite0")
    est_cache = FeatureCache(max_bytes=256 * 1024**2)
    results: dict = {"machine": machine(), "dataset": args.dataset, "shots": args.shots, "runs": []}
    folds = args.folds if args.dataset == "coco" else [None]
    for fold in folds:
        episodes, class_ids = _episodes(args, fold)
        run = {"fold": fold, "class_ids": class_ids, "episodes": [e.episode_id for e in episodes],
               "classes": [int(e.class_id) for e in episodes], "variants": {}, "est_cpu_s": {}}
        variants = [("mask", None)] + [(k, c) for k in args.kinds for c in args.configs]
        for kind, spec in variants:
            name = "mask" if kind == "mask" else f"{kind}|{spec}"
            cfg = None if spec is None else parse_config(spec)
            iu, cpu = [], []
            t0 = time.perf_counter()
            for ep in episodes:
                if kind != "mask":
                    ep = convert_supports(ep, kind, seed=0)
                    if cfg is not None and cfg.method != "off":
                        c0 = time.process_time()
                        ep = estimate_supports(ep, cfg, cache=est_cache)
                        cpu.append((time.process_time() - c0) / ep.k)
                iu.append(_score(seg, ep))
            run["variants"][name] = iu
            run["est_cpu_s"][name] = float(np.mean(cpu)) if cpu else 0.0
            miou = _miou(iu, run["classes"], class_ids)
            print(f"{args.dataset} fold {fold} {args.shots}-shot {name:50s} mIoU {miou:5.1f}  "
                  f"({time.perf_counter() - t0:.0f} s, estimate {run['est_cpu_s'][name]:.2f} s/support)", flush=True)
        results["runs"].append(run)
    return results


# ----------------------------------------------------------------------------------------------------
# oracle: which estimation errors cost mIoU
# ----------------------------------------------------------------------------------------------------
def _ignored(est: np.ndarray, where: np.ndarray) -> np.ndarray:
    """``est`` with ``where`` set to ignore (255); unchanged if that would leave no object pixel."""
    out = est.copy()
    out[where] = 255
    return out if (out == 1).any() else est


def _inner_band(est: np.ndarray, frac: float = 0.05) -> np.ndarray:
    """The estimate's object pixels within ``frac`` * sqrt(object area) of its outline."""
    obj = (est == 1).astype(np.uint8)
    r = max(1, round(frac * float(np.sqrt(obj.sum()))))
    core = cv2.erode(obj, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))) > 0
    return (est == 1) & ~core


def oracle_masks(est: np.ndarray, truth: np.ndarray, label) -> dict[str, np.ndarray]:
    """The estimate and edits of it: its errors set to ignore using the true mask (``missed-ignored``,
    ``false-ignored``), or label-only edits a method could make (``box-inside-ignored``: the box's
    non-object pixels; ``ring-ignored``: 15 px around the object; ``inner-band-ignored``)."""
    from fsdiff.weaklabel import label_seeds

    obj, t = est == 1, truth == 1
    out = {"estimate": est, "missed-ignored": _ignored(est, ~obj & t),
           "false-ignored": _ignored(est, obj & (truth == 0)), "inner-band-ignored": _ignored(est, _inner_band(est))}
    box = label_seeds(label, est.shape)[2]
    if box is not None:
        out["box-inside-ignored"] = _ignored(est, ~obj & box)
    else:
        ring = cv2.dilate(obj.astype(np.uint8), cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (31, 31))) > 0
        out["ring-ignored"] = _ignored(est, ring & (est == 0))
    return out


def run_oracle(args) -> dict:
    """Prototype mIoU with the default estimate and the :func:`oracle_masks` edits of it, identical episodes."""
    import dataclasses

    from fsdiff.episode import MaskAnnotation
    from fsdiff.methods.prototype import PrototypeSegmenter

    seg = PrototypeSegmenter("efficientnet-lite0")
    cache, cfg = FeatureCache(max_bytes=256 * 1024**2), WeakLabelConfig()
    results: dict = {"machine": machine(), "dataset": args.dataset, "shots": args.shots, "runs": []}
    for fold in (args.folds if args.dataset == "coco" else [None]):
        episodes, class_ids = _episodes(args, fold)
        run = {"fold": fold, "class_ids": class_ids, "episodes": [e.episode_id for e in episodes],
               "classes": [int(e.class_id) for e in episodes], "variants": {}, "est_cpu_s": {}}
        for ep in episodes:
            sets: dict[str, list] = {"mask": [s.annotation.mask for s in ep.shots]}
            for kind in args.kinds:
                weak = convert_supports(ep, kind, seed=0)
                for shot, ws in zip(ep.shots, weak.shots):
                    est = estimate_mask(shot.image, ws.annotation, cfg, seed=0, cache=cache)
                    for name, m in oracle_masks(est, shot.annotation.mask, ws.annotation).items():
                        sets.setdefault(f"{kind}|{name}", []).append(m)
            for name, masks in sets.items():
                shots = tuple(dataclasses.replace(s, annotation=MaskAnnotation(m)) for s, m in zip(ep.shots, masks))
                run["variants"].setdefault(name, []).append(_score(seg, dataclasses.replace(ep, shots=shots)))
        for name, iu in run["variants"].items():
            run["est_cpu_s"][name] = 0.0
            print(f"{args.dataset} fold {fold} {args.shots}-shot {name:40s} mIoU {_miou(iu, run['classes'], class_ids):5.1f}",
                  flush=True)
        results["runs"].append(run)
    return results


def _per_class(iu: list, classes: list[int], class_ids: list[int]) -> dict[int, float]:
    inter, union = {c: 0 for c in class_ids}, {c: 0 for c in class_ids}
    for pairs, c in zip(iu, classes):
        for i, u in pairs:
            inter[c] += i
            union[c] += u
    return {c: 100.0 * inter[c] / max(union[c], 1) for c in class_ids}


def _miou(iu: list, classes: list[int], class_ids: list[int]) -> float:
    """Mean foreground IoU over the classes that had at least one episode."""
    seen = sorted(set(classes) & set(class_ids))
    return float(np.mean([v for c, v in _per_class(iu, classes, class_ids).items() if c in seen]))


def _units(results: dict, name: str) -> list[float]:
    """Per-episode (horses) or per-class (coco) IoU of variant ``name`` over every run, in a fixed order."""
    out: list[float] = []
    for run in results["runs"]:
        v = run["variants"].get(name)
        if v is None:
            return []
        if results["dataset"] == "horse":
            out.extend(100.0 * sum(i for i, _ in p) / max(sum(u for _, u in p), 1) for p in v)
        else:
            pc = _per_class(v, run["classes"], run["class_ids"])
            out.extend(pc[c] for c in sorted(set(run["classes"])))
    return out


def e2e_table(results: dict) -> str:
    """Markdown: mIoU per variant and the paired difference to the raw label (``off``), to the ``default``
    estimator and to the mask (per episode on horses, per class on coco)."""
    header = "| support | config | mIoU | vs raw label (95% CI) | vs default (95% CI) | vs true mask (95% CI) | "
    lines = [header + "estimate s/support |", "|---|---|---|---|---|---|---|"]

    def cmp(name: str, other: str) -> str:
        base = _units(results, other)
        if not base or other == name:
            return ""
        s = paired_stats(np.array(base), np.array(_units(results, name)))
        return f"{s['diff']:+.1f} ({s['low']:+.1f} .. {s['high']:+.1f})"

    for name in results["runs"][0]["variants"]:
        kind, _, spec = name.partition("|")
        mious = [_miou(r["variants"][name], r["classes"], r["class_ids"]) for r in results["runs"]]
        cpu = [r["est_cpu_s"][name] for r in results["runs"]]
        lines.append(f"| {kind} | `{spec or '-'}` | {np.mean(mious):.1f} | {cmp(name, f'{kind}|off')} | "
                     f"{cmp(name, f'{kind}|default')} | {cmp(name, 'mask')} | {np.mean(cpu):.2f} |")
    return "\n".join(lines)


def read_results(paths: list[str]) -> dict:
    """One results file, or several of the same mode and dataset whose runs (folds) are joined."""
    results = [json.loads(Path(p).read_text()) for p in paths]
    if len(results) > 1:
        if any("rows" in r for r in results) or len({r["dataset"] for r in results}) > 1:
            raise SystemExit("table: several files must be e2e / oracle runs of one dataset")
        results[0]["runs"] = [run for r in results for run in r["runs"]]
    return results[0]


def main() -> int:
    """Parse arguments, run, print the table and save the JSON."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("mode", choices=["quality", "e2e", "oracle", "table"])
    ap.add_argument("--dataset", choices=["horse", "coco"], default="horse")
    ap.add_argument("--kinds", nargs="+", default=list(KINDS), choices=list(KINDS))
    ap.add_argument("--configs", nargs="+", default=["off", "default"])
    ap.add_argument("--sample", type=int, default=400, help="coco quality: (image, class) pairs (0 = all)")
    ap.add_argument("--stride", type=int, default=1, help="quality: score every STRIDE-th item")
    ap.add_argument("--shots", type=int, default=1)
    ap.add_argument("--episodes", type=int, default=120)
    ap.add_argument("--folds", type=int, nargs="+", default=[0, 1, 2, 3])
    ap.add_argument("--seed", type=int, default=0, help="quality: the seed of the synthesised labels")
    ap.add_argument("--sample-seed", type=int, default=0,
                    help="coco quality: the seed of the (image, class) sample (reports: 0, development draw: 1)")
    ap.add_argument("--episode-seed", type=int, default=0,
                    help="e2e / oracle: the seed of the sampled episodes (reports: 0, development draw: 7)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", nargs="+", default=None,
                    help="JSON results file (table mode: the files to read, e2e / oracle runs joined)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cv2.setNumThreads(args.threads)
    if args.mode == "table":
        results = read_results(args.out)
        print(quality_table(results) if "rows" in results else e2e_table(results))
        return 0
    results = {"quality": run_quality, "e2e": run_e2e, "oracle": run_oracle}[args.mode](args)
    results["command"] = " ".join(sys.argv)
    print(quality_table(results) if args.mode == "quality" else e2e_table(results))
    if args.out:
        out = Path(args.out[0])
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
