"""The Python API that the ``fsdiff`` command and the web app call: load shots and queries (from files, PIL
images or arrays), build a :class:`Segmenter` once and reuse it, segment, evaluate, train, demo.

``fsdiff.api.Segmenter`` is the pipeline a front end runs (support step -> DifFSS augmentation -> method ->
refinement, :mod:`fsdiff.pipeline`), built by method name; it satisfies :class:`fsdiff.protocol.Segmenter`.
Every function validates its inputs before it writes anything; errors are :class:`~fsdiff.errors.FsdiffError`
naming the argument (in Python terms) and what to do.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fsdiff.benchmark import open_source, test_split
from fsdiff.episode import Annotation, Episode, MaskAnnotation, Query, Shot
from fsdiff.errors import FsdiffError
from fsdiff.inputs import ClassValue, ImageLike, describe, to_box, to_image, to_mask, to_points, to_scribble
from fsdiff.output import OutputFolder, WrittenPrediction
from fsdiff.pipeline import Pipeline

DEFAULT_METHOD = "prototype"
DEFAULT_SUPPORT_MASKS = "grabcut"
"""Weak-label step applied by default (fsdiff.weaklabel): box, scribble and click supports become estimated masks."""
DEFAULT_REFINE = "guided"
"""Edge refinement applied by default (fsdiff.refine): it gained mIoU on every setting measured."""

__all__ = ["DEFAULT_METHOD", "SegmentResult", "Segmenter", "build_segmenter", "demo", "evaluate_benchmark",
           "load_query", "load_shot", "open_source", "parse_class_value", "segment", "test_split", "train"]


def parse_class_value(text: str | int | Sequence[int] | None) -> ClassValue:
    """A class value: one integer label, or an R,G,B colour (``"192,128,128"`` or a 3-sequence)."""
    if text is None:
        return None
    parts = str(text).split(",") if isinstance(text, (str, int)) else list(text)
    try:
        values = [int(p) for p in parts]
    except (TypeError, ValueError):
        values = []
    if len(values) == 1 and 0 <= values[0] <= 65535:
        return values[0]
    if len(values) == 3 and all(0 <= v <= 255 for v in values):
        return (values[0], values[1], values[2])
    raise FsdiffError(f"class_value={text!r}: expected one label value (e.g. 15) or a colour R,G,B (e.g. 192,128,128).")


def load_shot(
    image: ImageLike,
    *,
    mask: ImageLike | None = None,
    box: str | Sequence[float] | None = None,
    scribble: ImageLike | None = None,
    points: Sequence[Sequence[float]] | None = None,
    class_value: ClassValue = None,
    name: str | None = None,
) -> Shot:
    """One support image (path, PIL image or array) and exactly one annotation into a Shot.

    ``mask``: path, PIL image or array (bool or labels); ``box``: ``(x0, y0, x1, y1)`` in pixels or
    ``"x0,y0,x1,y1"``; ``scribble``: strokes (1/255 object, 2/128 background); ``points``: ``[(x, y, label)]``.
    """
    given = [n for n, v in (("mask", mask), ("box", box), ("scribble", scribble), ("points", points)) if v is not None]
    label = name or describe(image)
    if len(given) != 1:
        what = f"got {' and '.join(given)}" if given else "got none"
        raise FsdiffError(f"support {label}: give exactly one annotation (mask, box, scribble or points), {what}.")
    img = to_image(image, f"support {label}")
    ann: Annotation
    if mask is not None:
        ann = MaskAnnotation(to_mask(mask, class_value, f"mask of support {label}"))
    elif box is not None:
        ann = to_box(box, f"support {label}: ")
    elif scribble is not None:
        ann = to_scribble(scribble, f"scribble of support {label}")
    else:
        ann = to_points(points, f"support {label}: ")  # type: ignore[arg-type]
    return Shot(img, ann, image_id=label)


def load_query(image: ImageLike, *, gt: ImageLike | None = None, class_value: ClassValue = None,
               name: str | None = None) -> Query:
    """One query image (path, PIL image or array) and optionally its ground-truth mask into a Query."""
    label = name or describe(image)
    truth = None if gt is None else to_mask(gt, class_value, f"ground truth of query {label}")
    return Query(to_image(image, f"query {label}"), truth, image_id=label)


@dataclass(frozen=True)
class SegmentResult:
    """One query's prediction and where it was written (if an output folder was given)."""

    query_id: str
    prob: np.ndarray
    mask: np.ndarray
    files: WrittenPrediction | None


