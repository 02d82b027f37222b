"""Few-shot segmentation metrics, computed exactly as the reference codebases compute them.

Reproduces HSNet ``common/evaluation.py`` (``Evaluator.classify_prediction``) and
``common/logger.py`` (``AverageMeter.compute_iou``), cross-checked against BAM / PFENet
``util/util.py`` (``intersectionAndUnionGPU``) and the class-wise accumulation of BAM's ``test.py``
(HSNet: Min et al., ICCV 2021, arXiv 2104.01538; BAM: Lang et al., CVPR 2022, arXiv 2203.07615).

Per query, two-class areas (index 0 = background, 1 = foreground) are counted over the pixels whose
ground truth is not 255; HSNet overwrites the prediction with 255 wherever the ground truth is 255
and counts with ``histc(bins=2, min=0, max=1)``, so ignore pixels leave both prediction and ground
truth. Then, for the classes of the fold:

* ``IoU_c = sum_inter_c / max(sum_union_c, 1)`` with the sums over every query of class ``c``
  (HSNet's guard; BAM's ``/(union + 1e-10)`` gives the same number because the areas are integers);
* ``mIoU = mean_c IoU_c`` over *all* the fold's classes: a class that never appeared (union 0)
  scores 0 and still counts in the mean, as in HSNet (``iou[1].mean()`` over ``class_ids_interest``)
  and BAM (``class_miou / split_gap``);
* ``FB-IoU = mean(IoU_bg, IoU_fg)`` where each is ``sum inter / sum union`` pooled over every query
  of the fold (HSNet sums the per-class buffers over the fold's classes, BAM accumulates over all
  episodes; the two are the same). Guarded with ``max(union, 1)``, so an empty meter gives 0 rather
  than HSNet's NaN.

Everything is reported in percent.

Scoring resolution. ``'original'`` (default) scores at the query's label resolution; a probability
map of another size is first upsampled bilinearly with ``align_corners=True`` (what HSNet's
``use_original_imgsize`` path and BAM do to their logits). BAM additionally pads the label to a
square of its long side with 255; the padding is ignored, so its counts are the counts at the
original label resolution, i.e. the same as ours. An integer (HSNet's default is 400, the
``use_original_imgsize=False`` protocol) scores on an N x N grid: the ground truth is resized with
``F.interpolate(mode='nearest')`` as HSNet does to the label, and the probability map like HSNet's
query image (``transforms.Resize`` on a PIL image: PIL bilinear), then thresholded.

Several seeds: :func:`mean_std` gives the mean and the *sample* standard deviation (``ddof=1``; 0.0
for a single seed). BAM prints only the mean of its 5 seeds and HSNet runs one seed, so the std
convention is ours: the sample std estimates the spread of a new run and is the conservative choice.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Union

import numpy as np

from fsdiff.errors import FsdiffError
from fsdiff.io import IGNORE

Resolution = Union[str, int]

HSNET_SIZE = 400
"""HSNet's fixed evaluation size (``FSSDataset.initialize(img_size=400)``)."""


def check_resolution(resolution: Resolution) -> Resolution:
    """Normalise a scoring resolution: ``'original'`` or a positive int (digit strings accepted)."""
    if isinstance(resolution, str):
        text = resolution.strip().lower()
        if text == "original":
            return "original"
        if text.isdigit():
            resolution = int(text)
    if isinstance(resolution, (int, np.integer)) and not isinstance(resolution, bool) and resolution > 0:
        from fsdiff.limits import MAX_SCORE_RESOLUTION, check_side

        return check_side(int(resolution), "resolution", MAX_SCORE_RESOLUTION)
    raise FsdiffError(
        f"scoring resolution must be 'original' or a positive size such as {HSNET_SIZE} (HSNet), "
        f"got {resolution!r}."
    )


def _check_gt(gt: np.ndarray, source: str) -> None:
    if not isinstance(gt, np.ndarray) or gt.ndim != 2:
        desc = f"an array of shape {gt.shape}" if isinstance(gt, np.ndarray) else type(gt).__name__
        raise FsdiffError(f"{source}: ground truth must be a 2-D {{0,1,255}} mask, got {desc}.")


