"""The Python API that the ``fsdiff`` command mirrors: build episodes from files, segment, evaluate, demo.

Every function validates all of its inputs before it writes anything, and every file it writes is
written atomically, so bad input never leaves partial output behind.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fsdiff.episode import (
    Annotation,
    BoxAnnotation,
    Episode,
    MaskAnnotation,
    PointsAnnotation,
    Query,
    ScribbleAnnotation,
    Shot,
)
from fsdiff.errors import FsdiffError
from fsdiff.io import IGNORE, read_image, read_mask
from fsdiff.metrics import binary_iou
from fsdiff.output import WrittenPrediction, unique_stems, write_prediction

DEFAULT_METHOD = "prototype"
EXAMPLES_DIR = Path(__file__).resolve().parent / "assets" / "examples"


def parse_box(text: str) -> tuple[float, float, float, float]:
    """Parse ``"x0,y0,x1,y1"`` into four floats, or raise an FsdiffError naming --box."""
    parts = [p.strip() for p in str(text).split(",")]
    try:
        values = tuple(float(p) for p in parts)
    except ValueError:
        values = ()
    if len(values) != 4:
        raise FsdiffError(f"--box {text!r}: expected four numbers x0,y0,x1,y1 in pixels, e.g. --box 10,20,200,180.")
    return values  # type: ignore[return-value]


def parse_class_value(text: str | None) -> int | tuple[int, int, int] | None:
    """Parse ``--class-value``: one integer label, or an R,G,B colour."""
    if text is None:
        return None
    parts = str(text).split(",")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        values = []
    if len(values) == 1 and 0 <= values[0] <= 65535:
        return values[0]
    if len(values) == 3 and all(0 <= v <= 255 for v in values):
        return (values[0], values[1], values[2])
    raise FsdiffError(f"--class-value {text!r}: expected one label value (e.g. 15) or a colour R,G,B (e.g. 192,128,128).")


def load_shot(
    image: str | os.PathLike,
    *,
    mask: str | os.PathLike | None = None,
    box: str | Sequence[float] | None = None,
    scribble: str | os.PathLike | None = None,
    points: Sequence[tuple[float, float, int]] | None = None,
    class_value: int | tuple[int, int, int] | None = None,
) -> Shot:
    """Read one support image and exactly one annotation (mask, box, scribble or points) into a Shot."""
    given = [n for n, v in (("mask", mask), ("box", box), ("scribble", scribble), ("points", points)) if v is not None]
    if len(given) > 1:
        raise FsdiffError(f"support {image}: give one annotation, got {' and '.join('--' + g for g in given)}.")
    img = read_image(image)
    ann: Annotation
    if mask is not None:
        ann = MaskAnnotation(read_mask(mask, class_value=class_value))
    elif box is not None:
        ann = BoxAnnotation(parse_box(box) if isinstance(box, str) else tuple(float(v) for v in box))  # type: ignore[arg-type]
    elif scribble is not None:
        ann = ScribbleAnnotation.from_array(np.asarray(read_image(scribble)).max(axis=2))
    elif points is not None:
        pts = np.asarray([(p[0], p[1]) for p in points], np.float64)
        labels = np.asarray([p[2] for p in points], np.int64)
        ann = PointsAnnotation(pts, labels)
    else:
        raise FsdiffError(
            f"support {image}: no annotation; follow --support with --mask PNG, --box x0,y0,x1,y1 or --scribble PNG."
        )
    return Shot(img, ann, image_id=str(image))


def load_query(image: str | os.PathLike, *, gt: str | os.PathLike | None = None, class_value=None) -> Query:
    """Read one query image (and optionally its ground-truth mask) into a Query."""
    return Query(read_image(image), None if gt is None else read_mask(gt, class_value=class_value), image_id=str(image))


def build_segmenter(method: str = DEFAULT_METHOD, *, encoder: str | None = None, benchmark: dict | None = None,
                    **kwargs):
    """Build a segmenter by name, optionally with another frozen encoder.

    ``benchmark`` ({dataset, fold, convention}) goes to every method's factory: one with shipped weights
    (diffup) picks the checkpoint that never saw that fold's test classes; the others ignore it.
    """
    from fsdiff.methods import build_method

    if encoder is not None:
        kwargs["encoder"] = encoder
    return build_method(method, benchmark=benchmark, **kwargs)


@dataclass(frozen=True)
class SegmentResult:
    """One query's prediction and where it was written (if an output folder was given)."""

    query_id: str
    prob: np.ndarray
    mask: np.ndarray
    files: WrittenPrediction | None


