"""The shared trainer: resume equivalence, pickle-free checkpoints, schedule, logging, bad arguments."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config

from fsdiff.errors import FsdiffError
from fsdiff.methods.diffup import DiffUpConfig
from fsdiff.methods.diffup.training import DiffUpTrainable
from fsdiff.train import (
    Trainable,
    flatten_state,
    latest_checkpoint,
    lr_lambda,
    rng_states,
    set_rng_states,
    train,
    unflatten_state,
)

TINY = dict(input_size=64, base_channels=8, cond_channels=8, query_channels=4, dqm_channels=8,
            attention_head_dim=8, uapf_hidden_channels=8, max_shots=2, dropout=0.1)
FORBIDDEN = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".npy", ".npz"}


class Lin(ModelMixin, ConfigMixin):
    """A tiny regression model with dropout (so the global RNG matters)."""

    config_name = "config.json"

    @register_to_config
    def __init__(self, width: int = 8):
        super().__init__()
        self.a = torch.nn.Linear(4, width)
        self.norm = torch.nn.LayerNorm(width)
        self.b = torch.nn.Linear(width, 1)
        self.drop = torch.nn.Dropout(0.2)

    def forward(self, x):
        return self.b(self.drop(torch.relu(self.norm(self.a(x)))))


class LinTrainable:
    """A minimal Trainable: noisy linear regression, batches from the given rng only."""

    name = "lin"

    def __init__(self, seed: int = 0):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.model = Lin()
        self.batches: list[int] = []

    def modules(self):
        return {"lin": self.model}

    def make_batch(self, step, rng, batch_size):
        self.batches.append(step)
        x = torch.from_numpy(rng.standard_normal((batch_size, 4)).astype(np.float32))
        return {"x": x, "y": x.sum(1, keepdim=True) * 0.5}

    def loss(self, batch, generator):
        noise = torch.randn(batch["y"].shape, generator=generator) * 0.01
        mse = ((self.model(batch["x"]) - batch["y"] - noise) ** 2).mean()
        return {"loss": mse, "mse": mse.detach()}

    def save(self, directory, meta):
        self.model.save_pretrained(Path(directory) / "lin")
        (Path(directory) / "meta.json").write_text(json.dumps(meta))


class Crash(Exception):
    pass


def crash_at(trainable, step: int):
    """Make ``trainable.make_batch`` raise at ``step`` (a simulated kill)."""
    orig = trainable.make_batch

    def make_batch(s, rng, bs):
        if s == step:
            raise Crash()
        return orig(s, rng, bs)

    trainable.make_batch = make_batch
    return trainable


def _params(m: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def test_trainable_protocol():
    assert isinstance(LinTrainable(), Trainable)


def test_resume_reaches_the_same_weights_generic(tmp_path):
    kw = dict(steps=6, batch_size=4, lr=1e-2, warmup=2, save_every=2, progress=False, log_every=1)
    straight = LinTrainable()
    train(straight, tmp_path / "a", **kw)
    with pytest.raises(Crash):
        train(crash_at(LinTrainable(), 3), tmp_path / "b", **kw)  # dies after checkpoint-2
    assert latest_checkpoint(tmp_path / "b")[0] == 2
    torch.manual_seed(999)  # whatever the caller did to the global RNGs in between
    resumed = LinTrainable()
    res = train(resumed, tmp_path / "b", **kw)
    assert res.start_step == 2 and resumed.batches == [2, 3, 4, 5]
    a, b = _params(straight.model), _params(resumed.model)
    assert all(torch.equal(a[k], b[k]) for k in a)
    log = [json.loads(x) for x in (tmp_path / "b" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6]  # the crashed run's lines past step 2 are dropped
    log_a = [json.loads(x) for x in (tmp_path / "a" / "train_log.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in log_a] == pytest.approx([r["loss"] for r in log], abs=1e-7)
    assert {"step", "loss", "mse", "lr", "sec_per_step", "grad_norm"} <= set(log[0])
    # an up-to-date run resumed again changes nothing
    again = LinTrainable()
    assert train(again, tmp_path / "b", **kw).start_step == 6
    assert all(torch.equal(a[k], _params(again.model)[k]) for k in a)


def test_resume_equivalence_diffup(tmp_path):
    from test_diffup_segmenter import ToySource

    source = ToySource()
    cfg = DiffUpConfig(**TINY)
    kw = dict(steps=4, batch_size=2, save_every=2, progress=False)
    straight = DiffUpTrainable(source, cfg, seed=0, progress=False)
    train(straight, tmp_path / "a", **kw)
    with pytest.raises(Crash):
        train(crash_at(DiffUpTrainable(source, cfg, seed=0, progress=False), 2), tmp_path / "b", **kw)
    random.seed(5)
    np.random.seed(5)
    torch.manual_seed(5)
    resumed = DiffUpTrainable(source, cfg, seed=0, progress=False)
    assert train(resumed, tmp_path / "b", **kw).start_step == 2
    for name in ("uapf", "uqdd"):
        a, b = _params(straight.modules()[name]), _params(resumed.modules()[name])
        assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6, name
    # the training moved the weights at all
    fresh = _params(DiffUpTrainable(source, cfg, seed=0, progress=False).uqdd)
    assert any(not torch.equal(fresh[k], _params(straight.uqdd)[k]) for k in fresh)


def test_checkpoints_hold_no_pickle(tmp_path):
    from test_diffup_segmenter import ToySource

    trainable = DiffUpTrainable(ToySource(), DiffUpConfig(**TINY), seed=0, progress=False)
    train(trainable, tmp_path, steps=2, batch_size=2, save_every=1, progress=False, keep_last=1)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["checkpoint-2", "final", "train_log.jsonl"]  # keep_last=1 pruned checkpoint-1
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert not [p for p in files if p.suffix in FORBIDDEN]
    assert {p.suffix for p in files} == {".json", ".safetensors", ".jsonl"}
    for sub in ("checkpoint-2", "final"):
        for model in ("uapf", "uqdd"):
            assert sorted(p.name for p in (tmp_path / sub / model).iterdir()) == [
                "config.json", "diffusion_pytorch_model.safetensors"]
    for p in files:  # every file is JSON(L) or a well-formed safetensors file, never a pickle stream
        raw = p.read_bytes()
        if p.suffix == ".safetensors":  # 8-byte little-endian header length, then a JSON header
            n = int.from_bytes(raw[:8], "little")
            assert raw[8:9] == b"{" and isinstance(json.loads(raw[8:8 + n]), dict)
        else:
            assert not raw.startswith(b"\x80")  # pickle protocol 2+ opens with PROTO (0x80)
    state = json.loads((tmp_path / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["step"] == 2 and state["settings"]["batch_size"] == 2


def test_flatten_round_trip_optimizer_scheduler_rng():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.8, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda("cosine", 10, 2))
    model(torch.randn(2, 3)).sum().backward()
    opt.step()
    sched.step()
    for obj in (opt.state_dict(), sched.state_dict(), rng_states()):
        skel, tensors = flatten_state(obj, "x")
        json.dumps(skel)  # JSON-able
        back = unflatten_state(json.loads(json.dumps(skel)), tensors)

        def same(u, v):
            if isinstance(u, torch.Tensor):
                return isinstance(v, torch.Tensor) and torch.equal(u, v)
            if isinstance(u, np.ndarray):
                return isinstance(v, np.ndarray) and u.dtype == v.dtype and np.array_equal(u, v)
            if isinstance(u, dict):
                return isinstance(v, dict) and u.keys() == v.keys() and all(same(u[k], v[k]) for k in u)
            if isinstance(u, (list, tuple)):
                return type(u) is type(v) and len(u) == len(v) and all(same(a, b) for a, b in zip(u, v))
            return u == v

        assert same(obj, back)
    state = rng_states()
    expected = (torch.rand(3), np.random.rand(3), random.random())
    set_rng_states(unflatten_state(*flatten_state(state)))
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], got[0]) and np.array_equal(expected[1], got[1]) and expected[2] == got[2]
    with pytest.raises(FsdiffError, match="pickle"):
        flatten_state({"f": object()})


def test_lr_schedule_values():
    f = lr_lambda("cosine", 10, 2)
    assert [f(0), f(1)] == [0.5, 1.0]
    assert f(2) == 1.0 and f(6) == pytest.approx(0.5) and f(10) == pytest.approx(0.0)
    assert f(4) == pytest.approx(0.5 * (1 + math.cos(math.pi * 2 / 8)))
    g = lr_lambda("constant", 10, 0)
    assert g(0) == g(9) == 1.0


@pytest.mark.parametrize(
    "kw,match",
    [(dict(steps=0), "steps"), (dict(steps=2, schedule="linear"), "schedule"),
     (dict(steps=2, mixed_precision="fp8"), "mixed_precision"), (dict(steps=2, lr=0), "lr"),
     (dict(steps=2, batch_size=0), "batch_size"), (dict(steps=2, max_grad_norm=-1), "max_grad_norm")],
)
def test_bad_arguments(tmp_path, kw, match):
    with pytest.raises(FsdiffError, match=match):
        train(LinTrainable(), tmp_path, progress=False, **kw)


def test_resume_with_other_settings_is_refused(tmp_path):
    train(LinTrainable(), tmp_path, steps=2, batch_size=2, save_every=1, progress=False)
    with pytest.raises(FsdiffError, match="batch_size"):
        train(LinTrainable(), tmp_path, steps=4, batch_size=3, save_every=1, progress=False)
    with pytest.raises(FsdiffError, match="past steps"):
        train(LinTrainable(), tmp_path, steps=1, batch_size=2, save_every=1, progress=False)
    res = train(LinTrainable(), tmp_path, steps=3, batch_size=2, save_every=1, progress=False, resume=False)
    assert res.start_step == 0


def test_nan_loss_stops_with_a_clear_error(tmp_path):
    t = LinTrainable()
    t.loss = lambda batch, generator: {"loss": torch.tensor(float("nan"), requires_grad=True)}
    with pytest.raises(FsdiffError, match="lower lr"):
        train(t, tmp_path, steps=2, progress=False)


def test_stale_temporary_checkpoints_are_ignored(tmp_path):
    stale = tmp_path / ".checkpoint-5.tmp-123"
    stale.mkdir(parents=True)
    (stale / "trainer_state.json").write_text("{}")
    half = tmp_path / "checkpoint-7"  # no trainer state: not complete, never resumed from
    half.mkdir()
    assert latest_checkpoint(tmp_path) is None
    res = train(LinTrainable(), tmp_path, steps=1, progress=False)
    assert res.start_step == 0 and not stale.exists()


def test_train_diffup_entry_and_cpu_config(tmp_path):
    from test_diffup_segmenter import ToySource

    from fsdiff.methods.diffup.training import CPU_CONFIG, cpu_config, train_diffup

    cfg = cpu_config()
    got = (cfg.input_size, cfg.mask_size, cfg.prior_size, cfg.base_channels, cfg.layers_per_block)
    assert got == (448, 64, 56, 32, 1)
    assert cpu_config(base_channels=16).base_channels == 16 and CPU_CONFIG["mask_stride"] == 7
    assert cfg.query_channels == 0 and cfg.prior_matmul_dtype == "bfloat16" and cfg.residual_prior and cfg.uapf_anchor
    assert cfg.anchor_channels == [5, 8]  # contrast maps of levels 1 and 2, the prototype method's levels
    assert cfg.prior_maps == ("proto", "pix", "contrast") and cfg.train_pooled_prob == 0.0  # the shipped recipe
    before = torch.get_num_threads()
    res = train_diffup(ToySource(), tmp_path, config=DiffUpConfig(**TINY), steps=1, batch_size=2, save_every=1,
                       progress=False, num_threads=1)
    assert torch.get_num_threads() == before
    assert res.final_dir == tmp_path / "final" and (tmp_path / "checkpoint-1" / "trainer_state.json").is_file()
    meta = json.loads((tmp_path / "final" / "fsdiff_checkpoint.json").read_text())
    assert meta["encoder"] == "efficientnet-lite0" and meta["provenance"]["trainer"]["lr"] == 3e-4


def test_make_batch_is_seeded_collated_and_uses_text(tmp_path):
    from test_diffup_baft import make_tiny_clip
    from test_diffup_segmenter import ToySource

    cfg = DiffUpConfig(**{**TINY, "max_shots": 3})
    t = DiffUpTrainable(ToySource(n=8), cfg, text_model=make_tiny_clip(tmp_path), seed=0, progress=False)
    a = t.make_batch(0, np.random.default_rng(7), 6)
    b = t.make_batch(0, np.random.default_rng(7), 6)
    c = t.make_batch(0, np.random.default_rng(8), 6)
    assert a.keys() == {"priors", "type_ids", "present", "gt", "query_rgb", "query_extra"}
    assert all(torch.equal(a[k], b[k]) for k in a) and not torch.equal(a["gt"], c["gt"])
    k = a["priors"].shape[1]
    assert a["priors"].shape == (6, k, cfg.prior_channels, 8, 8) and cfg.prior_channels == 9 and a["type_ids"].shape == a["present"].shape == (6, k)
    assert a["gt"].shape == (6, 1, 16, 16) and a["query_rgb"].shape == (6, 3, 16, 16)
    assert a["query_extra"].shape == (6, 1, 8, 8)
    assert torch.all(a["priors"][~a["present"]] == 0) and torch.all((a["priors"] >= 0) & (a["priors"] <= 1))
    batches = [t.make_batch(s, np.random.default_rng(s), 8) for s in range(3)]
    ids = torch.cat([x["type_ids"][x["present"]] for x in batches])
    assert set(ids.tolist()) == {0, 1, 2, 3}  # mask, box, scribble and text shots all occur
    mem = t.memory_bytes()
    assert mem["images"] == 8 and mem["clip"] > 0
    assert mem["total"] == sum(mem[x] for x in ("features", "clip", "rgb", "labels"))
    # the flip: the same episode seed with flip_prob 0 / 1 gives mirrored GT
    t.flip_prob = 0.0
    e0 = t.episode(np.random.default_rng(3))
    t.flip_prob = 1.0
    e1 = t.episode(np.random.default_rng(3))
    assert e0["query"] == e1["query"] and torch.equal(e0["gt"].flip(-1), e1["gt"])
    assert torch.equal(e0["query_rgb"].flip(-1), e1["query_rgb"])
    out = t.loss(a, torch.Generator().manual_seed(0))
    assert torch.isfinite(out["loss"]) and "t" not in out


def test_pooled_training_episodes_match_the_pooled_segmenter_prior():
    """train_pooled_prob=1: a K > 1 episode carries one prior, pooled over its shots exactly as the
    segmenter's kshot='pooled' builds it, typed by the finest annotation; 0 keeps one prior per shot."""
    from test_diffup_segmenter import ToySource

    from fsdiff.methods.diffup.baft import config_prior_kwargs, pooled_prior, support_regions
    cfg = DiffUpConfig(**{**TINY, "max_shots": 3, "train_pooled_prob": 1.0, "prior_maps": ("contrast", "self")})
    t = DiffUpTrainable(ToySource(n=8), cfg, seed=0, progress=False, flip_prob=0.0)
    seen = 0
    for seed in range(12):
        e = t.episode(np.random.default_rng(seed))
        if len(e["supports"]) < 2:
            assert not e["pooled"] and len(e["priors"]) == len(e["supports"])
            continue
        seen += 1
        assert e["pooled"] and len(e["priors"]) == 1 and e["priors"][0].shape == (cfg.prior_channels, 8, 8)
        assert e["types"] == [cfg.finest_type(e["shot_types"])]
        qf = [f.float() for f in t.feats[e["query"]]]
        shots = []
        for s_, ann in zip(e["supports"], e["annotations"]):
            fg, bg = support_regions(ann, t.ann[(s_, e["class_id"])].shape)
            shots.append(([f.float() for f in t.feats[s_]], fg, bg))
        torch.testing.assert_close(e["priors"][0], pooled_prior(qf, shots, 8, **config_prior_kwargs(cfg)))
    assert seen >= 3
    cfg0 = DiffUpConfig(**{**TINY, "max_shots": 3})
    t0 = DiffUpTrainable(ToySource(n=8), cfg0, seed=0, progress=False)
    multi = [e for e in (t0.episode(np.random.default_rng(s)) for s in range(12)) if len(e["supports"]) > 1]
    assert multi and all(not e["pooled"] and len(e["priors"]) == len(e["supports"]) for e in multi)


