"""The training-free prototype segmenter: protocol, annotation kinds, errors, cache use, horse sanity."""

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
from fsdiff.features import FeatureCache, build_encoder
from fsdiff.methods import build_method, method_names
from fsdiff.protocol import Segmenter
from fsdiff.methods.prototype import PrototypeSegmenter

SIZE = 128  # small input for fast unit tests


@pytest.fixture(scope="module")
def encoder():
    return build_encoder("efficientnet-lite0", precision="auto")


@pytest.fixture
def seg(encoder):
    return PrototypeSegmenter(encoder, size=SIZE)


def _scene(h: int, w: int, cy: int, cx: int, r: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Green grass-like noise with a red disc; returns (image, {0,1} mask)."""
    rng = np.random.default_rng(seed)
    img = np.zeros((h, w, 3), np.uint8)
    img[..., 1] = rng.integers(90, 170, (h, w))
    img[..., 0] = rng.integers(20, 60, (h, w))
    img[..., 2] = rng.integers(20, 60, (h, w))
    yy, xx = np.mgrid[:h, :w]
    disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    img[disc] = (220, 30, 30)
    return img, disc.astype(np.uint8)


def _iou(prob: np.ndarray, gt: np.ndarray, thr: float = 0.5) -> float:
    pred, g = prob > thr, gt == 1
    return float((pred & g).sum() / max((pred | g).sum(), 1))


def _episode(*annotations, queries=2) -> Episode:
    s_img, s_mask = _scene(120, 160, 60, 50, 30, seed=1)
    shots = []
    for kind in annotations:
        if kind == "mask":
            ann = MaskAnnotation(s_mask)
        elif kind == "box":
            ann = BoxAnnotation.from_mask(s_mask)
        elif kind == "scribble":
            strokes = np.zeros_like(s_mask)
            strokes[58:63, 35:66] = 1
            ann = ScribbleAnnotation(strokes)
        elif kind == "points":
            ann = PointsAnnotation(np.array([[50, 60], [140, 20]]), np.array([1, 0]))
        else:
            ann = TextAnnotation()
        shots.append(Shot(s_img, ann, f"s-{kind}"))
    qs = []
    for i in range(queries):
        q_img, q_mask = _scene(100 + 10 * i, 130, 50, 80, 25, seed=10 + i)
        qs.append(Query(q_img, q_mask, f"q{i}"))
    return Episode(1, "red disc", shots, qs, "synthetic")


def test_protocol_and_output_format(seg):
    assert isinstance(seg, Segmenter) and seg.name == "prototype" and seg.threshold == 0.5
    ep = _episode("mask")
    probs = seg.predict(ep)
    assert len(probs) == 2
    for p, q in zip(probs, ep.queries):
        assert p.dtype == np.float32 and p.shape == q.shape
        assert 0.0 <= float(p.min()) and float(p.max()) <= 1.0
        assert _iou(p, q.gt) > 0.6


@pytest.mark.parametrize("kind", ["box", "scribble", "points"])
def test_every_spatial_annotation_kind_works(seg, kind):
    ep = _episode(kind, queries=1)
    p = seg.predict(ep)[0]
    assert p.shape == ep.queries[0].shape
    assert _iou(p, ep.queries[0].gt) > 0.4


def test_k_shot_and_mixed_text_shots(seg):
    ep = _episode("mask", "box", "text", queries=1)
    p = seg.predict(ep)[0]
    assert _iou(p, ep.queries[0].gt) > 0.5


@pytest.mark.parametrize("kinds", [(), ("text",), ("text", "text")])
def test_needs_a_spatial_support(seg, kinds):
    with pytest.raises(FsdiffError, match="at least one spatial support annotation"):
        seg.predict(_episode(*kinds, queries=1))


def test_support_without_background_still_predicts(seg):
    img, _ = _scene(64, 64, 32, 32, 10, seed=3)
    q_img, q_mask = _scene(64, 64, 20, 40, 10, seed=4)
    ep = Episode(1, "all", [Shot(img, MaskAnnotation(np.ones((64, 64), np.uint8)))], [Query(q_img, q_mask)])
    p = seg.predict(ep)[0]
    assert p.shape == (64, 64) and np.isfinite(p).all()


def test_each_image_is_encoded_once_and_results_are_deterministic(encoder):
    cache = FeatureCache()
    seg = PrototypeSegmenter(encoder, size=SIZE, cache=cache)
    ep = _episode("mask")
    first = seg.predict(ep)
    assert cache.misses == 3 and len(cache) == 3
    second = seg.predict(ep)
    assert len(cache) == 3 and cache.hits == 3
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)
    # The same image as support and query is encoded once.
    cache.clear()
    img, mask = _scene(64, 64, 32, 32, 10, seed=5)
    seg.predict(Episode(1, "x", [Shot(img, MaskAnnotation(mask))], [Query(img, mask)]))
    assert len(cache) == 1


def test_registry_and_argument_errors(encoder):
    assert "prototype" in method_names()
    m = build_method("prototype", encoder=encoder, size=SIZE, levels=[2])
    assert isinstance(m, PrototypeSegmenter) and m.levels == (2,)
    with pytest.raises(FsdiffError, match="prototype"):
        build_method("no-such-method")
    with pytest.raises(FsdiffError, match="option names"):
        build_method("prototype", encoder=encoder, colour="red")
    with pytest.raises(FsdiffError, match="levels"):
        PrototypeSegmenter(encoder, levels=[3])
    with pytest.raises(FsdiffError, match="threshold"):
        PrototypeSegmenter(encoder, threshold=1.5)
    with pytest.raises(FsdiffError, match="temperature"):
        PrototypeSegmenter(encoder, temperature=0)
    with pytest.raises(FsdiffError, match="size"):
        PrototypeSegmenter(encoder, size="big")
    with pytest.raises(FsdiffError, match="Episode"):
        PrototypeSegmenter(encoder, size=SIZE).predict("episode.json")


def test_horse_one_shot_beats_all_foreground(shared_data, encoder):
    from fsdiff.io import read_image, read_mask

    root = shared_data / "weizmann-horse"
    names = sorted(p.stem for p in (root / "images").glob("*.jpg"))
    assert len(names) > 20
    rng = np.random.default_rng(0)
    seg = PrototypeSegmenter(encoder)  # default input size and levels
    ious, trivial = [], []
    for _ in range(10):
        qi, si = rng.choice(len(names), size=2, replace=False)
        q_img, q_mask = read_image(root / "images" / f"{names[qi]}.jpg"), read_mask(root / "masks" / f"{names[qi]}.png")
        s_img, s_mask = read_image(root / "images" / f"{names[si]}.jpg"), read_mask(root / "masks" / f"{names[si]}.png")
        ep = Episode(1, "horse", [Shot(s_img, MaskAnnotation(s_mask))], [Query(q_img, q_mask)])
        ious.append(_iou(seg.predict(ep)[0], q_mask, seg.threshold))
        trivial.append(_iou(np.ones(q_mask.shape, np.float32), q_mask))
    assert np.mean(ious) > 0.6
    assert np.mean(ious) > np.mean(trivial) + 0.3


def test_self_support_matches_the_baft_self_map():
    """prototype(self_support=True) = the mean over its levels of BAFT's self maps (first estimate = the
    plain prototype output), computed independently by fsdiff.methods.diffup.baft.pooled_prior."""
    import torch.nn.functional as F

    from fsdiff.methods.diffup.baft import pooled_prior

    enc = build_encoder("efficientnet-lite0", precision=None)  # fp32 on both paths
    seg = PrototypeSegmenter(enc, size=SIZE, self_support=True)
    plain = PrototypeSegmenter(enc, size=SIZE, cache=seg.cache)
    ep = _episode("mask", queries=1)
    got = seg.predict(ep)[0]
    assert not np.allclose(got, plain.predict(ep)[0], atol=1e-3)  # the refinement changes the map
    shot, query = ep.shots[0], ep.queries[0]
    sf, qf = seg.cache.features(enc, [shot.image, query.image], seg.size)
    fg, bg = shot.annotation.regions(shot.shape)
    fine = tuple(qf[seg.levels[0]].shape[-2:])
    maps = pooled_prior(qf, [(sf, fg, bg)], fine, maps=("self",), self_levels=seg.levels)
    exp = maps[list(seg.levels)].mean(0)
    exp = F.interpolate(exp[None, None], size=query.shape, mode="bilinear", align_corners=False)[0, 0]
    np.testing.assert_allclose(got, exp.clamp(0, 1).numpy(), atol=1e-4)
    assert _iou(got, query.gt) >= _iou(plain.predict(ep)[0], query.gt) - 0.05  # still finds the red disc
    assert PrototypeSegmenter(enc, size=SIZE).self_support is False  # the plain baseline by default
    with pytest.raises(FsdiffError, match="self_support must be true, false or 'auto'.*got 'maybe'"):
        PrototypeSegmenter(enc, size=SIZE, self_support="maybe")
    # 'auto': the refinement for one support shot, the plain output for two
    auto = PrototypeSegmenter(enc, size=SIZE, self_support="auto", cache=seg.cache)
    np.testing.assert_array_equal(auto.predict(ep)[0], got)
    two = _episode("mask", "box", queries=1)
    np.testing.assert_array_equal(auto.predict(two)[0], plain.predict(two)[0])
    assert not np.allclose(seg.predict(two)[0], plain.predict(two)[0], atol=1e-3)