def _check_prob(prob: np.ndarray, source: str) -> np.ndarray:
    if not isinstance(prob, np.ndarray) or prob.ndim != 2:
        desc = f"an array of shape {prob.shape}" if isinstance(prob, np.ndarray) else type(prob).__name__
        raise FsdiffError(f"{source}: a probability map must be a 2-D (H, W) array, got {desc}.")
    prob = prob.astype(np.float32, copy=False)
    if not np.isfinite(prob).all():
        raise FsdiffError(f"{source}: the probability map holds NaN or infinite values.")
    return prob


def _bilinear_align_corners(prob: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """``F.interpolate(mode='bilinear', align_corners=True)`` of a 2-D float map to ``shape``."""
    import torch
    import torch.nn.functional as F

    t = torch.from_numpy(np.ascontiguousarray(prob, dtype=np.float32))[None, None]
    return F.interpolate(t, size=tuple(shape), mode="bilinear", align_corners=True)[0, 0].numpy()


def _nearest_torch(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """``F.interpolate(mode='nearest')`` of a label mask, as HSNet resizes query labels."""
    import torch
    import torch.nn.functional as F

    t = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))[None, None]
    return F.interpolate(t, size=tuple(shape), mode="nearest")[0, 0].numpy().astype(np.uint8)


def _bilinear_pil(prob: np.ndarray, size: int) -> np.ndarray:
    """PIL bilinear resize of a float map to ``size`` x ``size`` (torchvision ``Resize`` on PIL images)."""
    from PIL import Image

    img = Image.fromarray(np.ascontiguousarray(prob, dtype=np.float32))
    return np.asarray(img.resize((size, size), Image.BILINEAR), dtype=np.float32)


def resize_for_scoring(
    prob: np.ndarray, gt: np.ndarray, resolution: Resolution = "original"
) -> tuple[np.ndarray, np.ndarray]:
    """Bring a probability map and its {0,1,255} ground truth to the grid they are scored on."""
    resolution = check_resolution(resolution)
    _check_gt(gt, "scoring")
    prob = _check_prob(prob, "scoring")
    if resolution == "original":
        if prob.shape != gt.shape:
            prob = _bilinear_align_corners(prob, gt.shape)
        return prob, gt
    size = int(resolution)
    if gt.shape != (size, size):
        gt = _nearest_torch(gt, (size, size))
    if prob.shape != (size, size):
        prob = _bilinear_pil(prob, size)
    return prob, gt


def binary_iou(pred: np.ndarray, fg: np.ndarray, valid: np.ndarray | None = None) -> float:
    """IoU of two boolean maps over the ``valid`` pixels (1.0 when both are empty there); one query, no guard."""
    if valid is None:
        valid = np.ones(fg.shape, bool)
    inter = np.count_nonzero(pred & fg & valid)
    union = np.count_nonzero((pred | fg) & valid)
    return 1.0 if union == 0 else inter / union


