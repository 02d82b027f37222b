"""DiffSeg end to end on the tiny Kandinsky 2.2 stand-ins (fsdiff.diffusion.tiny), input size 64: the model's
forward pass, loss and gradients (Eq. 10), checkpoints, both segmenters, K-shot averaging, bad input and the
validation threshold choice."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fsdiff.episode import Episode, MaskAnnotation, Query, Shot
from fsdiff.errors import FsdiffError
from fsdiff.protocol import Segmenter

pytest.importorskip("diffusers", reason="the diffusion extra is not installed: pip install -e '.[diffusion]'")
pytest.importorskip("transformers", reason="the diffusion extra is not installed: pip install -e '.[diffusion]'")

from fsdiff.diffusion.loading import load_kandinsky  # noqa: E402
from fsdiff.diffusion.tiny import build_tiny_kandinsky, build_tiny_stable_diffusion  # noqa: E402
from fsdiff.methods.diffseg import (  # noqa: E402
    DiffSegConfig,
    DiffSegModel,
    DiffSegPriorSegmenter,
    DiffSegSegmenter,
    build_diffseg,
    build_diffseg_prior,
    make_training_batch,
)
from fsdiff.evaluate import choose_threshold  # noqa: E402

SIZE = 64
SMALL = dict(input_size=SIZE, attention_common_size=8, pam_width=16, pam_heads=2, scm_width=16,
             scm_feature_channels=8, scm_edge_channels=(4, 8, 8, 16), scm_mlp_ratio=2, dtype="fp32", device="cpu")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return build_tiny_kandinsky(tmp_path_factory.mktemp("diffseg_kandinsky"), seed=0)


@pytest.fixture(scope="module")
def parts(tiny: Any) -> Any:
    return load_kandinsky(tiny.prior, tiny.decoder, device="cpu", dtype="fp32")


def _config(tiny: Any, **changes: Any) -> DiffSegConfig:
    return DiffSegConfig(prior_model=str(tiny.prior), decoder_model=str(tiny.decoder), **dict(SMALL, **changes))


def _image(seed: int, h: int = SIZE, w: int = SIZE) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 80, size=(h, w, 3), dtype=np.uint8)
    img[h // 4: 3 * h // 4, w // 4: 3 * w // 4] += 150  # a bright square object
    return img


def _mask(h: int = SIZE, w: int = SIZE) -> np.ndarray:
    m = np.zeros((h, w), np.uint8)
    m[h // 4: 3 * h // 4, w // 4: 3 * w // 4] = 1
    return m


def _episode(k: int = 1, query_sizes: tuple[tuple[int, int], ...] = ((SIZE, SIZE),), same_shot: bool = False,
             gt: bool = True) -> Episode:
    shots = tuple(Shot(_image(0 if same_shot else i), MaskAnnotation(_mask()), f"s{i}") for i in range(k))
    queries = tuple(Query(_image(10 + j, h, w), _mask(h, w) if gt else None, f"q{j}")
                    for j, (h, w) in enumerate(query_sizes))
    return Episode(class_id=1, class_name="square", shots=shots, queries=queries, episode_id="ep")


def _perturb(model: DiffSegModel, seed: int = 0) -> None:
    """Give the zero-initialised SCM output adapters small random weights (a 'trained' SCM)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for conv in model.scm.out_adapters.values():
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * 0.2)


# ----------------------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------------------


def test_forward_shapes_and_ranges(tiny: Any, parts: Any) -> None:
    model = DiffSegModel(parts, _config(tiny))
    batch = make_training_batch([_episode(k=2, query_sizes=((SIZE, SIZE), (48, 80)))], SIZE)
    assert batch["support_images"].shape == (2, 2, 3, SIZE, SIZE) and batch["query_mask"].shape == (2, 1, SIZE, SIZE)
    with torch.no_grad():
        out = model(batch)
    h = SIZE // parts.movq_scale_factor
    assert out.prior.shape == (2, 1, h, h) and out.latent.shape == (2, 4, h, h)
    assert out.image.shape == (2, 3, SIZE, SIZE) and out.prob.shape == (2, 1, SIZE, SIZE)
    assert float(out.prior.min()) >= 0 and float(out.prior.max()) <= 1
    assert float(out.prob.min()) >= 0 and float(out.prob.max()) <= 1
    assert torch.equal(out.mask, out.image.mean(1, keepdim=True) > 0)
    assert torch.equal(out.mask, out.prob > 0.5)  # the linear read-out agrees with 'mean > 0'


