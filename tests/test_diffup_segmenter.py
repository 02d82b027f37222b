"""The DiffUp segmenter: checkpoint round trip, seeded sampling, encoder swap at load time, the 0-shot
and text paths, start-from-prior t* by annotation type, bad input, and one run on real COCO data."""

from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from fsdiff.data.base import FewShotSource
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
from fsdiff.protocol import Segmenter
from fsdiff.methods.diffup import DiffUpConfig
from fsdiff.methods.diffup.checkpoint import EXPECTED_FILES, load_diffup, save_diffup
from fsdiff.methods.diffup.segmenter import DiffUpSegmenter, build_diffup
from fsdiff.methods.diffup.training import DiffUpTrainable
from fsdiff.train import train

TINY = dict(input_size=64, base_channels=8, cond_channels=8, query_channels=4, dqm_channels=8,
            attention_head_dim=8, uapf_hidden_channels=8, max_shots=2)


class ToySource(FewShotSource):
    """Noise images with a bright square (class 0) or disc (class 1) at seeded places."""

    name = "toy"

    def __init__(self, n: int = 6, seed: int = 0):
        super().__init__()
        self.classes = [(0, "square"), (1, "disc")]
        rng = np.random.default_rng(seed)
        self.data: dict[str, tuple[np.ndarray, dict[int, np.ndarray]]] = {}
        for i in range(n):
            h, w = int(rng.integers(50, 80)), int(rng.integers(60, 90))
            img = rng.integers(0, 120, (h, w, 3), dtype=np.uint8)
            masks = {}
            c = i % 2
            m = np.zeros((h, w), np.uint8)
            cy, cx, r = int(rng.integers(18, h - 18)), int(rng.integers(18, w - 18)), int(rng.integers(8, 15))
            if c == 0:
                m[cy - r:cy + r, cx - r:cx + r] = 1
            else:
                cv2.circle(m, (cx, cy), r, 1, -1)
            img[m == 1] = (230, 200, 40) if c == 0 else (40, 200, 230)
            masks[c] = m
            self.data[f"img{i}"] = (img, masks)

    def images_of_class(self, class_id: int) -> list[str]:
        return [k for k, (_, m) in self.data.items() if class_id in m]

    def query_items(self) -> list[tuple[str, int]]:
        return [(k, c) for c, _ in self.classes for k in self.images_of_class(c)]

    def load(self, image_key: str, class_id: int):
        img, masks = self.data[image_key]
        return img.copy(), masks.get(class_id, np.zeros(img.shape[:2], np.uint8)).copy()

    def describe(self) -> dict:
        return {"dataset": "toy", "fold": None, "split": "trn"}


@pytest.fixture(scope="module")
def source() -> ToySource:
    return ToySource()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, source) -> str:
    """A tiny DiffUp trained for 2 steps with efficientnet-lite0 on the toy source."""
    out = tmp_path_factory.mktemp("diffup_run")
    trainable = DiffUpTrainable(source, DiffUpConfig(**TINY), encoder="efficientnet-lite0", seed=0, progress=False)
    train(trainable, out, steps=2, batch_size=2, save_every=2, progress=False)
    return str(out / "final")


def episode(source: ToySource, kinds=("mask",), n_queries: int = 1) -> Episode:
    shots = []
    for i, kind in enumerate(kinds):
        img, masks = source.data[f"img{2 * i + 2}"]
        m = masks[0]
        if kind == "mask":
            ann = MaskAnnotation(m)
        elif kind == "box":
            ann = BoxAnnotation.from_mask(m)
        elif kind == "scribble":
            s = np.zeros_like(m)
            ys, xs = np.nonzero(m)
            s[int(ys.mean()), xs.min() + 2: xs.max() - 2] = 1
            ann = ScribbleAnnotation(s)
        elif kind == "points":
            ys, xs = np.nonzero(m)
            ann = PointsAnnotation(np.array([[xs.mean(), ys.mean()]]), np.array([1]))
        else:
            ann = TextAnnotation()
        shots.append(Shot(img, ann, image_id=f"s{i}"))
    queries = [Query(source.data["img0"][0], gt=source.data["img0"][1][0], image_id="q0")]
    if n_queries > 1:
        queries.append(Query(source.data["img4"][0], gt=source.data["img4"][1][0], image_id="q1"))
    return Episode(0, "square", tuple(shots), tuple(queries))


