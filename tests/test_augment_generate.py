"""DifFSS generation (fsdiff.augment.generate) end to end on the tiny SD 1.5 + ControlNet stand-ins: DDIM set-up,
determinism per seed, batching, the cache short-circuit, the three controls, box supports and bad input."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from fsdiff.augment.cache import GenerationCache
from fsdiff.augment.controls import NEGATIVE_PROMPT, ControlConfig
from fsdiff.augment.generate import (
    ControlNetGenerator,
    GenerationConfig,
    Generator,
    derive_seed,
    support_identity,
)
from fsdiff.diffusion.loading import MissingModelError
from fsdiff.diffusion.tiny import build_tiny_controlnet, build_tiny_stable_diffusion
from fsdiff.episode import BoxAnnotation, MaskAnnotation
from fsdiff.errors import FsdiffError

TINY = GenerationConfig(steps=2, control=ControlConfig(resolution=64))


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_diffss")
    return {"sd": build_tiny_stable_diffusion(root / "sd15", "1.5", seed=0),
            "cn": build_tiny_controlnet(root / "controlnet", "1.5", seed=0)}


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("FSDIFF_MODEL_DIR", raising=False)


class Counting:
    """Wraps a pipeline and counts its invocations (and the batch size of each)."""

    def __init__(self, pipe):
        self.pipe, self.calls, self.batches = pipe, 0, []

    def __getattr__(self, name):
        return getattr(self.pipe, name)

    def __call__(self, **kw):
        self.calls += 1
        self.batches.append(len(kw["generator"]))
        return self.pipe(**kw)


def _support(h: int = 40, w: int = 56, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    mask = np.zeros((h, w), np.uint8)
    mask[8:30, 10:40] = 1
    mask[0, :4] = 255
    img[mask == 1] = (200, 40, 40)
    return img, mask


@pytest.fixture(scope="module")
def seg_gen(models: dict[str, Path]) -> ControlNetGenerator:
    return ControlNetGenerator.from_pretrained("seg", model=models["sd"], controlnet=models["cn"], config=TINY)


def test_pipeline_is_ldm_ddim_without_safety_checker(seg_gen: ControlNetGenerator) -> None:
    pipe = seg_gen.pipeline
    assert type(pipe).__name__ == "StableDiffusionControlNetPipeline"
    assert pipe.safety_checker is None
    cfg = pipe.scheduler.config
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"
    got = (cfg.timestep_spacing, cfg.steps_offset, cfg.clip_sample, cfg.set_alpha_to_one)
    assert got == ("leading", 1, False, False)
    pipe.scheduler.set_timesteps(20)
    assert pipe.scheduler.timesteps.tolist() == list(range(951, 0, -50))  # ldm DDIM 'uniform': 1, 51, ..., 951
    assert seg_gen.dtype == "bfloat16"  # default on CPU
    assert isinstance(seg_gen, Generator)
    assert seg_gen.prompt("tvmonitor") == "a real shot photo of television,, best quality, extremely detailed"


def test_generation_end_to_end_deterministic_per_seed(seg_gen: ControlNetGenerator) -> None:
    img, mask = _support()
    seg_gen.cache = None
    a = seg_gen.generate(img, mask, "dog", 3)
    b = seg_gen.generate(img, MaskAnnotation(mask), "dog", 3)
    assert [x.index for x in a] == [0, 1, 2] and len({x.seed for x in a}) == 3
    for x in a:
        assert x.image.shape == img.shape and x.image.dtype == np.uint8
        assert not x.cached and x.attempt == 0 and x.condition == "seg"
    assert a[0].generated_size == (64, 64)  # 40x56 -> short side 64 -> 64 x round(89.6/64)*64 = 64
    for x, y in zip(a, b):
        assert x.seed == y.seed and np.array_equal(x.image, y.image)  # same seed, same image
    assert not np.array_equal(a[0].image, a[1].image)  # different seed, different image
    # seeds: sha256 of (base seed, support content, index, attempt), not hash(); stable across runs
    ident = support_identity(img, MaskAnnotation(mask), "dog")
    assert a[1].seed == derive_seed(0, ident, 1, 0)
    assert derive_seed(0, "x", 0, 0) == derive_seed(0, "x", 0, 0) != derive_seed(1, "x", 0, 0)
    assert derive_seed(0, "x", 0, 1) != derive_seed(0, "x", 0, 0)
    assert derive_seed(0, "support", 3, 0) == 1591080371  # frozen: changing it invalidates every cache


def test_other_base_seed_gives_other_images(models: dict[str, Path], seg_gen: ControlNetGenerator) -> None:
    img, mask = _support()
    seg_gen.cache = None
    other = ControlNetGenerator(seg_gen.pipeline, "seg", config=TINY.replace(seed=7), dtype="bfloat16")
    x, y = seg_gen.generate(img, mask, "dog", 1)[0], other.generate(img, mask, "dog", 1)[0]
    assert x.seed != y.seed and not np.array_equal(x.image, y.image)


def test_batching_and_cache_hit_skips_pipeline(seg_gen: ControlNetGenerator, tmp_path: Path) -> None:
    img, mask = _support(seed=3)
    gen = ControlNetGenerator(Counting(seg_gen.pipeline), "seg", cache=GenerationCache(tmp_path / "c"),
                              config=TINY.replace(batch_size=2), model_ids=seg_gen.model_ids, dtype=seg_gen.dtype)
    t0 = time.perf_counter()
    first = gen.generate(img, mask, "cat", 3)
    elapsed = time.perf_counter() - t0
    assert gen.pipeline.calls == 2 and gen.pipeline.batches == [2, 1]
    assert len(gen.cache) == 3 and elapsed < 30
    second = gen.generate(img, mask, "cat", 3)
    assert gen.pipeline.calls == 2  # every image from the cache
    assert all(x.cached for x in second) and not any(x.cached for x in first)
    for x, y in zip(first, second):
        assert x.key == y.key and np.array_equal(x.image, y.image)
    # a partial hit only generates what is missing
    more = gen.generate(img, mask, "cat", 4)
    assert gen.pipeline.calls == 3 and gen.pipeline.batches[-1] == 1 and [x.cached for x in more] == [1, 1, 1, 0]
    # the record keeps what made the image, and the control map for inspection
    item = gen.cache.get(first[0].key)
    assert item.meta["seed"] == first[0].seed and item.meta["class_name"] == "cat" and item.meta["index"] == 0
    assert item.control is not None and item.control.shape == (64, 64, 3)
    assert item.image.shape == (64, 64, 3)  # stored at generation size, resized back on read


def test_key_covers_every_setting(seg_gen: ControlNetGenerator) -> None:
    img, mask = _support()
    ann = MaskAnnotation(mask)
    from fsdiff.augment.cache import generation_key

    def key(gen: ControlNetGenerator, name: str = "dog") -> str:
        return generation_key(**gen.key_fields(img, ann, name, 5))

    base = key(seg_gen)
    variants = [
        ControlNetGenerator(seg_gen.pipeline, "seg", config=TINY.replace(steps=3), model_ids=seg_gen.model_ids,
                            dtype=seg_gen.dtype),
        ControlNetGenerator(seg_gen.pipeline, "seg", config=TINY.replace(guidance=7.5), model_ids=seg_gen.model_ids,
                            dtype=seg_gen.dtype),
        ControlNetGenerator(seg_gen.pipeline, "seg", config=TINY.replace(control_scale=0.5),
                            model_ids=seg_gen.model_ids, dtype=seg_gen.dtype),
        ControlNetGenerator(seg_gen.pipeline, "seg", config=TINY, model_ids=seg_gen.model_ids,
                            key_extra={"dtype": "float32"}),
        ControlNetGenerator(seg_gen.pipeline, "hed", config=TINY, model_ids=seg_gen.model_ids, dtype=seg_gen.dtype),
        ControlNetGenerator(seg_gen.pipeline, "seg", config=TINY, model_ids={"sd": "other"}, dtype=seg_gen.dtype),
    ]
    keys = {base, key(seg_gen, "cat")} | {key(v) for v in variants}
    assert len(keys) == 2 + len(variants)
    # precision is recorded, not keyed: fp16 GPU pre-generation serves a bf16 CPU run
    same = ControlNetGenerator(seg_gen.pipeline, "seg", config=TINY, model_ids=seg_gen.model_ids, dtype="float16")
    assert key(same) == base
    with pytest.raises(FsdiffError, match="clashes"):
        ControlNetGenerator(seg_gen.pipeline, "seg", config=TINY, key_extra={"hed": "x"}).key_fields(img, ann, "d", 1)
    fields = seg_gen.key_fields(img, ann, "dog", 5)
    assert fields["negative_prompt"] == NEGATIVE_PROMPT and fields["scheduler"].startswith("DDIM")


@pytest.mark.parametrize("condition", ["hed", "scribble"])
def test_edge_conditions_end_to_end(models: dict[str, Path], seg_gen: ControlNetGenerator, condition: str,
                                    tmp_path: Path) -> None:
    img, mask = _support(seed=5)
    gen = ControlNetGenerator(seg_gen.pipeline, condition, cache=GenerationCache(tmp_path), config=TINY,
                              model_ids=seg_gen.model_ids, dtype=seg_gen.dtype)
    out = gen.generate(img, mask, "horse", 2)
    assert len(out) == 2 and out[0].image.shape == img.shape
    ctrl = gen.cache.get(out[0].key).control
    assert ctrl.shape == (64, 64, 3)
    if condition == "scribble":
        assert set(np.unique(ctrl)) <= {0, 255}
    assert gen.cache.get(out[0].key).meta["condition"] == condition
    # the HED detector's identity in the key is the same before and after it is built: the rerun hits
    fresh = ControlNetGenerator(seg_gen.pipeline, condition, cache=gen.cache, config=TINY,
                                model_ids=seg_gen.model_ids)
    assert [x.cached for x in fresh.generate(img, mask, "horse", 2)] == [True, True]
    assert [x.cached for x in gen.generate(img, mask, "horse", 2)] == [True, True]
    assert fresh.pipeline_calls == 0 and fresh._hed is None  # a full hit never runs HED either


def test_box_support(seg_gen: ControlNetGenerator) -> None:
    img, _ = _support()
    seg_gen.cache = None
    out = seg_gen.generate(img, BoxAnnotation((10, 8, 40, 30)), "dog", 1)
    assert out[0].image.shape == img.shape
    ctrl = seg_gen.control(img, BoxAnnotation((10, 8, 40, 30)), "dog")
    assert ctrl.shape == (64, 64, 3) and len(np.unique(ctrl.reshape(-1, 3), axis=0)) == 2


def test_bad_input(seg_gen: ControlNetGenerator) -> None:
    img, mask = _support()
    with pytest.raises(FsdiffError, match="unknown condition 'depth'"):
        ControlNetGenerator(seg_gen.pipeline, "depth")
    with pytest.raises(FsdiffError, match="empty"):
        seg_gen.generate(img, np.zeros_like(mask), "dog", 2)
    with pytest.raises(FsdiffError, match="does not match its image"):
        seg_gen.generate(img, mask[:10], "dog", 2)
    with pytest.raises(FsdiffError, match="non-empty string"):
        seg_gen.generate(img, mask, "", 2)
    with pytest.raises(FsdiffError, match="steps"):
        GenerationConfig(steps=0)
    assert seg_gen.generate(img, mask, "dog", 0) == []


def test_missing_controlnet_names_repo(models: dict[str, Path]) -> None:
    with pytest.raises(MissingModelError, match="lllyasviel/sd-controlnet-hed") as info:
        ControlNetGenerator.from_pretrained("hed", model=models["sd"], config=TINY)
    assert "hf download lllyasviel/sd-controlnet-hed" in str(info.value)
    with pytest.raises(MissingModelError) as both:
        ControlNetGenerator.from_pretrained("seg", config=TINY)
    assert "stable-diffusion-v1-5/stable-diffusion-v1-5" in str(both.value)
    assert "lllyasviel/sd-controlnet-seg" in str(both.value)
    with pytest.raises(FsdiffError, match="takes hed maps, not seg"):
        ControlNetGenerator.from_pretrained("seg", model=models["sd"], controlnet="hed", config=TINY)


def test_augmenter_on_tiny_models(seg_gen: ControlNetGenerator, tmp_path: Path) -> None:
    from fsdiff.augment.augmenter import Augmenter
    from fsdiff.episode import Episode, Query, Shot

    img, mask = _support(seed=11)
    ep = Episode(1, "dog", (Shot(img, MaskAnnotation(mask), image_id="s"),), (Query(img, image_id="q"),))
    gen = ControlNetGenerator(seg_gen.pipeline, "seg", cache=GenerationCache(tmp_path), config=TINY,
                              model_ids=seg_gen.model_ids, dtype=seg_gen.dtype)
    out = Augmenter(gen, "seg:2").augment(ep)
    assert out.k == 3 and all(s.image.shape == img.shape for s in out.shots)
    assert np.array_equal(out.shots[1].annotation.mask, mask)


def test_lazy_generator_serves_cache_without_weights(models: dict[str, Path], seg_gen: ControlNetGenerator,
                                                     tmp_path: Path) -> None:
    img, mask = _support(seed=13)
    cache = GenerationCache(tmp_path)
    assert seg_gen.model_ids == {"stable_diffusion": str(models["sd"].resolve()),
                                 "controlnet": str(models["cn"].resolve())}
    made = ControlNetGenerator(seg_gen.pipeline, "seg", cache=cache, config=TINY, model_ids=seg_gen.model_ids)
    first = made.generate(img, mask, "dog", 2)
    lazy = ControlNetGenerator.from_pretrained("seg", model=models["sd"], controlnet=models["cn"], config=TINY,
                                               cache=cache, lazy=True)
    assert not lazy.loaded and lazy.dtype == "bfloat16"
    hits = lazy.generate(img, mask, "dog", 2)
    assert not lazy.loaded and all(h.cached for h in hits)
    assert all(np.array_equal(a.image, b.image) for a, b in zip(first, hits))
    # a miss on a lazy generator whose ControlNet is not there: the download message comes only now
    broken = ControlNetGenerator.from_pretrained("hed", model=models["sd"], config=TINY, cache=cache, lazy=True)
    with pytest.raises(MissingModelError, match="lllyasviel/sd-controlnet-hed"):
        broken.generate(img, mask, "dog", 1)
    lazy.generate(img, mask, "dog", 3)  # index 2 is missing: now the pipeline is built
    assert lazy.loaded and lazy.pipeline_calls == 1
