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
from fsdiff.io import read_image, read_mask
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


def build_segmenter(method: str = DEFAULT_METHOD, *, encoder: str | None = None, **kwargs):
    """Build a segmenter by name, optionally with another frozen encoder."""
    from fsdiff.methods import build_method

    if encoder is not None:
        kwargs["encoder"] = encoder
    return build_method(method, **kwargs)


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


def mask_iou(pred: np.ndarray, gt: np.ndarray) -> float:
    """IoU of a binary prediction against a {0,1,255} mask, ignore pixels excluded."""
    valid = gt != 255
    p, g = pred.astype(bool) & valid, (gt == 1) & valid
    union = np.logical_or(p, g).sum()
    return float(np.logical_and(p, g).sum() / union) if union else 1.0


@dataclass(frozen=True)
class DemoResult:
    """One bundled example: its name, the written files and the IoU against the reference mask."""

    name: str
    annotation: str
    query: str
    iou: float
    files: WrittenPrediction


def demo(out: str | os.PathLike = "fsdiff-demo", *, method: str = DEFAULT_METHOD, encoder: str | None = None) -> list[DemoResult]:
    """Segment the bundled example images with the default offline method and write overlays."""
    manifest = json.loads((EXAMPLES_DIR / "examples.json").read_text())
    seg = build_segmenter(method, encoder=encoder)
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
            results.append(DemoResult(ep["name"], shots[0].annotation.kind, Path(q.image_id).name, mask_iou(r.mask, q.gt), r.files))
    return results
