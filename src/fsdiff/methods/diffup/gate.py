"""DiffUp's prior check: a training-free confidence test of the prototype prior that decides, per query,
whether DiffUp's learned correction runs at all (a fsdiff addition to DiffUp, arXiv 2407.16182; the
measurements behind it are in docs/bench/diffup_vs_prototype.md).

The check is PANet's prototype alignment (Wang et al., "PANet: Few-Shot Image Semantic Segmentation with
Prototype Alignment", ICCV 2019, Sec. 3.3), used at inference instead of as a training loss: the query's
predicted mask (``prior > 0.5``) becomes a support and segments every spatial support image back with the
same training-free prototype method. The score is the IoU of that back-prediction with the support's own
foreground region, counted over the support's labelled pixels (its foreground and background regions:
the whole image for a mask or a box, the strokes and the area far from them for a scribble), averaged
over the spatial shots. A prior that found the object reproduces the support's annotation (horses:
mean score 0.76); one that did not, does not (coco-mini: 0.27).

:class:`~fsdiff.methods.diffup.segmenter.DiffUpSegmenter` checks episodes whose spatial shots are all masks
(a box or scribble region is not the object: a prior that leaks over a box's background reproduces the
box), returns the prior itself where the score is at least its ``prior_gate`` threshold, and the decoder's
sample elsewhere: on coco-mini the shipped decoder
gains where the prior failed, and on Weizmann horses, where the prior is good, every decoder variant
measured lost to it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fsdiff.episode import Episode, MaskAnnotation, Query, Shot
from fsdiff.errors import FsdiffError


def region_iou(pred: np.ndarray, foreground: np.ndarray, background: np.ndarray) -> float:
    """IoU of a boolean prediction with ``foreground``, counted over the labelled pixels (fg | bg) only."""
    if pred.shape != foreground.shape or pred.shape != background.shape:
        raise FsdiffError(
            f"region_iou: prediction {pred.shape} and regions {foreground.shape} / {background.shape} differ in shape."
        )
    labelled = foreground | background
    p = pred & labelled
    union = int((p | foreground).sum())
    return float((p & foreground).sum()) / union if union else 0.0


def prior_check(prior, episode: Episode, query_index: int, prob: np.ndarray, threshold: float = 0.5) -> float:
    """The prior check score in [0, 1] of one query (see the module docstring).

    ``prior`` is the training-free segmenter that produced ``prob`` (a
    :class:`~fsdiff.methods.prototype.PrototypeSegmenter`; it segments each support back from the query),
    ``prob`` the query's foreground probability at the query's resolution. An empty predicted mask, or an
    episode without a spatial shot, scores 0.
    """
    query = episode.queries[query_index]
    if tuple(prob.shape) != tuple(query.shape):
        raise FsdiffError(f"prior_check: prob {prob.shape} does not match the query's shape {query.shape}.")
    mask = (np.asarray(prob) > threshold).astype(np.uint8)
    shots = [s for s in episode.shots if s.annotation.kind != "text"]
    if not shots or not mask.any():
        return 0.0
    scores = []
    as_support = (Shot(query.image, MaskAnnotation(mask), image_id=query.image_id),)
    for shot in shots:
        back = Episode(episode.class_id, episode.class_name, as_support, (Query(shot.image, image_id=shot.image_id),))
        pred = prior.predict(back)[0] > threshold
        fg, bg = shot.annotation.regions(shot.shape)
        scores.append(region_iou(pred, np.asarray(fg, bool), np.asarray(bg, bool)))
    return float(np.mean(scores))


def gate_decisions(scores: Sequence[float], threshold: float | None) -> list[bool]:
    """Per query: True where the decoder runs (score below ``threshold``); all True when the gate is off (None)."""
    if threshold is None:
        return [True] * len(scores)
    return [float(s) < float(threshold) for s in scores]
