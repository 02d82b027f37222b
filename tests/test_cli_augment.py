"""`fsdiff augment` and `--augment` end to end on tiny Stable Diffusion + ControlNet models."""

from __future__ import annotations

import json

import pytest

from conftest import write_folder_dataset
from fsdiff.cli import main

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    from fsdiff.diffusion.tiny import build_tiny_controlnet, build_tiny_stable_diffusion

    root = tmp_path_factory.mktemp("models")
    return build_tiny_stable_diffusion(root / "sd"), build_tiny_controlnet(root / "cn")


def _folder(root, n=2):
    write_folder_dataset(root, n, 40, 56)



def test_generate_list_check_then_segment_from_cache(tmp_path, capsys, tiny_models):
    sd, cn = tiny_models
    _folder(tmp_path / "ds")
    cache = tmp_path / "cache"
    common = ["--sd-model", str(sd), "--controlnet", str(cn)]
    code = main(["augment", "generate", "--dataset", "folder", "--root", str(tmp_path / "ds"), "--condition", "seg:2",
                 "--cache", str(cache), "--steps", "2", "--resolution", "64", "--no-progress", *common])
    out = capsys.readouterr()
    assert code == 0, out.err
    # 2 images x 1 class x 2 generated each
    assert main(["augment", "list", "--cache", str(cache)]) == 0
    listed = capsys.readouterr().out
    assert "4 cached image(s)" in listed
    rows = [json.loads(line) for line in listed.splitlines() if line.startswith("{")]
    assert {r["shard"] for r in rows} == {"0/1"} and {r["class_name"] for r in rows} == {"ds"}
    assert main(["augment", "check", "--cache", str(cache)]) == 0
    assert json.loads(capsys.readouterr().out)["ok"] is True

    ds = tmp_path / "ds"
    code = main(["segment", "--support", str(ds / "images/x0.png"), "--mask", str(ds / "masks/x0.png"), "--query", str(ds / "images/x1.png"),
                 "--out", str(tmp_path / "o"), "--augment", "seg:2", "--augment-cache", str(cache), "--augment-steps", "2",
                 "--augment-resolution", "64", "--class-name", "ds", *common])
    err = capsys.readouterr().err
    assert code == 0, err
    assert (tmp_path / "o" / "x1_mask.png").is_file()
    assert main(["augment", "list", "--cache", str(cache)]) == 0
    assert "4 cached image(s)" in capsys.readouterr().out  # segment read the cached images, generated none


@pytest.mark.parametrize("command", ["list", "check"])
def test_list_and_check_refuse_a_missing_cache(tmp_path, capsys, command):
    missing = tmp_path / "typo"
    assert main(["augment", command, "--cache", str(missing)]) == 2
    err = capsys.readouterr().err
    assert f"cache folder {missing} does not exist" in err and "Traceback" not in err
    assert not missing.exists()  # a typo must not create an empty cache


def test_augment_bad_input(tmp_path, capsys, tiny_models):
    _folder(tmp_path / "ds")
    code = main(["augment", "generate", "--dataset", "folder", "--root", str(tmp_path / "ds"), "--condition", "depth:2",
                 "--cache", str(tmp_path / "c")])
    assert code == 2 and "depth" in capsys.readouterr().err
    code = main(["augment", "generate", "--dataset", "folder", "--root", str(tmp_path / "ds"), "--cache", str(tmp_path / "c"), "--shard", "3/2"])
    assert code == 2 and "--shard" in capsys.readouterr().err
    code = main(["augment", "generate", "--dataset", "folder", "--root", str(tmp_path / "ds"), "--cache", str(tmp_path / "c"),
                 "--steps", "2", "--resolution", "64", "--no-progress", "--sd-model", str(tiny_models[0]), "--controlnet", str(tmp_path / "nope")])
    err = capsys.readouterr().err
    assert code == 2 and "nope" in err and "Traceback" not in err
