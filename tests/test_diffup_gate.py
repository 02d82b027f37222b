"""DiffUp's prior check (fsdiff.methods.diffup.gate) and how the segmenter uses it: hand-computed scores,
the gate's decisions, the prior returned exactly where it passes, and the inference input size."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from fsdiff.episode import BoxAnnotation, Episode, MaskAnnotation, Query, Shot, TextAnnotation
from fsdiff.errors import FsdiffError
from fsdiff.methods.diffup.gate import gate_decisions, prior_check, region_iou
from fsdiff.methods.diffup.segmenter import DiffUpSegmenter
from fsdiff.methods.prototype import PrototypeSegmenter
from test_diffup_segmenter import checkpoint, episode, source  # noqa: F401  (module fixtures)


def test_region_iou_by_hand():
    pred = np.zeros((4, 4), bool)
    pred[0:2, 0:3] = True  # 6 pixels
    fg = np.zeros((4, 4), bool)
    fg[0:2, 0:2] = True  # 4 pixels, all predicted
    bg = ~fg
    assert region_iou(pred, fg, bg) == pytest.approx(4 / 6)
    # unlabelled pixels do not count: the two extra predicted pixels lie outside fg | bg
    bg2 = np.zeros((4, 4), bool)
    bg2[2:, :] = True
    assert region_iou(pred, fg, bg2) == pytest.approx(1.0)
    assert region_iou(np.zeros((4, 4), bool), np.zeros((4, 4), bool), bg) == 0.0
    with pytest.raises(FsdiffError, match="shape"):
        region_iou(pred, fg[:3], bg)


class FixedPrior:
    """A stand-in prior that segments every back-episode with one fixed mask, and records the calls."""

    def __init__(self, mask: np.ndarray):
        self.mask = mask
        self.calls: list[Episode] = []

    def predict(self, episode: Episode) -> list[np.ndarray]:
        self.calls.append(episode)
        return [self.mask.astype(np.float32)]


def _image(h=8, w=8, v=0):
    return np.full((h, w, 3), v, np.uint8)


def test_prior_check_scores_each_support_back():
    fg = np.zeros((8, 8), np.uint8)
    fg[2:6, 2:6] = 1  # 16 pixels
    back = np.zeros((8, 8), bool)
    back[2:6, 2:4] = True  # half of the support's mask
    prior = FixedPrior(back)
    shots = (Shot(_image(v=1), MaskAnnotation(fg), image_id="s0"), Shot(_image(v=2), BoxAnnotation((0, 0, 8, 4))),
             Shot(_image(v=3), TextAnnotation()))
    query = Query(_image(v=9), image_id="q")
    ep = Episode(0, "thing", shots, (query,))
    prob = np.zeros((8, 8), np.float32)
    prob[1:3, 1:3] = 0.9
    score = prior_check(prior, ep, 0, prob)
    box_fg = np.zeros((8, 8), bool)
    box_fg[0:4, :] = True
    box_iou = (back & box_fg).sum() / (back | box_fg).sum()  # 4 / 36
    assert score == pytest.approx((0.5 + box_iou) / 2)
    assert len(prior.calls) == 2  # the text shot has no region and is not segmented back
    first = prior.calls[0]
    assert first.shots[0].image is query.image and first.queries[0].image is shots[0].image
    assert np.array_equal(first.shots[0].annotation.mask, (prob > 0.5).astype(np.uint8))
    # an empty query mask or no spatial shot: score 0, nothing segmented back
    assert prior_check(prior, ep, 0, np.zeros((8, 8), np.float32)) == 0.0
    text_only = Episode(0, "thing", (shots[2],), (query,))
    assert prior_check(prior, text_only, 0, prob) == 0.0 and len(prior.calls) == 2
    with pytest.raises(FsdiffError, match="shape"):
        prior_check(prior, ep, 0, prob[:4])


def test_gate_decisions():
    assert gate_decisions([0.2, 0.7, 0.5], 0.5) == [True, False, False]
    assert gate_decisions([0.2, 0.7], None) == [True, True]


def test_segmenter_returns_the_prior_where_it_passes(checkpoint, source):  # noqa: F811
    ep = episode(source, ("mask",), n_queries=2)
    seg = DiffUpSegmenter(checkpoint, steps=2, prior_gate=0.0)  # every score >= 0: the prior, no check needed
    preds = seg.predict_with_uncertainty(ep)
    ref = PrototypeSegmenter(seg.encoder, size=seg.input_size).predict(ep)
    for p, r in zip(preds, ref):
        assert not p.decoded and p.t_start == 0 and p.types == ("mask",) and p.check is None
        assert np.array_equal(p.prob, r)
        assert np.allclose(p.uncertainty, 1 - np.abs(2 * r - 1))
    always = DiffUpSegmenter(checkpoint, steps=2, prior_gate=False).predict_with_uncertainty(ep)
    strict = DiffUpSegmenter(checkpoint, steps=2, prior_gate=1.0).predict_with_uncertainty(ep)
    for a, s in zip(always, strict):
        assert a.decoded and a.check is None and a.t_start == 300
        if s.decoded:  # below a perfect score the decoder runs, with the same sample as without the check
            assert s.check < 1.0 and np.array_equal(s.prob, a.prob)


def test_mixed_decisions_keep_query_order(checkpoint, source, monkeypatch):  # noqa: F811
    ep = episode(source, ("mask",), n_queries=2)
    seg = DiffUpSegmenter(checkpoint, steps=2, prior_gate=0.5)
    monkeypatch.setattr("fsdiff.methods.diffup.segmenter.prior_check", lambda prior, e, i, p: [0.9, 0.1][i])
    first, second = seg.predict_with_uncertainty(ep)
    assert not first.decoded and first.check == 0.9 and second.decoded and second.check == 0.1
    alone = DiffUpSegmenter(checkpoint, steps=2, prior_gate=False).predict_with_uncertainty(ep)
    assert np.array_equal(second.prob, alone[1].prob)


def test_config_defaults_and_bad_values(checkpoint, source, tmp_path):  # noqa: F811
    ck = tmp_path / "ck"
    shutil.copytree(checkpoint, ck)
    info = json.loads((ck / "fsdiff_checkpoint.json").read_text())
    info["config"].update(prior_gate=0.25, inference_input_size=96)
    (ck / "fsdiff_checkpoint.json").write_text(json.dumps(info))
    seg = DiffUpSegmenter(ck, steps=2)
    assert seg.prior_gate == 0.25 and seg.input_size == 96 and seg.prior.size == (96, 96)
    cfg = seg.config
    assert seg.mask_size == 96 // cfg.mask_stride and seg.prior_size == 96 // cfg.prior_stride
    over = DiffUpSegmenter(ck, steps=2, prior_gate=False, input_size=80)
    assert over.prior_gate is None and over.input_size == 80
    item = over.episode_priors(episode(source, ("mask",)))[0]
    assert item["priors"].shape[-1] == 80 // cfg.prior_stride and item["query_rgb"].shape[-1] == 80 // cfg.mask_stride
    p = over.predict(episode(source, ("mask",)))[0]
    assert p.shape == source.data["img0"][0].shape[:2]
    for bad in (1.5, -0.1, "yes", True):
        with pytest.raises(FsdiffError, match="prior_gate"):
            DiffUpSegmenter(checkpoint, prior_gate=bad)
    with pytest.raises(FsdiffError, match="input_size"):
        DiffUpSegmenter(checkpoint, input_size=16)
    info["config"]["prior_gate"] = 2.0
    (ck / "fsdiff_checkpoint.json").write_text(json.dumps(info))
    with pytest.raises(FsdiffError, match="prior_gate"):
        DiffUpSegmenter(ck)


def test_shipped_defaults_answer_a_good_horse_prior_with_the_prototype_method(shared_data):
    """With the shipped defaults, a horse episode whose prior passes the check gets exactly the prototype
    method's default output (same 473 px features, same maps), and the decoder is skipped."""
    from fsdiff.api import load_query, load_shot
    from fsdiff.methods.diffup.segmenter import build_diffup
    from fsdiff.methods.diffup.training import cpu_config

    root = shared_data / "weizmann-horse"
    shot = load_shot(root / "images" / "horse001.jpg", mask=root / "masks" / "horse001.png")
    query = load_query(root / "images" / "horse002.jpg", gt=root / "masks" / "horse002.png")
    ep = Episode(0, "horse", (shot,), (query,))
    seg = build_diffup()
    assert seg.input_size == 473 == cpu_config().inference_input_size and seg.prior_gate == cpu_config().prior_gate
    pred = seg.predict_with_uncertainty(ep)[0]
    assert pred.check >= seg.prior_gate and not pred.decoded
    assert np.array_equal(pred.prob, PrototypeSegmenter().predict(ep)[0])