def test_predict_shapes_and_protocol(checkpoint, source):
    seg = build_diffup(checkpoint=checkpoint)
    assert isinstance(seg, Segmenter) and seg.name == "diffup" and seg.threshold == 0.5
    ep = episode(source, ("mask",), n_queries=2)
    preds = seg.predict_with_uncertainty(ep)
    for q, p in zip(ep.queries, preds):
        assert p.prob.shape == q.shape == p.uncertainty.shape and p.prob.dtype == np.float32
        assert 0 <= p.prob.min() and p.prob.max() <= 1 and 0 <= p.uncertainty.min() and p.uncertainty.max() <= 1
    probs = seg.predict(ep)
    assert all(np.array_equal(a, b.prob) for a, b in zip(probs, preds))
    assert seg.encoder.name == seg.trained_encoder == "efficientnet-lite0"


def test_checkpoint_files_and_round_trip(checkpoint, source, tmp_path):
    files = sorted(str(p.relative_to(checkpoint)) for p in Path(checkpoint).rglob("*") if p.is_file())
    assert files == sorted(EXPECTED_FILES)
    seg = DiffUpSegmenter(checkpoint)
    config, uapf, uqdd, meta = load_diffup(checkpoint)
    assert config == seg.config and meta["encoder"] == "efficientnet-lite0" and meta["step"] == 2
    assert meta["source"]["dataset"] == "toy" and meta["trainer"]["batch_size"] == 2
    save_diffup(tmp_path / "copy", config, uapf, uqdd, meta)
    seg2 = DiffUpSegmenter(tmp_path / "copy")
    ep = episode(source, ("mask", "box"))
    a, b = seg.predict_with_uncertainty(ep)[0], seg2.predict_with_uncertainty(ep)[0]
    assert np.array_equal(a.prob, b.prob) and np.array_equal(a.uncertainty, b.uncertainty)
    with pytest.raises(FsdiffError, match="encoder"):
        save_diffup(tmp_path / "bad", config, uapf, uqdd, {})


def test_same_seed_same_map(checkpoint, source):
    ep = episode(source, ("scribble",))
    a = DiffUpSegmenter(checkpoint, seed=3).predict(ep)[0]
    b = DiffUpSegmenter(checkpoint, seed=3).predict(ep)[0]
    c = DiffUpSegmenter(checkpoint, seed=4).predict(ep)[0]
    assert np.array_equal(a, b) and not np.allclose(a, c)
    seg = DiffUpSegmenter(checkpoint, seed=3)
    assert np.array_equal(seg.predict(ep)[0], seg.predict(ep)[0])  # no state carried between calls


def test_encoder_swap_at_load_time(checkpoint, source):
    ep = episode(source, ("mask",))
    lite0 = DiffUpSegmenter(checkpoint).predict(ep)[0]
    seg = DiffUpSegmenter(checkpoint, encoder="efficientnet-lite1")
    assert seg.encoder.name == "efficientnet-lite1" and seg.trained_encoder == "efficientnet-lite0"
    lite1 = seg.predict(ep)[0]
    assert lite1.shape == lite0.shape and not np.array_equal(lite0, lite1)


@pytest.mark.parametrize(
    "kinds,t_star",
    [(("mask",), 300), (("box",), 600), (("scribble",), 500), (("points",), 500), (("box", "mask"), 300),
     (("box", "scribble"), 500)],
)
def test_start_step_by_annotation_type(checkpoint, source, kinds, t_star):
    p = DiffUpSegmenter(checkpoint, steps=2, kshot="uapf").predict_with_uncertainty(episode(source, kinds))[0]
    assert p.t_start == t_star
    assert p.types == tuple("scribble" if k == "points" else k for k in kinds)


