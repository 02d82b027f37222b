"""The evaluation loop and its report (the test protocols of HSNet, arXiv 2104.01538, and BAM, arXiv 2203.07615).

Reproduces the test loops of HSNet ``test.py`` (one meter per run, queries scored with
``Evaluator.classify_prediction`` and pooled per class by ``AverageMeter``) and BAM ``test.py``
(several seeded runs, the mean over seeds reported), on top of :mod:`fsdiff.metrics`.
Every number is in percent; the std over seeds is the sample std (see :func:`fsdiff.metrics.mean_std`).
"""

from __future__ import annotations

import csv
import datetime as _dt
import io
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from fsdiff.episode import Episode
from fsdiff.errors import FsdiffError
from fsdiff.io import atomic_path
from fsdiff.jsonutil import dumps
from fsdiff.protocol import Segmenter
from fsdiff.metrics import FssMeter, Resolution, check_resolution, iou_percent, mean_std, resize_for_scoring

STD_CONVENTION = "sample standard deviation over seeds (ddof=1; 0 for a single seed)"
META_KEYS = ("dataset", "fold", "shots", "method", "encoder", "episodes", "protocol", "resolution")


@dataclass
class EvalResult:
    """The scores of one evaluation run (one seed), in percent."""

    miou: float
    fbiou: float
    per_class_iou: dict[int, float]
    n_episodes: int
    seconds: float
    episodes_per_second: float
    n_queries: int = 0
    per_class_queries: dict[int, int] = field(default_factory=dict)
    class_names: dict[int, str] = field(default_factory=dict)
    resolution: Resolution = "original"
    threshold: float = 0.5
    meter: FssMeter | None = None
    """The summed intersections and unions behind the scores (what processes merge)."""


EpisodeCallback = Callable[[Episode, list[np.ndarray], list[float]], None]
"""Called after each scored episode with its probability maps (query size) and each query's foreground IoU."""


def result_from_meter(meter: FssMeter, class_names: Mapping[int, str], *, n_episodes: int, seconds: float,
                      resolution: Resolution, threshold: float) -> EvalResult:
    """The scores of a meter (several processes' meters merged first give the single-process scores)."""
    names = {c: str(class_names.get(c, c)) for c in meter.class_ids}
    return EvalResult(
        miou=meter.miou(), fbiou=meter.fbiou(), per_class_iou=meter.per_class_iou(), n_episodes=n_episodes,
        seconds=seconds, episodes_per_second=n_episodes / seconds if seconds > 0 else 0.0,
        n_queries=meter.n_updates, per_class_queries=meter.per_class_counts(), class_names=names,
        resolution=resolution, threshold=threshold, meter=meter,
    )


def merge_results(results: Sequence[EvalResult]) -> EvalResult:
    """One result from several processes' results on disjoint episodes (wall time: the slowest process)."""
    first = results[0]
    meter = FssMeter(first.meter.class_ids)
    for r in results:
        meter.merge(r.meter)
    return result_from_meter(meter, first.class_names, n_episodes=sum(r.n_episodes for r in results),
                             seconds=max(r.seconds for r in results), resolution=first.resolution,
                             threshold=first.threshold)


def _threshold_of(segmenter: Any) -> float:
    thr = getattr(segmenter, "threshold", 0.5)
    try:
        thr = float(thr)
    except (TypeError, ValueError):
        raise FsdiffError(f"segmenter threshold must be a number, got {thr!r}.") from None
    if not math.isfinite(thr):
        raise FsdiffError(f"segmenter threshold must be finite, got {thr}.")
    return thr


def _episode_label(ep: Episode, index: int) -> str:
    return f"episode {ep.episode_id}" if ep.episode_id else f"episode #{index}"


