"""Generation-drift scores and a drift filter for DifFSS auxiliary supports ([R], beyond the paper).

DifFSS reuses the real support mask for every generated image, and names *generation drift* (the generated
object no longer lines up with that mask, mostly for small or scattered objects) as a limitation (DifFSS,
arXiv 2307.00773, which also notes that poor supports make it worse). Nothing in the paper measures it. This
module gives two per-image drift scores (higher = better aligned) and a filter built on them:

* ``segment`` (:func:`segment_score`): segment the generated image with the real support as the 1-shot
  support, using any :class:`~fsdiff.protocol.Segmenter` (default: ``build_method('prototype')``), and score
  IoU(prob > segmenter.threshold, reused mask), ignore pixels (255) excluded. For a box/scribble/points
  support the "mask" is the annotation's foreground region (the box, or the strokes), so scores are only
  comparable between images of the same support.
* ``separability`` (:func:`separability_score`): segmenter-free. Frozen features of the generated image
  (any callable ``features(image) -> (C, h, w)``; default :func:`encoder_features`, EfficientNet-Lite0 stride
  16; :func:`colour_features` is a model-free alternative) are compared with the image's own fg/bg prototypes
  under the reused mask: per cell ``s = cos(f, p_fg) - cos(f, p_bg)``, and the score is the AUC of ``s`` for
  mask cells against background cells (0.5 = no separation, 1 = the mask cuts the image exactly along a
  feature boundary). If the object drifted, part of it lies outside the mask and part of the mask covers
  background, so the AUC drops. ``method='fisher'`` gives Fisher's ratio of ``s`` instead (unbounded).
  Cells straddling the mask boundary (mask fraction strictly between 0.25 and 0.75) are left out; a mask
  without background cells (or without fg cells) is unscorable: NaN.

:class:`DriftFilter` scores each generated image; an image under the threshold is regenerated with the next
seed of its deterministic sequence (``attempt`` 1, 2, ... of :func:`fsdiff.augment.generate.derive_seed`) up to
``max_retries`` times, then dropped (or, with ``on_exhausted='keep_best'``, its best attempt is kept). Unscorable
images (NaN) are kept and counted. Every score and outcome lands in a :class:`DriftReport`.

Default thresholds are uncalibrated starting points (IoU 0.5 for ``segment``, AUC 0.8 for ``separability``);
calibrate them on a benchmark's score distribution (``DriftReport.summary()``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

from fsdiff.episode import Annotation, Episode, MaskAnnotation, Query, Shot, check_image
from fsdiff.errors import FsdiffError
from fsdiff.metrics import binary_iou

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from fsdiff.augment.generate import GeneratedImage, Generator
    from fsdiff.protocol import Segmenter

SCORES = ("segment", "separability")
DEFAULT_THRESHOLDS = {"segment": 0.5, "separability": 0.8}
"""Uncalibrated defaults [R]: IoU for 'segment', AUC for 'separability'."""
ON_EXHAUSTED = ("drop", "keep_best")
FG_MIN, BG_MAX = 0.75, 0.25
"""Separability cells count as foreground at mask fraction >= FG_MIN, background at <= BG_MAX."""
WORK_SIDE = 128
"""Longest side of the grid the separability score works on."""

ScoreFn = Callable[[np.ndarray, Annotation, np.ndarray], float]
FeatureFn = Callable[[np.ndarray], Any]


# ----------------------------------------------------------------------------------------------
# regions
# ----------------------------------------------------------------------------------------------


def reused_regions(annotation: Annotation | np.ndarray, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(foreground, valid) boolean maps of the reused annotation on an image of ``shape`` (valid excludes 255)."""
    if isinstance(annotation, np.ndarray):
        annotation = MaskAnnotation(annotation)
    if isinstance(annotation, MaskAnnotation):
        m = annotation.mask
        if tuple(m.shape) != tuple(shape):
            raise FsdiffError(f"drift score: the mask is {m.shape} but the generated image is {tuple(shape)} (HxW).")
        fg, valid = m == 1, m != 255
    else:
        fg = annotation.regions(tuple(shape))[0]
        valid = np.ones(shape, bool)
    if not (fg & valid).any():
        raise FsdiffError("drift score: the reused mask is empty (no class pixel); nothing to compare the image with.")
    return fg, valid


# ----------------------------------------------------------------------------------------------
# (a) segment-and-compare
# ----------------------------------------------------------------------------------------------


