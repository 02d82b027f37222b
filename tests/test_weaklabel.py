"""Weak-label mask estimation (fsdiff.weaklabel): recovery on constructed images, evidence from background
seeds, hard constraints, determinism, fallbacks, episode wiring and input errors."""

from __future__ import annotations

import dataclasses

import cv2
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
from fsdiff.weaklabel import (
    OFF,
    EstimatedMaskAnnotation,
    WeakLabelConfig,
    click_radius,
    doubted,
    estimate_mask,
    estimate_supports,
    label_mask,
    label_seeds,
)

COLOUR = WeakLabelConfig(features=None)
"""GrabCut from colour only (no encoder): the fast path most tests use."""


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum()) / max(1, int((a | b).sum()))


def noisy(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 40, (h, w, 3)).astype(np.int16)


def disc_scene() -> tuple[np.ndarray, np.ndarray]:
    """A red disc on a noisy green-grey background: (image, disc mask)."""
    img = noisy(150, 200)
    img += (60, 110, 70)
    disc = np.zeros((150, 200), np.uint8)
    cv2.circle(disc, (100, 75), 40, 1, -1)
    img[disc == 1] = noisy(150, 200, 1)[disc == 1] + (200, 40, 50)
    return np.clip(img, 0, 255).astype(np.uint8), disc.astype(bool)


def three_regions(middle: tuple[int, int, int] = (193, 54, 40)) -> np.ndarray:
    """Red | ``middle`` | blue columns of 60 px with noise; the default middle is nearly the left's red."""
    img = noisy(120, 180)
    img[:, :60] += (200, 40, 40)
    img[:, 60:120] += middle
    img[:, 120:] += (40, 60, 200)
    return np.clip(img, 0, 255).astype(np.uint8)


def thirds(mask: np.ndarray) -> list[float]:
    return [float((mask[:, a:a + 60] == 1).mean()) for a in (0, 60, 120)]


@pytest.mark.parametrize("cfg", [COLOUR, WeakLabelConfig()], ids=["colour", "default"])
def test_box_recovers_the_disc(cfg):
    img, disc = disc_scene()
    box = BoxAnnotation((45.0, 20.0, 155.0, 130.0))  # the disc with a 15 px margin
    est = estimate_mask(img, box, cfg)
    assert est.shape == disc.shape and est.dtype == np.uint8
    assert iou(est == 1, disc) > 0.9
    assert iou(box.regions(disc.shape)[0], disc) < 0.5  # the box itself is a poor mask
    assert not est[:20].any() and not est[:, :45].any()  # nothing outside the box is object


@pytest.mark.parametrize("cfg", [COLOUR, WeakLabelConfig()], ids=["colour", "default"])
def test_strokes_grow_into_their_region(cfg):
    img = three_regions(middle=(40, 200, 60))  # red | green | blue
    strokes = np.zeros((120, 180), np.uint8)
    strokes[40:80, 25:30] = 1
    est = estimate_mask(img, ScribbleAnnotation(strokes), cfg)
    left, mid, right = thirds(est)
    assert left > 0.95 and mid < 0.05 and right < 0.05


@pytest.mark.parametrize("cfg", [COLOUR, WeakLabelConfig()], ids=["colour", "default"])
def test_background_stroke_is_used_as_evidence(cfg):
    img = three_regions()  # the middle column is almost the red of the left one
    strokes = np.zeros((120, 180), np.uint8)
    strokes[40:80, 25:30] = 1
    fg_only = estimate_mask(img, ScribbleAnnotation(strokes), cfg)
    assert thirds(fg_only)[1] > 0.9  # alike in colour: grown into the middle
    strokes[40:80, 85:90] = 2  # the user marks the middle as background
    with_bg = estimate_mask(img, ScribbleAnnotation(strokes), cfg)
    left, mid, right = thirds(with_bg)
    assert left > 0.95 and mid < 0.05 and right < 0.05


def test_negative_click_is_used_as_evidence():
    cfg = WeakLabelConfig()
    img = three_regions()
    pos = PointsAnnotation(np.array([[30.0, 60.0]]), np.array([1]), radius=10)
    assert thirds(estimate_mask(img, pos, cfg))[1] > 0.9  # alike in colour and texture: grown into the middle
    both = PointsAnnotation(np.array([[30.0, 60.0], [90.0, 60.0]]), np.array([1, 0]), radius=10)
    left, mid, right = thirds(estimate_mask(img, both, cfg))
    assert left > 0.9 and mid < 0.05 and right < 0.05


def test_points_grow_around_a_click():
    img, disc = disc_scene()
    pts = PointsAnnotation(np.array([[100.0, 75.0]]), np.array([1]))
    for cfg in (COLOUR, WeakLabelConfig()):
        assert iou(estimate_mask(img, pts, cfg) == 1, disc) > 0.85