def _augmenter(spec: str, options: Mapping[str, Any]):
    """A DifFSS Augmenter for ``spec`` (e.g. ``'hed:4'``); its models load on the first cache miss."""
    from fsdiff.augment.augmenter import Augmenter
    from fsdiff.augment.controls import parse_condition
    from fsdiff.augment.generate import GenerationConfig, load_generator

    opts = dict(options)
    unknown = sorted(set(opts) - {"cache", "model", "controlnet", "per_shot", "steps", "resolution", "seed"})
    if unknown:
        raise FsdiffError(f"augment_options {unknown}: unknown; use cache, model, controlnet, per_shot, steps, "
                          "resolution, seed.")
    kind, _n = parse_condition(spec)
    config = GenerationConfig(seed=int(opts.get("seed", 0))).replace(resolution=int(opts.get("resolution", 512)))
    if opts.get("steps") is not None:
        config = config.replace(steps=int(opts["steps"]))
    gen = load_generator(kind, model=opts.get("model"), controlnet=opts.get("controlnet"), cache=opts.get("cache"),
                         config=config, lazy=True)
    return Augmenter(gen, spec, per_shot=opts.get("per_shot", "first"))


class Segmenter(Pipeline):
    """A segmentation method built once by name, with its models loaded once, reused for any number of calls.

    ``method``: a registered method (``fsdiff.methods.method_names()``); ``encoder``: swap the frozen
    encoder; ``checkpoint``: trained weights; ``threshold``: the decision threshold (default the method's);
    ``benchmark`` ({dataset, fold, convention}): lets a method with shipped weights pick the checkpoint
    blind to that fold's classes; ``augment`` (``'hed:4'``) with ``augment_options`` (cache, model,
    controlnet, per_shot, steps, resolution, seed): DifFSS generated supports; ``support_masks``: how box,
    scribble and click supports become masks first (:mod:`fsdiff.weaklabel`; default ``'grabcut'``; ``'off'``
    uses the labels as they are); ``refine``: the edge refinement
    of every probability map (:mod:`fsdiff.refine`; default ``'guided'``, which gained on every setting measured,
    docs/BENCHMARKS.md; ``'off'`` or None for the method's raw maps); ``options``: the method's own.
    """

    def __init__(self, method: str = DEFAULT_METHOD, *, encoder: str | None = None,
                 checkpoint: str | os.PathLike | None = None, threshold: float | None = None,
                 benchmark: Mapping[str, Any] | None = None, augment: str | None = None,
                 augment_options: Mapping[str, Any] | None = None, support_masks: Any = DEFAULT_SUPPORT_MASKS,
                 refine: Any = DEFAULT_REFINE, **options: Any) -> None:
        from fsdiff.methods import build_method
        from fsdiff.refine import as_refiner
        from fsdiff.weaklabel import as_support_step

        refiner, support_step = as_refiner(refine), as_support_step(support_masks)  # bad specs fail before loading
        if encoder is not None:
            options["encoder"] = encoder
        if checkpoint is not None:
            options["checkpoint"] = checkpoint
        built = build_method(method, benchmark=benchmark, **options)
        super().__init__(built, support_step=support_step, refiner=refiner,
                         augmenter=_augmenter(augment, augment_options or {}) if augment else None)
        self.method_name = method
        if threshold is not None:
            self.threshold = _check_threshold(threshold)

    @property
    def support_masks_spec(self) -> str:
        """The weak-label step in force, as text (``'off'`` or e.g. ``'grabcut'``)."""
        return "off" if self.support_step is None else self.support_step.spec

    @property
    def refine_spec(self) -> str:
        """The refinement in force, as text (``'off'`` or e.g. ``'guided:size=384,...'``)."""
        return "off" if self.refiner is None else self.refiner.config.spec()

    @classmethod
    def from_method(cls, method: Any) -> "Segmenter":
        """A Segmenter around an already built method object (any :class:`fsdiff.protocol.Segmenter`)."""
        if isinstance(method, Segmenter):
            return method
        seg = cls.__new__(cls)
        Pipeline.__init__(seg, method)
        seg.method_name = str(getattr(method, "name", type(method).__name__))
        return seg

    def iter_segment(self, shots: Sequence[Shot], queries: Iterable[Query | ImageLike], *, class_name: str = "object",
                     out: str | os.PathLike | None = None, formats: Sequence[str] = ("png",), overlay: bool = True,
                     overwrite: bool = False, progress: bool = False) -> Iterator[SegmentResult]:
        """Segment ``queries`` one at a time (loaded lazily, so memory does not grow with their number)."""
        items = list(queries)
        if not items:
            raise FsdiffError("queries: no query image given; pass at least one.")
        names = [_query_name(q, i) for i, q in enumerate(items)]
        estimates = estimate_file_names(shots) if self.support_step is not None else {}
        folder = OutputFolder(out, names, formats=formats, overlay=overlay, overwrite=overwrite,
                              extra=tuple(estimates.values())) if out is not None else None
        first = _as_query(items[0], names[0])
        prepared = self.prepare(Episode(class_id=0, class_name=class_name, shots=tuple(shots), queries=(first,)))
        if folder is not None:
            _write_estimates(folder, prepared, estimates)
        bar = _progress(len(items), progress)
        try:
            for i, item in enumerate(items):
                query = first if i == 0 else _as_query(item, names[i])
                prob = self.predict_prepared(self.with_queries(prepared, (query,)))[0]
                files = folder.write(i, query.image, prob, self.threshold) if folder is not None else None
                bar.update(1)
                yield SegmentResult(names[i], prob, prob > self.threshold, files)
        finally:
            bar.close()
            if folder is not None and folder.done:
                folder.finish(class_name)

    def segment(self, shots: Sequence[Shot], queries: Iterable[Query | ImageLike], **kwargs: Any) -> list[SegmentResult]:
        """Every query's result (see :meth:`iter_segment` for the keyword arguments)."""
        return list(self.iter_segment(shots, queries, **kwargs))


