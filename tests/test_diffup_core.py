"""DiffUp model core: config, UAPF fusion, cosine schedule / DDIM, the UQDD UNet, sampling, training loss."""

from __future__ import annotations

import math

import pytest
import torch

from fsdiff.errors import FsdiffError
from fsdiff.methods.diffup import (
    UAPF,
    UQDD,
    DiffUpConfig,
    build_models,
    fuse_precision,
    heteroscedastic_loss,
    mask_iou,
    training_losses,
)
from fsdiff.methods.diffup.schedule import (
    cosine_alpha_bar,
    ddim_step,
    make_generator,
    predict_eps,
    prior_start,
    q_sample,
    timestep_sequence,
)
from fsdiff.methods.diffup.uqdd import ResBlock



@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models run fastest on one thread (no OpenMP contention on a busy 2-core box); restore after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


TINY = dict(base_channels=8, cond_channels=8, query_channels=4, dqm_channels=8, attention_head_dim=8,
            uapf_hidden_channels=8, prior_maps=("proto", "pix"), uapf_anchor=False, residual_prior=False)
"""The network-mechanics tests use the plain (6-channel, unanchored, non-residual) layout; the anchor and the
residual prior have tests of their own below."""


def tiny_models(seed: int = 0, **kw) -> tuple[UAPF, UQDD]:
    torch.manual_seed(seed)
    return build_models(DiffUpConfig(**{**TINY, **kw}))