def test_hard_constraints_hold():
    img = three_regions()
    strokes = np.zeros((120, 180), np.uint8)
    strokes[40:80, 25:30] = 1
    strokes[0:3, 0:180] = 2  # a background stroke along the top border, across the object
    strokes[10:14, 100:170] = 1  # an object stroke in a region GrabCut would call background
    est = estimate_mask(img, ScribbleAnnotation(strokes), COLOUR)
    assert np.all(est[strokes == 1] == 1) and np.all(est[strokes == 2] == 0)
    box = BoxAnnotation((10.5, 20.2, 90.0, 100.0))
    inside, _ = box.regions((120, 180))
    est = estimate_mask(img, box, COLOUR)
    assert not np.any(est[~inside] == 1)
    pts = PointsAnnotation(np.array([[30.0, 60.0], [150.0, 60.0], [0.0, 0.0]]), np.array([1, 1, 0]))
    est = estimate_mask(img, pts, COLOUR)
    fg, bg, _ = label_seeds(pts, (120, 180))
    assert np.all(est[fg] == 1) and np.all(est[bg] == 0)  # a click on the blue region stays object


@pytest.mark.parametrize("kind", ["box", "scribble", "points"])
def test_deterministic(kind):
    img, disc = disc_scene()
    ann = {"box": BoxAnnotation((45.0, 20.0, 155.0, 130.0)),
           "scribble": ScribbleAnnotation(np.pad(np.ones((5, 40), np.uint8), ((73, 72), (80, 80)))),
           "points": PointsAnnotation(np.array([[100.0, 75.0], [10.0, 10.0]]), np.array([1, 0]))}[kind]
    cfg = WeakLabelConfig()
    a = estimate_mask(img, ann, cfg, seed=3)
    assert np.array_equal(a, estimate_mask(img, ann, cfg, seed=3))
    assert np.array_equal(a, estimate_mask(img.copy(), ann, cfg, seed=3))


def test_off_returns_the_labels_own_regions():
    shape = (120, 180)
    img = three_regions()
    strokes = np.zeros(shape, np.uint8)
    strokes[40:80, 25:30] = 1
    for ann in (BoxAnnotation((10, 20, 90, 100)), ScribbleAnnotation(strokes),
                PointsAnnotation(np.array([[30.0, 60.0]]), np.array([1]))):
        est = estimate_mask(img, ann, OFF)
        fg, bg = ann.regions(shape)
        assert np.array_equal(est == 1, fg) and np.array_equal(est == 0, bg)
        assert np.all(est[~fg & ~bg] == 255)
        assert np.array_equal(est, label_mask(ann, shape))


def test_mask_passes_through_and_text_is_refused():
    img, disc = disc_scene()
    m = disc.astype(np.uint8)
    m[0, 0] = 255
    assert estimate_mask(img, MaskAnnotation(m)) is m
    with pytest.raises(FsdiffError, match="text annotation"):
        estimate_mask(img, TextAnnotation())


def test_uncertain_band_marks_the_outline_only():
    img, disc = disc_scene()
    box = BoxAnnotation((45.0, 20.0, 155.0, 130.0))
    plain = estimate_mask(img, box, COLOUR)
    banded = estimate_mask(img, box, dataclasses.replace(COLOUR, uncertain_band=0.05))
    band = banded == 255
    assert band.any() and np.all(banded[~band] == plain[~band])
    dist = cv2.distanceTransform((plain == 1).astype(np.uint8), cv2.DIST_L2, 3)
    outside = cv2.distanceTransform((plain != 1).astype(np.uint8), cv2.DIST_L2, 3)
    assert np.all(np.maximum(dist, outside)[band] <= 0.05 * np.sqrt((plain == 1).sum()) + 1.5)


def test_fallbacks_keep_the_label():
    img, _ = disc_scene()
    tiny = BoxAnnotation((100.0, 70.0, 102.0, 72.0))  # 2x2 px: nothing for GrabCut to separate
    est = estimate_mask(img, tiny, COLOUR)
    assert np.array_equal(est, label_mask(tiny, img.shape[:2]))
    whole = BoxAnnotation((0.0, 0.0, 200.0, 150.0))  # no background sample anywhere
    est = estimate_mask(img, whole, COLOUR)
    assert np.array_equal(est, label_mask(whole, img.shape[:2]))


def test_stroke_on_the_border_and_large_image():
    img = cv2.resize(three_regions(middle=(40, 200, 60)), (1800, 1200), interpolation=cv2.INTER_NEAREST)
    strokes = np.zeros(img.shape[:2], np.uint8)
    strokes[0:1200, 0:4] = 1  # along the left border
    est = estimate_mask(img, ScribbleAnnotation(strokes), COLOUR)
    assert est.shape == (1200, 1800)
    assert (est[:, :600] == 1).mean() > 0.95 and (est[:, 600:] == 1).mean() < 0.02