def estimate_file_names(shots: Sequence[Shot]) -> dict[int, str]:
    """Output names of the estimated masks: ``support<i>_<stem>_estimate.png`` per weak-label support (by index)."""
    from fsdiff.output import unique_stems

    weak = [i for i, s in enumerate(shots) if s.annotation.kind in ("box", "scribble", "points")]
    stems = unique_stems([shots[i].image_id or f"support{i + 1}" for i in weak])
    return {i: f"support{i + 1}_{stem}_estimate.png" for i, stem in zip(weak, stems)}


def _write_estimates(folder: OutputFolder, prepared: Episode, names: Mapping[int, str]) -> None:
    """Write each estimated support mask (0 background, 255 object, 128 unsure) beside the outputs."""
    from fsdiff.io import IGNORE, write_image

    for i, name in names.items():
        mask = getattr(prepared.shots[i].annotation, "mask", None)
        if mask is not None:
            picture = np.where(mask == IGNORE, 128, np.where(mask == 1, 255, 0)).astype(np.uint8)
            folder.write_file(name, lambda p, a=picture: write_image(p, a))


def _check_threshold(value: Any) -> float:
    try:
        t = float(value)
    except (TypeError, ValueError):
        t = float("nan")
    if not 0.0 < t < 1.0:
        raise FsdiffError(f"threshold={value!r}: must be a number strictly between 0 and 1 (e.g. 0.5).")
    return t


def _query_name(item: Query | ImageLike, index: int) -> str:
    """A query's name in outputs: its image id or path, else ``query<index>``."""
    if isinstance(item, Query):
        return item.image_id or f"query{index}"
    return os.fspath(item) if isinstance(item, (str, os.PathLike)) else f"query{index}"


def _as_query(item: Query | ImageLike, name: str) -> Query:
    return item if isinstance(item, Query) else load_query(item, name=name)


def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc="segment", unit="query", disable=not enabled, file=sys.stderr, dynamic_ncols=True)


def build_segmenter(method: str = DEFAULT_METHOD, *, encoder: str | None = None,
                    benchmark: Mapping[str, Any] | None = None, **kwargs: Any) -> Segmenter:
    """A :class:`Segmenter` by name (kept for scripts written against earlier fsdiff versions)."""
    return Segmenter(method, encoder=encoder, benchmark=benchmark, **kwargs)


