"""Attention capture (fsdiff.diffusion.attention) on the tiny Kandinsky 2.2 and SD UNets: exact reproduction of
the default processors, probability rows, the joint-softmax split, DiffSeg Eq. (11) against a naive dense
computation, layer selection, classifier-free-guidance halves, gradients and bounded memory."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F

from fsdiff.diffusion.attention import (
    AddedKVCaptureProcessor,
    AttentionCapture,
    AttentionLayer,
    CaptureAttnProcessor,
    attention_layers,
    resize_cross_map,
    resize_self_map,
)
from fsdiff.diffusion.tiny import TINY_KANDINSKY_UNET, tiny_sd_unet_config
from fsdiff.errors import FsdiffError

pytest.importorskip("diffusers", reason="the diffusion extra is not installed: pip install -e '.[diffusion]'")
pytest.importorskip("transformers", reason="the diffusion extra is not installed: pip install -e '.[diffusion]'")

TOL = 1e-5


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Any:
    """Tiny models run fastest single-threaded (and do not thrash when other jobs share the CPU)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _seeded_unet(config: dict[str, Any], seed: int) -> Any:
    from diffusers import UNet2DConditionModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**config)
    return unet.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def kandinsky_unet() -> Any:
    return _seeded_unet(TINY_KANDINSKY_UNET, seed=0)


@pytest.fixture(scope="module", params=["1.5", "2.1"])
def sd_unet(request: pytest.FixtureRequest) -> Any:
    return _seeded_unet(tiny_sd_unet_config(request.param), seed=1)


def _k_inputs(batch: int, side: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 4, side, side, generator=g), torch.randn(batch, 32, generator=g)


def _k_run(unet: Any, x: torch.Tensor, emb: torch.Tensor, t: int = 100) -> torch.Tensor:
    return unet(x, t, encoder_hidden_states=None, added_cond_kwargs={"image_embeds": emb}).sample


def _sd_inputs(batch: int, hw: tuple[int, int] = (24, 16), seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 4, *hw, generator=g), torch.randn(batch, 12, 32, generator=g)


# ----------------------------------------------------------------------------------------------------------------
# A naive recorder: keeps every layer's full probabilities (the test's own dense reference)
# ----------------------------------------------------------------------------------------------------------------


class NaiveRecorder:
    """Stores (layer, P (B*heads, L_q, L_k), batch, grid, n_tok) for every call, and nothing else."""

    def __init__(self) -> None:
        self.records: list[tuple[AttentionLayer, torch.Tensor, int, tuple[int, int], int | None]] = []

    def __call__(self, layer: AttentionLayer, probs: torch.Tensor, batch: int, grid: tuple[int, int],
                 n_tok: int | None) -> None:
        self.records.append((layer, probs.detach().clone(), batch, grid, n_tok))

    def install(self, unet: Any) -> dict[str, Any]:
        mods = dict(unet.named_modules())
        originals = {}
        for layer in attention_layers(unet):
            originals[layer.name] = mods[layer.name].processor
            cls = AddedKVCaptureProcessor if layer.kind == "added_kv" else CaptureAttnProcessor
            mods[layer.name].set_processor(cls(layer, self))
        return originals

    @staticmethod
    def restore(unet: Any, originals: dict[str, Any]) -> None:
        mods = dict(unet.named_modules())
        for name, proc in originals.items():
            mods[name].set_processor(proc)