def segment_score(
    real_image: np.ndarray,
    annotation: Annotation | np.ndarray,
    generated: np.ndarray,
    segmenter: Segmenter,
    class_name: str = "object",
) -> float:
    """IoU of the segmenter's mask of ``generated`` (1-shot support: the real support) with the reused mask."""
    check_image(generated, "generated image")
    if isinstance(annotation, np.ndarray):
        annotation = MaskAnnotation(annotation)
    if tuple(generated.shape[:2]) != tuple(real_image.shape[:2]):
        raise FsdiffError(
            f"drift score: generated image {generated.shape[:2]} and real support {real_image.shape[:2]} (HxW) "
            "differ; resize the generated image back to the support's size first."
        )
    fg, valid = reused_regions(annotation, generated.shape[:2])
    episode = Episode(0, class_name, (Shot(real_image, annotation, image_id="real"),),
                      (Query(generated, image_id="generated"),), episode_id="drift")
    prob = np.asarray(segmenter.predict(episode)[0])
    if prob.shape != fg.shape:
        raise FsdiffError(f"drift score: the segmenter returned a {prob.shape} map for a {fg.shape} image.")
    return float(binary_iou(prob > float(segmenter.threshold), fg, valid))


# ----------------------------------------------------------------------------------------------
# (b) feature separability
# ----------------------------------------------------------------------------------------------


def colour_features(image: np.ndarray, side: int = 64) -> np.ndarray:
    """Model-free features: CIE Lab colour (3, h, w) on a grid whose longest side is ``side``, scaled to ~[0, 1]."""
    check_image(image, "image")
    h, w = image.shape[:2]
    k = min(1.0, float(side) / max(h, w))
    small = cv2.resize(image, (max(1, round(w * k)), max(1, round(h * k))), interpolation=cv2.INTER_AREA)
    lab = cv2.cvtColor(small, cv2.COLOR_RGB2LAB).astype(np.float32) / 255.0
    return np.ascontiguousarray(lab.transpose(2, 0, 1))


def encoder_features(encoder: Any = "efficientnet-lite0", level: int = 1, size: int | Sequence[int] = 320,
                     device: str = "cpu") -> FeatureFn:
    """A ``features(image) -> (C, h, w)`` callable on a frozen fsdiff encoder's level ``level`` (built lazily)."""
    state: dict[str, Any] = {"enc": encoder if not isinstance(encoder, str) else None}

    def features(image: np.ndarray) -> "torch.Tensor":
        if state["enc"] is None:
            from fsdiff.features import build_encoder

            state["enc"] = build_encoder(encoder, device=device, precision="auto")
        enc = state["enc"]
        if not 0 <= int(level) < enc.levels:
            raise FsdiffError(f"level must be in 0..{enc.levels - 1} for encoder {enc.name}, got {level!r}.")
        return enc.encode(image, size)[int(level)]

    return features


def _as_chw(feats: Any) -> np.ndarray:
    """A (C, h, w) float64 array from a tensor or an array."""
    if hasattr(feats, "detach"):
        feats = feats.detach().float().cpu().numpy()
    arr = np.asarray(feats, dtype=np.float64)
    if arr.ndim == 4 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 3 or min(arr.shape) < 1:
        raise FsdiffError(f"features(image) must return a (C, h, w) map, got shape {arr.shape}.")
    return arr


def auc(positive: np.ndarray, negative: np.ndarray) -> float:
    """Area under the ROC curve of ``positive`` vs ``negative`` scores (Mann-Whitney, ties counted half)."""
    p, q = np.asarray(positive, np.float64).ravel(), np.asarray(negative, np.float64).ravel()
    if p.size == 0 or q.size == 0:
        return float("nan")
    allv = np.concatenate([p, q])
    uniq, inv, counts = np.unique(allv, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    avg_rank = ends - (counts - 1) / 2.0  # 1-based average rank of each distinct value
    ranks = avg_rank[inv]
    u = ranks[: p.size].sum() - p.size * (p.size + 1) / 2.0
    return float(u / (p.size * q.size))


def separability_score(
    image: np.ndarray,
    annotation: Annotation | np.ndarray,
    features: FeatureFn | None = None,
    *,
    method: str = "auc",
    work_side: int = WORK_SIDE,
) -> float:
    """How well the reused mask separates the generated image's features (prototype-cosine AUC, or Fisher)."""
    check_image(image, "generated image")
    if method not in ("auc", "fisher"):
        raise FsdiffError(f"separability method must be 'auc' or 'fisher', got {method!r}.")
    fg, valid = reused_regions(annotation, image.shape[:2])
    feats = _as_chw((features or colour_features)(image))
    h, w = fg.shape
    k = min(1.0, float(work_side) / max(h, w))
    gh, gw = max(1, round(h * k)), max(1, round(w * k))
    grid = np.stack([cv2.resize(c.astype(np.float32), (gw, gh), interpolation=cv2.INTER_LINEAR) for c in feats])
    frac = cv2.resize(fg.astype(np.float32), (gw, gh), interpolation=cv2.INTER_AREA)
    vfrac = cv2.resize(valid.astype(np.float32), (gw, gh), interpolation=cv2.INTER_AREA)
    ok = vfrac >= 0.5
    fg_cells, bg_cells = ok & (frac >= FG_MIN), ok & (frac <= BG_MAX)
    if not fg_cells.any() or not bg_cells.any():
        return float("nan")
    f = grid.reshape(grid.shape[0], -1).T.astype(np.float64)  # (cells, C)
    f = f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)
    fgm, bgm = fg_cells.ravel(), bg_cells.ravel()

    def unit(v: np.ndarray) -> np.ndarray:
        return v / max(float(np.linalg.norm(v)), 1e-12)

    s = f @ unit(f[fgm].mean(0)) - f @ unit(f[bgm].mean(0))
    if method == "auc":
        return auc(s[fgm], s[bgm])
    a, b = s[fgm], s[bgm]
    return float((a.mean() - b.mean()) ** 2 / max(a.var() + b.var(), 1e-12))


