"""Annotation synthesis: boxes, skeleton scribbles, background strokes, clicks, episode layouts, seeding."""

from __future__ import annotations

import hashlib

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
from fsdiff.synth import (
    SUPPORT_ANNOTATIONS,
    EpisodeLayout,
    convert_supports,
    episode_rng,
    sample_episode_layout,
    synthesize_annotation,
    synthesize_background_strokes,
    synthesize_box,
    synthesize_points,
    synthesize_scribble,
    synthesize_scribble_fgbg,
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
    assert isinstance(synthesize_annotation(m, "points", 0), PointsAnnotation)
    assert isinstance(synthesize_annotation(m, "scribble-fgbg", 0), ScribbleAnnotation)
    with pytest.raises(FsdiffError, match="points"):
        synthesize_annotation(m, "polygon", 0)


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


def _episode(mask: np.ndarray) -> Episode:
    img = np.zeros(mask.shape + (3,), np.uint8)
    return Episode(1, "animal", (Shot(img, MaskAnnotation(mask), image_id="s0"),), (Query(img),), episode_id="e7")


def test_existing_kinds_are_unchanged():
    """Golden digests of the box / scribble outputs from before points and scribble-fgbg were added."""
    m = animal(ignore_band=True)
    h = hashlib.sha256()
    for seed in range(5):
        h.update(synthesize_scribble(m, seed).strokes.tobytes())
        h.update(np.asarray(synthesize_box(m).box).tobytes())
    assert h.hexdigest()[:16] == "04824aa5e4d24b7d"
    strokes = convert_supports(_episode(m), "scribble", 3).shots[0].annotation.strokes
    assert hashlib.sha256(strokes.tobytes()).hexdigest()[:16] == "b5caf7426ef8043d"


@pytest.mark.parametrize("ignore", [False, True])
def test_points_inside_the_object(ignore):
    m = animal(ignore)
    fg = m == 1
    dist = cv2.distanceTransform(np.pad(fg.astype(np.uint8), 1), cv2.DIST_L2, 5)[1:-1, 1:-1]
    counts = set()
    for seed in range(20):
        p = synthesize_points(m, seed)
        p.validate(m.shape, "synthetic points")
        xy = np.round(p.points).astype(int)
        pos, neg = xy[p.labels == 1], xy[p.labels == 0]
        assert 1 <= len(pos) <= 3 and 0 <= len(neg) <= 2
        counts.add((len(pos), len(neg)))
        # positive clicks deep inside: at least half the largest distance to the border
        assert np.all(dist[pos[:, 1], pos[:, 0]] >= 0.5 * dist.max() - 1e-6)
        assert np.all(m[neg[:, 1], neg[:, 0]] == 0)  # negatives on background, never on ignore
    assert len(counts) >= 5  # the numbers of clicks vary with the seed


def test_points_seeding_and_spacing():
    m = animal()
    a = synthesize_points(m, 4)
    b = synthesize_points(m, np.random.default_rng(4))
    assert np.array_equal(a.points, b.points) and np.array_equal(a.labels, b.labels)
    assert len({synthesize_points(m, s).points.tobytes() for s in range(8)}) >= 6
    bar = np.zeros((60, 400), np.uint8)
    bar[10:50, 10:390] = 1
    p = synthesize_points(bar, 0, positive=(3, 3), negative=(0, 0))
    xs = np.sort(p.points[:, 0])
    assert len(xs) == 3 and np.all(np.diff(xs) >= 0.5 * 20 - 1)  # spread along the bar
    none = synthesize_points(np.ones((30, 30), np.uint8), 0, negative=(2, 2))
    assert np.all(none.labels == 1)  # no background pixel: no negative click
    with pytest.raises(FsdiffError, match="positive"):
        synthesize_points(m, 0, positive=(0, 2))
    with pytest.raises(FsdiffError, match="no class pixel"):
        synthesize_points(np.zeros((10, 10), np.uint8), 0)


@pytest.mark.parametrize("ignore", [False, True])
def test_background_strokes_outside_the_object(ignore):
    m = animal(ignore)
    size = np.sqrt((m == 1).sum())
    outside = cv2.distanceTransform((m != 1).astype(np.uint8), cv2.DIST_L2, 5)
    for seed in range(6):
        bg = synthesize_background_strokes(m, seed)
        assert bg.any() and np.all(m[bg] == 0)
        # drawn around the object, not far away: within the largest distance plus the stroke width
        assert outside[bg].max() <= 0.3 * size + 5


def test_scribble_fgbg_adds_background_to_the_same_stroke():
    m = animal()
    for seed in range(4):
        fgbg = synthesize_scribble_fgbg(m, seed).strokes
        assert np.array_equal(fgbg == 1, synthesize_scribble(m, seed).strokes == 1)
        assert (fgbg == 2).any() and np.all(m[fgbg == 2] == 0) and set(np.unique(fgbg)) == {0, 1, 2}
    assert np.array_equal(synthesize_scribble_fgbg(m, 9).strokes, synthesize_scribble_fgbg(m, 9).strokes)
    full = np.ones((40, 40), np.uint8)
    assert not (synthesize_scribble_fgbg(full, 0).strokes == 2).any()  # no background: no background stroke
    fill = np.zeros((40, 40), np.uint8)
    fill[1:, :] = 1  # the dilated outline lies off the image: a dot on the one background row instead
    bg = synthesize_background_strokes(fill, 0)
    assert bg.any() and np.all(fill[bg] == 0)


def test_convert_supports_new_kinds():
    m = animal()
    ep = _episode(m)
    assert {"scribble-fgbg", "points"} <= set(SUPPORT_ANNOTATIONS)
    pts = convert_supports(ep, "points", 3).shots[0].annotation
    assert isinstance(pts, PointsAnnotation)
    again = convert_supports(ep, "points", 3).shots[0].annotation
    assert np.array_equal(pts.points, again.points)
    fgbg = convert_supports(ep, "scribble-fgbg", 3).shots[0].annotation.strokes
    fg = convert_supports(ep, "scribble", 3).shots[0].annotation.strokes
    assert np.array_equal(fgbg == 1, fg == 1) and (fgbg == 2).any()
