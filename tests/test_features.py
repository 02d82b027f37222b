"""Frozen encoders (EfficientNet-Lite, transformers hub backbones) and the feature cache."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from fsdiff.errors import FsdiffError
from fsdiff.features import (
    ENCODERS,
    Encoder,
    FeatureCache,
    build_encoder,
    encoder_cache_id,
    image_digest,
)
from fsdiff.features.efficientnet_lite import EfficientNetLite, _Conv, block_specs, weights_path

LITES = ("efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2")


@pytest.fixture(scope="module")
def lite0() -> Encoder:
    return build_encoder("efficientnet-lite0")


def _rand_image(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


# --- EfficientNet-Lite -------------------------------------------------------------------------


@pytest.mark.parametrize("name", LITES)
def test_lite_state_dict_matches_architecture(name):
    state = torch.load(weights_path(name), map_location="cpu", weights_only=True)
    model = EfficientNetLite(name)
    ours = model.state_dict()
    assert set(ours) == set(state)
    assert all(tuple(ours[k].shape) == tuple(v.shape) for k, v in state.items())
    enc = build_encoder(name)  # loads with strict=True
    assert enc.name == name and enc.levels == 3 and enc.strides == (8, 16, 32)
    assert len(model._blocks) == len(block_specs(*{"efficientnet-lite0": (1.0, 1.0), "efficientnet-lite1": (1.0, 1.1),
                                                    "efficientnet-lite2": (1.1, 1.2)}[name]))


def test_registry_names_and_unknown_encoder():
    assert set(LITES) <= set(ENCODERS.names())
    with pytest.raises(FsdiffError, match="efficientnet-lite0.*hf:"):
        build_encoder("resnet-9000")
    with pytest.raises(FsdiffError, match="precision"):
        build_encoder("efficientnet-lite0", precision="int4")
    with pytest.raises(FsdiffError, match="device"):
        build_encoder("efficientnet-lite0", device="banana")


def test_levels_shapes_and_all_blocks(lite0):
    x = lite0.preprocess(_rand_image(70, 90, 0), 96)
    assert x.shape == (1, 3, 96, 96) and x.dtype == torch.float32
    feats = lite0.extract(x)
    assert [tuple(f.shape) for f in feats] == [(1, 40, 12, 12), (1, 112, 6, 6), (1, 320, 3, 3)]
    assert lite0.channels == (40, 112, 320)
    with torch.inference_mode():
        groups = lite0(x, all_blocks=True)
    assert [len(g) for g in groups] == [2, 6, 5]  # stage groups of lite0 at strides 8 / 16 / 32
    for g, f in zip(groups, feats):
        torch.testing.assert_close(g[-1].float(), f, rtol=1e-4, atol=1e-4)
        assert all(b.shape[-2:] == f.shape[-2:] for b in g)


def test_fused_batchnorm_matches_unfused():
    from fsdiff.features.efficientnet_lite import build_efficientnet_lite

    plain = build_efficientnet_lite("efficientnet-lite0", fuse=False)
    fused = build_efficientnet_lite("efficientnet-lite0", fuse=True)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
    x = plain.preprocess(_rand_image(50, 60, 4), (64, 80))
    for a, b in zip(plain.extract(x), fused.extract(x)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    with torch.inference_mode():
        torch.testing.assert_close(plain.classify(x), fused.classify(x), rtol=1e-4, atol=1e-4)


def test_odd_sizes_use_tf_same_padding():
    conv = _Conv(1, 1, 3, stride=2, padding="same")
    assert conv(torch.zeros(1, 1, 7, 8)).shape[-2:] == (4, 4)  # ceil(n / 2)
    with pytest.raises(FsdiffError, match="padding"):
        _Conv(1, 1, 3, padding="reflect")


def test_encoder_is_frozen(lite0):
    assert not any(p.requires_grad for p in lite0.parameters())
    lite0.train()
    assert not lite0.training and not any(m.training for m in lite0.modules())


def test_preprocess_normalisation(lite0):
    img = np.full((10, 20, 3), 127, np.uint8)
    x = lite0.preprocess(img, (32, 48))
    assert x.shape == (1, 3, 32, 48)
    assert torch.allclose(x, torch.zeros_like(x), atol=1e-5)  # (127 - 127) / 128
    with pytest.raises(FsdiffError, match="RGB uint8"):
        lite0.preprocess(np.zeros((10, 10), np.uint8), 32)
    with pytest.raises(FsdiffError, match="size"):
        lite0.preprocess(img, 3)


def test_bf16_precision_close_to_fp32():
    enc32 = build_encoder("efficientnet-lite0")
    enc16 = build_encoder("efficientnet-lite0", precision="bf16")
    assert encoder_cache_id(enc32) != encoder_cache_id(enc16)
    x = enc32.preprocess(_rand_image(64, 64, 1), 64)
    for a, b in zip(enc32.extract(x), enc16.extract(x)):
        assert b.dtype == torch.float32
        assert float((a - b).norm() / a.norm()) < 0.1


def test_real_photo_is_classified_as_horse(shared_data, lite0):
    from fsdiff.io import read_image

    img = read_image(shared_data / "weizmann-horse" / "images" / "horse001.jpg")
    x = lite0.preprocess(img, 224)
    with torch.inference_mode():
        prob = lite0.classify(x).softmax(-1)[0]
    assert int(prob.argmax()) == 339  # ImageNet 'sorrel'
    assert float(prob[339]) > 0.5


# --- hub backbones -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_hub(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("hub")
    torch.manual_seed(0)
    dino = transformers.Dinov2Model(transformers.Dinov2Config(
        hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64, patch_size=14, image_size=56))
    dino.save_pretrained(root / "dino")
    proc = transformers.BitImageProcessor(image_mean=[0.4, 0.5, 0.6], image_std=[0.2, 0.25, 0.3])
    proc.save_pretrained(root / "dino")
    resnet = transformers.ResNetModel(transformers.ResNetConfig(
        embedding_size=8, hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1], layer_type="basic"))
    resnet.save_pretrained(root / "resnet")
    clip = transformers.CLIPModel(transformers.CLIPConfig(
        text_config=dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32),
        vision_config=dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64,
                           patch_size=16, image_size=64),
        projection_dim=8))
    clip.save_pretrained(root / "clip")
    transformers.CLIPImageProcessor().save_pretrained(root / "clip")
    return root


def test_hub_vit_levels_from_local_dir(tiny_hub):
    enc = build_encoder("hf:" + str(tiny_hub / "dino"))
    assert enc.kind == "vit" and enc.levels == 3 and enc.channels == (32, 32, 32) and enc.strides == (14, 14, 14)
    assert enc.mean == pytest.approx((0.4, 0.5, 0.6))  # from the saved image processor
    assert not any(p.requires_grad for p in enc.parameters())
    feats = enc.encode(_rand_image(50, 80, 2), (56, 84))
    assert [tuple(f.shape) for f in feats] == [(32, 4, 6)] * 3
    # Levels are blocks 1, 2 and the final (normed) output of the 3-block model.
    x = enc.preprocess(_rand_image(50, 80, 2), (56, 84))
    with torch.inference_mode():
        out = enc.model(pixel_values=x, output_hidden_states=True)
    torch.testing.assert_close(feats[0], out.hidden_states[1][0, 1:].T.reshape(32, 4, 6))
    torch.testing.assert_close(feats[2], out.last_hidden_state[0, 1:].T.reshape(32, 4, 6))


def test_hub_cnn_stages_and_clip_vision_tower(tiny_hub):
    enc = build_encoder("hf:" + str(tiny_hub / "resnet"))
    assert enc.kind == "cnn" and enc.channels == (16, 24, 32) and enc.strides == (8, 16, 32)
    assert enc.mean == pytest.approx((0.485, 0.456, 0.406))  # no processor saved -> ImageNet
    assert [tuple(f.shape) for f in enc.encode(_rand_image(40, 40, 3), 64)] == [(16, 8, 8), (24, 4, 4), (32, 2, 2)]
    clip = build_encoder("hf:" + str(tiny_hub / "clip"))
    assert type(clip.model).__name__ == "CLIPVisionModel" and clip.interpolate
    assert [tuple(f.shape) for f in clip.encode(_rand_image(40, 40, 3), (96, 80))] == [(32, 6, 5)] * 3


def test_hub_missing_model_offline_is_fast_and_says_what_to_download(monkeypatch, tmp_path):
    pytest.importorskip("transformers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    t0 = time.perf_counter()
    with pytest.raises(FsdiffError, match=r"hf download facebook/dinov2-small --local-dir DIR.*hf:DIR"):
        build_encoder("hf:facebook/dinov2-small")
    assert time.perf_counter() - t0 < 20
    with pytest.raises(FsdiffError, match="does not exist"):
        build_encoder("hf:" + str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FsdiffError, match="config.json"):
        build_encoder("hf:" + str(tmp_path / "empty"))
    with pytest.raises(FsdiffError, match="model id or directory"):
        build_encoder("hf:")


# --- feature cache -------------------------------------------------------------------------------


class _CountingEncoder(Encoder):
    """A tiny deterministic encoder that counts the images it encodes."""

    def __init__(self, scale: float = 1.0):
        super().__init__()
        self.name = "counting"
        self.levels = 2
        self.strides = (4, 8)
        self.channels = (3, 3)
        self.w = torch.nn.Parameter(torch.tensor(scale))
        self.seen = 0
        self.freeze()

    def forward(self, x):
        self.seen += x.shape[0]
        return [torch.nn.functional.avg_pool2d(x, 4) * self.w, torch.nn.functional.avg_pool2d(x, 8) * self.w]


def test_cache_encodes_each_image_once_and_returns_float32():
    enc = _CountingEncoder()
    cache = FeatureCache()
    a, b = _rand_image(20, 30, 0), _rand_image(20, 30, 1)
    f1 = cache.features(enc, [a, b, a], 32)
    assert enc.seen == 2 and len(cache) == 2
    f2 = cache.features(enc, [b, a.copy()], 32)
    assert enc.seen == 2 and cache.hits >= 2
    assert all(t.dtype == torch.float32 for f in f1 + f2 for t in f)
    for x, y in zip(f1[0], f2[1]):
        assert torch.equal(x, y)  # a miss returns exactly what a later hit returns
    direct = enc.extract(enc.preprocess(a, 32))
    enc.seen -= 1
    torch.testing.assert_close(f1[0][0], direct[0][0], rtol=2e-3, atol=2e-3)  # float16 storage
    assert all(t.dtype == torch.float16 for t in cache._store[cache.key(enc, a, 32)])
    cache.features(enc, [a], 64)  # another input size is another key
    assert enc.seen == 3


def test_cache_key_digest_and_lru_budget():
    enc = _CountingEncoder()
    a = _rand_image(16, 16, 0)
    assert image_digest(a) == image_digest(a.copy())
    assert image_digest(a) != image_digest(a[:, ::-1].copy())
    assert image_digest(a) != image_digest(a.reshape(8, 32, 3))
    k = FeatureCache().key(enc, a, 32)
    assert k[0].startswith("counting") and k[1] == (32, 32)
    per_image = 3 * 8 * 8 * 2 + 3 * 4 * 4 * 2  # two float16 maps at 32x32 input
    cache = FeatureCache(max_bytes=2 * per_image)
    imgs = [_rand_image(16, 16, s) for s in range(3)]
    cache.features(enc, imgs[:2], 32)
    cache.features(enc, imgs[:1], 32)  # touch image 0: image 1 is now least recently used
    cache.features(enc, imgs[2:], 32)
    assert len(cache) == 2 and cache.nbytes == 2 * per_image
    assert cache.get(cache.key(enc, imgs[1], 32)) is None
    assert cache.get(cache.key(enc, imgs[0], 32)) is not None
    cache.clear()
    assert len(cache) == 0 and cache.nbytes == 0
    with pytest.raises(FsdiffError, match="max_bytes"):
        FeatureCache(max_bytes=-1)
    with pytest.raises(FsdiffError, match="dtype"):
        FeatureCache(dtype=torch.int8)


def test_cache_falls_back_to_bf16_on_float16_overflow():
    enc = _CountingEncoder(scale=1e6)
    cache = FeatureCache()
    a = np.full((16, 16, 3), 255, np.uint8)
    out = cache.features(enc, [a], 32)
    assert torch.isfinite(out[0][0]).all()
    assert cache._store[cache.key(enc, a, 32)][0].dtype == torch.bfloat16
