"""The common checkpoint layout (fsdiff.checkpoint): round trip, run folders, legacy folders, bad folders."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config

from fsdiff.checkpoint import INFO_FILE, expected_files, load_module, read_checkpoint, write_checkpoint
from fsdiff.errors import FsdiffError
from fsdiff.methods.diffup.shipped import ALL_CLASSES, shipped_root


class Tiny(ModelMixin, ConfigMixin):
    @register_to_config
    def __init__(self, width: int = 3):
        super().__init__()
        self.lin = torch.nn.Linear(width, 1)


def _write(tmp_path, **kw):
    torch.manual_seed(0)
    mods = {"a": Tiny(3), "b": Tiny(4).to(torch.float16)}
    return mods, write_checkpoint(tmp_path / "ck", "toy", mods, {"x": (1, 2)}, encoder="enc", provenance={"step": 5}, **kw)


def test_round_trip_and_float32_loading(tmp_path):
    mods, d = _write(tmp_path)
    files = sorted(p.relative_to(d).as_posix() for p in d.rglob("*") if p.is_file())
    assert files == sorted(expected_files(("a", "b")))
    info = read_checkpoint(d, "toy")
    assert (info.method, info.modules, info.config, info.encoder, info.provenance) == (
        "toy", ("a", "b"), {"x": [1, 2]}, "enc", {"step": 5})
    b = load_module(info, "b", Tiny)
    assert b.lin.weight.dtype == torch.float32 and not b.training
    assert torch.equal(b.lin.weight, mods["b"].lin.weight.float())
    (tmp_path / "run").mkdir()
    shutil.move(str(d), tmp_path / "run" / "final")
    assert read_checkpoint(tmp_path / "run", "toy").directory == tmp_path / "run" / "final"


def test_bad_folders_name_the_problem(tmp_path):
    _, d = _write(tmp_path)
    with pytest.raises(FsdiffError, match="is a toy checkpoint, not a diffup one"):
        read_checkpoint(d, "diffup")
    with pytest.raises(FsdiffError, match="nowhere does not exist.*train it"):
        read_checkpoint(tmp_path / "nowhere", "toy", hint="train it")
    with pytest.raises(FsdiffError, match="is a file, not a folder"):
        read_checkpoint(d / INFO_FILE, "toy")
    (d / "b" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(FsdiffError, match="incomplete: missing b/diffusion_pytorch_model.safetensors"):
        read_checkpoint(d, "toy")
    doc = json.loads((d / INFO_FILE).read_text())
    (d / INFO_FILE).write_text(json.dumps({**doc, "version": 99}))
    with pytest.raises(FsdiffError, match="newer fsdiff"):
        read_checkpoint(d, "toy")
    (d / INFO_FILE).write_text("[" * 100_000)
    with pytest.raises(FsdiffError, match="not valid JSON"):
        read_checkpoint(d, "toy")
    (d / INFO_FILE).unlink()
    with pytest.raises(FsdiffError, match=f"holds no {INFO_FILE}"):
        read_checkpoint(d, "toy")


def test_legacy_diffup_folder_reads_like_the_new_one(tmp_path):
    new = read_checkpoint(shipped_root() / ALL_CLASSES, "diffup")
    old = tmp_path / "old"
    shutil.copytree(new.directory, old)
    (old / INFO_FILE).unlink()
    legacy = {"format": "fsdiff-diffup", "version": 1, "encoder": new.encoder, "config": new.config,
              "provenance": new.provenance}
    (old / "diffup.json").write_text(json.dumps(legacy))
    info = read_checkpoint(old, "diffup")
    assert (info.modules, info.config, info.encoder, info.provenance) == (
        new.modules, new.config, new.encoder, new.provenance)


def test_legacy_diffseg_folder(tmp_path):
    d = tmp_path / "ds"
    for name in ("pam", "scm"):
        Tiny().save_pretrained(d / name)
    (d / "diffseg_config.json").write_text(json.dumps({"input_size": 64}))
    (d / "diffseg_train.json").write_text(json.dumps({"step": 3}))
    info = read_checkpoint(d, "diffseg")
    assert (info.modules, info.config, info.provenance) == (("pam", "scm"), {"input_size": 64}, {"step": 3})