def test_bad_input_names_the_argument():
    img, _ = disc_scene()
    with pytest.raises(FsdiffError, match="annotation.*empty"):
        estimate_mask(img, BoxAnnotation((50, 50, 50, 80)))
    with pytest.raises(FsdiffError, match="annotation.*outside"):
        estimate_mask(img, PointsAnnotation(np.array([[500.0, 10.0]]), np.array([1])))
    with pytest.raises(FsdiffError, match="annotation.*no positive point"):
        estimate_mask(img, PointsAnnotation(np.array([[50.0, 10.0]]), np.array([0])))
    with pytest.raises(FsdiffError, match="annotation"):
        estimate_mask(img, np.zeros((150, 200), np.uint8))
    with pytest.raises(FsdiffError, match="image"):
        estimate_mask(img[..., 0], BoxAnnotation((1, 1, 20, 20)))
    with pytest.raises(FsdiffError, match="config"):
        estimate_mask(img, BoxAnnotation((1, 1, 20, 20)), config={"method": "grabcut"})
    for field, value in (("method", "snake"), ("iterations", 0), ("working_size", 8), ("seed_threshold", 1.0),
                         ("uncertain_band", 0.7), ("box_context", -0.5), ("max_upscale", 0.5),
                         ("far_margin", -1.0), ("feature_levels", ()), ("box_quantile", 0.0),
                         ("box_features_min_area", 2.0)):
        with pytest.raises(FsdiffError, match=field):
            WeakLabelConfig(**{field: value})


def test_click_radius_matches_the_annotation():
    pts = PointsAnnotation(np.array([[10.0, 10.0]]), np.array([1]))
    fg, _ = pts.regions((300, 400))
    seeds, _, _ = label_seeds(pts, (300, 400))
    assert np.array_equal(fg, seeds) and click_radius(pts, (300, 400)) == 5


def test_estimate_supports_keeps_the_source():
    img, disc = disc_scene()
    box = BoxAnnotation((45.0, 20.0, 155.0, 130.0))
    mask_shot = Shot(img, MaskAnnotation(disc.astype(np.uint8)), image_id="m")
    ep = Episode(0, "disc", (Shot(img, box, image_id="b"), mask_shot, Shot(img, TextAnnotation())),
                 (Query(img, gt=disc.astype(np.uint8)),), episode_id="e0")
    out = estimate_supports(ep, COLOUR)
    first = out.shots[0].annotation
    assert isinstance(first, EstimatedMaskAnnotation) and first.kind == "mask" and first.source is box
    assert np.array_equal(first.mask, estimate_mask(img, box, COLOUR))
    assert out.shots[1] is mask_shot and out.shots[2].annotation.kind == "text"
    assert out.annotation_kinds() == ("mask", "mask", "text") and out.queries == ep.queries
    assert ep.shots[0].annotation is box  # the input episode is unchanged
    with pytest.raises(FsdiffError, match="episode"):
        estimate_supports(img)


def test_real_horse_box(shared_data):
    from fsdiff.data.folder import FolderSource
    from fsdiff.synth import synthesize_box

    src = FolderSource(shared_data / "weizmann-horse")
    image, mask = src.load("horse001", 0)
    box = synthesize_box(mask)
    est = estimate_mask(image, box, COLOUR)
    truth = mask == 1
    assert iou(est == 1, truth) > 0.7 > iou(box.regions(mask.shape)[0], truth) + 0.2


def test_doubted_object_pixels_by_hand():
    obj = np.zeros((10, 10), bool)
    obj[2:8, 2:8] = True
    prob = np.full((10, 10), 0.9, np.float32)
    prob[2:8, 6:8] = 0.1  # the features doubt two columns of the object
    seeds = np.zeros((10, 10), bool)
    seeds[4, 3:8] = True  # a stroke that reaches into the doubted columns
    expect = np.zeros((10, 10), bool)
    expect[2:8, 6:8] = True
    expect[4, 6:8] = False  # the user's own stroke is never doubted
    np.testing.assert_array_equal(doubted(obj, prob, seeds, 0.3), expect)
    assert not doubted(obj, prob, seeds, 0.05).any()  # below every probability: nothing doubted
    assert not doubted(obj, np.full((10, 10), 0.1, np.float32), np.zeros((10, 10), bool), 0.3).any()  # keeps an object


@pytest.mark.parametrize("kind", ["scribble", "points", "box"])
def test_doubt_only_turns_object_into_ignore(kind):
    img = three_regions(middle=(40, 200, 60))
    strokes = np.zeros((120, 180), np.uint8)
    strokes[40:80, 25:30] = 1
    ann = {"scribble": ScribbleAnnotation(strokes), "box": BoxAnnotation((5.0, 5.0, 70.0, 115.0)),
           "points": PointsAnnotation(np.array([[30.0, 60.0]]), np.array([1]), radius=10)}[kind]
    kept = estimate_mask(img, ann, WeakLabelConfig())
    est = estimate_mask(img, ann, WeakLabelConfig(doubt_threshold=0.3))
    assert set(np.unique(kept)) <= {0, 1}
    np.testing.assert_array_equal(est == 0, kept == 0)  # background is untouched
    assert not ((est == 255) & (kept != 1)).any()  # only object pixels are doubted
    if kind == "box":  # a box's estimate has its own feature seeding and is never doubted
        np.testing.assert_array_equal(est, kept)
    else:
        assert (est == 255).any() and (est == 1).any()  # the synthetic far band is doubted here
    with pytest.raises(FsdiffError, match="doubt_threshold"):
        WeakLabelConfig(doubt_threshold=1.0)
