"""DiffSeg training through the shared trainer (fsdiff.train): the SGD / StepLR options of train(), the
DiffSeg trainable (episodes, batches, cache, checkpoints), resume equivalence and the loss going down, on the
tiny Kandinsky 2.2 stand-ins (fsdiff.diffusion.tiny) at 64 px."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config

from fsdiff.data.base import FewShotSource
from fsdiff.errors import FsdiffError
from fsdiff.train import latest_checkpoint, lr_lambda, train

pytest.importorskip("transformers", reason="the diffusion extra is not installed: pip install -e '.[diffusion]'")

from fsdiff.diffusion.loading import load_kandinsky  # noqa: E402
from fsdiff.diffusion.tiny import build_tiny_kandinsky  # noqa: E402
from fsdiff.methods.diffseg import DiffSegConfig, DiffSegSegmenter, make_training_batch  # noqa: E402
from fsdiff.methods.diffseg.training import (  # noqa: E402
    DiffSegTrainable,
    steps_per_epoch,
    train_diffseg,
)

SIZE = 64
SMALL = dict(input_size=SIZE, attention_common_size=8, pam_width=16, pam_heads=2, scm_width=16,
             scm_feature_channels=8, scm_edge_channels=(4, 8, 8, 16), scm_mlp_ratio=2, dtype="fp32", device="cpu")
ALLOWED_SUFFIXES = {".json", ".safetensors"}


# ----------------------------------------------------------------------------------------------------------------
# The generic trainer: optimizer='sgd' and schedule='step'
# ----------------------------------------------------------------------------------------------------------------


class Lin(ModelMixin, ConfigMixin):
    config_name = "config.json"

    @register_to_config
    def __init__(self, width: int = 8):
        super().__init__()
        self.a = torch.nn.Linear(4, width)
        self.b = torch.nn.Linear(width, 1)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


class LinTrainable:
    name = "lin"

    def __init__(self) -> None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.model = Lin()

    def modules(self):
        return {"lin": self.model}

    def make_batch(self, step, rng, batch_size):
        x = torch.from_numpy(rng.standard_normal((batch_size, 4)).astype(np.float32))
        return {"x": x, "y": x.sum(1, keepdim=True)}

    def loss(self, batch, generator):
        return {"loss": ((self.model(batch["x"]) - batch["y"]) ** 2).mean()}

    def save(self, directory, meta):
        self.model.save_pretrained(Path(directory) / "lin")


def test_step_schedule_matches_torch_steplr():
    f = lr_lambda("step", 100, 0, step_size=20, gamma=0.9)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    ref = torch.optim.lr_scheduler.StepLR(opt, step_size=20, gamma=0.9)
    for s in range(100):
        assert f(s) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-12), s
        opt.step()
        ref.step()
    g = lr_lambda("step", 100, 4, step_size=3, gamma=0.5)  # warm-up first, then the steps count from its end
    assert [g(s) for s in range(11)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.25]


def test_sgd_step_is_torch_sgd(tmp_path):
    """One trainer step with optimizer='sgd' equals a hand-made torch SGD step (decay on >= 2-D weights only)."""
    t = LinTrainable()
    before = {k: v.detach().clone() for k, v in t.model.named_parameters()}
    train(t, tmp_path, steps=1, batch_size=4, lr=0.1, weight_decay=0.01, optimizer="sgd", momentum=0.9,
          schedule="constant", max_grad_norm=None, progress=False)
    ref = LinTrainable()
    from fsdiff.train import derive_rng

    batch = ref.make_batch(0, derive_rng(0, "batch", 0, 0), 4)
    ref.loss(batch, None)["loss"].backward()
    with torch.no_grad():
        for name, p in ref.model.named_parameters():
            wd = 0.01 if p.ndim >= 2 else 0.0
            expected = before[name] - 0.1 * (p.grad + wd * before[name])
            assert torch.allclose(dict(t.model.named_parameters())[name], expected, atol=1e-7), name


def test_sgd_step_schedule_logged_and_resumable(tmp_path):
    kw = dict(steps=6, batch_size=4, lr=0.05, optimizer="sgd", momentum=0.9, schedule="step", step_size=2,
              gamma=0.5, save_every=2, log_every=1, progress=False)
    straight = LinTrainable()
    train(straight, tmp_path / "a", **kw)
    log = [json.loads(x) for x in (tmp_path / "a" / "train_log.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in log] == pytest.approx([0.05, 0.05, 0.025, 0.025, 0.0125, 0.0125])
    state = json.loads((tmp_path / "a" / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["settings"]["optimizer"] == "sgd" and state["settings"]["step_size"] == 2
    assert state["optimizer"]["param_groups"][0]["momentum"] == 0.9

    # stop after checkpoint-4, resume: same weights as the uninterrupted run
    train(LinTrainable(), tmp_path / "b", **dict(kw, steps=4))
    resumed = LinTrainable()
    assert train(resumed, tmp_path / "b", **kw).start_step == 4
    for (name, a), (_, b) in zip(straight.model.named_parameters(), resumed.model.named_parameters()):
        assert torch.equal(a, b), name
    with pytest.raises(FsdiffError, match="optimizer"):
        train(LinTrainable(), tmp_path / "b", **dict(kw, steps=8, optimizer="adamw"))
    with pytest.raises(FsdiffError, match="step_size"):
        train(LinTrainable(), tmp_path / "b", **dict(kw, steps=8, step_size=3))


def test_default_adamw_checkpoints_stay_compatible(tmp_path):
    """A run without the new options writes no new setting and resumes as before."""
    train(LinTrainable(), tmp_path, steps=2, batch_size=2, save_every=1, progress=False)
    state = json.loads((tmp_path / "checkpoint-2" / "trainer_state.json").read_text())
    assert not {"optimizer", "momentum", "step_size", "gamma"} & set(state["settings"])
    assert train(LinTrainable(), tmp_path, steps=3, batch_size=2, save_every=1, progress=False).start_step == 2
    with pytest.raises(FsdiffError, match="optimizer"):
        train(LinTrainable(), tmp_path, steps=4, batch_size=2, save_every=1, progress=False, optimizer="sgd")


@pytest.mark.parametrize(
    "kw,match",
    [(dict(optimizer="adam"), "optimizer"), (dict(schedule="step"), "step_size"),
     (dict(schedule="step", step_size=0), "step_size"), (dict(schedule="step", step_size=2, gamma=0), "gamma"),
     (dict(optimizer="sgd", momentum=1.0), "momentum")],
)
def test_bad_optimizer_arguments(tmp_path, kw, match):
    with pytest.raises(FsdiffError, match=match):
        train(LinTrainable(), tmp_path, steps=2, progress=False, **kw)


# ----------------------------------------------------------------------------------------------------------------
# DiffSeg
# ----------------------------------------------------------------------------------------------------------------


class ToySource(FewShotSource):
    """Noise images with a bright square (class 0) or disc (class 1); a few ignore (255) pixels."""

    name = "toy"

    def __init__(self, n: int = 6, seed: int = 0, classes: tuple[int, ...] = (0, 1)):
        super().__init__()
        self.classes = [(c, ("square", "disc")[c]) for c in classes]
        rng = np.random.default_rng(seed)
        self.data: dict[str, tuple[np.ndarray, int, np.ndarray]] = {}
        for i in range(n):
            c = classes[i % len(classes)]
            h, w = int(rng.integers(56, 90)), int(rng.integers(56, 90))
            img = rng.integers(0, 100, (h, w, 3), dtype=np.uint8)
            m = np.zeros((h, w), np.uint8)
            cy, cx, r = int(rng.integers(20, h - 20)), int(rng.integers(20, w - 20)), int(rng.integers(10, 18))
            if c == 0:
                m[cy - r:cy + r, cx - r:cx + r] = 1
            else:
                cv2.circle(m, (cx, cy), r, 1, -1)
            img[m == 1] = (230, 200, 40) if c == 0 else (40, 200, 230)
            m[:3] = 255
            self.data[f"img{i}"] = (img, c, m)
        self.loads = 0

    def images_of_class(self, class_id: int) -> list[str]:
        return [k for k, (_, c, _) in self.data.items() if c == class_id]

    def query_items(self) -> list[tuple[str, int]]:
        return [(k, c) for c, _ in self.classes for k in self.images_of_class(c)]

    def load(self, image_key: str, class_id: int):
        self.loads += 1
        img, c, m = self.data[image_key]
        return img.copy(), (m if c == class_id else np.zeros_like(m)).copy()

    def describe(self) -> dict:
        return {"dataset": "toy", "fold": None, "split": "trn"}


def sobel_edges(images: torch.Tensor) -> torch.Tensor:
    """A cheap stand-in for HED: (B, 3, S, S) on 0..255 -> (B, 1, S, S) in [0, 1]."""
    grey = images.float().mean(1, keepdim=True) / 255.0
    kx = torch.tensor([[-1.0, 0, 1], [-2, 0, 2], [-1, 0, 1]]).view(1, 1, 3, 3)
    gx = torch.nn.functional.conv2d(grey, kx, padding=1)
    gy = torch.nn.functional.conv2d(grey, kx.transpose(-1, -2), padding=1)
    return torch.tanh((gx ** 2 + gy ** 2).sqrt())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return build_tiny_kandinsky(tmp_path_factory.mktemp("diffseg_train_kandinsky"), seed=0)


@pytest.fixture(scope="module")
def parts(tiny: Any) -> Any:
    return load_kandinsky(tiny.prior, tiny.decoder, device="cpu", dtype="fp32")


def _config(tiny: Any, **changes: Any) -> DiffSegConfig:
    return DiffSegConfig(prior_model=str(tiny.prior), decoder_model=str(tiny.decoder), **dict(SMALL, **changes))


def _trainable(tiny: Any, parts: Any, source: FewShotSource | None = None, **kw: Any) -> DiffSegTrainable:
    cfg = kw.pop("config", None) or _config(tiny)
    return DiffSegTrainable(source or ToySource(), cfg, parts=parts, edge_detector=sobel_edges, **kw)


def _state(t: DiffSegTrainable) -> dict[str, torch.Tensor]:
    return {f"{n}.{k}": v.detach().clone() for n, m in t.modules().items() for k, v in m.state_dict().items()}


def test_batch_is_make_training_batch_of_the_episodes(tiny: Any, parts: Any) -> None:
    t = _trainable(tiny, parts, shots=2)
    seeds = np.random.default_rng(3).integers(0, 2**63 - 1, size=3)
    batch = t.make_batch(0, np.random.default_rng(3), 3)
    ref = make_training_batch([t.episode(np.random.default_rng(int(s))) for s in seeds], SIZE)
    assert set(batch) == set(ref) | {"query_edges"}
    for k, v in ref.items():
        assert torch.equal(batch[k], v), k
    assert batch["support_images"].shape == (3, 2, 3, SIZE, SIZE) and float(batch["query_valid"].min()) == 0.0
    with torch.no_grad():
        expected = sobel_edges(batch["query_image"] * 255.0)
    assert torch.allclose(batch["query_edges"], expected, atol=2e-3)  # float16 cache
    # a second identical draw is served from the cache (no loading, no edge detection) and is identical
    loads = t.source.loads
    again = t.make_batch(0, np.random.default_rng(3), 3)
    assert t.source.loads == loads and all(torch.equal(again[k], batch[k]) for k in batch)
    assert t.memory_bytes()["total"] > 0
    # without the SCM no edges are computed
    no_scm = _trainable(tiny, parts, config=_config(tiny, use_scm=False))
    assert "query_edges" not in no_scm.make_batch(0, np.random.default_rng(3), 2)
    assert set(no_scm.modules()) == {"pam"} and set(t.modules()) == {"pam", "scm"}


def test_episodes_use_only_classes_with_enough_images(tiny: Any, parts: Any) -> None:
    src = ToySource(n=5)  # class 0: 3 images, class 1: 2 images
    t = _trainable(tiny, parts, src, shots=2)
    assert t.classes == [0]
    for s in range(20):
        c, q, sup = t.draw(np.random.default_rng(s))
        assert c == 0 and q not in sup and len(set(sup)) == 2
    with pytest.raises(FsdiffError, match="at least 4 images"):
        _trainable(tiny, parts, src, shots=3)
    with pytest.raises(FsdiffError, match="not classes"):
        _trainable(tiny, parts, src, classes=[7])
    with pytest.raises(FsdiffError, match="shots"):
        _trainable(tiny, parts, src, shots=0)


def test_resume_equivalence_and_pickle_free_checkpoints(tiny: Any, parts: Any, tmp_path: Path) -> None:
    kw = dict(steps=4, batch_size=2, lr=0.05, optimizer="sgd", schedule="step", step_size=2, gamma=0.9,
              max_grad_norm=None, save_every=2, log_every=1, progress=False)
    straight = _trainable(tiny, parts)
    train(straight, tmp_path / "a", **kw)

    class Crash(Exception):
        pass

    crashing = _trainable(tiny, parts)
    orig = crashing.make_batch

    def make_batch(step, rng, bs):
        if step == 3:
            raise Crash()
        return orig(step, rng, bs)

    crashing.make_batch = make_batch  # type: ignore[method-assign]
    with pytest.raises(Crash):
        train(crashing, tmp_path / "b", **kw)
    assert latest_checkpoint(tmp_path / "b")[0] == 2
    torch.manual_seed(123)
    resumed = _trainable(tiny, parts)  # fresh weights and an empty cache
    assert train(resumed, tmp_path / "b", **kw).start_step == 2
    a, b = _state(straight), _state(resumed)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6
    fresh = _state(_trainable(tiny, parts))
    assert any(not torch.equal(fresh[k], a[k]) for k in a)  # training moved the weights
    log_a = [json.loads(x) for x in (tmp_path / "a" / "train_log.jsonl").read_text().splitlines()]
    log_b = [json.loads(x) for x in (tmp_path / "b" / "train_log.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in log_a] == pytest.approx([r["loss"] for r in log_b], rel=1e-5)
    assert {"loss_prior", "loss_latent"} <= set(log_a[0])

    for folder in ("checkpoint-2", "checkpoint-4", "final"):
        files = [p for p in (tmp_path / "b" / folder).rglob("*") if p.is_file()]
        assert files and all(p.suffix in ALLOWED_SUFFIXES for p in files), files
        names = {p.relative_to(tmp_path / "b" / folder).as_posix() for p in files}
        assert {"pam/config.json", "scm/config.json", "fsdiff_checkpoint.json"} <= names
        assert any(n.startswith("pam/") and n.endswith(".safetensors") for n in names)
    doc = json.loads((tmp_path / "b" / "final" / "fsdiff_checkpoint.json").read_text())
    info = doc["provenance"]
    assert doc["method"] == info["method"] == "diffseg" and doc["modules"] == ["pam", "scm"]
    assert doc["config"]["input_size"] == SIZE and info["step"] == 4 and info["trainer"]["optimizer"] == "sgd"

    # the final folder is a DiffSeg checkpoint the segmenter loads (same weights)
    seg = DiffSegSegmenter(checkpoint=tmp_path / "b" / "final", parts=parts)
    loaded = {f"pam.{k}": v for k, v in seg.model.pam.state_dict().items()}
    assert all(torch.equal(loaded[k], b[k]) for k in loaded)


def test_training_lowers_the_loss(tiny: Any, parts: Any, tmp_path: Path) -> None:
    src = ToySource(n=4, classes=(0,))
    t = _trainable(tiny, parts, src)
    probe = t.make_batch(0, np.random.default_rng(99), 4)  # the same batch before and after training
    with torch.no_grad():
        before = {k: float(v) for k, v in t.loss(probe).items()}
    res = train(t, tmp_path, steps=12, batch_size=2, lr=0.05, optimizer="sgd", momentum=0.9, weight_decay=1e-4,
                schedule="constant", max_grad_norm=None, log_every=1, progress=False)
    losses = [json.loads(x)["loss"] for x in res.log_path.read_text().splitlines()]
    assert len(losses) == 12 and all(math.isfinite(v) for v in losses)
    with torch.no_grad():
        after = {k: float(v) for k, v in t.loss(probe).items()}
    # PAM learns the latent term fast; the prior term only moves through the SCM (slowly, 12 steps)
    assert after["loss_latent"] < 0.5 * before["loss_latent"], (before, after, losses)
    assert after["loss_prior"] < before["loss_prior"] and after["loss"] < 0.9 * before["loss"], (before, after)


def test_train_diffseg_epoch_counts_only_the_trained_classes(tiny: Any, parts: Any, tmp_path: Path) -> None:
    src = ToySource()  # 6 images: 3 (image, class) pairs per class
    assert steps_per_epoch(src, 2, num_processes=1) == 3
    assert steps_per_epoch(src, 2, num_processes=1, classes=[0]) == math.ceil(3 / 2) == 2
    res = train_diffseg(src, tmp_path, config=_config(tiny, epochs=1, batch_size=2), parts=parts, classes=[0],
                        edge_detector=sobel_edges, save_every=0, progress=False)
    assert res.steps == 2  # one epoch of class 0's pairs, not of all six


def test_train_diffseg_recipe_in_epochs(tiny: Any, parts: Any, tmp_path: Path) -> None:
    src = ToySource()
    cfg = _config(tiny, lr_step_epochs=2, epochs=3, batch_size=2)
    epoch = steps_per_epoch(src, 2, num_processes=1)
    assert epoch == math.ceil(len(src.query_items()) / 2) == 3
    res = train_diffseg(src, tmp_path, config=cfg, parts=parts, edge_detector=sobel_edges, save_every=100,
                        progress=False)
    assert res.steps == 3 * epoch
    state = json.loads((tmp_path / f"checkpoint-{res.steps}" / "trainer_state.json").read_text())["settings"]
    assert state["optimizer"] == "sgd" and state["momentum"] == 0.9 and state["lr"] == 0.01
    assert state["weight_decay"] == 1e-4 and state["schedule"] == "step"
    assert state["step_size"] == 2 * epoch and state["gamma"] == 0.9 and state["max_grad_norm"] is None
    assert state["batch_size"] == 2
    log = [json.loads(x) for x in res.log_path.read_text().splitlines()]
    assert log[-1]["step"] == 9
    from fsdiff.checkpoint import read_checkpoint

    saved = DiffSegConfig.from_dict(read_checkpoint(tmp_path, "diffseg").config)  # a run folder resolves to final/
    assert saved.input_size == SIZE and saved.pam_width == 16


def test_coco_mini_batches(shared_data: Path, tiny: Any, parts: Any) -> None:
    from fsdiff.data import build_source

    src = build_source("coco", root=shared_data / "coco-mini", fold=0, split="trn")
    t = _trainable(tiny, parts, src)
    fold_val = {c for c, _ in build_source("coco", root=shared_data / "coco-mini", fold=0, split="val").classes}
    assert t.classes and not set(t.classes) & fold_val
    batch = t.make_batch(0, np.random.default_rng(0), 2)
    assert batch["query_image"].shape == (2, 3, SIZE, SIZE) and float(batch["query_mask"].sum()) > 0
    with torch.no_grad():
        out = t.loss(batch)
    assert torch.isfinite(out["loss"])