def cond_inputs(b: int, h: int, w: int, seed: int = 0, extra: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    out = dict(
        prior_mu=torch.randn(b, 1, max(1, h // 2), max(1, w // 2), generator=g),
        prior_var=torch.rand(b, 1, max(1, h // 2), max(1, w // 2), generator=g) + 0.1,
        query_rgb=torch.rand(b, 3, 4 * h, 4 * w, generator=g),
    )
    if extra:
        out["query_extra"] = torch.rand(b, extra, max(1, h // 2), max(1, w // 2), generator=g)
    return out


# --------------------------------------------------------------------------------------------------
# config
# --------------------------------------------------------------------------------------------------
def test_config_defaults_follow_methods():
    c = DiffUpConfig()
    assert c.mask_size == 96 and c.prior_size == 48 and c.prior_channels == 9
    assert c.prior_maps == ("proto", "pix", "contrast") and c.anchor_channels == [2, 5, 8]
    assert DiffUpConfig(uapf_anchor_levels=[2, 1]).anchor_channels == [5, 8]  # the prototype method's levels
    assert DiffUpConfig(uapf_anchor=False).anchor_channels == []
    with pytest.raises(FsdiffError, match="uapf_anchor_levels"):
        DiffUpConfig(uapf_anchor_levels=(3,))
    assert DiffUpConfig(prior_maps=("proto", "pix"), uapf_anchor=False).prior_channels == 6
    assert c.num_train_timesteps == 1000 and c.ddim_steps == 10 and c.ddim_eta == 0.0
    assert c.start_fractions == {"mask": 0.3, "scribble": 0.5, "box": 0.6, "text": 0.8}
    assert (c.adaptive_min_fraction, c.adaptive_max_fraction) == (0.2, 0.9)
    assert (c.self_cond_prob, c.prior_start_prob) == (0.5, 0.3)
    assert (c.loss_bce, c.loss_dice, c.loss_err, c.loss_iou, c.loss_uapf) == (1.0, 1.0, 1.0, 1.0, 0.5)
    assert c.base_channels * torch.tensor(c.channel_mult).tolist()[-1] == 256
    assert c.type_id("text") == 3
    with pytest.raises(FsdiffError, match="points"):
        c.type_id("points")


@pytest.mark.parametrize(
    "kw", [dict(channel_mult=(1, 2)), dict(prediction_type="eps"), dict(start_fractions={"lidar": 0.3}),
           dict(uapf_log_var_min=3.0, uapf_log_var_max=1.0), dict(self_cond_prob=1.5)]
)
def test_config_rejects_bad_values(kw):
    with pytest.raises(FsdiffError, match="DiffUpConfig"):
        DiffUpConfig(**kw)


# --------------------------------------------------------------------------------------------------
# UAPF
# --------------------------------------------------------------------------------------------------
def test_fusion_matches_hand_computation():
    # shot 1: μ=2, s=0 (precision 1); shot 2: μ=-1, s=log 2 (precision 0.5)
    mu_k = torch.tensor([2.0, -1.0]).reshape(1, 2, 1, 1, 1)
    s_k = torch.tensor([0.0, math.log(2.0)]).reshape(1, 2, 1, 1, 1)
    mu, log_var = fuse_precision(mu_k, s_k, torch.tensor([[True, True]]))
    assert mu.item() == pytest.approx((2 * 1 - 1 * 0.5) / 1.5)
    assert log_var.exp().item() == pytest.approx(1 / 1.5)
    # padding shots are excluded whatever they hold
    mu_k3 = torch.cat([mu_k, torch.full((1, 1, 1, 1, 1), 50.0)], 1)
    s_k3 = torch.cat([s_k, torch.full((1, 1, 1, 1, 1), -30.0)], 1)
    mu3, lv3 = fuse_precision(mu_k3, s_k3, torch.tensor([[True, True, False]]))
    assert mu3.item() == pytest.approx(mu.item()) and lv3.item() == pytest.approx(log_var.item())


def test_fusion_zero_shots_is_honest():
    mu_k = torch.randn(2, 3, 1, 4, 4)
    s_k = torch.randn(2, 3, 1, 4, 4)
    mu, lv = fuse_precision(mu_k, s_k, torch.zeros(2, 3, dtype=torch.bool), empty_variance=1000.0)
    assert torch.all(mu == 0) and torch.allclose(lv.exp(), torch.full_like(lv, 1000.0))
    mu0, lv0 = fuse_precision(torch.zeros(2, 0, 1, 4, 4), torch.zeros(2, 0, 1, 4, 4), torch.zeros(2, 0, dtype=torch.bool))
    assert mu0.shape == (2, 1, 4, 4) and torch.all(mu0 == 0) and torch.allclose(lv0.exp(), torch.full_like(lv0, 1000.0))


def test_uapf_module_padding_and_mixed_k():
    torch.manual_seed(0)
    uapf = UAPF(prior_channels=6, hidden_channels=8)
    priors = torch.rand(2, 3, 6, 8, 8)
    types = torch.tensor([[0, 1, 3], [2, 0, 0]])
    present = torch.tensor([[True, True, True], [True, False, False]])
    out = uapf(priors, types, present)
    assert out.mu.shape == (2, 1, 8, 8) and out.var.shape == (2, 1, 8, 8)
    alone = uapf(priors[1:, :1], types[1:, :1])  # episode 2 on its own, K = 1
    assert torch.allclose(out.mu[1], alone.mu[0], atol=1e-6) and torch.allclose(out.var[1], alone.var[0], atol=1e-6)
    # one shot: the fused map is that shot's (μ_k, e^{s_k})
    assert torch.allclose(out.mu[1], out.mu_k[1, 0], atol=1e-6)
    assert torch.allclose(out.log_var[1], out.s_k[1, 0], atol=1e-6)
    assert torch.all(out.s_k <= 6.0) and torch.all(out.s_k >= -6.0)
    # the type embedding matters
    other = uapf(priors[:1, :1], torch.tensor([[2]]))
    assert not torch.allclose(other.mu, uapf(priors[:1, :1], torch.tensor([[0]])).mu)
    # no evidence at all
    empty = uapf(priors, types, torch.zeros(2, 3, dtype=torch.bool))
    assert torch.all(empty.mu == 0) and torch.allclose(empty.var, torch.full_like(empty.var, 1000.0))
    assert not empty.has_evidence.any()
    k0 = uapf(torch.rand(2, 0, 6, 8, 8), torch.zeros(2, 0, dtype=torch.long))  # K = 0, no text
    assert k0.mu.shape == (2, 1, 8, 8) and torch.all(k0.mu == 0)
    assert torch.allclose(k0.var, torch.full_like(k0.var, 1000.0))
    with pytest.raises(FsdiffError, match="prior channels"):
        uapf(torch.rand(1, 1, 5, 8, 8), torch.zeros(1, 1, dtype=torch.long))


def test_heteroscedastic_loss_by_hand():
    mu = torch.zeros(1, 1, 2, 2)
    y = torch.ones(1, 1, 2, 2)
    assert heteroscedastic_loss(mu, torch.zeros_like(mu), y).item() == pytest.approx(math.log(2))
    lv = torch.full_like(mu, math.log(2.0))
    assert heteroscedastic_loss(mu, lv, y).item() == pytest.approx(math.log(2) / 2 + math.log(2))
    valid = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]])
    mu2 = torch.tensor([[[[0.0, 9.0], [9.0, 9.0]]]])
    assert heteroscedastic_loss(mu2, torch.zeros_like(mu2), y * 0, valid).item() == pytest.approx(math.log(2))


# --------------------------------------------------------------------------------------------------
# schedule
# --------------------------------------------------------------------------------------------------
def test_cosine_alpha_bar_closed_form():
    def f(t):
        return math.cos((t / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2

    assert cosine_alpha_bar(0).item() == 1.0
    assert cosine_alpha_bar(1000).item() == pytest.approx(0.0, abs=1e-12)
    for t in (1, 250, 300, 500, 800, 999):
        assert cosine_alpha_bar(t).item() == pytest.approx(f(t) / f(0), rel=1e-12)
    assert cosine_alpha_bar(500).item() == pytest.approx(0.4938, abs=1e-4)
    ab = cosine_alpha_bar(torch.arange(0, 1001))
    assert torch.all(ab[1:] < ab[:-1])
    with pytest.raises(FsdiffError):
        cosine_alpha_bar(1001)


def test_q_sample_and_ddim_closed_forms():
    g = make_generator(0)
    x0 = torch.sign(torch.randn(3, 1, 4, 4, generator=g))
    eps = torch.randn(3, 1, 4, 4, generator=g)
    t = torch.tensor([100, 500, 900])
    xt = q_sample(x0, t, eps)
    ab = cosine_alpha_bar(t).float().reshape(-1, 1, 1, 1)
    assert torch.allclose(xt, ab.sqrt() * x0 + (1 - ab).sqrt() * eps, atol=1e-6)
    assert torch.allclose(q_sample(x0, t, torch.zeros_like(x0)), ab.sqrt() * x0, atol=1e-6)
    assert torch.allclose(predict_eps(xt, x0, t), eps, atol=1e-4)
    # t -> 0 returns x̂0 exactly; with a perfect x̂0 a DDIM step lands on the same noise trajectory
    x0_hat = torch.tanh(torch.randn(3, 1, 4, 4, generator=g))
    assert torch.allclose(ddim_step(xt, x0_hat, t, 0), x0_hat, atol=1e-6)
    s = torch.tensor([50, 250, 450])
    abs_ = cosine_alpha_bar(s).float().reshape(-1, 1, 1, 1)
    assert torch.allclose(ddim_step(xt, x0, t, s), abs_.sqrt() * x0 + (1 - abs_).sqrt() * eps, atol=1e-4)
    assert torch.equal(ddim_step(xt, x0_hat, t, t), xt)
    with pytest.raises(FsdiffError):
        ddim_step(xt, x0, 100, 200)


def test_timestep_sequence_and_prior_start():
    assert timestep_sequence(300, 10).tolist() == list(range(300, -1, -30))
    seq = timestep_sequence(torch.tensor([1000, 600]), 4)
    assert seq.shape == (5, 2) and seq[:, 0].tolist() == [1000, 750, 500, 250, 0] and seq[-1, 1] == 0
    assert torch.all(seq[1:] <= seq[:-1])
    with pytest.raises(FsdiffError):
        timestep_sequence(0, 10)
    mu = torch.rand(2, 1, 5, 5)
    a = cosine_alpha_bar(300).item()
    assert torch.allclose(prior_start(mu, 300, torch.zeros_like(mu)), math.sqrt(a) * (2 * mu - 1), atol=1e-6)
    x1 = prior_start(mu, 300, generator=make_generator(7))
    x2 = prior_start(mu, 300, generator=make_generator(7))
    x3 = prior_start(mu, 300, generator=make_generator(8))
    assert torch.equal(x1, x2) and not torch.allclose(x1, x3)


# --------------------------------------------------------------------------------------------------
# UQDD
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("b,h,w", [(1, 32, 32), (3, 24, 40), (2, 20, 28)])
def test_uqdd_shapes(b, h, w):
    _, m = tiny_models()
    x = torch.randn(b, 1, h, w)
    out = m(x, torch.randint(1, 1001, (b,)), **cond_inputs(b, h, w))
    assert out.x0.shape == (b, 1, h, w) and out.x0_logit.shape == (b, 1, h, w)
    assert out.err.shape == (b, 1, h, w) and out.iou.shape == (b,)
    assert torch.all(out.x0.abs() < 1) and torch.all((out.err >= 0) & (out.err <= 1))
    assert torch.all((out.iou >= 0) & (out.iou <= 1))


def test_condition_film_and_dqm_gates_are_applied():
    _, m = tiny_models()
    m.eval()
    b, h, w = 2, 16, 16
    x = torch.randn(b, 1, h, w)
    t = torch.tensor([300, 700])
    c = cond_inputs(b, h, w)
    base = m(x, t, **c).x0
    changed = dict(c, prior_mu=c["prior_mu"] + 3.0)
    assert not torch.allclose(base, m(x, t, **changed).x0)  # SCM sees the prior
    assert not torch.allclose(base, m(x, t, **dict(c, query_rgb=1 - c["query_rgb"])).x0)  # and the query
    assert not torch.allclose(base, m(x, t, **c, x0_prev=torch.ones_like(x)).x0)  # self-conditioning
    # IoU-level gates: a different î changes the output
    assert not torch.allclose(m(x, t, **c, iou_override=0.1).x0, m(x, t, **c, iou_override=0.9).x0)
    # error-map gates: ê = 1 zeroes every residual branch, so the condition (FiLM) no longer matters
    ones = torch.ones(b, 1, h, w)
    a1 = m(x, t, **c, err_override=ones).x0
    a2 = m(x, t, **changed, err_override=ones).x0
    assert torch.allclose(a1, a2, atol=1e-6)
    assert not torch.allclose(m(x, t, **c, err_override=ones * 0).x0, m(x, t, **changed, err_override=ones * 0).x0)


def test_resblock_error_gate_zeroes_branch():
    torch.manual_seed(0)
    blk = ResBlock(8, 16, temb_dim=12, cond_channels=4, gate_dim=12, dropout=0.0)
    x = torch.randn(2, 8, 6, 6)
    temb, cond, ge = torch.randn(2, 12), torch.randn(2, 4, 6, 6), torch.randn(2, 12)
    assert torch.allclose(blk(x, temb, cond, torch.ones(2, 1, 6, 6), ge), blk.skip(x))
    assert not torch.allclose(blk(x, temb, cond, torch.zeros(2, 1, 6, 6), ge), blk.skip(x))


def test_uqdd_requires_query_extra_when_configured():
    _, m = tiny_models()
    c = cond_inputs(1, 16, 16)
    c.pop("query_extra")
    with pytest.raises(FsdiffError, match="query_extra"):
        m(torch.randn(1, 1, 16, 16), 10, **c)
    _, m0 = tiny_models(query_extra_channels=0)
    assert m0(torch.randn(1, 1, 16, 16), 10, **c).x0.shape == (1, 1, 16, 16)


def test_checkpoint_round_trip(tmp_path):
    uapf, m = tiny_models(seed=3)
    m.save_pretrained(tmp_path / "uqdd")
    uapf.save_pretrained(tmp_path / "uapf")
    for sub in ("uqdd", "uapf"):
        assert sorted(p.name for p in (tmp_path / sub).iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    m2 = UQDD.from_pretrained(tmp_path / "uqdd")
    u2 = UAPF.from_pretrained(tmp_path / "uapf")
    assert m2.config.start_fractions == m.config.start_fractions and m2.config.base_channels == 8
    c = cond_inputs(2, 16, 16)
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(m.eval()(x, 500, **c).x0, m2.eval()(x, 500, **c).x0)
        pr = torch.rand(2, 2, 6, 8, 8)
        ty = torch.tensor([[0, 1], [2, 3]])
        assert torch.equal(uapf.eval()(pr, ty).mu, u2.eval()(pr, ty).mu)
    s1 = m.sample(**c, annotation_types=["box"], steps=3, generator=make_generator(1))
    s2 = m2.sample(**c, annotation_types=["box"], steps=3, generator=make_generator(1))
    assert torch.equal(s1.prob, s2.prob)


def test_sample_paths_and_determinism():
    _, m = tiny_models()
    m.eval()
    c = cond_inputs(2, 16, 16)
    s1 = m.sample(**c, annotation_types=["mask", "box"], steps=4, generator=make_generator(0), size=16)
    s2 = m.sample(**c, annotation_types=["mask", "box"], steps=4, generator=make_generator(0), size=16)
    s3 = m.sample(**c, annotation_types=["mask", "box"], steps=4, generator=make_generator(1), size=16)
    assert torch.equal(s1.prob, s2.prob) and not torch.allclose(s1.prob, s3.prob)
    s4 = m.sample(**c, annotation_types=["mask", "box"], steps=4, generator=0, size=16)
    assert torch.equal(s1.prob, s4.prob)  # an int seed works like a generator
    assert s1.t_start.tolist() == [300, 300]  # the finest type present decides
    assert s1.prob.shape == (2, 1, 16, 16) and s1.uncertainty.shape == (2, 1, 16, 16)
    for v in (s1.prob, s1.uncertainty, s1.trajectory_var, s1.prior_uncertainty):
        assert torch.all((v >= 0) & (v <= 1))
    assert torch.allclose(s1.prob, (s1.x0 + 1) / 2, atol=1e-6)
    per = m.sample(**c, annotation_types=[["text"], ["scribble", "box"]], steps=2, generator=make_generator(0))
    assert per.t_start.tolist() == [800, 500] and per.prob.shape == (2, 1, 16, 16)  # default size: query / 4
    noise = m.sample(**c, start="noise", steps=2, generator=make_generator(0), size=16)
    assert noise.t_start.tolist() == [1000, 1000]
    ad = m.sample(**c, adaptive=True, steps=2, generator=make_generator(0), size=16)
    assert torch.all((ad.t_start >= 200) & (ad.t_start <= 900))
    explicit = m.sample(**c, t_start=torch.tensor([5, 950]), steps=10, generator=make_generator(0), size=16)
    assert explicit.t_start.tolist() == [5, 950]
    with pytest.raises(FsdiffError):
        m.sample(**c, generator=make_generator(0))
    with pytest.raises(FsdiffError):
        m.sample(**c, start="middle")


def test_mask_iou_edge_cases():
    v = torch.ones(2, 1, 2, 2)
    p = torch.tensor([[[[1.0, 1.0], [0.0, 0.0]]], [[[0.0, 0.0], [0.0, 0.0]]]])
    y = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]], [[[0.0, 0.0], [0.0, 0.0]]]])
    assert mask_iou(p, y, v).tolist() == [0.5, 1.0]


def _toy_batch(b: int = 2, size: int = 32, k: int = 3):
    g = torch.Generator().manual_seed(0)
    gt = torch.zeros(b, 1, size, size)
    gt[0, :, 6:20, 8:26] = 1
    gt[1 % b, :, 14:30, 4:16] = 1
    gt[0, :, 0, :] = 255  # an ignore row
    priors = torch.rand(b, k, 6, size // 2, size // 2, generator=g) * 0.3
    priors[:, :, :, :, :] += torch.nn.functional.interpolate((gt == 1).float(), size=size // 2).unsqueeze(1) * 0.7
    return dict(
        gt=gt,
        query_rgb=torch.rand(b, 3, 4 * size, 4 * size, generator=g),
        query_extra=torch.rand(b, 1, size // 2, size // 2, generator=g),
        priors=priors,
        type_ids=torch.tensor([[0, 1, 3], [2, 0, 0]])[:b, :k],
        present=torch.tensor([[True, True, True], [False, False, False]])[:b, :k],
    )


def test_training_losses_mixed_k_and_gradients():
    uapf, m = tiny_models()
    batch = _toy_batch()
    out = training_losses(m, batch, make_generator(0), uapf=uapf, config=DiffUpConfig(**TINY))
    for k in ("loss", "bce", "dice", "err", "iou", "uapf"):
        assert torch.isfinite(out[k])
    out["loss"].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in uapf.parameters())
    assert m.conv_out.weight.grad.abs().sum() > 0
    assert m.dqm.err_out.weight.grad.abs().sum() > 0
    # type-matched t* from the ids: episode 1 has a mask shot (0.3), episode 2 none (T)
    assert m.start_timesteps_from_ids(batch["type_ids"], batch["present"]).tolist() == [300, 1000]
    # prior given directly (no UAPF): L_UAPF is 0
    direct = training_losses(m, dict(gt=batch["gt"], query_rgb=batch["query_rgb"], query_extra=batch["query_extra"],
                                      prior_mu=torch.zeros(2, 1, 16, 16), prior_var=torch.ones(2, 1, 16, 16)),
                             make_generator(0))
    assert direct["uapf"].item() == 0.0 and torch.isfinite(direct["loss"])


def test_tiny_overfit_lowers_loss():
    uapf, m = tiny_models(seed=1)
    cfg = DiffUpConfig(**TINY)
    batch = _toy_batch()
    params = list(m.parameters()) + list(uapf.parameters())
    opt = torch.optim.Adam(params, lr=3e-3)

    def eval_loss() -> float:
        # the same seed gives the same t, noise and self-conditioning draws before and after
        return sum(training_losses(m, batch, make_generator(s), uapf=uapf, config=cfg)["loss"].item() for s in range(4))

    before = eval_loss()
    g = make_generator(123)
    for _ in range(40):
        opt.zero_grad()
        training_losses(m, batch, g, uapf=uapf, config=cfg)["loss"].backward()
        opt.step()
    after = eval_loss()
    assert after < 0.8 * before, (before, after)


@pytest.mark.parametrize(
    "kw",
    [dict(use_dqm=False), dict(use_scm=False), dict(self_conditioning=False), dict(dqm_uses_condition=False),
     dict(use_scm=False, use_dqm=False, mid_attention=False)],
)
def test_ablation_switches_run(kw):
    uapf, m = tiny_models(**kw)
    c = cond_inputs(2, 16, 16)
    out = m(torch.randn(2, 1, 16, 16), 400, **c)
    assert out.x0.shape == (2, 1, 16, 16) and (out.err is None) == (not m.config.use_dqm)
    s = m.sample(**c, annotation_types=["scribble"], steps=2, generator=0, size=16)
    assert s.prob.shape == (2, 1, 16, 16) and torch.all((s.uncertainty >= 0) & (s.uncertainty <= 1))
    losses = training_losses(m, _toy_batch(), make_generator(0), uapf=uapf, config=DiffUpConfig(**TINY, **kw))
    assert torch.isfinite(losses["loss"])
    if not m.config.use_dqm:
        with pytest.raises(FsdiffError, match="DQM"):
            m.sample(**c, adaptive=True, steps=2, generator=0, size=16)


# --------------------------------------------------------------------------------------------------
# the prior anchor (UAPF) and the residual prior (UQDD)
# --------------------------------------------------------------------------------------------------
def test_uapf_anchor_starts_at_the_contrast_logit_and_learns_a_residual():
    cfg = DiffUpConfig(**{**TINY, "prior_maps": ("proto", "pix", "contrast"), "uapf_anchor": True})
    assert cfg.anchor_channels == [2, 5, 8] and cfg.prior_channels == 9
    torch.manual_seed(0)
    uapf = UAPF(**cfg.uapf_kwargs())
    g = torch.Generator().manual_seed(1)
    priors = torch.rand(2, 2, 9, 6, 6, generator=g)
    out = uapf(priors, torch.tensor([[0, 1], [2, 0]]), torch.tensor([[True, True], [True, False]]))
    p = priors[:, :, [2, 5, 8]].mean(2, keepdim=True).clamp(1e-3, 1 - 1e-3)
    hand = torch.log(p / (1 - p))  # μ_k = logit(mean contrast), s_k = 0 before any training
    assert torch.allclose(out.mu_k[0], hand[0], atol=1e-5) and torch.allclose(out.mu_k[1, 0], hand[1, 0], atol=1e-5)
    assert torch.all(out.s_k == 0)
    assert torch.allclose(out.mu[0], hand[0].mean(0), atol=1e-5)  # equal precisions: the plain mean
    # the CNN's residual is trainable: one gradient step moves μ away from the anchor
    loss = uapf.loss(out, torch.ones(2, 1, 6, 6))
    loss.backward()
    assert uapf.net[-1].weight.grad is not None and float(uapf.net[-1].weight.grad.abs().sum()) > 0
    with pytest.raises(FsdiffError, match="anchor channels"):
        UAPF(prior_channels=6, anchor_channels=[6])
    with pytest.raises(FsdiffError, match="contrast"):
        DiffUpConfig(prior_maps=("proto", "pix"), uapf_anchor=True)


def test_self_maps_and_their_anchor_in_the_config():
    cfg = DiffUpConfig(prior_maps=("proto", "pix", "contrast", "self"), uapf_anchor_map="self",
                       uapf_anchor_levels=(1, 2), self_levels=[1, 2])
    assert cfg.prior_channels == 12 and cfg.anchor_channels == [7, 11] and cfg.self_levels == (1, 2)
    assert DiffUpConfig(prior_maps=("contrast", "self")).anchor_channels == [0, 2, 4]  # contrast by default
    assert (cfg.self_fg_threshold, cfg.self_bg_threshold, cfg.self_mix) == (0.7, 0.6, 0.5)  # SSP's values
    assert cfg.finest_type(["box", "scribble", "box"]) == "scribble" and cfg.finest_type(["text", "mask"]) == "mask"
    for kw, name in [(dict(uapf_anchor_map="self"), "uapf_anchor"), (dict(uapf_anchor_map="pix"), "uapf_anchor_map"),
                     (dict(self_levels=(0, 5)), "self_levels"), (dict(self_fg_threshold=0.5), "self_fg_threshold"),
                     (dict(self_mix=1.5), "self_mix"), (dict(train_pooled_prob=-0.1), "train_pooled_prob")]:
        with pytest.raises(FsdiffError, match=f"DiffUpConfig.{name}"):
            DiffUpConfig(**kw)


def test_residual_prior_decoder_starts_at_the_prior():
    cfg = DiffUpConfig(**{**TINY, "residual_prior": True})
    torch.manual_seed(0)
    _, m = build_models(cfg)
    c = cond_inputs(2, 16, 16)
    out = m(torch.randn(2, 1, 16, 16), 300, **c)
    mu_up = torch.nn.functional.interpolate(c["prior_mu"], size=(16, 16), mode="bilinear", align_corners=False)
    assert torch.allclose(out.x0_logit, 0.5 * mu_up, atol=1e-6)  # the UNet adds zero at initialisation
    s = m.sample(c["prior_mu"], c["prior_var"], c["query_rgb"], c["query_extra"], annotation_types=["mask"],
                 generator=0)
    assert torch.allclose(s.prob, torch.sigmoid(mu_up), atol=1e-6)  # so sampling returns sigmoid(μ)
    # without it the same weights give something else
    _, plain = build_models(DiffUpConfig(**TINY))
    assert not torch.allclose(plain(torch.randn(2, 1, 16, 16), 300, **c).x0_logit, 0.5 * mu_up, atol=1e-3)


def test_no_rgb_query_input():
    torch.manual_seed(0)
    _, m = build_models(DiffUpConfig(**{**TINY, "query_channels": 0}))
    assert m.query_encoder is None and m.cond_in_channels == 3 + 1
    c = cond_inputs(2, 16, 16)
    x = torch.randn(2, 1, 16, 16)
    a = m(x, 300, **c).x0
    assert torch.equal(a, m(x, 300, **dict(c, query_rgb=1 - c["query_rgb"])).x0)  # RGB is ignored
    assert not torch.allclose(a, m(x, 300, **dict(c, prior_mu=-c["prior_mu"])).x0)  # the prior is not