def evaluate(
    segmenter: Segmenter,
    episodes: Iterable[Episode],
    class_ids: list[int],
    class_names: dict[int, str],
    resolution: Resolution = "original",
    progress: bool = True,
    total: int | None = None,
    on_episode: EpisodeCallback | None = None,
) -> EvalResult:
    """Run ``segmenter`` on every episode and score each query's ``prob > threshold`` mask per class.

    ``total``: the number of episodes, for the progress bar's ETA when ``episodes`` has no length.
    ``on_episode``: called after each episode (see :data:`EpisodeCallback`), e.g. to keep the best and worst.
    """
    resolution = check_resolution(resolution)
    meter = FssMeter(class_ids)
    threshold = _threshold_of(segmenter)
    if total is None and hasattr(episodes, "__len__"):
        total = len(episodes)  # type: ignore[arg-type]
    name = getattr(segmenter, "name", type(segmenter).__name__)
    bar = tqdm(episodes, total=total, desc=f"eval {name}", unit="ep", file=sys.stderr,
               disable=not progress, dynamic_ncols=True)
    n_episodes = 0
    start = time.perf_counter()
    try:
        for index, ep in enumerate(bar):
            label = _episode_label(ep, index)
            if int(ep.class_id) not in meter:
                raise FsdiffError(
                    f"{label}: class {ep.class_id} ({ep.class_name}) is not one of the evaluated classes "
                    f"{meter.class_ids}; check the fold or the episode source."
                )
            for q, query in enumerate(ep.queries):
                if query.gt is None:
                    qname = query.image_id or f"#{q}"
                    raise FsdiffError(
                        f"{label}: query {qname} has no ground truth; evaluation needs a label for every "
                        "query (use prediction mode for unlabelled images)."
                    )
            try:
                probs = segmenter.predict(ep)
            except Exception as exc:
                if hasattr(exc, "add_note"):  # Python >= 3.11: say which episode broke the segmenter
                    exc.add_note(f"fsdiff.evaluate: while {name!r} predicted {label} (class {ep.class_id})")
                raise
            if probs is None or len(probs) != len(ep.queries):
                got = "None" if probs is None else str(len(probs))
                raise FsdiffError(
                    f"{label}: segmenter {name!r} returned {got} probability maps for {len(ep.queries)} queries."
                )
            ious = []
            for q, (query, prob) in enumerate(zip(ep.queries, probs)):
                prob = np.asarray(prob) if not isinstance(prob, np.ndarray) else prob
                try:
                    prob_s, gt_s = resize_for_scoring(prob, query.gt, resolution)
                except FsdiffError as exc:
                    raise FsdiffError(f"{label}, query {query.image_id or q}: {exc}") from None
                inter, union = meter.update(ep.class_id, prob_s > threshold, gt_s)
                ious.append(iou_percent(inter[1], union[1]))
            if on_episode is not None:
                on_episode(ep, list(probs), ious)
            n_episodes += 1
            if progress:
                bar.set_postfix(mIoU=f"{meter.miou():.2f}", FB=f"{meter.fbiou():.2f}", refresh=False)
    finally:
        bar.close()
    return result_from_meter(meter, class_names, n_episodes=n_episodes, seconds=time.perf_counter() - start,
                             resolution=resolution, threshold=threshold)