def segment(shots: Sequence[Shot], queries: Iterable[Query | ImageLike], *, class_name: str = "object",
            method: str = DEFAULT_METHOD, encoder: str | None = None, out: str | os.PathLike | None = None,
            segmenter: Segmenter | None = None, **kwargs: Any) -> list[SegmentResult]:
    """Segment every query given the support shots (a new :class:`Segmenter` unless one is passed)."""
    queries = list(queries)
    if out is not None:  # refuse a bad output folder before any model loads
        OutputFolder(out, [_query_name(q, i) for i, q in enumerate(queries)],
                     formats=kwargs.get("formats", ("png",)), overlay=kwargs.get("overlay", True),
                     overwrite=kwargs.get("overwrite", False))
    seg = Segmenter.from_method(segmenter) if segmenter is not None else Segmenter(method, encoder=encoder)
    return seg.segment(shots, queries, class_name=class_name, out=out, **kwargs)


def evaluate_benchmark(dataset: str, root: str | os.PathLike, *, method: str = DEFAULT_METHOD,
                       encoder: str | None = None, segmenter: Segmenter | None = None, fold: int = 0,
                       **kwargs: Any) -> tuple[dict, str]:
    """Score a method on one benchmark fold (see :func:`fsdiff.benchmark.evaluate_benchmark` for the options).

    Without ``segmenter`` one is built for the benchmark, so a method with shipped weights picks the
    checkpoint that never saw this fold's classes.
    """
    from fsdiff.benchmark import evaluate_benchmark as run

    if segmenter is None:
        bench = {"dataset": dataset, "fold": fold, "convention": kwargs.get("convention") or "interleaved"}
        segmenter = Segmenter(method, encoder=encoder, benchmark=bench)
    return run(Segmenter.from_method(segmenter), dataset, root, fold=fold, **kwargs)


def train(method: str, dataset: str, root: str | os.PathLike, out: str | os.PathLike, *, fold: int | None = 0,
          all_classes: bool = False, config: Mapping[str, Any] | None = None, input_size: int | None = None,
          ann: str | os.PathLike | None = None, splits_dir: str | os.PathLike | None = None,
          convention: str | None = None, **options: Any):
    """Train ``method`` on a benchmark's base classes (``all_classes=True``: every class) into ``out``.

    Mirrors ``fsdiff train``: ``config`` overrides fields of the method's training config (``input_size`` is
    one of them); the method's model options (``fsdiff.methods.method_spec(m).model_options``, e.g. DiffUp's
    ``encoder``, DiffSeg's ``prior``/``decoder``) and the trainer's (``steps``, ``batch_size``, ``lr``,
    ``warmup``, ``save_every``, ``seed``, ``num_threads``, ``mixed_precision``, ``progress``) are keywords.
    Re-running with the same ``out`` resumes from its latest checkpoint. Returns :class:`fsdiff.train.TrainResult`.
    """
    from fsdiff.methods import load_object, method_spec, trainable_methods

    spec = method_spec(method)
    if spec.trainer is None:
        raise FsdiffError(f"method {method!r} is training-free; trainable methods: {', '.join(trainable_methods())}.")
    fields = dict(config or {})
    for opt in spec.model_options:
        if opt.target == "config" and options.get(opt.name) is not None:
            fields = _merge_field(fields, opt.field or opt.name, options.pop(opt.name), opt.name)
    fields = _merge_field(fields, "input_size", input_size, "input_size")
    cfg = spec.make_config(**fields)
    split = "trn" if test_split(dataset) is not None else None  # a folder has no splits: all of it
    source = open_source(dataset, root, fold=None if all_classes else fold, split=split, ann=ann,
                         splits_dir=splits_dir, convention=convention)
    trainer = load_object(spec.trainer)
    return trainer(source, out, config=cfg, **{k: v for k, v in options.items() if v is not None})


def _merge_field(fields: dict, key: str, value: Any, name: str) -> dict:
    """``fields`` with ``key`` set from a dedicated argument; a conflicting config entry is an error."""
    if value is None:
        return fields
    if key in fields and fields[key] != value:
        raise FsdiffError(f"{name}={value!r} disagrees with the config's {key} ({fields[key]!r}); give one of them.")
    return {**fields, key: value}


def demo(out: str | os.PathLike = "fsdiff-demo", *, method: str = DEFAULT_METHOD, encoder: str | None = None,
         segmenter: Segmenter | None = None, overwrite: bool = False) -> list:
    """Run the bundled demo (:func:`fsdiff.demo.run_demo`): one class from a mask, box, scribble, clicks and
    5 shots; returns one :class:`fsdiff.demo.DemoRecord` per case (IoU in percent)."""
    from fsdiff.demo import run_demo

    seg = Segmenter.from_method(segmenter) if segmenter is not None else Segmenter(method, encoder=encoder)
    return run_demo(out, seg, overwrite=overwrite)
