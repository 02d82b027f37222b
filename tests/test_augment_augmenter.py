"""Episode expansion (fsdiff.augment.augmenter): 1 real + N generated shots with the reused annotation,
per_shot 'first' vs 'all', box/scribble supports, the drift filter hook, and AugmentedSegmenter around any
segmenter. The diffusion pipeline is a deterministic fake (seeded noise blended with the control map)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from fsdiff.augment.augmenter import AugmentedSegmenter, Augmenter
from fsdiff.augment.cache import GenerationCache
from fsdiff.augment.controls import ControlConfig
from fsdiff.augment.drift import DriftFilter
from fsdiff.augment.generate import ControlNetGenerator, GenerationConfig
from fsdiff.episode import BoxAnnotation, Episode, MaskAnnotation, Query, ScribbleAnnotation, Shot, TextAnnotation
from fsdiff.errors import FsdiffError
from fsdiff.protocol import Segmenter

CFG = GenerationConfig(steps=2, control=ControlConfig(resolution=64))


class FakePipeline:
    """Stands in for StableDiffusionControlNetPipeline: per-generator noise blended with the control."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, *, prompt, negative_prompt, image, num_inference_steps, guidance_scale, eta,
                 controlnet_conditioning_scale, height, width, generator, output_type):
        self.calls += 1
        assert len(prompt) == len(negative_prompt) == len(generator) and output_type == "np"
        ctrl = image[0].permute(1, 2, 0).numpy()
        assert ctrl.shape == (height, width, 3)
        imgs = [0.5 * torch.rand((height, width, 3), generator=g).numpy() + 0.5 * ctrl for g in generator]
        return SimpleNamespace(images=np.stack(imgs))


def _scene(h: int, w: int, box: tuple[int, int, int, int], seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 120, (h, w, 3), dtype=np.uint8)
    mask = np.zeros((h, w), np.uint8)
    x0, y0, x1, y1 = box
    mask[y0:y1, x0:x1] = 1
    img[mask == 1] = (220, 30, 30)
    mask[-1, :] = 255
    return img, mask


def _episode(k: int = 1, annotations: str = "mask") -> Episode:
    shots = []
    for i in range(k):
        img, mask = _scene(36 + 4 * i, 50, (8 + i, 6, 30 + i, 26), seed=i)
        ann = {"mask": MaskAnnotation(mask), "box": BoxAnnotation((8, 6, 30, 26)),
               "scribble": ScribbleAnnotation(_stroke(mask.shape)),
               "text": TextAnnotation()}[annotations]
        shots.append(Shot(img, ann, image_id=f"s{i}"))
    qimg, qmask = _scene(40, 40, (5, 5, 25, 25), seed=9)
    return Episode(3, "dog", shots, (Query(qimg, gt=qmask, image_id="q"),), episode_id="e1", meta={"dataset": "x"})


def _stroke(shape: tuple[int, int]) -> np.ndarray:
    s = np.zeros(shape, np.uint8)
    s[15, 10:28] = 1
    return s


@pytest.fixture()
def gen(tmp_path) -> ControlNetGenerator:
    return ControlNetGenerator(FakePipeline(), "seg", cache=GenerationCache(tmp_path / "cache"), config=CFG)


def test_one_shot_becomes_one_plus_n(gen: ControlNetGenerator) -> None:
    ep = _episode(1)
    aug = Augmenter(gen, "seg", n=3)
    out = aug.augment(ep)
    assert out.k == 4 and out.shots[0] is ep.shots[0]
    real = ep.shots[0]
    for s in out.shots[1:]:
        assert s.image.shape == real.image.shape  # resized back to the real support's (W, H)
        assert s.annotation is real.annotation  # the real mask reused unchanged (1 = class, 255 kept)
        assert not np.array_equal(s.image, real.image)
    assert [s.image_id for s in out.shots[1:]] == ["s0#seg:0", "s0#seg:1", "s0#seg:2"]
    assert out.queries == ep.queries and out.class_id == 3 and out.episode_id == "e1"
    info = out.meta["augment"]
    assert info["condition"] == "seg" and info["n"] == 3 and info["augmented_shots"] == [0]
    assert out.meta["dataset"] == "x" and "augment" not in ep.meta
    assert gen.pipeline.calls == 1
    again = aug(ep)  # second time: every image from the cache
    assert gen.pipeline.calls == 1 and all(g["cached"] for g in again.meta["augment"]["generated"])
    assert all(np.array_equal(a.image, b.image) for a, b in zip(out.shots, again.shots))


