"""Drift scores and the drift filter (fsdiff.augment.drift) on constructed images: an object that stays under
the reused mask scores higher than one shifted off it, for the segment score (fake colour segmenter and the real
prototype segmenter) and the segmenter-free separability score; regenerate / drop / keep-best logic with a fake
generator; deterministic retry seeds; reporting; bad input."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from fsdiff.augment.controls import ControlConfig
from fsdiff.augment.drift import (
    DriftFilter,
    DriftReport,
    auc,
    colour_features,
    encoder_features,
    segment_score,
    separability_score,
)
from fsdiff.augment.generate import (
    ControlNetGenerator,
    GeneratedImage,
    GenerationConfig,
    derive_seed,
    support_identity,
)
from fsdiff.episode import Episode, MaskAnnotation
from fsdiff.errors import FsdiffError

H, W = 64, 80


def _scene(cy: int, cx: int, seed: int, bg=(40, 140, 40), obj=(210, 40, 40), r: int = 14) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = np.clip(rng.normal(0, 12, (H, W, 3)) + np.asarray(bg), 0, 255).astype(np.uint8)
    yy, xx = np.mgrid[:H, :W]
    img[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = obj
    return img


def _disc(cy: int, cx: int, r: int = 14) -> np.ndarray:
    yy, xx = np.mgrid[:H, :W]
    return ((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r).astype(np.uint8)


REAL = _scene(30, 30, seed=0)
MASK = _disc(30, 30)
MASK[0, :] = 255  # an ignore row
# "Generated" images: other background texture and object shade (diffusion changes appearance) ...
ALIGNED = _scene(30, 30, seed=1, bg=(60, 120, 50), obj=(190, 60, 50))
SHIFTED = _scene(34, 52, seed=2, bg=(60, 120, 50), obj=(190, 60, 50))  # ... object moved 22 px right


class ColourSegmenter:
    """Fake segmenter: foreground = nearer the support's fg mean colour than its bg mean colour."""

    name = "colour"
    threshold = 0.5

    def predict(self, episode: Episode) -> list[np.ndarray]:
        s = episode.shots[0]
        fg, bg = s.annotation.regions(s.shape)
        mf, mb = s.image[fg].mean(0), s.image[bg].mean(0)
        x = episode.queries[0].image.astype(np.float64)
        return [(np.linalg.norm(x - mf, axis=2) < np.linalg.norm(x - mb, axis=2)).astype(np.float32)]


def test_segment_score_aligned_beats_shifted() -> None:
    seg = ColourSegmenter()
    good = segment_score(REAL, MASK, ALIGNED, seg)
    bad = segment_score(REAL, MaskAnnotation(MASK), SHIFTED, seg)
    assert good > 0.9 and bad < 0.4 and good > bad


def test_segment_score_with_prototype_segmenter() -> None:
    from fsdiff.methods.prototype import PrototypeSegmenter

    seg = PrototypeSegmenter(size=128)
    good, bad = (segment_score(REAL, MASK, g, seg) for g in (ALIGNED, SHIFTED))
    assert good > bad + 0.2


def test_separability_aligned_beats_shifted() -> None:
    good = separability_score(ALIGNED, MASK)  # default: model-free colour features
    bad = separability_score(SHIFTED, MASK)
    assert good > 0.95 and bad < 0.8 and good > bad
    fg, fb = (separability_score(x, MASK, colour_features, method="fisher") for x in (ALIGNED, SHIFTED))
    assert fg > fb > 0
    # any features(image) -> (C, h, w) callable, tensor or array
    enc = encoder_features(level=1, size=128)
    ge, be = separability_score(ALIGNED, MASK, enc), separability_score(SHIFTED, MASK, enc)
    assert ge > be


def test_auc_and_unscorable() -> None:
    assert auc(np.array([3.0, 4.0]), np.array([1.0, 2.0])) == 1.0
    assert auc(np.array([1.0, 2.0]), np.array([3.0, 4.0])) == 0.0
    assert auc(np.array([1.0, 1.0]), np.array([1.0])) == 0.5
    assert math.isnan(separability_score(ALIGNED, np.ones((H, W), np.uint8)))  # no background cell


def test_bad_input() -> None:
    with pytest.raises(FsdiffError, match="empty"):
        separability_score(ALIGNED, np.zeros((H, W), np.uint8))
    with pytest.raises(FsdiffError, match="empty"):
        segment_score(REAL, np.zeros((H, W), np.uint8), ALIGNED, ColourSegmenter())
    with pytest.raises(FsdiffError, match="differ"):
        segment_score(REAL, MASK, ALIGNED[:32], ColourSegmenter())
    with pytest.raises(FsdiffError, match="drift score must be"):
        DriftFilter("psnr")
    with pytest.raises(FsdiffError, match="explicit threshold"):
        DriftFilter(lambda a, b, c: 1.0)
    with pytest.raises(FsdiffError, match="max_retries"):
        DriftFilter("segment", max_retries=-1)
    with pytest.raises(FsdiffError, match="method"):
        separability_score(ALIGNED, MASK, method="x")


