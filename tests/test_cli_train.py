"""`fsdiff train` for both trainable methods, end to end on tiny data and models."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import write_folder_dataset
from fsdiff.cli import main

pytest.importorskip("transformers")


def _folder(root, n=4):
    write_folder_dataset(root, n)



def test_train_diffseg_on_tiny_kandinsky(tmp_path, capsys):
    from fsdiff.diffusion.tiny import build_tiny_kandinsky

    dirs = build_tiny_kandinsky(tmp_path / "kandinsky")
    _folder(tmp_path / "ds")
    out = tmp_path / "run"
    args = ["train", "diffseg", "--dataset", "folder", "--root", str(tmp_path / "ds"), "--prior", str(dirs.prior),
            "--decoder", str(dirs.decoder), "--input-size", "64", "--steps", "2", "--batch-size", "1", "--threads", "1",
            "--save-every", "1", "--no-progress", "--out", str(out)]
    assert main(args) == 0, capsys.readouterr().err
    files = {p.relative_to(out / "final").as_posix() for p in (out / "final").rglob("*") if p.is_file()}
    assert {"pam/config.json", "pam/diffusion_pytorch_model.safetensors", "scm/config.json"} <= files
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pkl", ".pth"))]
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert log and all(np.isfinite(r["loss"]) for r in log)


def test_train_diffseg_missing_models_is_a_clear_error(tmp_path, capsys):
    _folder(tmp_path / "ds")
    code = main(["train", "diffseg", "--dataset", "folder", "--root", str(tmp_path / "ds"), "--prior", str(tmp_path / "no-prior"),
                 "--decoder", str(tmp_path / "no-decoder"), "--steps", "1", "--no-progress", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and "kandinsky-community/kandinsky-2-2-prior" in err and "Traceback" not in err


def test_train_diffup_two_steps(tmp_path, capsys):
    _folder(tmp_path / "ds")
    out = tmp_path / "run"
    code = main(["train", "diffup", "--dataset", "folder", "--root", str(tmp_path / "ds"), "--steps", "2", "--batch-size", "2",
                 "--warmup", "0", "--threads", "1", "--no-progress", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    assert (out / "final" / "fsdiff_checkpoint.json").is_file() and (out / "final" / "uqdd" / "config.json").is_file()


def test_train_diffup_config_args(tmp_path, capsys):
    _folder(tmp_path / "ds")
    out = tmp_path / "run"
    base = ["train", "diffup", "--dataset", "folder", "--root", str(tmp_path / "ds"), "--steps", "1", "--batch-size", "1",
            "--warmup", "0", "--threads", "1", "--no-progress", "--save-every", "0"]
    code = main(base + ["--config-arg", "query_channels=0", "--config-arg", "input_size=64", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    doc = json.loads((out / "final" / "fsdiff_checkpoint.json").read_text())
    assert doc["config"]["query_channels"] == 0 and doc["config"]["input_size"] == 64
    assert doc["config"]["prior_matmul_dtype"] == "bfloat16"  # the rest is the CPU recipe
    for bad, word in (("no_such_field=1", "no_such_field"), ("query_channels", "KEY=VALUE"),
                      ("query_channels=-1", "query_channels")):
        code = main(base + ["--config-arg", bad, "--out", str(tmp_path / "bad")])
        err = capsys.readouterr().err
        assert code == 2 and word in err and "Traceback" not in err
        assert not (tmp_path / "bad" / "final").exists()


@pytest.mark.parametrize("method,extra,flag", [
    ("diffup", ["--prior", "kandinsky-community/kandinsky-2-2-prior"], "--prior"),
    ("diffup", ["--decoder", "some/dir"], "--decoder"),
    ("diffseg", ["--encoder", "efficientnet-lite2"], "--encoder"),
])
def test_train_rejects_the_other_methods_options(tmp_path, capsys, method, extra, flag):
    # each method's options come from its registry entry, so argparse refuses another method's before anything loads
    with pytest.raises(SystemExit) as exc:
        main(["train", method, "--dataset", "folder", "--root", str(tmp_path / "missing"), *extra,
              "--no-progress", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "unrecognized arguments" in err and flag in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_train_help_lists_the_trainable_methods_and_their_options(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert "diffup: DiffUp" in out and "diffseg: DiffSeg" in out and "prototype" not in out
    with pytest.raises(SystemExit):
        main(["train", "diffseg", "--help"])
    out = capsys.readouterr().out
    assert "--prior" in out and "--decoder" in out and "--encoder" not in out


def test_train_diffup_input_size_option(tmp_path, capsys):
    _folder(tmp_path / "ds")
    out = tmp_path / "run"
    base = ["train", "diffup", "--dataset", "folder", "--root", str(tmp_path / "ds"), "--steps", "1", "--batch-size", "1",
            "--warmup", "0", "--threads", "1", "--no-progress", "--save-every", "0"]
    assert main(base + ["--input-size", "64", "--out", str(out)]) == 0, capsys.readouterr().err
    assert json.loads((out / "final" / "fsdiff_checkpoint.json").read_text())["config"]["input_size"] == 64
    code = main(base + ["--input-size", "64", "--config-arg", "input_size=96", "--out", str(tmp_path / "bad")])
    err = capsys.readouterr().err
    assert code == 2 and "--input-size 64 disagrees" in err and "(96)" in err
    assert not (tmp_path / "bad").exists()
