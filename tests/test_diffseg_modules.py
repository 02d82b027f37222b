"""DiffSeg building blocks (fsdiff.methods.diffseg): the config defaults for what the paper leaves open, the
Perceptual Attention Module (DiffSeg §4.3) and the Spatial Control Module (§4.4) on the tiny Kandinsky 2.2 UNet:
shapes, ablation switches, adapters read from block_out_channels, zero-init identity and where the residual
enters."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from fsdiff.diffusion.tiny import TINY_KANDINSKY_UNET, TINY_IMAGE_EMBED_DIM
from fsdiff.errors import FsdiffError
from fsdiff.methods.diffseg import DiffSegConfig

pytest.importorskip("diffusers", reason="the diffusion extra is not installed: pip install -e '.[diffusion]'")

from fsdiff.methods.diffseg.pam import PerceptualAttentionModule, init_pam, sincos_2d  # noqa: E402
from fsdiff.methods.diffseg.scm import init_scm, levels_for_resolutions  # noqa: E402

SMALL_SCM = dict(edge_channels=(4, 8, 8, 16), feature_channels=8, width=16, mlp_ratio=2)


def _unet(seed: int = 0, **changes: Any) -> Any:
    from diffusers import UNet2DConditionModel

    cfg = dict(TINY_KANDINSKY_UNET, **changes)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**cfg)
    return unet.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def unet() -> Any:
    return _unet(0)


def _run(unet: Any, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
    return unet(sample=x, timestep=100, encoder_hidden_states=None, added_cond_kwargs={"image_embeds": emb}).sample


def _inputs(batch: int = 2, side: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 4, side, side, generator=g), torch.randn(batch, TINY_IMAGE_EMBED_DIM, generator=g),
            torch.rand(batch, 1, side * 8, side * 8, generator=g))


# ----------------------------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------------------------


def test_config_defaults_follow_methods_md() -> None:
    cfg = DiffSegConfig()
    assert (cfg.timestep, cfg.attention_common_size, cfg.attention_resolutions) == (100, 32, (8, 16, 32))
    assert cfg.prior_size is None and cfg.renormalise_self_rows and cfg.hed_source == "query"
    assert (cfg.pam_width, cfg.pam_heads, cfg.final_activation, cfg.mask_readout) == (256, 8, "linear", "mean")
    assert (cfg.input_size, cfg.batch_size, cfg.shot_fusion, cfg.clip_background) == (512, 4, "mean", "black")
    assert (cfg.alpha, cfg.beta, cfg.lr, cfg.momentum, cfg.weight_decay) == (2.0, 1.0, 0.01, 0.9, 1e-4)
    assert (cfg.lr_step_epochs, cfg.lr_gamma, cfg.epochs, cfg.optimizer) == (20, 0.9, 200, "sgd")
    assert cfg.prior_model == "kandinsky-community/kandinsky-2-2-prior"
    assert cfg.decoder_model == "kandinsky-community/kandinsky-2-2-decoder"
    assert DiffSegConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("bad", [dict(timestep=1000), dict(pam_width=30, pam_heads=8), dict(hed_source="support"),
                                 dict(final_activation="relu"), dict(input_size=4), dict(threshold=1.5)])
def test_config_rejects_bad_values(bad: dict[str, Any]) -> None:
    with pytest.raises(FsdiffError, match="DiffSeg config"):
        DiffSegConfig(**bad)


def test_config_unknown_option_names_the_valid_ones() -> None:
    with pytest.raises(FsdiffError, match="unknown option.*timestep"):
        DiffSegConfig().updated(time_step=3)


# ----------------------------------------------------------------------------------------------------------------
# PAM
# ----------------------------------------------------------------------------------------------------------------


def test_pam_shapes_and_config_round_trip() -> None:
    pam = init_pam(0, latent_channels=4, width=32, num_heads=4)
    g = torch.Generator().manual_seed(1)
    prior = torch.rand(2, 1, 8, 6, generator=g)
    out = pam(prior, torch.randn(2, 4, 5, 7, generator=g), torch.randn(2, 4, 8, 6, generator=g))
    assert out.shape == (2, 4, 8, 6) and torch.isfinite(out).all()
    assert pam.config.width == 32 and pam.config.num_heads == 4
    assert isinstance(pam.head[-1], torch.nn.Conv2d) and pam.head[-1].kernel_size == (1, 1)  # linear last layer
    # Same seed, same weights; another seed, other weights.
    same = init_pam(0, latent_channels=4, width=32, num_heads=4)
    assert all(torch.equal(a, b) for a, b in zip(pam.state_dict().values(), same.state_dict().values()))


@pytest.mark.parametrize("flags", [dict(use_semantic_attention=False), dict(use_prior_attention=False),
                                   dict(use_self_attention=False),
                                   dict(use_semantic_attention=False, use_prior_attention=False,
                                        use_self_attention=False)])
def test_pam_ablation_switches(flags: dict[str, bool]) -> None:
    pam = init_pam(0, width=16, num_heads=2, **flags)
    for key, attr in (("use_semantic_attention", "semantic_attention"), ("use_prior_attention", "prior_attention"),
                      ("use_self_attention", "self_attention")):
        assert (getattr(pam, attr) is None) == (not flags.get(key, True))
    g = torch.Generator().manual_seed(0)
    out = pam(torch.rand(1, 1, 4, 4, generator=g), torch.randn(1, 4, 4, 4, generator=g),
              torch.randn(1, 4, 4, 4, generator=g))
    assert out.shape == (1, 4, 4, 4)


def test_pam_prior_reaches_the_same_position() -> None:
    """With positions, the output at a pixel depends on the prior there (gradient check)."""
    pam = init_pam(0, width=16, num_heads=2, use_semantic_attention=False, use_self_attention=False)
    g = torch.Generator().manual_seed(0)
    prior = torch.rand(1, 1, 4, 4, generator=g).requires_grad_(True)
    out = pam(prior, torch.randn(1, 4, 4, 4, generator=g), torch.randn(1, 4, 4, 4, generator=g))
    out[0, :, 1, 2].sum().backward()
    assert prior.grad is not None and prior.grad.abs().sum() > 0


def test_pam_rejects_mismatched_shapes() -> None:
    pam = init_pam(0, width=16, num_heads=2)
    with pytest.raises(FsdiffError, match="prior M_a"):
        pam(torch.rand(1, 1, 4, 4), torch.randn(1, 4, 4, 4), torch.randn(1, 4, 8, 8))
    with pytest.raises(FsdiffError, match="query latent"):
        pam(torch.rand(1, 1, 4, 4), torch.randn(1, 4, 4, 4), torch.randn(1, 3, 4, 4))
    with pytest.raises(FsdiffError, match="divisible"):
        PerceptualAttentionModule(width=30, num_heads=4)


def test_sincos_positions_are_distinct() -> None:
    pe = sincos_2d(3, 5, 16)
    assert pe.shape == (15, 16)
    assert torch.cdist(pe, pe).add(torch.eye(15) * 10).min() > 0


# ----------------------------------------------------------------------------------------------------------------
# SCM
# ----------------------------------------------------------------------------------------------------------------


def test_scm_levels_from_resolutions(unet: Any) -> None:
    assert levels_for_resolutions(unet, (8, 16, 32)) == (1, 2, 3)
    assert levels_for_resolutions(unet, (16,)) == (2,)
    with pytest.raises(FsdiffError, match="not a level"):
        levels_for_resolutions(unet, (12,))


@pytest.mark.parametrize("widths", [(32, 32, 64, 64), (16, 32, 48, 64)])
def test_scm_adapters_follow_block_out_channels(widths: tuple[int, ...]) -> None:
    net = _unet(0, block_out_channels=widths)
    chans = tuple(net.config.block_out_channels)
    scm = init_scm(0, block_out_channels=chans, levels=(1, 2, 3), **SMALL_SCM)
    for lv in (1, 2, 3):
        assert scm.in_adapters[str(lv)].in_channels == chans[lv]
        assert scm.out_adapters[str(lv)].out_channels == chans[lv]
        assert torch.count_nonzero(scm.out_adapters[str(lv)].weight) == 0  # zero-initialised
    scm.check_unet(net)
    other = init_scm(0, block_out_channels=(8, 16, 24, 32), levels=(1,), **SMALL_SCM)
    with pytest.raises(FsdiffError, match="block_out_channels"):
        other.check_unet(net)


def test_scm_residual_shapes(unet: Any) -> None:
    scm = init_scm(0, block_out_channels=tuple(unet.config.block_out_channels), levels=(1, 2, 3), **SMALL_SCM)
    g = torch.Generator().manual_seed(0)
    edges = torch.rand(2, 1, 64, 64, generator=g)
    ef = scm.encode_edges(edges, (8, 8))
    assert ef.shape == (2, 16, 8, 8)
    feats = {1: torch.randn(2, 32, 4, 4), 2: torch.randn(2, 64, 2, 2), 3: torch.randn(2, 64, 1, 1)}
    res = scm(edges, feats, (8, 8))
    assert {k: tuple(v.shape) for k, v in res.items()} == {k: tuple(v.shape) for k, v in feats.items()}
    assert all(torch.count_nonzero(v) == 0 for v in res.values())  # zero-init output adapters


def test_untrained_scm_leaves_the_unet_unchanged(unet: Any) -> None:
    x, emb, edges = _inputs()
    scm = init_scm(3, block_out_channels=tuple(unet.config.block_out_channels), levels=(1, 2, 3), **SMALL_SCM)
    with torch.no_grad():
        ref = _run(unet, x, emb)
        with scm.control(unet, edges, (16, 16)):
            got = _run(unet, x, emb)
        after = _run(unet, x, emb)
    assert torch.equal(got, ref)  # bit-identical: the residuals are exactly zero
    assert torch.equal(after, ref)  # hooks removed on exit


def test_scm_residual_enters_only_the_up_path_skips(unet: Any) -> None:
    """A non-zero SCM changes the UNet output, but not the down path nor the mid block input."""
    x, emb, edges = _inputs()
    scm = init_scm(3, block_out_channels=tuple(unet.config.block_out_channels), levels=(1, 2, 3), **SMALL_SCM)
    with torch.no_grad():
        for conv in scm.out_adapters.values():
            conv.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    seen: dict[str, list[torch.Tensor]] = {"ref": [], "scm": []}
    key = ["ref"]

    def grab_mid(module: Any, args: tuple[Any, ...]) -> None:
        seen[key[0]].append(args[0].clone())

    handle = unet.mid_block.register_forward_pre_hook(grab_mid)
    try:
        with torch.no_grad():
            ref = _run(unet, x, emb)
            key[0] = "scm"
            with scm.control(unet, edges, (16, 16)):
                got = _run(unet, x, emb)
    finally:
        handle.remove()
    assert torch.equal(seen["ref"][0], seen["scm"][0])  # down path (-> mid block) untouched
    assert not torch.allclose(got, ref)  # the up path sees the control


def test_scm_gradients_flow_through_the_frozen_unet(unet: Any) -> None:
    x, emb, edges = _inputs(batch=1)
    scm = init_scm(3, block_out_channels=tuple(unet.config.block_out_channels), levels=(1, 2, 3), **SMALL_SCM)
    with scm.control(unet, edges, (16, 16)):
        out = _run(unet, x, emb)
    out.square().mean().backward()
    for lv in ("1", "2", "3"):
        assert scm.out_adapters[lv].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in unet.parameters())