def test_clip_background_option(tiny: Any, parts: Any) -> None:
    batch = make_training_batch([_episode()], SIZE)
    s_img, s_mask = batch["support_images"], batch["support_masks"]
    black = DiffSegModel(parts, _config(tiny)).encode_support(s_img, s_mask)
    grey = DiffSegModel(parts, _config(tiny, clip_background="clip_mean")).encode_support(s_img, s_mask)
    assert not torch.allclose(black[0], grey[0])  # E_m sees the background fill
    assert torch.equal(black[1], grey[1])  # the MoVQ latent L_s always gets the black background


def test_early_exit_gives_the_same_prior(tiny: Any, parts: Any) -> None:
    batch = make_training_batch([_episode()], SIZE)
    with torch.no_grad():
        a = DiffSegModel(parts, _config(tiny, unet_early_exit=True))
        b = DiffSegModel(parts, _config(tiny, unet_early_exit=False))
        _perturb(a), _perturb(b)
        calls: list[int] = []
        hook = parts.unet.up_blocks[-1].register_forward_hook(lambda *_: calls.append(1))
        try:
            pa = a(batch, pam=False).prior
            assert calls == []  # the last up block (no attention) was skipped
            pb = b(batch, pam=False).prior
            assert calls == [1]
        finally:
            hook.remove()
    assert torch.equal(pa, pb)


def test_untrained_scm_does_not_change_the_prior(tiny: Any, parts: Any) -> None:
    batch = make_training_batch([_episode()], SIZE)
    with torch.no_grad():
        with_scm = DiffSegModel(parts, _config(tiny))(batch, pam=False).prior
        without = DiffSegModel(parts, _config(tiny, use_scm=False))(batch, pam=False).prior
    assert torch.allclose(with_scm, without, atol=1e-6, rtol=0)


def test_gradients_reach_pam_and_scm_only(tiny: Any, parts: Any) -> None:
    model = DiffSegModel(parts, _config(tiny)).train()
    _perturb(model)
    batch = make_training_batch([_episode()], SIZE)
    model.loss(batch)["loss"].backward()
    for name, p in list(model.pam.named_parameters()) + list(model.scm.named_parameters()):
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    scm_grads = {n: float(p.grad.abs().sum()) for n, p in model.scm.named_parameters() if n.endswith("weight")}
    assert all(v > 0 for v in scm_grads.values()), scm_grads  # through the frozen UNet, down to the edge encoder
    assert sum(float(p.grad.abs().sum()) for p in model.pam.parameters()) > 0
    for frozen in (parts.unet, parts.movq, parts.image_encoder):
        assert all(p.grad is None and not p.requires_grad for p in frozen.parameters())
    assert all(n.startswith(("pam.", "scm.")) for n in model.state_dict())  # only the trainable modules
    assert {id(p) for p in model.parameters()} == {id(p) for p in model.trainable_parameters()}