def test_adaptive_and_noise_starts(checkpoint, source):
    ep = episode(source, ("mask",))
    ad = DiffUpSegmenter(checkpoint, adaptive=True, steps=2).predict_with_uncertainty(ep)[0]
    assert 200 <= ad.t_start <= 900
    noise = DiffUpSegmenter(checkpoint, start="noise", steps=2).predict_with_uncertainty(ep)[0]
    assert noise.t_start == 1000
    with pytest.raises(FsdiffError, match="start"):
        DiffUpSegmenter(checkpoint, start="middle")


def test_zero_shot_without_text_is_honest(checkpoint, source):
    seg = DiffUpSegmenter(checkpoint)
    for ep in (episode(source, ()), episode(source, ("text",))):
        p = seg.predict_with_uncertainty(ep)[0]
        assert p.types == () and p.t_start == 1000
        assert np.all(p.prob == 0.5) and np.all(p.uncertainty == 1.0)
        assert not (p.prob > seg.threshold).any()  # nothing is claimed without evidence


def test_text_prior_path(checkpoint, source, tmp_path):
    from test_diffup_baft import make_tiny_clip

    clip = make_tiny_clip(tmp_path)
    seg = DiffUpSegmenter(checkpoint, text_model=clip, steps=2)
    p = seg.predict_with_uncertainty(episode(source, ("text",)))[0]
    assert p.types == ("text",) and p.t_start == 800 and p.prob.shape == source.data["img0"][0].shape[:2]
    both = seg.predict_with_uncertainty(episode(source, ("box",)))[0]
    assert both.types == ("box", "text") and both.t_start == 600
    with pytest.raises(FsdiffError, match="CLIP"):
        DiffUpSegmenter(checkpoint, text_model=str(tmp_path / "no-clip-here"))


