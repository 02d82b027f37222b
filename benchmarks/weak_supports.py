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

    python benchmarks/weak_supports.py quality --dataset horse --configs off default --out runs/wq-horse.json
    python benchmarks/weak_supports.py quality --dataset coco --sample 400 --configs off default
    python benchmarks/weak_supports.py e2e --dataset horse --shots 1 --episodes 120 --configs off default
    python benchmarks/weak_supports.py e2e --dataset coco --folds 0 1 2 3 --shots 1 --episodes 250

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


# ----------------------------------------------------------------------------------------------------
# quality
# ----------------------------------------------------------------------------------------------------
def run_quality(args) -> dict:
    """Support-mask IoU per (config, kind) and CPU time per support."""
    items = horse_items() if args.dataset == "horse" else coco_items(args.sample)
    cache = FeatureCache(max_bytes=512 * 1024**2)
    anns = {k: [synthesize_annotation(m, k, episode_rng(args.seed, "weak-quality", key)) for key, _, m in items]
            for k in args.kinds}
    results: dict = {"machine": machine(), "dataset": args.dataset, "n": len(items), "rows": [],
                     "area": [float((m == 1).mean()) for _, _, m in items], "keys": [k for k, _, _ in items]}
    for spec in args.configs:
        cfg = parse_config(spec)
        for kind in args.kinds:
            ious, unc, cpu = [], [], []
            for (key, image, mask), ann in zip(items, anns[kind]):
                t0 = time.process_time()
                est = estimate_mask(image, ann, cfg, seed=0, cache=cache)
                cpu.append(time.process_time() - t0)
                ious.append(iou(est == 1, mask))
                unc.append(float((est == 255).mean()))
            row = {"config": spec, "kind": kind, "miou": float(np.mean(ious)), "ious": ious,
                   "uncertain": float(np.mean(unc)), "cpu_s": float(np.mean(cpu)), "cpu_s_max": float(np.max(cpu))}
            results["rows"].append(row)
            print(f"{args.dataset} {kind:14s} {spec:40s} IoU {100 * row['miou']:5.1f}  ignore {row['uncertain']:.2f}  "
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
    specs = sample_episodes(source, "hsnet", args.episodes, args.shots, 0)
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


def e2e_table(results: dict) -> str:
    """Markdown: mIoU per variant and the paired difference to the raw label (``off``) and to the mask."""
    lines = ["| support | config | mIoU | vs raw label (95% CI) | vs true mask (95% CI) | estimate s/support |",
             "|---|---|---|---|---|---|"]
    names = list(results["runs"][0]["variants"])
    horse = results["dataset"] == "horse"
    for name in names:
        units, units_raw, units_mask, mious, cpu = [], [], [], [], []
        kind, _, spec = name.partition("|")
        raw = f"{kind}|off"
        for run in results["runs"]:
            v = run["variants"]
            mious.append(_miou(v[name], run["classes"], run["class_ids"]))
            cpu.append(run["est_cpu_s"][name])
            if horse:  # pair episodes: per-episode foreground IoU
                for key, dest in ((name, units), (raw, units_raw), ("mask", units_mask)):
                    if key in v:
                        dest.extend(100.0 * sum(i for i, _ in p) / max(sum(u for _, u in p), 1) for p in v[key])
            else:  # pair classes
                for key, dest in ((name, units), (raw, units_raw), ("mask", units_mask)):
                    if key in v:
                        pc = _per_class(v[key], run["classes"], run["class_ids"])
                        dest.extend(pc[c] for c in sorted(set(run["classes"])))

        def cmp(other):
            if not other or name == "mask":
                return ""
            s = paired_stats(np.array(other), np.array(units))
            return f"{s['diff']:+.1f} ({s['low']:+.1f} .. {s['high']:+.1f})"

        lines.append(f"| {kind} | `{spec or '-'}` | {np.mean(mious):.1f} | {cmp(units_raw) if spec != 'off' else ''} | "
                     f"{cmp(units_mask)} | {np.mean(cpu):.2f} |")
    return "\n".join(lines)


def main() -> int:
    """Parse arguments, run, print the table and save the JSON."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("mode", choices=["quality", "e2e", "table"])
    ap.add_argument("--dataset", choices=["horse", "coco"], default="horse")
    ap.add_argument("--kinds", nargs="+", default=list(KINDS), choices=list(KINDS))
    ap.add_argument("--configs", nargs="+", default=["off", "default"])
    ap.add_argument("--sample", type=int, default=400, help="coco quality: (image, class) pairs (0 = all)")
    ap.add_argument("--shots", type=int, default=1)
    ap.add_argument("--episodes", type=int, default=120)
    ap.add_argument("--folds", type=int, nargs="+", default=[0, 1, 2, 3])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="JSON results file (table mode: the file to read)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cv2.setNumThreads(args.threads)
    if args.mode == "table":
        results = json.loads(Path(args.out).read_text())
        print(quality_table(results) if "rows" in results else e2e_table(results))
        return 0
    results = run_quality(args) if args.mode == "quality" else run_e2e(args)
    results["command"] = " ".join(sys.argv)
    print(quality_table(results) if args.mode == "quality" else e2e_table(results))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