def summarize_seeds(results: list[EvalResult], seeds: Sequence[int]) -> dict:
    """Mean and sample std of mIoU / FB-IoU over seeded runs, with per-class means and per-seed rows."""
    results = list(results)
    seeds = list(seeds)
    if not results:
        raise FsdiffError("no evaluation results to summarise.")
    if len(seeds) != len(results):
        raise FsdiffError(f"got {len(results)} results for {len(seeds)} seeds; give one seed per run.")
    class_ids = list(results[0].per_class_iou)
    for r in results[1:]:
        if list(r.per_class_iou) != class_ids:
            raise FsdiffError("the runs to summarise were evaluated on different classes.")
    miou, miou_std = mean_std([r.miou for r in results])
    fbiou, fbiou_std = mean_std([r.fbiou for r in results])
    names: dict[int, str] = {}
    for r in results:
        names.update(r.class_names)
    per_class = []
    for c in class_ids:
        values = [r.per_class_iou[c] for r in results]
        m, s = mean_std(values)
        per_class.append({
            "class_id": int(c),
            "class_name": names.get(c, str(c)),
            "iou": m,
            "iou_std": s,
            "queries": int(sum(r.per_class_queries.get(c, 0) for r in results)),
            "per_seed": values,
        })
    per_seed = [
        {
            "seed": seed,
            "miou": r.miou,
            "fbiou": r.fbiou,
            "episodes": r.n_episodes,
            "queries": r.n_queries,
            "seconds": r.seconds,
            "episodes_per_second": r.episodes_per_second,
        }
        for seed, r in zip(seeds, results)
    ]
    seconds = float(sum(r.seconds for r in results))
    n_episodes = int(sum(r.n_episodes for r in results))
    return {
        "miou": miou,
        "miou_std": miou_std,
        "fbiou": fbiou,
        "fbiou_std": fbiou_std,
        "std": STD_CONVENTION,
        "seeds": seeds,
        "per_seed": per_seed,
        "per_class": per_class,
        "resolution": results[0].resolution,
        "threshold": results[0].threshold,
        "total_episodes": n_episodes,
        "seconds": seconds,
        "episodes_per_second": n_episodes / seconds if seconds > 0 else 0.0,
    }


def class_rows(summary: Mapping) -> list[dict]:
    """Flat per-class rows for ``per_class.csv``: class_id, class_name, iou, iou_std, queries, iou_seed_<s>."""
    seeds = list(summary.get("seeds", []))
    rows = []
    for pc in summary.get("per_class", []):
        row = {
            "class_id": pc["class_id"],
            "class_name": pc["class_name"],
            "iou": pc["iou"],
            "iou_std": pc["iou_std"],
            "queries": pc.get("queries", ""),
        }
        for seed, value in zip(seeds, pc.get("per_seed", [])):
            row[f"iou_seed_{seed}"] = value
        rows.append(row)
    return rows


def _fmt(value: Any) -> Any:
    if isinstance(value, float):
        return f"{value:.4f}"
    return value


def _csv_text(rows: list[dict]) -> str:
    if not rows:
        return "class_id,class_name,iou\n"
    fieldnames: list[str] = []
    for row in rows:
        for key in row:
            if key not in fieldnames:
                fieldnames.append(key)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fieldnames, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _fmt(v) for k, v in row.items()})
    return buf.getvalue()


