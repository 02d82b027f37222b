"""fsdiff.refine: edge-aware refinement of a coarse probability map (guided filter, GrabCut)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from fsdiff.errors import FsdiffError
from fsdiff.refine import (
    OFF,
    RefineConfig,
    guided_filter,
    parse_refine,
    refine,
    working_shape,
)


def _scene(h: int = 240, w: int = 320, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """An ellipse object with a sharp colour edge on a noisy background, its true region, and a coarse map.

    The coarse map is what a stride-32 feature grid gives: the region area-averaged onto a 10x8 grid,
    upsampled bilinearly, shifted by a few pixels and squashed into [0.2, 0.8].
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    gt = ((xx - 0.52 * w) / (0.3 * w)) ** 2 + ((yy - 0.5 * h) / (0.27 * h)) ** 2 < 1
    img = np.where(gt[..., None], [200.0, 60.0, 40.0], [40.0, 90.0, 160.0]) + rng.normal(0, 12, (h, w, 3))
    coarse = cv2.resize(gt.astype(np.float32), (10, 8), interpolation=cv2.INTER_AREA)
    prob = np.roll(cv2.resize(coarse, (w, h), interpolation=cv2.INTER_LINEAR), (3, -4), (0, 1))
    return img.clip(0, 255).astype(np.uint8), gt, (0.2 + 0.6 * prob).astype(np.float32)


def _iou(mask: np.ndarray, gt: np.ndarray) -> float:
    return float((mask & gt).sum() / (mask | gt).sum())


@pytest.mark.parametrize("config", [RefineConfig(), RefineConfig(domain="logit"), RefineConfig(method="grabcut")])
def test_refined_mask_follows_the_edge(config):
    img, gt, prob = _scene()
    before = _iou(prob > 0.5, gt)
    after = _iou(refine(img, prob, config) > 0.5, gt)
    assert before < 0.92  # the coarse map misses the object's edge by a few pixels all round
    assert after > 0.97, (before, after)


def test_guided_filter_on_a_step_guide_snaps_a_ramp_to_the_step():
    # a vertical colour step at x = 40 and a ramp p = (x - 14) / 60 that crosses 0.5 at x = 44. In a window
    # across the step the least-squares fit q = a I + b is the mean of p on each side (p(40 -+ r/2) for a
    # centred window): about 0.28 left of the step and 0.57 right of it, so q crosses 0.5 at the step.
    w = 80
    guide = np.zeros((20, w, 3), np.float32)
    guide[:, 40:] = 1.0
    p = np.tile(np.clip((np.arange(w) - 14) / 60.0, 0, 1), (20, 1)).astype(np.float32)
    assert (p[10] > 0.5).argmax() == 45  # raw mask starts 5 px right of the step
    q = guided_filter(guide, p, radius=16, eps=1e-4)
    assert (q[10] > 0.5).argmax() == 40
    assert q[10, 39] == pytest.approx(0.285, abs=0.01) and q[10, 40] == pytest.approx(0.566, abs=0.01)


def test_guided_filter_leaves_a_constant_map_constant_and_matches_a_gray_hand_computation():
    rng = np.random.default_rng(1)
    guide = rng.random((30, 40, 3)).astype(np.float32)
    const = np.full((30, 40), 0.3, np.float32)
    np.testing.assert_allclose(guided_filter(guide, const, 4, 1e-3), 0.3, atol=1e-5)
    # with a gray guide (all channels equal) the colour filter equals the gray one: a = cov/(3 var + eps)
    # summed over channels is cov / (var + eps / 3); check the interior against a direct window computation
    g = rng.random((30, 40)).astype(np.float32)
    p = rng.random((30, 40)).astype(np.float32)
    r, eps = 2, 1e-2
    q = guided_filter(np.repeat(g[..., None], 3, axis=2), p, r, eps)
    a = np.zeros_like(g, dtype=np.float64)
    b = np.zeros_like(a)
    for y in range(r, 30 - r):
        for x in range(r, 40 - r):
            gw, pw = g[y - r:y + r + 1, x - r:x + r + 1].astype(np.float64), p[y - r:y + r + 1, x - r:x + r + 1]
            cov = (gw * pw).mean() - gw.mean() * pw.mean()
            a[y, x] = cov / (gw.var() + eps / 3)
            b[y, x] = pw.mean() - a[y, x] * gw.mean()
    y, x = 15, 20  # a pixel whose windows all lie in the interior
    am = a[y - r:y + r + 1, x - r:x + r + 1].mean()
    bm = b[y - r:y + r + 1, x - r:x + r + 1].mean()
    assert q[y, x] == pytest.approx(am * g[y, x] + bm, abs=1e-4)


def test_off_returns_the_input_unchanged():
    img, _, prob = _scene()
    assert refine(img, prob, OFF) is prob
    assert refine(img, prob, parse_refine("off")) is prob


@pytest.mark.parametrize("config", [RefineConfig(), RefineConfig(domain="logit", radius=3), RefineConfig(method="grabcut", size=128)])
def test_output_is_a_float32_probability_of_the_input_shape_and_deterministic(config):
    img, _, prob = _scene(h=97, w=203)
    out = refine(img, prob, config)
    assert out.dtype == np.float32 and out.shape == prob.shape
    assert out.min() >= 0.0 and out.max() <= 1.0
    np.testing.assert_array_equal(out, refine(img, prob.copy(), config))


def test_grabcut_output_thresholds_to_its_mask_and_keeps_the_map_where_it_agrees():
    img, _, prob = _scene()
    out = refine(img, prob, RefineConfig(method="grabcut"))
    m = out > 0.5
    # (p + m) / 2: p = 2 * out - m
    np.testing.assert_allclose(2 * out - m, prob, atol=1e-6)


