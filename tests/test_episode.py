"""Episode validation and the annotation kinds' regions."""

from __future__ import annotations

import numpy as np
import pytest

from fsdiff.episode import (
    BoxAnnotation,
    Episode,
    MaskAnnotation,
    PointsAnnotation,
    Query,
    ScribbleAnnotation,
    Shot,
    TextAnnotation,
)
from fsdiff.errors import FsdiffError


def img(h=8, w=10):
    return np.zeros((h, w, 3), np.uint8)


def test_mask_shot_and_regions():
    m = np.zeros((8, 10), np.uint8)
    m[2:4, 3:6] = 1
    m[0, 0] = 255
    shot = Shot(img(), MaskAnnotation(m), image_id="s.jpg")
    fg, bg = shot.annotation.regions(shot.shape)
    assert fg.sum() == 6 and not bg[0, 0] and bg.sum() == 80 - 6 - 1


def test_size_mismatch_names_the_support():
    with pytest.raises(FsdiffError, match=r"support s\.jpg: mask size 9x8 .* does not match its image 10x8"):
        Shot(img(), MaskAnnotation(np.ones((8, 9), np.uint8)), image_id="s.jpg")


def test_empty_mask_rejected():
    with pytest.raises(FsdiffError, match="support mask is empty"):
        Shot(img(), MaskAnnotation(np.zeros((8, 10), np.uint8)))


def test_mask_with_class_values_rejected():
    m = np.zeros((8, 10), np.uint8)
    m[0, 0] = 15
    with pytest.raises(FsdiffError, match=r"values \[15\]"):
        Shot(img(), MaskAnnotation(m))


def test_non_rgb_image_rejected():
    with pytest.raises(FsdiffError, match=r"expected an RGB uint8 image"):
        Shot(np.zeros((8, 10), np.uint8), TextAnnotation())
    with pytest.raises(FsdiffError, match=r"expected an RGB uint8 image"):
        Query(np.zeros((8, 10, 3), np.float32))


def test_box_regions_and_bounds():
    shot = Shot(img(), BoxAnnotation((2.5, 1.0, 5.0, 3.2)))
    fg, bg = shot.annotation.regions(shot.shape)
    # pixel columns 2..4 (floor 2.5 .. ceil 5.0) and rows 1..3 (floor 1 .. ceil 3.2)
    assert fg.sum() == 3 * 3 and fg[1, 2] and fg[3, 4] and not fg[4, 2]
    assert (bg == ~fg).all()
    with pytest.raises(FsdiffError, match="outside the 10x8 image"):
        Shot(img(), BoxAnnotation((0, 0, 11, 5)))
    with pytest.raises(FsdiffError, match="is empty"):
        Shot(img(), BoxAnnotation((3, 3, 3, 5)))


def test_box_from_mask_is_tight():
    m = np.zeros((8, 10), np.uint8)
    m[2:5, 3:7] = 1
    assert BoxAnnotation.from_mask(m).box == (3.0, 2.0, 7.0, 5.0)


def test_scribble_regions_default_background():
    s = np.zeros((20, 20), np.uint8)
    s[9:11, 8:12] = 1
    fg, bg = ScribbleAnnotation(s).regions((20, 20))
    assert fg.sum() == 8
    # strokes' box rows 9..10, cols 8..11 grown by round(0.1 * 20) = 2 px: rows 7..12, cols 6..13 excluded
    assert not bg[7:13, 6:14].any() and bg.sum() == 400 - 6 * 8
    s[0, 0] = 2
    fg, bg = ScribbleAnnotation(s).regions((20, 20))
    assert bg.sum() == 1 and bg[0, 0]
    with pytest.raises(FsdiffError, match="no foreground stroke"):
        Shot(img(20, 20), ScribbleAnnotation(np.zeros((20, 20), np.uint8)))


def test_points():
    pa = PointsAnnotation(np.array([[5.0, 4.0], [0.0, 0.0]]), np.array([1, 0]), radius=1)
    shot = Shot(img(), pa)
    fg, bg = shot.annotation.regions(shot.shape)
    assert fg[4, 5] and fg.sum() == 5 and bg[0, 0] and not (fg & bg).any()
    with pytest.raises(FsdiffError, match="outside"):
        Shot(img(), PointsAnnotation(np.array([[10.0, 0.0]]), np.array([1])))
    with pytest.raises(FsdiffError, match="no positive point"):
        Shot(img(), PointsAnnotation(np.array([[1.0, 1.0]]), np.array([0])))


def test_text_has_no_region_and_episode_rules():
    shot = Shot(img(), TextAnnotation())
    with pytest.raises(FsdiffError, match="no spatial region"):
        shot.annotation.regions(shot.shape)
    with pytest.raises(FsdiffError, match="at least one query"):
        Episode(1, "cat", (shot,), ())
    ep = Episode(1, "cat", [shot], [Query(img())])
    assert ep.k == 1 and ep.annotation_kinds() == ("text",)


def test_query_gt_checked():
    with pytest.raises(FsdiffError, match="query q.png ground truth: mask size"):
        Query(img(), np.zeros((3, 3), np.uint8), image_id="q.png")