def test_train_class_subset_and_unknown_class():
    from test_diffup_segmenter import ToySource

    src = ToySource()
    ids = src.class_ids()
    assert src.select_classes() == ids and src.select_classes(list(reversed(ids[:1]))) == ids[:1]
    t = DiffUpTrainable(src, DiffUpConfig(**TINY), classes=ids[:1], precompute=False, progress=False)
    assert t.classes == ids[:1]
    with pytest.raises(FsdiffError, match=r"classes \[999\] are not classes of the toy source"):
        DiffUpTrainable(src, DiffUpConfig(**TINY), classes=[999], precompute=False, progress=False)


def test_crop_helpers_by_hand():
    from fsdiff.methods.diffup.training import crop_array, crop_map, crop_window

    a = np.arange(16, dtype=np.uint8).reshape(4, 4)
    window = (0.0, 0.5, 0.5, 1.0)  # the top-right quarter
    np.testing.assert_array_equal(crop_array(a, window, nearest=True), np.kron(a[:2, 2:], np.ones((2, 2), np.uint8)))
    rgb = np.stack([a, a + 1, a + 2])
    np.testing.assert_array_equal(crop_array(rgb, window, nearest=True)[1],
                                  np.kron(a[:2, 2:] + 1, np.ones((2, 2), np.uint8)))
    x = torch.arange(32, dtype=torch.float32).reshape(2, 4, 4)
    torch.testing.assert_close(crop_map(x, (0.0, 1.0, 0.0, 1.0)), x)  # the full window is the identity
    const = torch.full((1, 8, 8), 3.0)
    const[:, :4, 4:] = 7.0
    torch.testing.assert_close(crop_map(const, window), torch.full((1, 8, 8), 7.0))
    levels = [torch.zeros(1, 56, 56), torch.zeros(1, 14, 14)]
    for seed in range(20):
        y0, y1, x0, x1 = crop_window(levels, np.random.default_rng(seed), 0.6)
        for v in (y0, y1, x0, x1):
            assert abs(v * 14 - round(v * 14)) < 1e-9  # whole cells of the coarsest level
        assert 0 <= y0 < y1 <= 1 and 0 <= x0 < x1 <= 1 and 8 / 14 <= y1 - y0 <= 1 and 8 / 14 <= x1 - x0 <= 1