def test_loss_is_finite_and_decreases(tiny: Any, parts: Any) -> None:
    model = DiffSegModel(parts, _config(tiny, lr=0.05)).train()
    batch = make_training_batch([_episode()], SIZE)
    # the recipe's optimizer is built by fsdiff.train (test_diffseg_training checks its settings)
    opt = torch.optim.SGD(model.trainable_parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(4):
        out = model.loss(batch)
        assert set(out) == {"loss", "loss_prior", "loss_latent"} and torch.isfinite(out["loss"])
        assert torch.allclose(out["loss"].detach(), 2 * out["loss_prior"] + out["loss_latent"])
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(float(out["loss"].detach()))
    assert losses[-1] < losses[0], losses


def test_loss_ignores_void_pixels(tiny: Any, parts: Any) -> None:
    model = DiffSegModel(parts, _config(tiny))
    batch = make_training_batch([_episode()], SIZE)
    assert float(batch["query_valid"].min()) == 1.0
    ep = _episode()
    gt = ep.queries[0].gt.copy()
    gt[:8] = 255
    ep2 = Episode(1, "square", ep.shots, (Query(ep.queries[0].image, gt, "q"),))
    batch2 = make_training_batch([ep2], SIZE)
    assert float(batch2["query_valid"][0, 0, :8].max()) == 0.0
    with torch.no_grad():
        assert torch.isfinite(model.loss(batch2)["loss"])


def test_checkpoint_round_trip(tiny: Any, parts: Any, tmp_path: Path) -> None:
    model = DiffSegModel(parts, _config(tiny))
    _perturb(model, seed=1)
    with torch.no_grad():
        model.pam.head[-1].bias.add_(0.3)
    ckpt = model.save_trainable(tmp_path / "ckpt")
    for sub in ("pam", "scm"):
        assert sorted(p.name for p in (ckpt / sub).iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    assert json.loads((ckpt / "scm" / "config.json").read_text())["block_out_channels"] == [32, 32, 64, 64]
    assert json.loads((ckpt / "fsdiff_checkpoint.json").read_text())["method"] == "diffseg"

    fresh = DiffSegModel(parts, _config(tiny))
    fresh.load_trainable(ckpt)
    for a, b in ((model.pam, fresh.pam), (model.scm, fresh.scm)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    batch = make_training_batch([_episode()], SIZE)
    with torch.no_grad():
        assert torch.equal(model(batch).prob, fresh(batch).prob)

    from fsdiff.methods.diffseg.pam import PerceptualAttentionModule

    assert isinstance(PerceptualAttentionModule.from_pretrained(ckpt / "pam"), PerceptualAttentionModule)


def test_checkpoint_errors(tiny: Any, parts: Any, tmp_path: Path) -> None:
    model = DiffSegModel(parts, _config(tiny))
    with pytest.raises(FsdiffError, match="not a diffseg checkpoint"):
        model.load_trainable(tmp_path)
    # An SCM trained for another UNet (other block widths) is refused.
    from fsdiff.methods.diffseg.scm import init_scm

    model.save_trainable(tmp_path / "ok")
    init_scm(0, block_out_channels=(16, 32, 48, 64), levels=(1, 2, 3), edge_channels=(4, 8, 8, 16),
             feature_channels=8, width=16, mlp_ratio=2).save_pretrained(tmp_path / "ok" / "scm")
    with pytest.raises(FsdiffError, match="block_out_channels"):
        model.load_trainable(tmp_path / "ok")


# ----------------------------------------------------------------------------------------------------------------
# Segmenters
# ----------------------------------------------------------------------------------------------------------------


def test_prior_segmenter_maps(tiny: Any, parts: Any) -> None:
    seg = build_diffseg_prior(parts=parts, **SMALL)
    assert isinstance(seg, Segmenter) and seg.name == "diffseg-prior" and seg.threshold == 0.5
    ep = _episode(query_sizes=((SIZE, SIZE), (50, 70), (120, 90)))
    maps = seg.predict(ep)
    assert [m.shape for m in maps] == [(SIZE, SIZE), (50, 70), (120, 90)]
    for m in maps:
        assert m.dtype == np.float32 and float(m.min()) >= 0 and float(m.max()) <= 1


def test_full_segmenter_maps_from_checkpoint(tiny: Any, parts: Any, tmp_path: Path) -> None:
    model = DiffSegModel(parts, _config(tiny))
    _perturb(model)
    model.save_trainable(tmp_path / "ckpt")
    seg = build_diffseg(checkpoint=tmp_path / "ckpt", parts=parts, threshold=0.4)
    assert isinstance(seg, Segmenter) and seg.name == "diffseg" and seg.threshold == 0.4
    assert seg.config.input_size == SIZE  # read from the checkpoint's diffseg_config.json
    maps = seg.predict(_episode(query_sizes=((40, 72),)))
    assert maps[0].shape == (40, 72) and maps[0].dtype == np.float32
    assert 0 <= float(maps[0].min()) and float(maps[0].max()) <= 1


def test_k_shot_mean_of_identical_shots_equals_one_shot(tiny: Any, parts: Any, tmp_path: Path) -> None:
    model = DiffSegModel(parts, _config(tiny))
    _perturb(model)
    model.save_trainable(tmp_path / "ckpt")
    full = DiffSegSegmenter(checkpoint=tmp_path / "ckpt", parts=parts)
    prior = DiffSegPriorSegmenter(model=full.model)
    one, two = _episode(k=1, same_shot=True), _episode(k=2, same_shot=True)
    for seg in (prior, full):
        a, b = seg.predict(one)[0], seg.predict(two)[0]
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
    differs = _episode(k=2, same_shot=False)
    assert not np.allclose(prior.predict(one)[0], prior.predict(differs)[0], atol=1e-5)


def test_full_segmenter_needs_a_checkpoint(parts: Any, tmp_path: Path) -> None:
    with pytest.raises(FsdiffError, match="fsdiff train diffseg.*checkpoint=DIR"):
        build_diffseg(parts=parts, **SMALL)
    with pytest.raises(FsdiffError, match="missing does not exist"):
        build_diffseg(checkpoint=tmp_path / "missing", parts=parts, **SMALL)


# ----------------------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------------------


def test_missing_model_directory_names_the_repositories(tmp_path: Path) -> None:
    with pytest.raises(FsdiffError) as info:
        build_diffseg_prior(prior=str(tmp_path / "no_prior"), decoder=str(tmp_path / "no_decoder"), **SMALL)
    msg = str(info.value)
    assert "kandinsky-community/kandinsky-2-2-prior" in msg or "kandinsky-community/kandinsky-2-2-decoder" in msg


def test_missing_hub_model_offline_names_both_repositories(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import huggingface_hub.constants as hf_constants

    from fsdiff.diffusion import loading

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv(loading.MODEL_DIR_ENV, raising=False)
    cache = tmp_path / "hf_cache"
    cache.mkdir()
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    with pytest.raises(FsdiffError) as info:
        build_diffseg_prior(**SMALL)
    msg = str(info.value)
    assert "DiffSeg needs the Kandinsky 2.2" in msg
    assert "kandinsky-community/kandinsky-2-2-prior" in msg and "kandinsky-community/kandinsky-2-2-decoder" in msg


def test_wrong_model_kind_is_refused(tiny: Any, tmp_path: Path) -> None:
    sd = build_tiny_stable_diffusion(tmp_path / "sd15", version="1.5", seed=0)
    with pytest.raises(FsdiffError, match="(?i)stable diffusion.*Kandinsky 2.2 decoder"):
        build_diffseg_prior(prior=str(tiny.prior), decoder=str(sd), **SMALL)


def test_mismatched_sizes_are_refused(tiny: Any, parts: Any) -> None:
    model = DiffSegModel(parts, _config(tiny))
    batch = make_training_batch([_episode()], SIZE)
    bad = dict(batch, support_images=torch.rand(1, 1, 3, 32, 32), support_masks=torch.ones(1, 1, 1, 32, 32))
    with pytest.raises(FsdiffError, match="support images"):
        model(bad)
    with pytest.raises(FsdiffError, match="support_masks"):
        model(dict(batch, support_masks=torch.ones(1, 1, 1, 32, 32)))
    with pytest.raises(FsdiffError, match="multiples of the MoVQ scale factor"):
        model(dict(batch, query_image=torch.rand(1, 3, 60, 60)))
    with pytest.raises(FsdiffError, match="query_mask"):
        model.loss(dict(batch, query_mask=torch.ones(1, 1, 32, 32)))
    with pytest.raises(FsdiffError, match="missing 'support_masks'"):
        model({"query_image": batch["query_image"], "support_images": batch["support_images"]})
    with pytest.raises(FsdiffError, match="multiple of the MoVQ scale factor"):
        DiffSegModel(parts, _config(tiny, input_size=60))


def test_bad_episodes_and_options(tiny: Any, parts: Any) -> None:
    seg = DiffSegPriorSegmenter(model=DiffSegModel(parts, _config(tiny)))
    zero_shot = Episode(1, "square", (), (Query(_image(1)),))
    with pytest.raises(FsdiffError, match="at least one annotated support"):
        seg.predict(zero_shot)
    with pytest.raises(FsdiffError, match="no ground truth"):
        make_training_batch([_episode(gt=False)], SIZE)
    with pytest.raises(FsdiffError, match="same number of shots"):
        make_training_batch([_episode(k=1), _episode(k=2)], SIZE)
    with pytest.raises(FsdiffError, match="unknown option"):
        build_diffseg_prior(parts=parts, bogus=1, **SMALL)


# ----------------------------------------------------------------------------------------------------------------
# Threshold choice
# ----------------------------------------------------------------------------------------------------------------


class _FixedSegmenter:
    """Returns stored probability maps, one list per episode id."""

    name = "fixed"
    threshold = 0.5

    def __init__(self, maps: dict[str, list[np.ndarray]]) -> None:
        self.maps = maps

    def predict(self, episode: Episode) -> list[np.ndarray]:
        return self.maps[episode.episode_id]


def test_choose_threshold_picks_the_best_candidate() -> None:
    gt = _mask(16, 16)
    prob = np.where(gt == 1, 0.8, 0.2).astype(np.float32)
    prob[:2] = 0.6  # background strip that only a threshold above 0.6 rejects
    img = _image(0, 16, 16)
    eps = [Episode(c, f"c{c}", (Shot(img, MaskAnnotation(gt)),), (Query(img, gt),), episode_id=f"e{c}")
           for c in (1, 2)]
    seg = _FixedSegmenter({"e1": [prob], "e2": [prob]})
    assert choose_threshold(seg, eps, candidates=(0.1, 0.5, 0.7, 0.9)) == 0.7
    assert seg.threshold == 0.7
    with pytest.raises(FsdiffError, match="candidates"):
        choose_threshold(seg, eps, candidates=())
    no_gt = [Episode(1, "c", (Shot(img, MaskAnnotation(gt)),), (Query(img),), episode_id="e1")]
    with pytest.raises(FsdiffError, match="no ground truth"):
        choose_threshold(seg, no_gt, candidates=(0.5,))