def test_cpu_config_inference_size_follows_a_custom_training_size():
    from fsdiff.methods.diffup.training import cpu_config

    assert cpu_config().inference_input_size == 473 and cpu_config().input_size == 448
    assert cpu_config(input_size=64).inference_input_size is None
    assert cpu_config(input_size=64, inference_input_size=96).inference_input_size == 96


def test_the_check_needs_mask_supports(checkpoint, source, monkeypatch):  # noqa: F811
    calls = []
    monkeypatch.setattr("fsdiff.methods.diffup.segmenter.prior_check",
                        lambda prior, e, i, p: calls.append(i) or 1.0)
    seg = DiffUpSegmenter(checkpoint, steps=2, prior_gate=0.5)
    for kinds in (("box",), ("scribble",), ("mask", "box"), ("points",)):
        p = seg.predict_with_uncertainty(episode(source, kinds))[0]
        assert p.decoded and p.check is None
    assert calls == []
    p = seg.predict_with_uncertainty(episode(source, ("mask", "text")))[0]
    assert not p.decoded and p.check == 1.0 and calls == [0]


def test_prior_only_types_get_the_prior_unchecked(checkpoint, source, monkeypatch):  # noqa: F811
    monkeypatch.setattr("fsdiff.methods.diffup.segmenter.prior_check", lambda *a: pytest.fail("no check expected"))
    seg = DiffUpSegmenter(checkpoint, steps=2, prior_gate=0.5, prior_only=["scribble"])
    assert seg.prior_only == ("scribble",)
    for kinds in (("scribble",), ("points",), ("scribble", "points")):
        ep = episode(source, kinds)
        p = seg.predict_with_uncertainty(ep)[0]
        assert not p.decoded and p.check is None and p.t_start == 0
        assert np.array_equal(p.prob, PrototypeSegmenter(seg.encoder, size=seg.input_size).predict(ep)[0])
    for kinds in (("box",), ("mask", "scribble")):  # a box, or a mix with a mask: the decoder runs
        assert seg.predict_with_uncertainty(episode(source, kinds))[0].decoded
    assert DiffUpSegmenter(checkpoint, prior_only=["points"]).prior_only == ("scribble",)
    for bad in ("scribble", ["text"], ["polygon"]):
        with pytest.raises(FsdiffError, match="prior_only"):
            DiffUpSegmenter(checkpoint, prior_only=bad)


