"""DiffUp annotation synthesis: boxes, skeleton scribbles, episode layouts, seeding."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from fsdiff.episode import BoxAnnotation, MaskAnnotation, ScribbleAnnotation, TextAnnotation
from fsdiff.errors import FsdiffError
from fsdiff.synth import (
    EpisodeLayout,
    episode_rng,
    sample_episode_layout,
    synthesize_annotation,
    synthesize_box,
    synthesize_scribble,
    zhang_suen_skeleton,
)


def animal(ignore_band: bool = False) -> np.ndarray:
    """A body, a head and four thin legs; optionally an ignore band across the body."""
    m = np.zeros((240, 320), np.uint8)
    cv2.ellipse(m, (160, 100), (100, 45), 0, 0, 360, 1, -1)
    for x in (90, 130, 190, 230):
        m[120:220, x : x + 10] = 1
    cv2.circle(m, (270, 60), 30, 1, -1)
    if ignore_band:
        band = m[100:104] == 1
        m[100:104][band] = 255
        m[:, 300:] = np.where(m[:, 300:] == 0, 255, m[:, 300:])  # an ignore region touching the object
    return m


def test_box_is_tight():
    m = animal(ignore_band=True)
    box = synthesize_box(m)
    ys, xs = np.nonzero(m == 1)
    assert box.box == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    fg, _ = box.regions(m.shape)
    assert fg[m == 1].all()
    # tight: every border row/column of the box touches the class
    x0, y0, x1, y1 = box.pixel_bounds()
    assert (m[y0, x0:x1] == 1).any() and (m[y1 - 1, x0:x1] == 1).any()
    assert (m[y0:y1, x0] == 1).any() and (m[y0:y1, x1 - 1] == 1).any()


@pytest.mark.parametrize("ignore", [False, True])
def test_scribble_inside_mask_and_valid(ignore):
    m = animal(ignore)
    for seed in range(8):
        sc = synthesize_scribble(m, seed)
        assert isinstance(sc, ScribbleAnnotation)
        s = sc.strokes
        assert s.dtype == np.uint8 and s.shape == m.shape and set(np.unique(s)) <= {0, 1}
        assert s.sum() >= 25  # a real stroke, not a dot
        assert np.all(m[s == 1] == 1)  # never on background or ignore pixels
        sc.validate(m.shape, "synthetic scribble")
        # one 8-connected stroke
        n, _ = cv2.connectedComponents(s, connectivity=8)
        assert n == 2


def test_scribble_is_about_five_pixels_wide():
    m = np.zeros((120, 400), np.uint8)
    m[30:90, 20:380] = 1  # a long bar: the stroke runs along its axis
    s = synthesize_scribble(m, 0, width=5).strokes
    cols = s.sum(axis=0)
    assert 4 <= np.median(cols[cols > 0]) <= 6


def test_scribble_seeding():
    m = animal()
    a = synthesize_scribble(m, 11).strokes
    assert np.array_equal(a, synthesize_scribble(m, 11).strokes)
    assert np.array_equal(a, synthesize_scribble(m, np.random.default_rng(11)).strokes)
    distinct = {synthesize_scribble(m, s).strokes.tobytes() for s in range(6)}
    assert len(distinct) >= 5


@pytest.mark.parametrize(
    "region", [(slice(10, 11), slice(10, 11)), (slice(10, 12), slice(10, 12)), (slice(10, 11), slice(3, 40)),
               (slice(5, 45), slice(20, 22))]
)
def test_scribble_tiny_and_thin_objects(region):
    m = np.zeros((50, 50), np.uint8)
    m[region] = 1
    s = synthesize_scribble(m, 0).strokes
    assert s.any() and np.all(m[s == 1] == 1)


def test_scribble_compact_blob_gets_a_stroke():
    m = np.zeros((200, 200), np.uint8)
    cv2.circle(m, (100, 100), 70, 1, -1)  # thinning collapses a disc to a point
    for seed in range(4):
        s = synthesize_scribble(m, seed).strokes
        assert s.sum() >= 5 * 20 and np.all(m[s == 1] == 1)


def test_scribble_rejects_bad_masks():
    with pytest.raises(FsdiffError, match="no class pixel"):
        synthesize_scribble(np.zeros((10, 10), np.uint8), 0)
    with pytest.raises(FsdiffError, match="values"):
        synthesize_scribble(np.full((10, 10), 7, np.uint8), 0)
    with pytest.raises(FsdiffError):
        synthesize_box(np.zeros((10, 10), np.uint8))
    assert synthesize_scribble(np.pad(np.ones((20, 20), bool), 5), 0).strokes.any()  # bool masks are fine


def test_zhang_suen_skeleton():
    bar = np.zeros((30, 60), bool)
    bar[10:19, 5:55] = True
    sk = zhang_suen_skeleton(bar)
    assert sk.any() and np.all(bar[sk])
    assert sk.sum(axis=0).max() == 1  # one pixel thick
    assert set(np.nonzero(sk)[0]) <= {13, 14, 15}  # on the bar's axis
    n, _ = cv2.connectedComponents(sk.astype(np.uint8), connectivity=8)
    assert n == 2
    ring = np.zeros((60, 60), np.uint8)
    cv2.circle(ring, (30, 30), 20, 1, 5)
    rs = zhang_suen_skeleton(ring)
    assert np.all(ring[rs] == 1) and rs.sum() < ring.sum() / 3
    assert not zhang_suen_skeleton(np.zeros((5, 5), bool)).any()


def test_synthesize_annotation_kinds():
    m = animal()
    assert isinstance(synthesize_annotation(m, "mask", 0), MaskAnnotation)
    assert isinstance(synthesize_annotation(m, "box", 0), BoxAnnotation)
    assert isinstance(synthesize_annotation(m, "scribble", 0), ScribbleAnnotation)
    assert isinstance(synthesize_annotation(m, "text", 0), TextAnnotation)
    with pytest.raises(FsdiffError, match="points"):
        synthesize_annotation(m, "points", 0)


def test_episode_layouts():
    layouts = [sample_episode_layout(s) for s in range(400)]
    assert {lay.k for lay in layouts} == set(range(6))
    for lay in layouts:
        assert isinstance(lay, EpisodeLayout) and len(lay.shot_types) == lay.k
        assert set(lay.shot_types) <= {"mask", "box", "scribble"}
        if lay.k == 0:
            assert lay.use_text and lay.prior_types() == ("text",)
    with_shots = [lay for lay in layouts if lay.k > 0]
    frac_text = np.mean([lay.use_text for lay in with_shots])
    assert 0.35 < frac_text < 0.65
    assert {t for lay in layouts for t in lay.shot_types} == {"mask", "box", "scribble"}
    assert sample_episode_layout(5) == sample_episode_layout(5)
    one = sample_episode_layout(0, max_shots=1, shot_types=("box",), text_prob=0.0)
    assert one.shot_types in ((), ("box",))
    with pytest.raises(FsdiffError):
        sample_episode_layout(0, shot_types=("text",))


def test_episode_rng_is_stable_and_keyed():
    a = episode_rng(0, "fold0", 17).integers(1 << 30, size=4)
    assert np.array_equal(a, episode_rng(0, "fold0", 17).integers(1 << 30, size=4))
    assert not np.array_equal(a, episode_rng(0, "fold0", 18).integers(1 << 30, size=4))
    assert not np.array_equal(a, episode_rng(1, "fold0", 17).integers(1 << 30, size=4))
    m = animal()
    s1 = synthesize_scribble(m, episode_rng(3, "ep", 1)).strokes
    assert np.array_equal(s1, synthesize_scribble(m, episode_rng(3, "ep", 1)).strokes)