def test_crop_training_episodes_crop_every_query_map_together():
    """train_crop_prob=1: the GT is the cropped cached label, the priors are BAFT's on the cropped features."""
    from test_diffup_segmenter import ToySource

    from fsdiff.methods.diffup.baft import config_prior_kwargs, shot_prior, support_regions
    from fsdiff.methods.diffup.training import crop_array, crop_map

    cfg = DiffUpConfig(**{**TINY, "max_shots": 2, "train_crop_prob": 1.0, "train_crop_min": 0.5})
    t = DiffUpTrainable(ToySource(n=8), cfg, seed=0, progress=False, flip_prob=0.0)
    cropped = 0
    for seed in range(6):
        e = t.episode(np.random.default_rng(seed))
        window = e["crop"]
        assert window is not None
        cropped += window != (0.0, 1.0, 0.0, 1.0)
        gt = crop_array(t.gt[(e["query"], e["class_id"])], window, nearest=True)
        np.testing.assert_array_equal(e["gt"][0].numpy(), gt.astype(np.float32))
        qf = [crop_map(f.float(), window) for f in t.feats[e["query"]]]
        for prior, s_, ann in zip(e["priors"], e["supports"], e["annotations"]):
            fg, bg = support_regions(ann, t.ann[(s_, e["class_id"])].shape)
            want = shot_prior(qf, [f.float() for f in t.feats[s_]], fg, 8, background=bg, **config_prior_kwargs(cfg))
            torch.testing.assert_close(prior, want)
    assert cropped >= 3
    off = DiffUpTrainable(ToySource(n=8), DiffUpConfig(**TINY), seed=0, progress=False)
    assert off.episode(np.random.default_rng(0))["crop"] is None
    with pytest.raises(Exception, match="train_crop_min"):
        DiffUpConfig(**{**TINY, "train_crop_min": 0.0})