def test_kshot_threshold(checkpoint, source, monkeypatch):  # noqa: F811
    seen = []
    monkeypatch.setattr("fsdiff.methods.diffup.segmenter.prior_check", lambda prior, e, i, p: seen.append(len(e.shots)) or 0.3)
    two = episode(source, ("mask", "mask"))
    seg = DiffUpSegmenter(checkpoint, steps=2, prior_gate=0.5, prior_gate_kshot=0.0)
    p = seg.predict_with_uncertainty(two)[0]
    assert not p.decoded and p.check is None and seen == []  # threshold 0: the prior, without the check
    assert np.array_equal(p.prob, PrototypeSegmenter(seg.encoder, size=seg.input_size).predict(two)[0])
    assert seg.predict_with_uncertainty(episode(source, ("mask",)))[0].decoded and seen == [1]  # 0.3 < 0.5
    inherit = DiffUpSegmenter(checkpoint, steps=2, prior_gate=0.2)
    assert inherit.prior_gate_kshot == 0.2 and not inherit.predict_with_uncertainty(two)[0].decoded
    assert DiffUpSegmenter(checkpoint, prior_gate=0.2, prior_gate_kshot=False).prior_gate_kshot is None
    with pytest.raises(FsdiffError, match="prior_gate_kshot"):
        DiffUpSegmenter(checkpoint, prior_gate_kshot=3)


def test_one_feature_cache_for_the_decoder_and_the_prior_check(checkpoint, source):  # noqa: F811
    from fsdiff.features import FeatureCache

    seg = DiffUpSegmenter(checkpoint, steps=2)
    assert seg.prior.cache is seg.cache
    old, fresh = seg.cache, FeatureCache()
    n_old = len(old)
    seg.cache = fresh  # e.g. a benchmark starting each setting cold
    assert seg.cache is fresh and seg.prior.cache is fresh
    seg.predict(episode(source))
    assert len(fresh) > 0 and len(old) == n_old  # the features went to the new cache, none to the old one