def intersection_and_union(pred_mask: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-query areas ``(inter[bg, fg], union[bg, fg])`` as int64, ignore (255) pixels excluded."""
    _check_gt(gt, "scoring")
    if not isinstance(pred_mask, np.ndarray) or pred_mask.shape != gt.shape:
        got = pred_mask.shape if isinstance(pred_mask, np.ndarray) else type(pred_mask).__name__
        raise FsdiffError(
            f"prediction {got} and ground truth {gt.shape} differ in size; "
            "bring both to the scoring grid first (fsdiff.metrics.resize_for_scoring)."
        )
    if pred_mask.dtype != bool:
        if pred_mask.size and not np.isin(pred_mask, (0, 1)).all():
            raise FsdiffError("a predicted mask must hold only 0 and 1 (threshold the probability map first).")
        pred_mask = pred_mask.astype(bool)
    valid = gt != IGNORE
    if gt.size and not np.isin(gt[valid], (0, 1)).all():
        raise FsdiffError("ground truth must hold only 0 (background), 1 (class) and 255 (ignore).")
    pred = pred_mask[valid]
    true = gt[valid] == 1
    n = int(pred.size)
    tp = int(np.count_nonzero(pred & true))
    n_pred = int(np.count_nonzero(pred))
    n_true = int(np.count_nonzero(true))
    fg_union = n_pred + n_true - tp
    tn = n - fg_union  # neither predicted nor labelled foreground
    bg_union = n - tp  # (n - n_pred) + (n - n_true) - tn
    inter = np.array([tn, tp], dtype=np.int64)
    union = np.array([bg_union, fg_union], dtype=np.int64)
    return inter, union


def iou_percent(inter: float, union: float) -> float:
    """``100 * inter / max(union, 1)``: HSNet's guarded IoU, in percent."""
    return 100.0 * float(inter) / max(float(union), 1.0)


class FssMeter:
    """Accumulates background/foreground intersection and union per class of one fold (HSNet ``AverageMeter``)."""

    def __init__(self, class_ids: Sequence[int]) -> None:
        ids = [int(c) for c in class_ids]
        if not ids:
            raise FsdiffError("a metric meter needs at least one class id (the classes of the fold).")
        if len(set(ids)) != len(ids):
            raise FsdiffError(f"class ids must be unique, got {ids}.")
        self.class_ids: list[int] = ids
        self._index = {c: i for i, c in enumerate(ids)}
        self.inter = np.zeros((2, len(ids)), dtype=np.int64)  # rows: background, foreground
        self.union = np.zeros((2, len(ids)), dtype=np.int64)
        self.counts = np.zeros(len(ids), dtype=np.int64)

    def __contains__(self, class_id: object) -> bool:
        return isinstance(class_id, (int, np.integer)) and int(class_id) in self._index

    def update(self, class_id: int, pred_mask: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Add one query's binary prediction against its ground truth; returns its (inter, union)."""
        c = int(class_id)
        if c not in self._index:
            raise FsdiffError(
                f"class id {c} is not one of this fold's classes {self.class_ids}; "
                "check the fold or the episode source."
            )
        inter, union = intersection_and_union(pred_mask, gt)
        i = self._index[c]
        self.inter[:, i] += inter
        self.union[:, i] += union
        self.counts[i] += 1
        return inter, union

    def merge(self, other: "FssMeter") -> "FssMeter":
        """Add another meter's counts over the same classes (e.g. another process's share of the episodes)."""
        if other.class_ids != self.class_ids:
            raise FsdiffError(f"cannot merge meters over different classes: {self.class_ids} vs {other.class_ids}.")
        self.inter += other.inter
        self.union += other.union
        self.counts += other.counts
        return self

    @property
    def n_updates(self) -> int:
        """Number of queries scored so far."""
        return int(self.counts.sum())

    def per_class_iou(self) -> dict[int, float]:
        """Foreground IoU (percent) of every class of the fold; 0 for a class never seen."""
        return {c: iou_percent(self.inter[1, i], self.union[1, i]) for c, i in self._index.items()}

    def per_class_counts(self) -> dict[int, int]:
        """Number of queries scored for every class of the fold."""
        return {c: int(self.counts[i]) for c, i in self._index.items()}

    def miou(self) -> float:
        """Mean over all the fold's classes of the foreground IoU, in percent (absent classes count 0)."""
        return float(np.mean(list(self.per_class_iou().values())))

    def fbiou(self) -> float:
        """Mean of background and foreground IoU pooled over all queries, in percent."""
        inter = self.inter.sum(axis=1)
        union = self.union.sum(axis=1)
        return float(np.mean([iou_percent(inter[k], union[k]) for k in (0, 1)]))


def mean_std(values: Sequence[float], ddof: int = 1) -> tuple[float, float]:
    """Mean and standard deviation (sample, ``ddof=1``, by default) of per-seed scores; std 0 for one value."""
    arr = np.asarray([float(v) for v in values], dtype=np.float64)
    if arr.size == 0:
        raise FsdiffError("cannot average over zero seeds.")
    std = float(arr.std(ddof=ddof)) if arr.size > ddof else 0.0
    return float(arr.mean()), std