def test_k2_first_vs_all(gen: ControlNetGenerator) -> None:
    ep = _episode(2)
    first = Augmenter(gen, n=2, per_shot="first").augment(ep)
    assert first.k == 2 + 2
    assert [s.image_id for s in first.shots] == ["s0", "s1", "s0#seg:0", "s0#seg:1"]
    every = Augmenter(gen, n=2, per_shot="all").augment(ep)
    assert every.k == 2 + 2 * 2
    assert [s.image_id for s in every.shots] == ["s0", "s1", "s0#seg:0", "s0#seg:1", "s1#seg:0", "s1#seg:1"]
    for s in every.shots[4:]:
        assert s.annotation is ep.shots[1].annotation and s.image.shape == ep.shots[1].image.shape
    # the shot-0 auxiliaries are the same images whichever mode (same seeds, cached)
    assert np.array_equal(first.shots[2].image, every.shots[2].image)


def test_spec_and_condition_checks(gen: ControlNetGenerator) -> None:
    assert Augmenter(gen, "seg:2").n == 2 and Augmenter(gen).spec == "seg:4"
    assert Augmenter(gen, "seg:2", n=3).n == 3  # an explicit n wins over the spec's count (as in pregenerate)
    with pytest.raises(FsdiffError, match="integer >= 0"):
        Augmenter(gen, n=-1)
    with pytest.raises(FsdiffError, match="does not match the generator"):
        Augmenter(gen, "hed:4")
    with pytest.raises(FsdiffError, match="unknown condition"):
        Augmenter(gen, "canny:2")
    with pytest.raises(FsdiffError, match="per_shot"):
        Augmenter(gen, per_shot="some")
    with pytest.raises(FsdiffError, match="generator must have"):
        Augmenter(object())


@pytest.mark.parametrize("kind", ["box", "scribble"])
def test_sparse_supports_reuse_their_annotation(gen: ControlNetGenerator, kind: str) -> None:
    ep = _episode(1, kind)
    out = Augmenter(gen, n=2).augment(ep)
    assert out.k == 3 and all(s.annotation is ep.shots[0].annotation for s in out.shots)
    assert out.shots[0].annotation.kind == kind


def test_text_support_and_empty_episode(gen: ControlNetGenerator) -> None:
    with pytest.raises(FsdiffError, match="text annotation"):
        Augmenter(gen, n=2).augment(_episode(1, "text"))
    q = _episode(1).queries
    empty = Episode(1, "dog", (), q)
    assert Augmenter(gen, n=2).augment(empty).k == 0


class ColourSegmenter:
    """Tiny fake segmenter: a query pixel is foreground when nearer the support's fg mean colour than its bg one."""

    name = "colour"
    encoder_name = None

    def __init__(self) -> None:
        self.threshold = 0.5
        self.seen: list[int] = []

    def predict(self, episode: Episode) -> list[np.ndarray]:
        self.seen.append(episode.k)
        fgs, bgs = [], []
        for s in episode.shots:
            fg, bg = s.annotation.regions(s.shape)
            fgs.append(s.image[fg].reshape(-1, 3))
            bgs.append(s.image[bg].reshape(-1, 3))
        mf, mb = np.concatenate(fgs).mean(0), np.concatenate(bgs).mean(0)
        out = []
        for q in episode.queries:
            x = q.image.astype(np.float64)
            df, db = np.linalg.norm(x - mf, axis=2), np.linalg.norm(x - mb, axis=2)
            out.append((df < db).astype(np.float32))
        return out


def test_augmented_segmenter_wraps_any_segmenter(gen: ControlNetGenerator) -> None:
    inner = ColourSegmenter()
    wrapped = AugmentedSegmenter(inner, Augmenter(gen, "seg", n=4))
    assert isinstance(wrapped, Segmenter)
    assert wrapped.name == "colour+seg:4" and wrapped.threshold == 0.5
    wrapped.threshold = 0.4
    assert inner.threshold == 0.4 and wrapped.threshold == 0.4
    ep = _episode(1)
    probs = wrapped.predict(ep)
    assert inner.seen == [5] and len(probs) == 1 and probs[0].shape == ep.queries[0].shape
    with pytest.raises(FsdiffError):
        AugmentedSegmenter(object(), Augmenter(gen))


def test_drift_filter_drops_and_fill_real(gen: ControlNetGenerator) -> None:
    ep = _episode(1)
    calls = []

    def score(real, ann, generated):
        calls.append(1)
        return 0.0  # every image fails

    drop = Augmenter(gen, n=2, drift_filter=DriftFilter(score, threshold=0.5, max_retries=1))
    out = drop.augment(ep)
    assert out.k == 1 and drop.last_report.dropped == 2 and drop.last_report.regenerated == 2 and len(calls) == 4
    assert out.meta["augment"]["drift"]["dropped"] == 2
    fill = Augmenter(gen, n=2, drift_filter=DriftFilter(score, threshold=0.5, max_retries=0), fill_dropped="real")
    out = fill.augment(ep)
    assert out.k == 3 and all(np.array_equal(s.image, ep.shots[0].image) for s in out.shots)
    assert [s.image_id for s in out.shots[1:]] == ["s0#real-copy:0", "s0#real-copy:1"]