def test_grabcut_without_foreground_seeds_returns_the_map():
    img, _, _ = _scene()
    prob = np.full(img.shape[:2], 0.2, np.float32)
    np.testing.assert_array_equal(refine(img, prob, RefineConfig(method="grabcut")), prob)


def test_a_large_photo_is_refined_at_the_working_size_and_returned_at_full_size():
    small_img, small_gt, small_prob = _scene()  # 240x320, enlarged 25-fold in area
    img = cv2.resize(small_img, (3000, 2000), interpolation=cv2.INTER_NEAREST)
    gt = cv2.resize(small_gt.astype(np.uint8), (3000, 2000), interpolation=cv2.INTER_NEAREST) > 0
    prob = cv2.resize(small_prob, (3000, 2000), interpolation=cv2.INTER_LINEAR)
    assert working_shape(img.shape[:2], 512) == (341, 512)
    for config in (RefineConfig(), RefineConfig(method="grabcut", size=128)):
        out = refine(img, prob, config)
        assert out.shape == (2000, 3000) and out.dtype == np.float32
        assert _iou(out > 0.5, gt) > _iou(prob > 0.5, gt)


def test_working_size_scales_up_and_down_keeping_the_aspect():
    assert working_shape((100, 50), 512) == (512, 256)
    assert working_shape((3000, 1), 512) == (512, 1)
    assert working_shape((480, 640), 320) == (240, 320)


@pytest.mark.parametrize(
    "image, prob, needle",
    [
        (np.zeros((10, 12, 3), np.uint8), np.zeros((10, 11), np.float32), "prob has shape (10, 11)"),
        (np.zeros((10, 12, 3), np.float32), np.zeros((10, 12), np.float32), "image must be an (H, W, 3) uint8"),
        (np.zeros((10, 12), np.uint8), np.zeros((10, 12), np.float32), "image must be an (H, W, 3) uint8"),
        (np.zeros((10, 12, 3), np.uint8), np.zeros((10, 12), np.uint8), "prob must be a float (H, W)"),
        (np.zeros((10, 12, 3), np.uint8), np.full((10, 12), np.nan, np.float32), "prob contains NaN"),
        (np.zeros((10, 12, 3), np.uint8), np.full((10, 12), 1.5, np.float32), "prob must lie in [0, 1]"),
    ],
)
def test_bad_input_names_the_argument(image, prob, needle):
    for config in (RefineConfig(), OFF):
        with pytest.raises(FsdiffError) as exc:
            refine(image, prob, config)
        assert needle in str(exc.value)


def test_config_is_validated_and_round_trips_through_its_spec():
    cfg = parse_refine("guided:radius=16,eps=0.01,domain=logit")
    assert cfg == RefineConfig(radius=16, eps=0.01, domain="logit")
    assert parse_refine(cfg.spec()) == cfg
    assert parse_refine(RefineConfig(method="grabcut", size=256).spec()) == RefineConfig(method="grabcut", size=256)
    for bad, needle in [("crf", "method 'crf'"), ("guided:radius=0", "radius 0"), ("guided:eps=-1", "eps -1"),
                        ("guided:domain=x", "domain 'x'"), ("guided:radius", "'radius' is not key=value"),
                        ("guided:radius=a", "radius needs an integer"), ("guided:detail=2", "detail 2.0"), ("guided:detail=x", "detail needs a number"), ("grabcut:sure=0.5", "sure 0.5"), ("", "refine=")]:
        with pytest.raises(FsdiffError, match=None) as exc:
            parse_refine(bad)
        assert needle in str(exc.value), (bad, str(exc.value))
    with pytest.raises(FsdiffError, match="config must be a RefineConfig"):
        refine(np.zeros((4, 4, 3), np.uint8), np.zeros((4, 4), np.float32), "guided")  # type: ignore[arg-type]


class _Fixed:
    """A segmenter double that returns given maps."""

    name = "fixed"
    encoder_name = "enc"

    def __init__(self, probs):
        self.probs = probs
        self.threshold = 0.5

    def predict(self, episode):
        return list(self.probs)


def test_pipeline_refines_every_query_and_forwards_the_rest():
    from fsdiff.episode import Episode, MaskAnnotation, Query, Shot
    from fsdiff.pipeline import Pipeline
    from fsdiff.refine import QueryRefiner, as_refiner

    img, gt, prob = _scene()
    img2, gt2, prob2 = _scene(seed=3)
    ep = Episode(0, "x", (Shot(img, MaskAnnotation(gt.astype(np.uint8))),), (Query(img), Query(img2)))
    inner = _Fixed([prob, prob2])
    seg = Pipeline(inner, refiner=as_refiner("guided"))
    out = seg.predict(ep)
    np.testing.assert_array_equal(out[0], refine(img, prob, RefineConfig()))
    np.testing.assert_array_equal(out[1], refine(img2, prob2, RefineConfig()))
    assert seg.name == "fixed" and seg.encoder_name == "enc"
    seg.threshold = 0.4
    assert inner.threshold == 0.4 and seg.threshold == 0.4
    assert as_refiner("off") is None and as_refiner(None) is None and as_refiner(OFF) is None
    assert isinstance(as_refiner(RefineConfig(method="grabcut")), QueryRefiner)
    assert Pipeline(inner, refiner=as_refiner("off")).predict(ep)[0] is prob
    with pytest.raises(FsdiffError, match="RefineConfig method 'blur': use one of off, guided, grabcut"):
        as_refiner("blur")
    with pytest.raises(FsdiffError, match="expected a RefineConfig"):
        QueryRefiner("guided")