def segment(
    shots: Sequence[Shot],
    queries: Sequence[Query],
    *,
    class_name: str = "object",
    method: str = DEFAULT_METHOD,
    encoder: str | None = None,
    out: str | os.PathLike | None = None,
    segmenter=None,
) -> list[SegmentResult]:
    """Segment every query given the support shots; write masks, probabilities and overlays to ``out``."""
    episode = Episode(class_id=0, class_name=class_name, shots=tuple(shots), queries=tuple(queries))
    seg = segmenter if segmenter is not None else build_segmenter(method, encoder=encoder)
    probs = seg.predict(episode)
    results = []
    out_dir = Path(out) if out is not None else None
    stems = unique_stems([q.image_id or f"query{i}" for i, q in enumerate(queries)])
    for q, prob, stem in zip(queries, probs, stems):
        files = write_prediction(out_dir, stem, q.image, prob, seg.threshold) if out_dir is not None else None
        results.append(SegmentResult(q.image_id, prob, prob > seg.threshold, files))
    return results


@dataclass(frozen=True)
class DemoResult:
    """One bundled example: its name, the written files and the IoU against the reference mask."""

    name: str
    annotation: str
    query: str
    iou: float
    files: WrittenPrediction


def demo(
    out: str | os.PathLike = "fsdiff-demo", *, method: str = DEFAULT_METHOD, encoder: str | None = None, segmenter=None
) -> list[DemoResult]:
    """Segment the bundled example images with the default offline method and write overlays."""
    manifest = json.loads((EXAMPLES_DIR / "examples.json").read_text())
    seg = segmenter if segmenter is not None else build_segmenter(method, encoder=encoder)
    results = []
    out_dir = Path(out)
    for ep in manifest["episodes"]:
        shots = []
        for s in ep["support"]:
            kwargs = {"mask": EXAMPLES_DIR / s["mask"]} if "mask" in s else {"box": s["box"]}
            shots.append(load_shot(EXAMPLES_DIR / s["image"], **kwargs))
        queries = [load_query(EXAMPLES_DIR / q["image"], gt=EXAMPLES_DIR / q["reference_mask"]) for q in ep["queries"]]
        ep_out = out_dir / ep["name"]
        for q, r in zip(queries, segment(shots, queries, class_name=ep["class_name"], out=ep_out, segmenter=seg)):
            assert r.files is not None
            results.append(DemoResult(ep["name"], shots[0].annotation.kind, Path(q.image_id).name, binary_iou(r.mask, q.gt == 1, q.gt != IGNORE), r.files))
    return results


def _episode_runs(specs: list, protocol: str, seeds: list[int]) -> list[tuple[int, list]]:
    """Split sampled episode specs into (seed, specs) runs (BAM lists hold 5 runs, ids ``r<run>-<i>``)."""
    if protocol != "bam":
        return [(seeds[0], specs)]
    runs: dict[str, list] = {}
    for s in specs:
        runs.setdefault(s.episode_id.split("-", 1)[0], []).append(s)
    return list(zip(seeds, runs.values()))


def test_split(dataset: str) -> str:
    """The split a benchmark scores by default: FSS-1000's ``test``, every other benchmark's ``val``."""
    return "test" if dataset == "fss1000" else "val"


def open_source(
    dataset: str,
    root: str | os.PathLike,
    *,
    fold: int | None = 0,
    split: str | None = None,
    ann: str | os.PathLike | None = None,
    splits_dir: str | os.PathLike | None = None,
    convention: str = "interleaved",
):
    """Open a data source the way the CLI names it (``split`` defaults to the benchmark's test split)."""
    from fsdiff.data import build_source

    if split is None:
        split = test_split(dataset)
    kwargs: dict = {"root": root, "fold": fold, "split": split}
    if dataset == "coco":
        kwargs["convention"] = convention
        if ann is not None:  # --root is then the image folder
            kwargs.update(ann=ann, images=kwargs.pop("root"))
    elif ann is not None:
        raise FsdiffError(f"--ann is only used with --dataset coco, not {dataset}.")
    if dataset in ("pascal", "fss1000"):
        kwargs["splits_dir"] = splits_dir
    if dataset == "folder":
        kwargs.pop("split")
    return build_source(dataset, **kwargs)