# ----------------------------------------------------------------------------------------------
# the filter and its report
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DriftRecord:
    """One scored image: which support/index/attempt, its seed and score, and what happened to it."""

    support_id: str
    index: int
    attempt: int
    seed: int
    score: float
    outcome: str
    """'kept', 'retried' (replaced by the next attempt), 'dropped', 'kept_best' (best of all attempts, kept under
    ``on_exhausted='keep_best'``), 'rejected' (a last attempt that lost to an earlier one) or 'unscored' (NaN, kept)."""


@dataclass
class DriftReport:
    """Scores and outcomes of a drift filter (one call, or merged over many)."""

    score: str
    threshold: float
    max_retries: int
    records: list[DriftRecord] = field(default_factory=list)
    kept: int = 0
    regenerated: int = 0  # not derivable from the records: keep_best rewrites a retried record as kept_best
    dropped: int = 0
    unscored: int = 0

    @property
    def scores(self) -> list[float]:
        """Every score computed (first attempts and retries), in order."""
        return [r.score for r in self.records]

    @property
    def first_scores(self) -> list[float]:
        """Scores of the first attempts only: the unfiltered drift distribution."""
        return [r.score for r in self.records if r.attempt == 0]

    def merged(self, other: "DriftReport") -> "DriftReport":
        """A new report holding both reports' records and counts."""
        return dataclasses.replace(self, records=list(self.records)).add(other)

    def add(self, other: "DriftReport") -> "DriftReport":
        """Add ``other``'s records and counts to this report (in place, for running totals); returns self."""
        self.records.extend(other.records)
        self.kept += other.kept
        self.regenerated += other.regenerated
        self.dropped += other.dropped
        self.unscored += other.unscored
        return self

    def summary(self) -> dict[str, Any]:
        """Distribution of the first-attempt scores: n, mean, quantiles, fraction under the threshold."""
        v = np.asarray([s for s in self.first_scores if math.isfinite(s)], np.float64)
        if v.size == 0:
            return {"n": 0}
        q = np.quantile(v, [0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0])
        return {"n": int(v.size), "mean": float(v.mean()), "std": float(v.std()),
                "quantiles": dict(zip(("min", "p10", "p25", "median", "p75", "p90", "max"), map(float, q))),
                "below_threshold": float(np.mean(v < self.threshold))}

    def as_dict(self) -> dict[str, Any]:
        """Plain dict for JSON reports (scores rounded to 6 digits, NaN as None)."""
        def num(x: float) -> float | None:
            return round(float(x), 6) if math.isfinite(x) else None

        return {
            "score": self.score, "threshold": self.threshold, "max_retries": self.max_retries,
            "kept": self.kept, "regenerated": self.regenerated, "dropped": self.dropped, "unscored": self.unscored,
            "scores": [num(s) for s in self.scores], "summary": self.summary(),
            "records": [{"support_id": r.support_id, "index": r.index, "attempt": r.attempt, "seed": r.seed,
                         "score": num(r.score), "outcome": r.outcome} for r in self.records],
        }


