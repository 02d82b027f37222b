"""fsdiff.metrics against hand-computed values (HSNet / BAM conventions)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fsdiff.errors import FsdiffError
from fsdiff.metrics import (
    FssMeter,
    check_resolution,
    intersection_and_union,
    iou_percent,
    mean_std,
    resize_for_scoring,
)

I = 255  # ignore


def arr(rows, dtype=np.uint8):
    return np.array(rows, dtype=dtype)


# --- per-query areas -------------------------------------------------------------------------


def test_intersection_and_union_3x3():
    pred = arr([[1, 1, 0],
                [0, 1, 0],
                [0, 0, 0]])
    gt = arr([[1, 0, 0],
              [1, 1, 0],
              [0, 0, 0]])
    # TP = (0,0),(1,1) = 2; FP = (0,1) = 1; FN = (1,0) = 1; TN = 9 - 4 = 5
    # fg: inter = TP = 2, union = TP+FP+FN = 4; bg: inter = TN = 5, union = TN+FP+FN = 7
    inter, union = intersection_and_union(pred, gt)
    assert inter.tolist() == [5, 2]
    assert union.tolist() == [7, 4]
    assert inter.dtype == np.int64


def test_ignore_pixels_leave_prediction_and_ground_truth():
    pred = arr([[1, 1, 0],
                [0, 1, 0],
                [0, 0, 1]])
    gt = arr([[1, I, 0],
              [1, 1, 0],
              [0, 0, I]])
    # the FP at (0,1) and the predicted fg at (2,2) lie on ignore pixels: gone from both sides.
    # valid = 7 pixels: TP = (0,0),(1,1) = 2; FP = 0; FN = (1,0) = 1; TN = 7 - 3 = 4
    # fg: inter 2, union 3; bg: inter 4, union 4 + 0 + 1 = 5
    inter, union = intersection_and_union(pred, gt)
    assert inter.tolist() == [4, 2]
    assert union.tolist() == [5, 3]


def test_all_ignore_gives_zero_areas():
    inter, union = intersection_and_union(np.ones((2, 2), bool), np.full((2, 2), I, np.uint8))
    assert inter.tolist() == [0, 0] and union.tolist() == [0, 0]


def test_bool_and_uint8_predictions_agree():
    gt = arr([[0, 1], [1, I]])
    p = arr([[1, 1], [0, 0]])
    a = intersection_and_union(p, gt)
    b = intersection_and_union(p.astype(bool), gt)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))


def test_bad_inputs_raise():
    gt = np.zeros((3, 3), np.uint8)
    with pytest.raises(FsdiffError, match="differ in size"):
        intersection_and_union(np.zeros((2, 3), bool), gt)
    with pytest.raises(FsdiffError, match="only 0 and 1"):
        intersection_and_union(np.full((3, 3), 0.7, np.float32), gt)
    with pytest.raises(FsdiffError, match="ground truth"):
        intersection_and_union(np.zeros((3, 3), bool), np.full((3, 3), 2, np.uint8))


# --- the guard ---------------------------------------------------------------------------------


def test_iou_guard_is_max_union_1():
    # HSNet: inter / max(union, 1); union 0 implies inter 0 -> 0, not NaN
    assert iou_percent(0, 0) == 0.0
    assert iou_percent(3, 4) == 75.0  # 100 * 3 / 4
    assert iou_percent(1, 1) == 100.0


# --- accumulation per class ---------------------------------------------------------------------


def _ep_perfect_single_pixel():
    gt = arr([[1, 0, 0], [0, 0, 0], [0, 0, 0]])
    return gt.copy(), gt  # pred, gt: fg inter 1, union 1; bg inter 8, union 8


def _ep_overshoot():
    gt = arr([[1, 0, 0], [0, 0, 0], [0, 0, 0]])
    pred = arr([[1, 1, 1], [1, 0, 0], [0, 0, 0]])
    # fg: TP 1, FP 3, FN 0 -> inter 1, union 4 (IoU 25 %); bg: TN 5, union 5 + 3 = 8
    return pred, gt


def test_same_class_is_summed_before_dividing():
    m = FssMeter([1, 2])
    m.update(1, *_ep_perfect_single_pixel())  # episode IoU 1/1 = 100 %
    m.update(1, *_ep_overshoot())             # episode IoU 1/4 = 25 %
    # class 1: (1 + 1) / (1 + 4) = 2/5 = 40 %   (NOT the per-episode mean (100 + 25)/2 = 62.5 %)
    iou = m.per_class_iou()
    assert iou[1] == pytest.approx(40.0)
    assert iou[1] != pytest.approx((100.0 + 25.0) / 2)
    # class 2 never appeared: IoU 0, and it still counts in the mean -> mIoU = (40 + 0) / 2 = 20
    assert iou[2] == 0.0
    assert m.miou() == pytest.approx(20.0)
    assert m.per_class_counts() == {1: 2, 2: 0}
    assert m.n_updates == 2
    # FB-IoU: bg pooled = (8 + 5) / (8 + 8) = 13/16 = 81.25 %; fg pooled = (1 + 1)/(1 + 4) = 40 %
    # FB-IoU = (81.25 + 40) / 2 = 60.625
    assert m.fbiou() == pytest.approx(60.625)


def test_fbiou_pools_over_all_classes():
    m = FssMeter([1, 2])
    m.update(1, *_ep_perfect_single_pixel())  # fg 1/1, bg 8/8
    pred = arr([[1, 1, 0], [0, 0, 0], [0, 0, 0]])
    gt = arr([[1, 1, 0], [1, 1, 0], [0, 0, 0]])
    # class 2: TP 2, FP 0, FN 2 -> fg inter 2, union 4 (50 %); bg: TN 5, union 5 + 2 = 7
    m.update(2, pred, gt)
    assert m.per_class_iou() == {1: pytest.approx(100.0), 2: pytest.approx(50.0)}
    assert m.miou() == pytest.approx(75.0)  # (100 + 50) / 2
    # fg pooled = (1 + 2) / (1 + 4) = 60 %; bg pooled = (8 + 5) / (8 + 7) = 13/15 = 86.666..%
    # FB-IoU = (60 + 86.666..) / 2 = 73.333..
    assert m.fbiou() == pytest.approx((60.0 + 1300.0 / 15.0) / 2)
    # and it is not the mean of per-class FB-IoUs: class 1 -> 100, class 2 -> (50 + 500/7)/2
    assert m.fbiou() != pytest.approx((100.0 + (50.0 + 500.0 / 7.0) / 2) / 2)


def test_empty_foreground_union_scores_zero():
    # HSNet's guard: a class whose every query has no fg in GT nor prediction scores 0, not 100
    m = FssMeter([3])
    z = np.zeros((3, 3), np.uint8)
    m.update(3, z, z)
    assert m.per_class_iou() == {3: 0.0}
    # FB-IoU: bg 9/9 = 100 %; fg 0/max(0,1) = 0 -> 50
    assert m.fbiou() == pytest.approx(50.0)


def test_empty_meter():
    m = FssMeter([1, 2, 3])
    assert m.miou() == 0.0
    assert m.fbiou() == 0.0  # HSNet would give NaN (0/0); we guard like BAM


def test_meter_rejects_foreign_class_and_duplicates():
    m = FssMeter([1, 2])
    with pytest.raises(FsdiffError, match="not one of this fold"):
        m.update(7, np.zeros((2, 2), bool), np.zeros((2, 2), np.uint8))
    with pytest.raises(FsdiffError, match="unique"):
        FssMeter([1, 1])
    with pytest.raises(FsdiffError):
        FssMeter([])
    assert 1 in m and 7 not in m and "1" not in m


# --- scoring resolution -----------------------------------------------------------------------


def test_check_resolution():
    assert check_resolution("original") == "original"
    assert check_resolution("Original") == "original"
    assert check_resolution(400) == 400
    assert check_resolution("400") == 400
    for bad in (0, -400, "big", True, 1.5, None):
        with pytest.raises(FsdiffError):
            check_resolution(bad)


def test_original_resolution_upsamples_prediction_align_corners():
    gt = arr([[1, 1, 1], [0, 0, 0], [I, I, I]])
    prob = np.array([[1, 1], [0, 0]], np.float32)
    p, g = resize_for_scoring(prob, gt, "original")
    assert g is gt and p.shape == (3, 3)
    # bilinear, align_corners=True, 2 -> 3 rows: source rows 0, 0.5, 1 -> 1.0, 0.5, 0.0
    np.testing.assert_allclose(p[:, 0], [1.0, 0.5, 0.0], atol=1e-6)
    # prob > 0.5: row 0 only. fg: TP 3, union 3 -> 100; bg: TN 3 (row 1), union 3 -> 100
    m = FssMeter([1])
    m.update(1, p > 0.5, g)
    assert m.miou() == pytest.approx(100.0) and m.fbiou() == pytest.approx(100.0)


def test_same_size_prediction_is_untouched():
    gt = arr([[0, 1], [1, 0]])
    prob = np.array([[0.1, 0.9], [0.8, 0.2]], np.float32)
    p, g = resize_for_scoring(prob, gt)
    np.testing.assert_array_equal(p, prob)
    assert g is gt


def test_hsnet_400_variant():
    gt = arr([[1, 1, 1], [0, 0, 0], [I, I, I]])
    prob = np.array([[1, 1], [0, 0]], np.float32)
    p, g = resize_for_scoring(prob, gt, 400)
    assert p.shape == g.shape == (400, 400) and g.dtype == np.uint8
    # GT, nearest (torch 'nearest': src = floor(dst * 3/400)): rows 0..133 -> 1 (134 rows),
    # rows 134..266 -> 0 (133 rows), rows 267..399 -> 255 (133 rows)
    col = g[:, 0]
    assert (col[:134] == 1).all() and (col[134:267] == 0).all() and (col[267:] == I).all()
    # prob, PIL bilinear 2 -> 400 (half-pixel centres, src = (y + .5) / 200 - .5):
    # value > 0.5 iff src < 0.5 iff y <= 199 -> rows 0..199 predicted fg
    fg = (p > 0.5)[:, 0]
    assert fg[:200].all() and not fg[200:].any()
    m = FssMeter([1])
    m.update(1, p > 0.5, g)
    # fg: inter = 134 rows, union = rows 0..199 = 200 rows -> 134/200 = 67 %
    # bg: inter = rows 200..266 = 67 rows, union = rows 134..266 = 133 rows -> 67/133 = 50.3759..%
    assert m.miou() == pytest.approx(67.0)
    assert m.fbiou() == pytest.approx((67.0 + 100.0 * 67 / 133) / 2)
    # at the original resolution the same prediction is perfect (see the test above): the two differ
    assert m.fbiou() < 60


def test_non_finite_probability_raises():
    with pytest.raises(FsdiffError, match="NaN"):
        resize_for_scoring(np.array([[np.nan]], np.float32), np.zeros((1, 1), np.uint8))


# --- seeds ---------------------------------------------------------------------------------------


def test_mean_std_over_seeds():
    # mean = (50 + 60 + 70)/3 = 60; sample std = sqrt((10^2 + 0 + 10^2) / (3 - 1)) = 10
    mean, std = mean_std([50.0, 60.0, 70.0])
    assert mean == pytest.approx(60.0) and std == pytest.approx(10.0)
    # population std (ddof=0) on request: sqrt(200 / 3)
    assert mean_std([50.0, 60.0, 70.0], ddof=0)[1] == pytest.approx(math.sqrt(200 / 3))
    assert mean_std([42.0]) == (42.0, 0.0)
    with pytest.raises(FsdiffError):
        mean_std([])


def test_binary_iou_single_query():
    from fsdiff.metrics import binary_iou

    pred = np.array([[1, 1, 0], [0, 0, 0]], bool)
    fg = np.array([[1, 0, 0], [1, 0, 0]], bool)
    # inter 1, union 3 -> 1/3; excluding column 0's second row (valid False) -> inter 1, union 2
    assert binary_iou(pred, fg) == pytest.approx(1 / 3)
    valid = np.array([[1, 1, 1], [0, 1, 1]], bool)
    assert binary_iou(pred, fg, valid) == pytest.approx(1 / 2)
    empty = np.zeros((2, 3), bool)
    assert binary_iou(empty, empty) == 1.0
