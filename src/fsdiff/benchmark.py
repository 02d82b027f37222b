"""Scoring a segmenter on one few-shot benchmark fold (HSNet and BAM test protocols, :mod:`fsdiff.data.sampler`): open the
source, sample (or replay) the episodes, optionally convert the supports or calibrate the threshold, evaluate,
and write the report.

Under ``accelerate launch`` (or torchrun) with N processes every process samples the same episodes and scores
every N-th one; the per-class intersections and unions are then gathered and summed, so ``summary.json`` and
``per_class.csv`` hold exactly the numbers of a single-process run. Only the main process writes files.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from fsdiff.data.base import SOURCES, FewShotSource
from fsdiff.errors import FsdiffError
from fsdiff.evaluate import EvalResult, merge_results
from fsdiff.protocol import Segmenter


def open_source(dataset: str, root: str | os.PathLike, *, fold: int | None = 0, split: str | None = None,
                **options: Any) -> FewShotSource:
    """The data source registered as ``dataset`` (``split`` defaults to the benchmark's test split)."""
    return SOURCES.get(dataset).open(root, fold=fold, split=split, **options)  # type: ignore[attr-defined]


def test_split(dataset: str) -> str | None:
    """The split a benchmark scores by default (FSS-1000: ``test``; a folder has none)."""
    return SOURCES.get(dataset).test_split  # type: ignore[attr-defined]


def _episode_runs(specs: list, protocol: str, seeds: list[int]) -> list[tuple[int, list]]:
    """Split sampled episode specs into (seed, specs) runs (BAM lists hold 5 runs, ids ``r<run>-<i>``)."""
    if protocol != "bam":
        return [(seeds[0], specs)]
    runs: dict[str, list] = {}
    for s in specs:
        runs.setdefault(s.episode_id.split("-", 1)[0], []).append(s)
    return list(zip(seeds, runs.values()))


def calibrate(seg: Segmenter, dataset: str, root: str | os.PathLike, *, fold: int, shots: int, n: int,
              support_annotation: str = "mask", **options: Any) -> dict:
    """Choose ``seg.threshold`` on ``n`` HSNet-protocol episodes (seed 1) of the fold's base (trn) classes.

    The supports are converted to ``support_annotation`` exactly as in the scored episodes.
    """
    from fsdiff.data.sampler import build_episode, sample_episodes
    from fsdiff.evaluate import choose_threshold
    from fsdiff.synth import convert_supports

    base = open_source(dataset, root, fold=fold, split="trn", **options)
    base.classes = [(c, name) for c, name in base.classes if len(base.images_of_class(c)) > shots]
    specs = sample_episodes(base, "hsnet", n, shots, 1)
    names = {c: base.class_name(c) for c in base.class_ids()}
    episodes = (convert_supports(build_episode(base, spec, names.get(spec.class_id)), support_annotation, 1)
                for spec in specs)
    threshold = choose_threshold(seg, episodes)
    return {"split": "trn", "episodes": n, "seed": 1, "threshold": threshold, "support_annotation": support_annotation}


def _check_settings(dataset: str, *, shots: int, protocol: str, calibrate_threshold: int, split: str | None,
                    support_annotation: str, visualize: int) -> None:
    from fsdiff.synth import SUPPORT_ANNOTATIONS

    if support_annotation not in SUPPORT_ANNOTATIONS:
        raise FsdiffError(f"support_annotation={support_annotation!r}: use one of {', '.join(SUPPORT_ANNOTATIONS)}.")
    if isinstance(shots, bool) or int(shots) < 1:
        raise FsdiffError(f"shots={shots!r}: the number of support shots must be a positive integer.")
    if protocol not in ("hsnet", "bam"):
        raise FsdiffError(f"protocol={protocol!r}: use 'hsnet' or 'bam'.")
    if isinstance(visualize, bool) or int(visualize) < 0:
        raise FsdiffError(f"visualize={visualize!r}: give how many best and worst episodes to draw (0 = none).")
    if calibrate_threshold:
        from fsdiff.limits import MAX_EPISODES, check_count

        if isinstance(calibrate_threshold, bool) or int(calibrate_threshold) < 1:
            raise FsdiffError(f"calibrate_threshold={calibrate_threshold!r}: give a positive number of validation "
                              "episodes (or 0 for no calibration).")
        check_count(calibrate_threshold, "calibrate_threshold", MAX_EPISODES, minimum=1)
        if test_split(dataset) is None:
            raise FsdiffError(f"calibrate_threshold needs a benchmark with base classes (coco, pascal, fss1000), "
                              f"not {dataset}.")
        if split == "trn":
            raise FsdiffError("calibrate_threshold tunes on the base (trn) classes, so it cannot score them too; "
                              "drop calibrate_threshold or split='trn'.")


def _sample(source: FewShotSource, *, protocol: str, episodes: int | None, shots: int, seeds: Sequence[int] | None,
            episode_list: str | os.PathLike | None, save_episodes: str | os.PathLike | None,
            main: bool) -> list[tuple[int, list]]:
    """The (seed, episode specs) runs: replayed from ``episode_list`` or sampled (and saved by the main process)."""
    from fsdiff.data.sampler import bam_seeds, episode_meta, load_episode_list, sample_episodes, save_episode_list

    if episode_list is not None:
        specs, list_meta = load_episode_list(episode_list)
        if int(list_meta.get("shots", shots)) != shots:
            raise FsdiffError(f"episode_list {episode_list} holds {list_meta['shots']}-shot episodes but shots={shots}.")
        run_seeds = list(list_meta["seed"]) if isinstance(list_meta.get("seed"), list) else [list_meta.get("seed")]
        return _episode_runs(specs, str(list_meta.get("protocol", protocol)), run_seeds)
    if protocol == "bam":
        base = 123 if not seeds else int(seeds[0])
        specs = sample_episodes(source, "bam", episodes, shots, base)
        runs, list_seed = _episode_runs(specs, "bam", bam_seeds(base)), base
    else:
        run_seeds = list(seeds) if seeds else [0]
        runs = [(s, sample_episodes(source, "hsnet", episodes, shots, s)) for s in run_seeds]
        specs = [sp for _, r in runs for sp in r]
        list_seed = run_seeds if len(run_seeds) > 1 else run_seeds[0]
    if save_episodes is not None:
        if protocol == "hsnet" and len(runs) > 1:
            raise FsdiffError("save_episodes stores one run; give a single seed (or use protocol='bam').")
        if main:
            save_episode_list(save_episodes, specs, episode_meta(source, protocol, shots, list_seed))
    return runs


def _gather(result: EvalResult, gallery: Any, world: int) -> tuple[EvalResult, Any]:
    """Every process's result and gallery merged (identity for one process)."""
    if world == 1:
        return result, gallery
    from accelerate.utils import gather_object

    parts = gather_object([(result, gallery)])
    merged_gallery = None
    if gallery is not None:
        merged_gallery = parts[0][1]
        for _, g in parts[1:]:
            merged_gallery.merge(g)
    return merge_results([r for r, _ in parts]), merged_gallery


def evaluate_benchmark(
    segmenter: Segmenter,
    dataset: str,
    root: str | os.PathLike,
    *,
    fold: int = 0,
    shots: int = 1,
    protocol: str = "hsnet",
    episodes: int | None = None,
    seeds: Sequence[int] | None = None,
    resolution: str | int = "original",
    episode_list: str | os.PathLike | None = None,
    save_episodes: str | os.PathLike | None = None,
    skip_small_classes: bool = False,
    calibrate_threshold: int = 0,
    support_annotation: str = "mask",
    split: str | None = None,
    out: str | os.PathLike | None = None,
    progress: bool = True,
    visualize: int = 0,
    meta: dict | None = None,
    **source_options: Any,
) -> tuple[dict, str]:
    """Score ``segmenter`` on one benchmark fold; write summary.json and per_class.csv (and pictures) to ``out``.

    Returns the summary (``miou``/``fbiou`` in percent, mean and std over seeds) and the text table.
    ``calibrate_threshold=N`` first sets the threshold to the one maximising mIoU on N episodes of the fold's
    *base* classes (every process computes it: it is deterministic). ``support_annotation`` = box, scribble, ...
    replaces every support mask by that annotation synthesised from it (:func:`fsdiff.synth.convert_supports`).
    ``split='trn'`` scores the fold's base classes, a validation set for a training-free method's settings.
    ``visualize=N`` also writes the per-class IoU chart and the N best and N worst episodes.
    ``source_options``: ``ann``, ``splits_dir``, ``convention`` as the source takes them.
    """
    from fsdiff.data.sampler import build_episode
    from fsdiff.distributed import partial_state, world_size
    from fsdiff.evaluate import evaluate, format_table, summarize_seeds, write_report
    from fsdiff.metrics import check_resolution
    from fsdiff.output import check_output_dir
    from fsdiff.synth import convert_supports
    from fsdiff.visual_report import EpisodeGallery, write_visual_report

    resolution = check_resolution(resolution)
    _check_settings(dataset, shots=shots, protocol=protocol, calibrate_threshold=calibrate_threshold, split=split,
                    support_annotation=support_annotation, visualize=visualize)
    state = partial_state() if world_size() > 1 else None
    rank, world = (int(state.process_index), int(state.num_processes)) if state is not None else (0, 1)
    if out is not None and rank == 0:
        check_output_dir(out)
    source = open_source(dataset, root, fold=fold, split=split, **source_options)
    skipped: list[str] = []
    if skip_small_classes:
        keep = [(c, n) for c, n in source.classes if len(source.images_of_class(c)) > shots]
        skipped = [n for c, n in source.classes if (c, n) not in keep]
        if not keep:
            raise FsdiffError(f"no class of {dataset} fold {fold} has more than {shots} images; lower shots.")
        source.classes = keep
    calibrated = None
    if calibrate_threshold:
        calibrated = calibrate(segmenter, dataset, root, fold=fold, shots=shots, n=int(calibrate_threshold),
                               support_annotation=support_annotation, **source_options)
    class_ids = source.class_ids()
    names = {c: source.class_name(c) for c in class_ids}
    runs = _sample(source, protocol=protocol, episodes=episodes, shots=shots, seeds=seeds, episode_list=episode_list,
                   save_episodes=save_episodes, main=rank == 0)
    results, gallery = [], None
    for seed, run in runs:
        mine = run[rank::world]
        eps = (convert_supports(build_episode(source, spec, names.get(spec.class_id)), support_annotation, seed or 0)
               for spec in mine)
        run_gallery = EpisodeGallery(visualize, segmenter.threshold) if visualize and gallery is None else None
        res = evaluate(segmenter, eps, class_ids, names, resolution=resolution, progress=progress and rank == 0,
                       total=len(mine), on_episode=run_gallery)
        res, run_gallery = _gather(res, run_gallery, world)
        results.append(res)
        gallery = gallery or run_gallery
    summary = summarize_seeds(results, [s for s, _ in runs])
    info = {
        **(meta or {}), "dataset": dataset, "fold": fold, "shots": shots,
        "method": getattr(segmenter, "name", None), "encoder": getattr(segmenter, "encoder_name", None),
        "support_masks": getattr(segmenter, "support_masks_spec", None),
        "refine": getattr(segmenter, "refine_spec", None),
        "episodes": len(runs[0][1]), "protocol": protocol, "resolution": resolution,
        "convention": source_options.get("convention", "interleaved") if dataset == "coco" else None,
        "classes_skipped": skipped, "support_annotation": support_annotation,
        "split": split if split is not None else test_split(dataset), "threshold_calibrated_on": calibrated,
        "processes": world,
    }
    if out is not None and rank == 0:
        write_report(out, summary, None, info)
        if gallery is not None:
            write_visual_report(out, summary, gallery)
    return {**info, **summary}, format_table(summary)