class DriftFilter:
    """Score generated supports; regenerate (new seeds) those under ``threshold``, then drop the rest."""

    def __init__(
        self,
        score: str | ScoreFn = "segment",
        threshold: float | None = None,
        max_retries: int = 2,
        *,
        segmenter: Segmenter | None = None,
        features: FeatureFn | None = None,
        on_exhausted: str = "drop",
    ) -> None:
        """``score``: 'segment', 'separability' or a callable ``(real_image, annotation, generated) -> float``."""
        if callable(score):
            self.score_name, self._fn = getattr(score, "__name__", "custom"), score
        elif score in SCORES:
            self.score_name, self._fn = score, None
        else:
            raise FsdiffError(f"drift score must be one of {', '.join(SCORES)} or a callable, got {score!r}.")
        if threshold is None:
            if self._fn is not None:
                raise FsdiffError("a custom drift score needs an explicit threshold.")
            threshold = DEFAULT_THRESHOLDS[self.score_name]
        if not isinstance(threshold, (int, float, np.integer, np.floating)) or not math.isfinite(float(threshold)):
            raise FsdiffError(f"drift threshold must be a finite number, got {threshold!r}.")
        if isinstance(max_retries, bool) or not isinstance(max_retries, (int, np.integer)) or max_retries < 0:
            raise FsdiffError(f"max_retries must be a non-negative integer, got {max_retries!r}.")
        if on_exhausted not in ON_EXHAUSTED:
            raise FsdiffError(f"on_exhausted must be 'drop' or 'keep_best', got {on_exhausted!r}.")
        self.threshold = float(threshold)
        self.max_retries = int(max_retries)
        self.on_exhausted = on_exhausted
        self._segmenter = segmenter
        self._features = features
        self.report = self._new_report()
        """Cumulative report over every :meth:`filter` call since construction or :meth:`reset`."""

    def __repr__(self) -> str:
        return f"DriftFilter({self.score_name!r}, threshold={self.threshold}, max_retries={self.max_retries})"

    def _new_report(self) -> DriftReport:
        return DriftReport(self.score_name, self.threshold, self.max_retries)

    def reset(self) -> None:
        """Forget the cumulative report."""
        self.report = self._new_report()

    @property
    def segmenter(self) -> Segmenter:
        """The segmenter of the 'segment' score (the prototype method unless one was given)."""
        if self._segmenter is None:
            from fsdiff.methods import build_method

            self._segmenter = build_method("prototype")
        return self._segmenter

    @property
    def features(self) -> FeatureFn:
        """The feature callable of the 'separability' score (EfficientNet-Lite0 level 1 unless one was given)."""
        if self._features is None:
            self._features = encoder_features()
        return self._features

    def score_image(self, real_image: np.ndarray, annotation: Annotation | np.ndarray, generated: np.ndarray,
                    class_name: str = "object") -> float:
        """The drift score of one generated image (already at the real support's size)."""
        if self._fn is not None:
            return float(self._fn(real_image, annotation, generated))
        if self.score_name == "segment":
            return segment_score(real_image, annotation, generated, self.segmenter, class_name)
        return separability_score(generated, annotation, self.features)

    def filter(
        self,
        generator: Generator,
        image: np.ndarray,
        annotation: Annotation | np.ndarray,
        class_name: str,
        items: Sequence[GeneratedImage],
        *,
        support_id: str = "",
    ) -> tuple[list[GeneratedImage], DriftReport]:
        """Score ``items``; regenerate low scorers (next attempt, same index) or drop them. Returns (kept, report)."""
        rep = self._new_report()
        kept: list[GeneratedImage] = []
        for item in items:
            current, attempt, best = item, int(item.attempt), None
            retries = 0
            while True:
                s = float(self.score_image(image, annotation, current.image, class_name))
                if not math.isfinite(s):
                    rep.records.append(DriftRecord(support_id, current.index, attempt, current.seed, s, "unscored"))
                    rep.unscored += 1
                    rep.kept += 1
                    kept.append(current)
                    break
                if best is None or s > best[0]:
                    best = (s, current, len(rep.records))
                if s >= self.threshold:
                    rep.records.append(DriftRecord(support_id, current.index, attempt, current.seed, s, "kept"))
                    rep.kept += 1
                    kept.append(current)
                    break
                if retries < self.max_retries:
                    rep.records.append(DriftRecord(support_id, current.index, attempt, current.seed, s, "retried"))
                    retries += 1
                    attempt += 1
                    rep.regenerated += 1
                    current = generator.generate(image, annotation, class_name, indices=[current.index],
                                                 attempt=attempt)[0]
                    continue
                if self.on_exhausted == "keep_best":
                    rep.records.append(DriftRecord(support_id, current.index, attempt, current.seed, s, "rejected"))
                    bs, bitem, bpos = best
                    old = rep.records[bpos]
                    rep.records[bpos] = DriftRecord(old.support_id, old.index, old.attempt, old.seed, old.score,
                                                    "kept_best")
                    rep.kept += 1
                    kept.append(bitem)
                else:
                    rep.records.append(DriftRecord(support_id, current.index, attempt, current.seed, s, "dropped"))
                    rep.dropped += 1
                break
        self.report.add(rep)
        return kept, rep


__all__ = [
    "DEFAULT_THRESHOLDS", "DriftFilter", "DriftRecord", "DriftReport", "SCORES", "auc", "colour_features",
    "encoder_features", "reused_regions", "segment_score", "separability_score",
]