def _dense_resize(grid: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """The 2-D resize operator as a dense (H*W, h*w) matrix, built by resizing every basis image."""
    h, w = grid
    basis = torch.eye(h * w, dtype=torch.float64).reshape(h * w, 1, h, w)
    parts = []
    for axis_in, axis_out in ((h, size[0]), (w, size[1])):
        parts.append("up" if axis_out >= axis_in else "down")
    # Separable: bilinear on enlarged axes, area on shrunk ones (F.interpolate per axis, in that order).
    out = basis
    out = F.interpolate(out, size=(size[0], w), mode="bilinear" if parts[0] == "up" else "area",
                        **({"align_corners": False} if parts[0] == "up" else {}))
    out = F.interpolate(out, size=(size[0], size[1]), mode="bilinear" if parts[1] == "up" else "area",
                        **({"align_corners": False} if parts[1] == "up" else {}))
    return out.reshape(h * w, size[0] * size[1]).T.contiguous()


def _dense_prior(records: list, common: tuple[int, int], grid_of: Any, cfg_half: str | None = None,
                 tokens: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eq. (11) computed directly: per-layer maps, dense resizes, means over layers, product, min-max."""
    selfs, crosses = [], []
    for layer, p, batch, grid, n_tok in records:
        grid = grid_of(layer, grid, p.shape[1])
        heads = p.shape[0] // batch
        p = p.double().reshape(batch, heads, p.shape[1], p.shape[2])
        if cfg_half == "cond":
            p = p[batch // 2:]
        elif cfg_half == "uncond":
            p = p[: batch // 2]
        r = _dense_resize(grid, common)
        k = r / r.sum(dim=0, keepdim=True)
        for b in range(p.shape[0]):
            pm = p[b].mean(0)
            if layer.kind == "added_kv":
                cross = pm[:, :n_tok].sum(-1) if tokens is None else pm[:, tokens].sum(-1)
                s = pm[:, n_tok:]
                s = s / s.sum(-1, keepdim=True)
            elif layer.kind == "cross":
                cross, s = (pm.sum(-1) if tokens is None else pm[:, tokens].sum(-1)), None
            else:
                cross, s = None, pm
            if cross is not None:
                crosses.append((b, r @ cross))
            if s is not None:
                selfs.append((b, r @ s @ k.T))
    nb = max(b for b, _ in selfs) + 1
    m_self = torch.stack([torch.stack([m for b, m in selfs if b == i]).mean(0) for i in range(nb)])
    m_cross = torch.stack([torch.stack([m for b, m in crosses if b == i]).mean(0) for i in range(nb)])
    prod = torch.einsum("bij,bj->bi", m_self, m_cross)
    lo, hi = prod.min(dim=1, keepdim=True).values, prod.max(dim=1, keepdim=True).values
    prior = ((prod - lo) / (hi - lo)).reshape(nb, 1, *common)
    return prior, m_self, m_cross.reshape(nb, 1, *common)


def _assert_prior_close(prior: torch.Tensor, ref_prior: torch.Tensor, ref_self: torch.Tensor,
                        ref_cross: torch.Tensor) -> None:
    """M_a agrees with the dense reference to the float32 precision of the product M_self · vec(M_cross).

    The min-max of Eq. (11) divides by the product's dynamic range; a random tiny UNet attends almost
    uniformly, so that range is ~1% of the product's size and float32 rounding of the accumulated maps
    (relative ~1e-7) is amplified ~100x in M_a. The error is therefore judged relative to the product.
    """
    prod = torch.einsum("bij,bj->bi", ref_self, ref_cross.flatten(1))
    hi, lo = prod.amax(dim=1), prod.amin(dim=1)
    rel_range = ((hi - lo) / hi).reshape(-1, 1, 1, 1)
    err = (prior.double() - ref_prior).abs() * rel_range
    assert err.max().item() < 1e-6, (err.max().item(), rel_range.flatten().tolist())


def _square_grid(layer: AttentionLayer, grid: tuple[int, int], length: int) -> tuple[int, int]:
    return grid


# ----------------------------------------------------------------------------------------------------------------
# Kandinsky (AttnAddedKVProcessor)
# ----------------------------------------------------------------------------------------------------------------


def test_kandinsky_layers_and_levels(kandinsky_unet: Any) -> None:
    layers = attention_layers(kandinsky_unet)
    assert all(layer.kind == "added_kv" for layer in layers)
    sides = sorted(max(layer.grid((64, 64))) for layer in layers)
    # down 32/16/8, mid 8, up 8,8 / 16,16 / 32,32 (the real Kandinsky 2.2 decoder's layout)
    assert sides == [8, 8, 8, 8, 16, 16, 16, 32, 32, 32]


@pytest.mark.parametrize("reference", ["AttnAddedKVProcessor2_0", "AttnAddedKVProcessor"])
def test_kandinsky_capture_reproduces_default_processor(kandinsky_unet: Any, reference: str) -> None:
    import diffusers.models.attention_processor as ap

    unet = kandinsky_unet
    x, emb = _k_inputs(2, side=32)
    originals = {k: v for k, v in unet.attn_processors.items()}
    unet.set_attn_processor(getattr(ap, reference)())
    try:
        with torch.no_grad():
            ref = _k_run(unet, x, emb)
            with AttentionCapture(unet, resolutions=None) as cap:
                out = _k_run(unet, x, emb)
    finally:
        unet.set_attn_processor(originals)
    assert (out - ref).abs().max().item() < TOL
    assert len(cap.layer_calls) == 10 and set(cap.layer_calls.values()) == {1}


def test_kandinsky_probability_rows_and_joint_softmax_split(kandinsky_unet: Any) -> None:
    rec = NaiveRecorder()
    originals = rec.install(kandinsky_unet)
    try:
        with torch.no_grad():
            _k_run(kandinsky_unet, *_k_inputs(2, side=32))
    finally:
        NaiveRecorder.restore(kandinsky_unet, originals)
    assert len(rec.records) == 10
    for layer, p, batch, (h, w), n_tok in rec.records:
        assert n_tok == 32 and p.shape[1] == h * w and p.shape[2] == n_tok + h * w
        assert torch.allclose(p.sum(-1), torch.ones(()), atol=TOL)  # one softmax over [tokens, spatial]
        pm = p.reshape(batch, -1, h * w, n_tok + h * w).mean(1)
        cross, self_raw = pm[..., :n_tok].sum(-1), pm[..., n_tok:].sum(-1)
        assert torch.allclose(cross + self_raw, torch.ones(()), atol=TOL)
        assert (cross > 0).all() and (cross < 1).all()
        renorm = pm[..., n_tok:] / pm[..., n_tok:].sum(-1, keepdim=True)
        assert torch.allclose(renorm.sum(-1), torch.ones(()), atol=TOL)


def test_kandinsky_prior_matches_dense_eq11(kandinsky_unet: Any) -> None:
    """Latent 32 (attention at 16, 8, 4) fused at 16x16: the same code paths as 64 -> (32, 16, 8) at 32x32,
    small enough for the dense float64 reference (which multiplies full matrices) to stay fast."""
    x, emb = _k_inputs(2, side=32, seed=1)
    rec = NaiveRecorder()
    originals = rec.install(kandinsky_unet)
    try:
        with torch.no_grad():
            _k_run(kandinsky_unet, x, emb)
    finally:
        NaiveRecorder.restore(kandinsky_unet, originals)
    ref_prior, ref_self, ref_cross = _dense_prior(rec.records, (16, 16), _square_grid)
    with torch.no_grad(), AttentionCapture(kandinsky_unet, resolutions=(4, 8, 16), common_size=16,
                                           latent_size=32) as cap:
        _k_run(kandinsky_unet, x, emb)
    assert cap.levels == {(4, 4): (4, 4), (8, 8): (3, 3), (16, 16): (3, 3)}
    prior = cap.prior()
    assert prior.shape == (2, 1, 16, 16)
    assert prior.min().item() == 0.0 and abs(prior.amax(dim=(1, 2, 3)) - 1).max().item() < 1e-6
    assert (cap.self_map().double() - ref_self).abs().max().item() < TOL
    assert (cap.cross_map().double() - ref_cross).abs().max().item() < TOL
    _assert_prior_close(prior, ref_prior, ref_self, ref_cross)
    assert torch.allclose(cap.self_map().sum(-1), torch.ones(()), atol=TOL)
    up = cap.prior(size=32)
    assert up.shape == (2, 1, 32, 32)
    assert torch.allclose(up.amin(dim=(1, 2, 3)), torch.zeros(()))
    assert torch.allclose(up.amax(dim=(1, 2, 3)), torch.ones(()))


def test_per_resolution_readout(kandinsky_unet: Any) -> None:
    x, emb = _k_inputs(1, side=32, seed=2)
    rec = NaiveRecorder()
    originals = rec.install(kandinsky_unet)
    try:
        with torch.no_grad():
            _k_run(kandinsky_unet, x, emb)
    finally:
        NaiveRecorder.restore(kandinsky_unet, originals)
    only8 = [r for r in rec.records if r[3] == (8, 8)]
    ref_prior, ref_self, ref_cross = _dense_prior(only8, (16, 16), _square_grid)
    with torch.no_grad(), AttentionCapture(kandinsky_unet, resolutions=None, common_size=16, latent_size=32) as cap:
        _k_run(kandinsky_unet, x, emb)
    assert (cap.cross_map(resolutions=[8]).double() - ref_cross).abs().max().item() < TOL
    _assert_prior_close(cap.prior(resolutions=[8]), ref_prior, ref_self, ref_cross)


def test_only_chosen_layers_get_the_capture_processor(kandinsky_unet: Any) -> None:
    before = dict(kandinsky_unet.attn_processors)
    with AttentionCapture(kandinsky_unet, resolutions=(16,)) as cap:
        inside = kandinsky_unet.attn_processors
        chosen = {f"{layer.name}.processor" for layer in cap.layers}
        assert chosen == {"down_blocks.2.attentions.0.processor", "up_blocks.1.attentions.0.processor",
                          "up_blocks.1.attentions.1.processor"}
        for key, proc in inside.items():
            if key in chosen:
                assert isinstance(proc, AddedKVCaptureProcessor)
            else:
                assert proc is before[key] and type(proc).__name__ == "AttnAddedKVProcessor2_0"
        with torch.no_grad():
            _k_run(kandinsky_unet, *_k_inputs(1, side=64))  # the default 64 latent: these layers run at 16x16
        assert set(cap.layer_calls) == {k[: -len(".processor")] for k in chosen}
        assert cap.levels == {(16, 16): (3, 3)}
    after = kandinsky_unet.attn_processors
    assert all(after[k] is before[k] for k in before)
    # explicit layer names
    cap2 = AttentionCapture(kandinsky_unet, layers=["mid_block.attentions.0.processor"])
    assert [layer.name for layer in cap2.layers] == ["mid_block.attentions.0"]
    with pytest.raises(FsdiffError, match="not Attention layers"):
        AttentionCapture(kandinsky_unet, layers=["mid_block.resnets.0"])
    with pytest.raises(FsdiffError, match="available sides"):
        AttentionCapture(kandinsky_unet, resolutions=(64,))


def test_cfg_halves(kandinsky_unet: Any) -> None:
    x, emb = _k_inputs(2, side=32, seed=3)
    uncond_emb = torch.zeros_like(emb)
    x2 = torch.cat([x, x])
    emb2 = torch.cat([uncond_emb, emb])  # diffusers order: [uncond, cond]
    with torch.no_grad():
        with AttentionCapture(kandinsky_unet, resolutions=(4, 8, 16), latent_size=32) as cond_only:
            _k_run(kandinsky_unet, x, emb)
        with AttentionCapture(kandinsky_unet, resolutions=(4, 8, 16), latent_size=32) as uncond_only:
            _k_run(kandinsky_unet, x, uncond_emb)
        with AttentionCapture(kandinsky_unet, resolutions=(4, 8, 16), latent_size=32, cfg_half="cond") as cond:
            _k_run(kandinsky_unet, x2, emb2)
        with AttentionCapture(kandinsky_unet, resolutions=(4, 8, 16), latent_size=32, cfg_half="uncond") as unc:
            _k_run(kandinsky_unet, x2, emb2)
    assert cond.prior().shape == (2, 1, 32, 32)
    assert (cond.self_map() - cond_only.self_map()).abs().max().item() < TOL
    _assert_prior_close(cond.prior(), cond_only.prior().double(), cond_only.self_map().double(),
                        cond_only.cross_map().double())
    assert (cond.cross_map() - cond_only.cross_map()).abs().max().item() < TOL
    assert (unc.cross_map() - uncond_only.cross_map()).abs().max().item() < TOL
    assert (cond.cross_map() - unc.cross_map()).abs().max().item() > 1e-3  # the halves differ
    with pytest.raises(FsdiffError, match="even UNet batch"):
        with torch.no_grad(), AttentionCapture(kandinsky_unet, latent_size=32, resolutions=(4,), cfg_half="cond"):
            _k_run(kandinsky_unet, *_k_inputs(1, side=32))


def test_gradients_flow_through_the_prior(kandinsky_unet: Any) -> None:
    x, emb = _k_inputs(1, side=32, seed=4)
    x.requires_grad_(True)
    with AttentionCapture(kandinsky_unet, resolutions=(4, 8, 16), latent_size=32) as cap:
        _k_run(kandinsky_unet, x, emb)
    prior = cap.prior()
    assert prior.requires_grad
    (prior * torch.linspace(0, 1, prior.numel()).reshape(prior.shape)).sum().backward()
    assert x.grad is not None and x.grad.abs().sum().item() > 0


def test_gradient_checkpointing_records_once(kandinsky_unet: Any) -> None:
    x, emb = _k_inputs(1, side=32, seed=5)
    x.requires_grad_(True)
    kandinsky_unet.enable_gradient_checkpointing()
    try:
        with AttentionCapture(kandinsky_unet, resolutions=None, latent_size=32) as cap:
            out = _k_run(kandinsky_unet, x, emb)
            prior = cap.prior()
            (out.mean() + prior.mean()).backward()
    finally:
        kandinsky_unet.disable_gradient_checkpointing()
    assert set(cap.layer_calls.values()) == {1}
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_timesteps_filter_and_bounded_memory(kandinsky_unet: Any) -> None:
    x, emb = _k_inputs(1, side=32, seed=6)
    with torch.no_grad(), AttentionCapture(kandinsky_unet, resolutions=(4, 8, 16), latent_size=32,
                                           timesteps=[100, 200]) as cap:
        _k_run(kandinsky_unet, x, emb, t=50)
        assert cap.layer_calls == {}
        _k_run(kandinsky_unet, x, emb, t=100)
        one_call = cap.accumulated_bytes
        _k_run(kandinsky_unet, x, emb, t=200)
        _k_run(kandinsky_unet, x, emb, t=100)
    assert set(cap.layer_calls.values()) == {3}
    assert cap.levels == {(4, 4): (12, 12), (8, 8): (9, 9), (16, 16): (9, 9)}
    # One running sum per level at native size, whatever the number of calls (for a 64 latent the 32x32
    # level is the largest buffer: 1024^2 floats, 4 MB per sample).
    assert cap.accumulated_bytes == one_call == 4 * (256**2 + 64**2 + 16**2 + 256 + 64 + 16)
    with pytest.raises(FsdiffError, match="batch changed"):
        with torch.no_grad(), AttentionCapture(kandinsky_unet, latent_size=32, resolutions=(8,)) as cap2:
            _k_run(kandinsky_unet, *_k_inputs(1, side=32))
            _k_run(kandinsky_unet, *_k_inputs(2, side=32))
    cap2.reset()
    with pytest.raises(FsdiffError, match="no self attention maps were captured"):
        cap2.prior()


# ----------------------------------------------------------------------------------------------------------------
# Stable Diffusion (AttnProcessor / AttnProcessor2_0)
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reference", ["AttnProcessor2_0", "AttnProcessor"])
def test_sd_capture_reproduces_default_processor(sd_unet: Any, reference: str) -> None:
    import diffusers.models.attention_processor as ap

    x, text = _sd_inputs(2)
    originals = dict(sd_unet.attn_processors)
    sd_unet.set_attn_processor(getattr(ap, reference)())
    try:
        with torch.no_grad():
            ref = sd_unet(x, 10, encoder_hidden_states=text).sample
            with AttentionCapture(sd_unet, resolutions=None, latent_size=(24, 16)) as cap:
                out = sd_unet(x, 10, encoder_hidden_states=text).sample
    finally:
        sd_unet.set_attn_processor(originals)
    assert (out - ref).abs().max().item() < TOL
    kinds = {layer.kind for layer in cap.layers}
    assert kinds == {"self", "cross"} and len(cap.layer_calls) == len(cap.layers) == 14


def test_sd_rows_and_dense_eq11_non_square(sd_unet: Any) -> None:
    x, text = _sd_inputs(2, hw=(24, 16), seed=7)
    rec = NaiveRecorder()
    originals = rec.install(sd_unet)
    try:
        with torch.no_grad():
            sd_unet(x, 10, encoder_hidden_states=text)
    finally:
        NaiveRecorder.restore(sd_unet, originals)
    for layer, p, batch, grid, _ in rec.records:
        assert torch.allclose(p.sum(-1), torch.ones(()), atol=TOL)
        assert p.shape[2] == (12 if layer.kind == "cross" else p.shape[1])

    def grid_of(layer: AttentionLayer, grid: tuple[int, int], length: int) -> tuple[int, int]:
        g = layer.grid((24, 16))
        assert g[0] * g[1] == length
        return g

    tokens = [1, 2, 3]
    ref_prior, ref_self, ref_cross = _dense_prior(rec.records, (12, 8), grid_of, tokens=tokens)
    with torch.no_grad(), AttentionCapture(sd_unet, resolutions=None, common_size=(12, 8), latent_size=(24, 16),
                                           cross_tokens=tokens) as cap:
        sd_unet(x, 10, encoder_hidden_states=text)
    assert set(cap.levels) == {(24, 16), (12, 8), (6, 4)}
    assert (cap.self_map().double() - ref_self).abs().max().item() < TOL
    assert (cap.cross_map().double() - ref_cross).abs().max().item() < TOL
    _assert_prior_close(cap.prior(), ref_prior, ref_self, ref_cross)


def test_sd_cross_over_all_tokens_is_one(sd_unet: Any) -> None:
    x, text = _sd_inputs(1, hw=(16, 16))
    with torch.no_grad(), AttentionCapture(sd_unet, resolutions=None, common_size=8, latent_size=16) as cap:
        sd_unet(x, 10, encoder_hidden_states=text)
    assert torch.allclose(cap.cross_map(), torch.ones(()), atol=TOL)
    with pytest.raises(FsdiffError, match="out of range"):
        with torch.no_grad(), AttentionCapture(sd_unet, resolutions=None, latent_size=16, cross_tokens=[40]):
            sd_unet(x, 10, encoder_hidden_states=text)


# ----------------------------------------------------------------------------------------------------------------
# Resizing
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("grid, size", [((8, 8), (32, 32)), ((16, 16), (8, 8)), ((6, 4), (12, 8)), ((5, 7), (3, 9))])
def test_resize_self_keeps_rows_stochastic_and_is_linear(grid: tuple[int, int], size: tuple[int, int]) -> None:
    g = torch.Generator().manual_seed(0)
    n = grid[0] * grid[1]
    a = torch.softmax(torch.randn(2, n, n, generator=g, dtype=torch.float64), -1)
    b = torch.softmax(torch.randn(2, n, n, generator=g, dtype=torch.float64), -1)
    ra, rb = resize_self_map(a, grid, size), resize_self_map(b, grid, size)
    assert ra.shape == (2, size[0] * size[1], size[0] * size[1])
    assert torch.allclose(ra.sum(-1), torch.ones((), dtype=torch.float64), atol=1e-10)
    assert torch.allclose(resize_self_map(a + 2 * b, grid, size), ra + 2 * rb, atol=1e-10)
    dense = _dense_resize(grid, size)
    k = dense / dense.sum(0, keepdim=True)
    assert torch.allclose(ra, dense @ a @ k.T, atol=1e-10)
    c = torch.rand(2, n, generator=g, dtype=torch.float64)
    assert torch.allclose(resize_cross_map(c, grid, size), c @ dense.T, atol=1e-10)
    assert resize_self_map(a, grid, grid) is a