def with_augmentation(
    segmenter,
    spec: str,
    *,
    cache: str | os.PathLike | None = None,
    model: str | os.PathLike | None = None,
    controlnet: str | os.PathLike | None = None,
    per_shot: str = "first",
    steps: int | None = None,
    resolution: int = 512,
    seed: int = 0,
):
    """Wrap ``segmenter`` with DifFSS auxiliary supports, e.g. ``spec='hed:4'`` (models load on the first cache miss)."""
    from fsdiff.augment.augmenter import AugmentedSegmenter, Augmenter
    from fsdiff.augment.controls import parse_condition
    from fsdiff.augment.generate import GenerationConfig, load_generator

    kind, _n = parse_condition(spec)
    config = GenerationConfig(seed=seed).replace(resolution=int(resolution))
    if steps is not None:
        config = config.replace(steps=int(steps))
    gen = load_generator(kind, model=model, controlnet=controlnet, cache=cache, config=config, lazy=True)
    return AugmentedSegmenter(segmenter, Augmenter(gen, spec, per_shot=per_shot))


def _calibrate(seg, dataset, root, *, fold, shots, n, ann, splits_dir, convention, support_annotation="mask") -> dict:
    """Choose ``seg.threshold`` on ``n`` HSNet-protocol episodes (seed 1) of the fold's base classes.

    The supports are converted to ``support_annotation`` exactly as in the scored episodes.
    """
    from fsdiff.data.sampler import build_episode, sample_episodes
    from fsdiff.evaluate import choose_threshold
    from fsdiff.synth import convert_supports

    base = open_source(dataset, root, fold=fold, split="trn", ann=ann, splits_dir=splits_dir, convention=convention)
    base.classes = [(c, name) for c, name in base.classes if len(base.images_of_class(c)) > shots]
    specs = sample_episodes(base, "hsnet", n, shots, 1)
    names = {c: base.class_name(c) for c in base.class_ids()}
    episodes = (convert_supports(build_episode(base, spec, names.get(spec.class_id)), support_annotation, 1)
                for spec in specs)
    threshold = choose_threshold(seg, episodes)
    return {"split": "trn", "episodes": n, "seed": 1, "threshold": threshold, "support_annotation": support_annotation}