def write_report(
    out_dir: str | os.PathLike,
    summary: Mapping,
    per_class_rows: list[dict] | None,
    meta: Mapping,
) -> tuple[Path, Path]:
    """Write ``per_class.csv`` then ``summary.json`` (summary + meta) atomically; returns their paths."""
    from fsdiff import __version__

    out = Path(out_dir)
    rows = class_rows(summary) if per_class_rows is None else list(per_class_rows)
    doc: dict[str, Any] = {k: None for k in META_KEYS}
    doc["resolution"] = summary.get("resolution")
    per_seed_eps = {p.get("episodes") for p in summary.get("per_seed", [])}
    if len(per_seed_eps) == 1:
        doc["episodes"] = per_seed_eps.pop()
    doc.update(meta)
    doc.update(summary)  # the scores and the resolution they were computed at always win over meta
    doc.setdefault("fsdiff_version", __version__)
    doc.setdefault("date", _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    try:
        json_text = dumps(doc, indent=2) + "\n"
    except (TypeError, ValueError) as exc:
        raise FsdiffError(f"cannot write the evaluation report: {exc}.") from None
    csv_text = _csv_text(rows)
    csv_path, json_path = out / "per_class.csv", out / "summary.json"
    # summary.json goes last, so its presence means the report is complete.
    with atomic_path(csv_path) as tmp:
        tmp.write_text(csv_text, encoding="utf-8")
    with atomic_path(json_path) as tmp:
        tmp.write_text(json_text, encoding="utf-8")
    return json_path, csv_path


def format_table(summary: Mapping) -> str:
    """A plain-text table of per-class IoU and the mean lines (mIoU, FB-IoU), for the terminal."""
    seeds = list(summary.get("seeds", []))
    multi = len(seeds) > 1
    rows = list(summary.get("per_class", []))
    name_w = max([len("class")] + [len(str(r["class_name"])) for r in rows] + [len("FB-IoU")])
    id_w = max([2] + [len(str(r["class_id"])) for r in rows])
    head = f"{'id':>{id_w}}  {'class':<{name_w}}  {'IoU %':>7}"
    if multi:
        head += f"  {'± std':>6}"
    lines = [head, "-" * len(head)]
    for r in rows:
        line = f"{r['class_id']:>{id_w}}  {str(r['class_name']):<{name_w}}  {r['iou']:>7.2f}"
        if multi:
            line += f"  {r['iou_std']:>6.2f}"
        if r.get("queries", 1) == 0:
            line += "  (no queries: counts as 0)"
        lines.append(line)
    lines.append("-" * len(head))
    for label, key in (("mIoU", "miou"), ("FB-IoU", "fbiou")):
        line = f"{'':>{id_w}}  {label:<{name_w}}  {summary[key]:>7.2f}"
        if multi:
            line += f"  {summary[key + '_std']:>6.2f}"
        lines.append(line)
    if seeds:
        n = len(seeds)
        tail = f"{n} seed{'s' if n != 1 else ''} ({', '.join(str(s) for s in seeds)})"
        if multi:
            tail += "; mean ± sample std"
        eps = summary.get("episodes_per_second")
        if eps:
            tail += f"; {eps:.2f} episodes/s"
        lines.append(tail)
    return "\n".join(lines)

DEFAULT_CANDIDATES = tuple(round(0.05 * i, 2) for i in range(1, 20))
"""Thresholds tried by :func:`choose_threshold` by default: 0.05, 0.10, ..., 0.95."""


def choose_threshold(segmenter: Any, episodes: Iterable[Episode],
                     candidates: Sequence[float] = DEFAULT_CANDIDATES) -> float:
    """The candidate threshold maximising mIoU (fsdiff.metrics.FssMeter) over validation ``episodes``.

    Predictions are computed once per episode; ties go to the candidate closest to 0.5. The segmenter's
    ``threshold`` attribute is set to the winner, which is also returned.
    """
    from fsdiff.metrics import FssMeter

    cands = [float(c) for c in candidates]
    if not cands or any(not 0.0 <= c <= 1.0 for c in cands):
        raise FsdiffError(f"choose_threshold: candidates must be a non-empty list in [0, 1], got {list(candidates)}.")
    records: list[tuple[int, np.ndarray, np.ndarray]] = []
    for ep in episodes:
        preds = segmenter.predict(ep)
        for query, prob in zip(ep.queries, preds):
            if query.gt is None:
                raise FsdiffError(
                    f"choose_threshold: query {query.image_id or '(unnamed)'} of episode "
                    f"{ep.episode_id or '(unnamed)'} has no ground truth; validation episodes need it."
                )
            records.append((int(ep.class_id), prob, query.gt))
    if not records:
        raise FsdiffError("choose_threshold: no validation episodes given.")
    class_ids = sorted({c for c, _, _ in records})
    best, best_score = cands[0], -1.0
    for c in sorted(cands, key=lambda v: (abs(v - 0.5), v)):
        meter = FssMeter(class_ids)
        for cid, prob, gt in records:
            meter.update(cid, prob > c, gt)
        score = meter.miou()
        if score > best_score + 1e-12:
            best, best_score = c, score
    segmenter.threshold = best
    return best