def test_bad_checkpoints(checkpoint, tmp_path):
    with pytest.raises(FsdiffError, match="does not exist.*fsdiff_checkpoint.json"):
        DiffUpSegmenter(tmp_path / "nowhere")
    with pytest.raises(FsdiffError, match="PASCAL.*checkpoint=DIR"):
        build_diffup(benchmark=dict(dataset="pascal", fold=0))  # no shipped checkpoint keeps PASCAL classes unseen
    broken = tmp_path / "broken"
    shutil.copytree(checkpoint, broken)
    (broken / "uqdd" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(FsdiffError, match=r"missing uqdd/diffusion_pytorch_model\.safetensors.*train"):
        DiffUpSegmenter(broken)
    (broken / "uqdd" / "diffusion_pytorch_model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(FsdiffError, match="cannot load"):
        DiffUpSegmenter(broken)
    (broken / "fsdiff_checkpoint.json").write_text("{not json")
    with pytest.raises(FsdiffError, match="JSON"):
        DiffUpSegmenter(broken)
    # a training output directory resolves to its final/ weights
    assert DiffUpSegmenter(Path(checkpoint).parent).checkpoint.name == "final"


def test_encoder_with_wrong_level_count(checkpoint):
    from test_diffup_baft import FakeEncoder

    with pytest.raises(FsdiffError, match="2 feature levels.*needs 3"):
        DiffUpSegmenter(checkpoint, encoder=FakeEncoder((4, 8), levels=2))
    with pytest.raises(FsdiffError, match="unknown encoder"):
        DiffUpSegmenter(checkpoint, encoder="no-such-encoder")


def test_bad_support_annotations_through_the_segmenter_path(checkpoint, source, tmp_path):
    from fsdiff import api
    from fsdiff.io import write_image

    seg = DiffUpSegmenter(checkpoint, steps=2)
    img, masks = source.data["img2"]
    write_image(tmp_path / "s.png", img)
    write_image(tmp_path / "empty.png", np.zeros(img.shape[:2], np.uint8))
    write_image(tmp_path / "q.png", source.data["img0"][0])
    query = api.load_query(tmp_path / "q.png")
    with pytest.raises(FsdiffError, match="empty"):
        api.segment([api.load_shot(tmp_path / "s.png", mask=tmp_path / "empty.png", class_value=1)], [query],
                    segmenter=seg)
    h, w = img.shape[:2]
    with pytest.raises(FsdiffError, match="outside"):
        api.segment([api.load_shot(tmp_path / "s.png", box=f"10,10,{w + 5},{h - 1}")], [query], segmenter=seg)
    ok = api.segment([api.load_shot(tmp_path / "s.png", box=f"0,0,{w},{h}")], [query], segmenter=seg)
    assert ok[0].prob.shape == query.shape
    with pytest.raises(FsdiffError, match="Episode"):
        seg.predict("not an episode")


def test_trained_on_real_coco_and_evaluated(shared_data, tmp_path):
    from fsdiff.data import build_episode, build_source, sample_episodes
    from fsdiff.evaluate import evaluate

    root = shared_data / "coco-mini"
    trn = build_source("coco", root=root, fold=0, split="trn", convention="interleaved")
    base = [c for c, _ in trn.classes][:3]
    trainable = DiffUpTrainable(trn, DiffUpConfig(**TINY), classes=base, seed=0, progress=False)
    assert trainable.classes == base and trainable.memory_bytes()["images"] > 0
    batch = trainable.make_batch(0, np.random.default_rng(0), 2)
    assert batch["gt"].shape == (2, 1, 16, 16) and set(torch.unique(batch["gt"]).tolist()) <= {0.0, 1.0, 255.0}
    train(trainable, tmp_path / "run", steps=2, batch_size=2, progress=False)
    val = build_source("coco", root=root, fold=0, split="val", convention="interleaved")
    specs = sample_episodes(val, "hsnet", n_episodes=2, shots=1, seed=0)
    seg = DiffUpSegmenter(tmp_path / "run", steps=2)
    res = evaluate(seg, [build_episode(val, s) for s in specs], val.class_ids(), dict(val.classes), progress=False)
    assert res.n_episodes == 2 and 0 <= res.miou <= 100


def test_bf16_precision_is_close_to_fp32(checkpoint, source):
    ep = episode(source, ("mask",))
    a = DiffUpSegmenter(checkpoint, steps=3, precision="fp32").predict(ep)[0]
    seg = DiffUpSegmenter(checkpoint, steps=3, precision="bf16")
    assert seg.bf16 and seg.encoder.autocast_dtype == torch.bfloat16
    b = seg.predict(ep)[0]
    assert b.dtype == np.float32 and np.abs(a - b).mean() < 0.02 and not np.array_equal(a, b)
    with pytest.raises(FsdiffError, match="precision"):
        DiffUpSegmenter(checkpoint, precision="fp8")


def test_kshot_pooling_modes(checkpoint, source):
    ep = episode(source, ("mask", "box"))
    per = DiffUpSegmenter(checkpoint, steps=2, kshot="uapf").episode_priors(ep)[0]
    pooled = DiffUpSegmenter(checkpoint, steps=2).episode_priors(ep)[0]  # pooled is the default
    both = DiffUpSegmenter(checkpoint, steps=2, kshot="both").episode_priors(ep)[0]
    assert per["types"] == ("mask", "box") and pooled["types"] == ("mask",)  # the finest type names the pool
    assert both["types"] == ("mask", "box", "mask") and torch.equal(both["priors"][:2], per["priors"])
    assert torch.equal(both["priors"][2], pooled["priors"][0])
    one = episode(source, ("box",))  # a single shot is never pooled
    assert torch.equal(DiffUpSegmenter(checkpoint, kshot="pooled").episode_priors(one)[0]["priors"],
                       DiffUpSegmenter(checkpoint).episode_priors(one)[0]["priors"])
    p = DiffUpSegmenter(checkpoint, steps=2, kshot="pooled").predict(ep)[0]
    assert p.shape == ep.queries[0].shape and 0 <= p.min() and p.max() <= 1
    with pytest.raises(FsdiffError, match="kshot"):
        DiffUpSegmenter(checkpoint, kshot="mean")