def evaluate_benchmark(
    dataset: str,
    root: str | os.PathLike,
    *,
    fold: int = 0,
    shots: int = 1,
    method: str = DEFAULT_METHOD,
    encoder: str | None = None,
    ann: str | os.PathLike | None = None,
    splits_dir: str | os.PathLike | None = None,
    convention: str = "interleaved",
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
    segmenter=None,
) -> tuple[dict, str]:
    """Score a method on one benchmark fold; write summary.json and per_class.csv to ``out``.

    Returns the summary dict (``miou``/``fbiou`` in percent, mean and std over seeds) and the text table.
    ``calibrate_threshold=N`` first sets the segmenter's threshold to the one maximising mIoU on N episodes
    of the fold's *base* (training) classes, so the novel test classes are never used to tune it.
    ``support_annotation`` = box or scribble replaces every support mask by a box / scribble synthesised
    from it (:func:`fsdiff.synth.convert_supports`; the same for every method).
    ``split``: whose images and classes (default: the benchmark's test split and the fold's novel classes);
    ``"trn"`` scores the fold's *base* classes instead, a validation set for choosing a training-free
    method's settings without looking at the test classes (a method trained on the fold has seen them).
    """
    from fsdiff.data.sampler import bam_seeds, build_episode, episode_meta, load_episode_list, sample_episodes, save_episode_list
    from fsdiff.evaluate import evaluate, format_table, summarize_seeds, write_report
    from fsdiff.metrics import check_resolution

    from fsdiff.synth import SUPPORT_ANNOTATIONS, convert_supports

    resolution = check_resolution(resolution)
    if support_annotation not in SUPPORT_ANNOTATIONS:
        raise FsdiffError(f"--support-annotation {support_annotation!r}: use one of {', '.join(SUPPORT_ANNOTATIONS)}.")
    if isinstance(shots, bool) or int(shots) < 1:
        raise FsdiffError(f"--shots {shots}: the number of support shots must be a positive integer.")
    if protocol not in ("hsnet", "bam"):
        raise FsdiffError(f"--protocol {protocol!r}: use 'hsnet' or 'bam'.")
    if calibrate_threshold:
        if isinstance(calibrate_threshold, bool) or int(calibrate_threshold) < 1:
            raise FsdiffError(f"--calibrate-threshold {calibrate_threshold}: give a positive number of validation "
                              "episodes (or 0 for no calibration).")
        if dataset == "folder":
            raise FsdiffError("--calibrate-threshold needs a benchmark with base classes (coco, pascal, fss1000), "
                              "not a folder.")
        if split == "trn":
            raise FsdiffError("--calibrate-threshold tunes on the base (trn) classes, so it cannot score them too; "
                              "drop --calibrate-threshold or --split trn.")
    if split is not None and dataset == "folder":
        raise FsdiffError(f"--split {split}: a folder dataset has no splits; drop --split.")
    source = open_source(dataset, root, fold=fold, split=split, ann=ann, splits_dir=splits_dir, convention=convention)
    skipped: list[str] = []
    if skip_small_classes:
        keep = [(c, n) for c, n in source.classes if len(source.images_of_class(c)) > shots]
        skipped = [n for c, n in source.classes if (c, n) not in keep]
        if not keep:
            raise FsdiffError(f"no class of {dataset} fold {fold} has more than {shots} images; lower --shots.")
        source.classes = keep
    bench = dict(dataset=dataset, fold=fold, convention=convention)
    seg = segmenter if segmenter is not None else build_segmenter(method, encoder=encoder, benchmark=bench)
    calibrated = None
    if calibrate_threshold:
        calibrated = _calibrate(seg, dataset, root, fold=fold, shots=shots, n=int(calibrate_threshold), ann=ann,
                                splits_dir=splits_dir, convention=convention, support_annotation=support_annotation)
    class_ids = source.class_ids()
    names = {c: source.class_name(c) for c in class_ids}

    if episode_list is not None:
        specs, list_meta = load_episode_list(episode_list)
        if int(list_meta.get("shots", shots)) != shots:
            raise FsdiffError(f"--episode-list {episode_list} holds {list_meta['shots']}-shot episodes but --shots is {shots}.")
        run_seeds = list(list_meta["seed"]) if isinstance(list_meta.get("seed"), list) else [list_meta.get("seed")]
        runs = _episode_runs(specs, str(list_meta.get("protocol", protocol)), run_seeds)
    else:
        if protocol == "bam":
            base = 123 if not seeds else int(seeds[0])
            specs = sample_episodes(source, "bam", episodes, shots, base)
            run_seeds = bam_seeds(base)
            runs = _episode_runs(specs, "bam", run_seeds)
            list_seed: object = base
        else:
            run_seeds = list(seeds) if seeds else [0]
            runs = [(s, sample_episodes(source, "hsnet", episodes, shots, s)) for s in run_seeds]
            specs = [sp for _, r in runs for sp in r]
            list_seed = run_seeds if len(run_seeds) > 1 else run_seeds[0]
        if save_episodes is not None:
            if protocol == "hsnet" and len(run_seeds) > 1:
                raise FsdiffError("--save-episodes stores one run; give a single --seeds value (or use --protocol bam).")
            save_episode_list(save_episodes, specs, episode_meta(source, protocol, shots, list_seed))

    results = []
    for seed, run in runs:
        eps = (convert_supports(build_episode(source, spec, names.get(spec.class_id)), support_annotation, seed or 0)
               for spec in run)
        results.append(evaluate(seg, eps, class_ids, names, resolution=resolution, progress=progress))
    summary = summarize_seeds(results, [s for s, _ in runs])
    meta = {
        "dataset": dataset,
        "fold": fold,
        "shots": shots,
        "method": method if segmenter is None else getattr(seg, "name", method),
        "encoder": getattr(seg, "encoder_name", encoder),
        "episodes": len(runs[0][1]),
        "protocol": protocol,
        "resolution": resolution,
        "convention": convention if dataset == "coco" else None,
        "classes_skipped": skipped,
        "support_annotation": support_annotation,
        "split": split if split is not None else test_split(dataset),
        "threshold_calibrated_on": calibrated,
    }
    if out is not None:
        write_report(out, summary, None, meta)
    return {**meta, **summary}, format_table(summary)