class FakeGenerator:
    """Returns ALIGNED for the (index, attempt) pairs in ``good`` and SHIFTED otherwise; logs its calls."""

    condition = "seg"
    cache = None

    def __init__(self, good: set[tuple[int, int]]) -> None:
        self.good = good
        self.calls: list[tuple[tuple[int, ...], int]] = []

    def generate(self, image, annotation, class_name, n=4, *, indices=None, attempt=0):
        idx = list(range(n)) if indices is None else list(indices)
        self.calls.append((tuple(idx), attempt))
        return [GeneratedImage(ALIGNED if (i, attempt) in self.good else SHIFTED, seed=100 * i + attempt, index=i,
                               attempt=attempt, key=f"k{i}.{attempt}", cached=False, condition="seg",
                               generated_size=(H, W)) for i in idx]


def test_filter_regenerates_then_drops() -> None:
    gen = FakeGenerator({(0, 0), (1, 1)})  # 0 good at once, 1 good on the first retry, 2 never
    filt = DriftFilter("segment", threshold=0.5, max_retries=2, segmenter=ColourSegmenter())
    items = gen.generate(REAL, MASK, "dog", 3)
    kept, rep = filt.filter(gen, REAL, MASK, "dog", items, support_id="s")
    assert [(k.index, k.attempt) for k in kept] == [(0, 0), (1, 1)]
    assert gen.calls[1:] == [((1,), 1), ((2,), 1), ((2,), 2)]
    assert (rep.kept, rep.regenerated, rep.dropped, rep.unscored) == (2, 3, 1, 0)
    assert len(rep.scores) == 6 and len(rep.first_scores) == 3
    assert [r.outcome for r in rep.records] == ["kept", "retried", "kept", "retried", "retried", "dropped"]
    assert rep.first_scores[0] > 0.9 > 0.4 > rep.first_scores[1]
    d = rep.as_dict()
    assert d["summary"]["n"] == 3 and d["summary"]["below_threshold"] == pytest.approx(2 / 3)
    assert d["records"][0]["seed"] == 0 and d["records"][-1]["attempt"] == 2
    # cumulative report over calls
    filt.filter(gen, REAL, MASK, "dog", gen.generate(REAL, MASK, "dog", 1))
    assert filt.report.kept == 3 and len(filt.report.records) == 7
    both = rep.merged(rep)  # a new report with both halves' records and counts; rep itself unchanged
    assert (both.kept, both.regenerated, both.dropped, len(both.records)) == (4, 6, 2, 12) and len(rep.records) == 6
    filt.reset()
    assert filt.report.records == []


def test_filter_no_retries_and_keep_best() -> None:
    gen = FakeGenerator({(0, 0)})
    seg = ColourSegmenter()
    kept, rep = DriftFilter("segment", 0.5, max_retries=0, segmenter=seg).filter(
        gen, REAL, MASK, "dog", gen.generate(REAL, MASK, "dog", 2))
    assert [k.index for k in kept] == [0] and (rep.regenerated, rep.dropped) == (0, 1)
    kept, rep = DriftFilter("segment", 1.01, max_retries=1, segmenter=seg, on_exhausted="keep_best").filter(
        gen, REAL, MASK, "dog", gen.generate(REAL, MASK, "dog", 2))
    assert len(kept) == 2 and rep.dropped == 0 and rep.regenerated == 2
    assert [(k.index, k.attempt) for k in kept] == [(0, 0), (1, 0)]  # index 0: its aligned first attempt
    assert [r.outcome for r in rep.records].count("kept_best") == 2


def test_filter_separability_and_unscored() -> None:
    gen = FakeGenerator({(0, 0)})
    kept, rep = DriftFilter("separability", max_retries=0, features=colour_features).filter(
        gen, REAL, MASK, "dog", gen.generate(REAL, MASK, "dog", 2))
    assert [k.index for k in kept] == [0] and rep.threshold == 0.8
    full = np.ones((H, W), np.uint8)
    kept, rep = DriftFilter("separability", max_retries=1).filter(
        gen, REAL, full, "dog", gen.generate(REAL, full, "dog", 1))
    assert len(kept) == 1 and rep.unscored == 1 and rep.regenerated == 0


def test_retry_seeds_are_a_deterministic_sequence() -> None:
    def fake(*, generator, height, width, **kw):
        return SimpleNamespace(images=np.stack([torch.rand((height, width, 3), generator=g).numpy()
                                                for g in generator]))

    gen = ControlNetGenerator(fake, "seg", config=GenerationConfig(steps=2, seed=3,
                                                                 control=ControlConfig(resolution=64)))
    ident = support_identity(REAL, MaskAnnotation(MASK), "dog")
    first = gen.generate(REAL, MASK, "dog", indices=[1])[0]
    retry = gen.generate(REAL, MASK, "dog", indices=[1], attempt=1)[0]
    assert (first.seed, retry.seed) == (derive_seed(3, ident, 1, 0), derive_seed(3, ident, 1, 1))
    assert first.seed != retry.seed and retry.attempt == 1
    assert retry.seed == gen.generate(REAL, MASK, "dog", indices=[1], attempt=1)[0].seed
    filt = DriftFilter(lambda r, a, g: 1.0 if g is not None else 0.0, threshold=0.5)
    assert isinstance(filt.report, DriftReport) and filt.score_name == "<lambda>"
