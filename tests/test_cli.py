"""The ``fsdiff`` command: outputs of segment/demo/eval and clear errors, no traceback, no partial files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fsdiff.cli import main

REPO = Path(__file__).resolve().parents[1]


def _photo(tmp_path: Path, name: str, h: int = 48, w: int = 64, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 60, (h, w, 3), dtype=np.uint8)
    arr[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4] = (200, 40, 40)  # a red square object
    path = tmp_path / name
    Image.fromarray(arr).save(path)
    return path


def _mask(tmp_path: Path, name: str, h: int = 48, w: int = 64) -> Path:
    m = np.zeros((h, w), np.uint8)
    m[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4] = 255
    path = tmp_path / name
    Image.fromarray(m).save(path)
    return path


def _run(argv, capsys):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_segment_writes_masks_probs_overlays(tmp_path, capsys):
    s, m, q = _photo(tmp_path, "s.png"), _mask(tmp_path, "s_mask.png"), _photo(tmp_path, "q.jpg", seed=1)
    out = tmp_path / "out"
    code, stdout, err = _run(["segment", "--support", s, "--mask", m, "--query", q, "--out", out], capsys)
    assert code == 0, err
    names = sorted(p.name for p in out.iterdir())
    assert names == ["fsdiff_outputs.jsonl", "q_mask.png", "q_overlay.jpg", "q_prob.png"]
    mask = np.asarray(Image.open(out / "q_mask.png"))
    assert mask.shape == (48, 64) and set(np.unique(mask)) <= {0, 255}
    prob = np.asarray(Image.open(out / "q_prob.png"))
    # the mask is the thresholded probability (0.5 -> 127.5 on the 0..255 scale)
    assert ((prob > 128) <= (mask == 255)).all() and ((prob < 127) <= (mask == 0)).all()
    # the red square should be found: more foreground inside than outside
    assert mask[14:34, 18:46].mean() > mask[:10].mean()


def test_segment_two_shots_mask_and_box(tmp_path, capsys):
    s1, m1 = _photo(tmp_path, "a.png"), _mask(tmp_path, "a_mask.png")
    s2, q = _photo(tmp_path, "b.png", seed=2), _photo(tmp_path, "q.png", seed=3)
    code, stdout, err = _run(
        ["segment", "--support", s1, "--mask", m1, "--support", s2, "--box", "16,12,48,36", "--query", q, q, "--out", tmp_path / "o"],
        capsys,
    )
    assert code == 0, err
    # two queries with the same name get distinct file names
    assert {p.name for p in (tmp_path / "o").iterdir()} >= {"q_png_mask.png", "q_png_1_mask.png"}


@pytest.mark.parametrize(
    "make_args, message",
    [
        (lambda t: ["--support", _photo(t, "s.png"), "--mask", _mask(t, "m.png", 40, 64), "--query", _photo(t, "q.png")], "does not match its image"),
        (lambda t: ["--support", _photo(t, "s.png"), "--mask", t / "missing.png", "--query", _photo(t, "q.png")], "not found"),
        (lambda t: ["--support", _photo(t, "s.png"), "--box", "1,2,3", "--query", _photo(t, "q.png")], "four numbers"),
        (lambda t: ["--support", _photo(t, "s.png"), "--box", "0,0,100,10", "--query", _photo(t, "q.png")], "outside the 64x48 image"),
        (lambda t: ["--support", _photo(t, "s.png"), "--query", _photo(t, "q.png")], "no annotation"),
        (lambda t: ["--support", _photo(t, "s.png"), "--points", "100,10", "--query", _photo(t, "q.png")],
         "point (100, 10) lies outside the 64x48 image; give pixel coordinates with 0 <= x < 64"),
        (lambda t: ["--support", _photo(t, "s.png"), "--points", "3,4,0", "--query", _photo(t, "q.png")], "no positive point"),
        (lambda t: ["--support", _photo(t, "s.png"), "--box", "5,5,5,20", "--query", _photo(t, "q.png")], "is empty; it needs x1 > x0"),
        (lambda t: ["--support", _photo(t, "s.png"), "--scribble", _photo(t, "s.png"), "--query", _photo(t, "q.png")], "does not look like a scribble"),
        (lambda t: ["--support", _photo(t, "s.png"), "--mask", _mask(t, "m.png"), "--query", _photo(t, "q.png"), "--encoder", "resnet-9000"], "unknown encoder 'resnet-9000'"),
    ],
)
def test_segment_bad_input(tmp_path, capsys, make_args, message):
    out = tmp_path / "out"
    code, stdout, err = _run(["segment", *make_args(tmp_path), "--out", out], capsys)
    assert code == 2
    assert message in err and "Traceback" not in err
    assert not out.exists(), "no partial output on bad input"


def test_empty_mask_and_truncated_query(tmp_path, capsys):
    empty = tmp_path / "empty.png"
    Image.fromarray(np.zeros((48, 64), np.uint8)).save(empty)
    code, _, err = _run(["segment", "--support", _photo(tmp_path, "s.png"), "--mask", empty, "--query", _photo(tmp_path, "q.png"), "--out", tmp_path / "o"], capsys)
    assert code == 2 and "support mask is empty" in err
    q = _photo(tmp_path, "q.jpg")
    q.write_bytes(q.read_bytes()[:200])
    code, _, err = _run(["segment", "--support", _photo(tmp_path, "s.png"), "--mask", _mask(tmp_path, "m.png"), "--query", q, "--out", tmp_path / "o"], capsys)
    assert code == 2 and "truncated or corrupt" in err
    assert not (tmp_path / "o").exists()


def test_annotation_before_support_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["segment", "--mask", "m.png", "--support", "s.png", "--query", "q.png", "--out", str(tmp_path)])
    assert exc.value.code == 2
    assert "comes before any --support" in capsys.readouterr().err


def test_demo_writes_overlays(tmp_path, capsys):
    code, stdout, err = _run(["demo", "--out", tmp_path / "demo"], capsys)
    assert code == 0, err
    overlays = sorted((tmp_path / "demo").rglob("*_overlay.jpg"))
    assert len(overlays) == 5
    assert (tmp_path / "demo" / "demo.json").is_file() and (tmp_path / "demo" / "contact_sheet.png").is_file()
    assert "IoU" in stdout and "fish-from-box" in stdout and "mean" in stdout
    # a second run replaces its own files; a file fsdiff did not write is refused before any work
    assert _run(["demo", "--out", tmp_path / "demo"], capsys)[0] == 0
    (tmp_path / "demo" / "contact_sheet.png").unlink()
    (tmp_path / "demo" / "contact_sheet.png").write_text("mine")
    code, _, err = _run(["demo", "--out", tmp_path / "demo"], capsys)
    assert code == 2 and "fsdiff did not write" in err
    assert (tmp_path / "demo" / "contact_sheet.png").read_text() == "mine"


def _user_folder(root):
    """Four photos with masks in the user-folder layout (images/, masks/)."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(4):
        _photo(root / "images", f"x{i}.png", seed=i)
        _mask(root / "masks", f"x{i}.png")
    return root


def test_eval_on_a_user_folder(tmp_path, capsys):
    root = _user_folder(tmp_path / "ds")
    out = tmp_path / "report"
    code, stdout, err = _run(["eval", "--dataset", "folder", "--root", root, "--shots", "1", "--out", out, "--no-progress"], capsys)
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert 0 <= summary["miou"] <= 100 and 0 <= summary["fbiou"] <= 100
    assert summary["shots"] == 1 and summary["method"] == "prototype"
    assert (out / "per_class.csv").read_text().startswith("class_id,class_name,iou")
    code, _, err = _run(["eval", "--dataset", "folder", "--root", root, "--calibrate-threshold", "5",
                         "--out", tmp_path / "cal", "--no-progress"], capsys)
    assert code == 2 and "needs a benchmark with base classes" in err and not (tmp_path / "cal").exists()
    code, _, err = _run(["eval", "--dataset", "folder", "--root", root, "--split", "trn",
                         "--out", tmp_path / "split", "--no-progress"], capsys)
    assert code == 2 and "--split 'trn': a folder source has no splits" in err and not (tmp_path / "split").exists()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--fold", "7"], "--fold 7 is out of range"),
        (["--shots", "500"], "500 support shot(s) were requested"),
        (["--calibrate-threshold", "-3"], "--calibrate-threshold -3: give a positive number"),
        (["--calibrate-threshold", "4", "--split", "trn"], "cannot score them too"),
    ],
)
def test_eval_bad_input(tmp_path, capsys, shared_data, extra, message):
    out = tmp_path / "report"
    args = ["eval", "--dataset", "coco", "--root", shared_data / "coco-mini", "--episodes", "3", "--out", out, "--no-progress", *extra]
    code, _, err = _run(args, capsys)
    assert code == 2 and message in err and "Traceback" not in err
    assert not out.exists()


def test_eval_weak_supports_and_diffup_routing(tmp_path, capsys, monkeypatch):
    root = _user_folder(tmp_path / "ds")
    scores = {}
    for kind in ("mask", "box", "scribble", "scribble-fgbg", "points"):
        for masks in ("grabcut", "off"):
            out = tmp_path / f"report-{kind}-{masks}"
            code, _, err = _run(["eval", "--dataset", "folder", "--root", root, "--shots", "1", "--episodes", "6",
                                 "--support-annotation", kind, "--support-masks", masks, "--out", out,
                                 "--no-progress"], capsys)
            assert code == 0, err
            summary = json.loads((out / "summary.json").read_text())
            assert summary["support_annotation"] == kind and summary["support_masks"] == masks
            scores[kind, masks] = summary["miou"]
    assert len({scores[k, "off"] for k in ("mask", "box", "scribble")}) > 1  # the supports really changed
    for kind in ("box", "scribble", "scribble-fgbg", "points"):  # estimated masks close the gap to the mask
        assert scores[kind, "grabcut"] >= scores[kind, "off"] and scores[kind, "grabcut"] > scores["mask", "off"] - 2
    with pytest.raises(SystemExit) as exc:  # argparse rejects an unknown kind with the choices
        _run(["eval", "--dataset", "folder", "--root", root, "--support-annotation", "polygon",
              "--out", tmp_path / "bad", "--no-progress"], capsys)
    assert exc.value.code == 2 and "scribble" in capsys.readouterr().err and not (tmp_path / "bad").exists()
    # diffup without --checkpoint on PASCAL: no shipped checkpoint keeps PASCAL classes unseen
    code, _, err = _run(["eval", "--dataset", "pascal", "--root", tmp_path, "--method", "diffup",
                         "--out", tmp_path / "bad", "--no-progress"], capsys)
    assert code == 2 and "PASCAL" in err and "--checkpoint" in err and "Traceback" not in err


def test_eval_malformed_json(tmp_path, capsys):
    (tmp_path / "instances.json").write_text("{not json")
    code, _, err = _run(["eval", "--dataset", "coco", "--root", tmp_path, "--out", tmp_path / "r", "--no-progress"], capsys)
    assert code == 2 and "instances.json" in err and "Traceback" not in err


def test_console_entry_point_runs_as_module():
    proc = subprocess.run([sys.executable, "-m", "fsdiff", "--version"], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0 and proc.stdout.startswith("fsdiff ")


def test_method_arg_errors_and_missing_diffusion_models(tmp_path, capsys):
    base = ["segment", "--support", _photo(tmp_path, "s.png"), "--mask", _mask(tmp_path, "m.png"), "--query", _photo(tmp_path, "q.png"), "--out", tmp_path / "o"]
    code, _, err = _run([*base, "--method-arg", "steps"], capsys)
    assert code == 2 and "expected KEY=VALUE" in err
    code, _, err = _run([*base, "--method-arg", "no_such_option=1"], capsys)
    assert code == 2 and "no_such_option" in err and "Traceback" not in err
    code, _, err = _run(
        [*base, "--method", "diffseg-prior", "--method-arg", f"prior={tmp_path / 'p'}", "--method-arg", f"decoder={tmp_path / 'd'}"], capsys
    )
    assert code == 2 and "kandinsky-community/kandinsky-2-2-prior" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_segment_query_folders_globs_points_threshold_and_formats(tmp_path, capsys):
    s = _photo(tmp_path, "s.png")
    qdir = tmp_path / "qs"
    qdir.mkdir()
    for i, ext in enumerate(("jpg", "png", "png")):
        _photo(qdir, f"q{i}.{ext}", seed=i + 1)
    (qdir / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    code, stdout, err = _run(["segment", "--support", s, "--points", "32,24", "2,2,0", "--query", qdir,
                              str(tmp_path / "qs" / "q*.jpg"), "--out", out, "--format", "png", "coco", "npz",
                              "--no-overlay", "--threshold", "0.3", "--no-progress"], capsys)
    assert code == 0, err
    names = sorted(p.name for p in out.iterdir())
    assert "q0_jpg_mask.png" in names and "q0_jpg_1_prob.npz" in names and "q2_prob.png" in names
    assert not [n for n in names if n.endswith("overlay.jpg")] and "predictions.coco.json" in names
    prob = np.load(out / "q2_prob.npz")
    mask = np.asarray(Image.open(out / "q2_mask.png")) == 255
    assert float(prob["threshold"]) == pytest.approx(0.3) and np.array_equal(mask, prob["prob"] > 0.3)
    assert len(json.loads((out / "predictions.coco.json").read_text())["images"]) == 4
    assert "wrote 4 predictions" in stdout


@pytest.mark.parametrize("args, message", [
    (["--query", "{t}/none"], "--query {t}/none: no such file or folder"),
    (["--query", "{t}/empty"], "the folder holds no image"),
    (["--query", "{t}/*.gif"], "the pattern matches no file"),
    (["--points", "3,x"], "--points '3,x': expected X,Y"),
    (["--points", "3,4,7"], "LABEL 1 (object) or 0"),
    (["--threshold", "1.5"], "--threshold 1.5: must be a number strictly between 0 and 1"),
    (["--out", "{t}/file.txt"], "--out '{t}/file.txt' is a file"),
    (["--out", "{t}/file.txt/sub"], "lies below the file"),
])
def test_segment_bad_new_flags(tmp_path, capsys, args, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "file.txt").write_text("x")
    args = [a.format(t=tmp_path) for a in args]
    base = {"--query": [_photo(tmp_path, "q.png")], "--out": [tmp_path / "out"]}
    for flag in ("--query", "--out"):
        if flag in args:
            base.pop(flag)
    support = ["--support", _photo(tmp_path, "s.png")]
    support += args[:2] if args[0] == "--points" else ["--mask", _mask(tmp_path, "m.png")]
    rest = args[2:] if args[0] == "--points" else args
    argv = ["segment", *support, *rest, *[v for k, vs in base.items() for v in (k, *vs)], "--no-progress"]
    code, _, err = _run(argv, capsys)
    assert code == 2 and message.format(t=tmp_path) in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_segment_never_replaces_a_users_file(tmp_path, capsys):
    work = tmp_path / "work"
    work.mkdir()
    q = _photo(work, "b.jpg")
    (work / "b_mask.png").write_bytes(b"mine")
    argv = ["segment", "--support", _photo(tmp_path, "s.png"), "--mask", _mask(tmp_path, "m.png"), "--query", q,
            "--out", work, "--no-progress"]
    code, _, err = _run(argv, capsys)
    assert code == 2 and "b_mask.png already exist" in err and "--overwrite" in err
    assert (work / "b_mask.png").read_bytes() == b"mine" and sorted(p.name for p in work.iterdir()) == ["b.jpg", "b_mask.png"]
    code, _, err = _run([*argv, "--overwrite"], capsys)
    assert code == 0, err


def test_interrupted_segment_says_what_finished(tmp_path, capsys, monkeypatch):
    from fsdiff.api import Segmenter

    queries = [_photo(tmp_path, f"q{i}.png", seed=i) for i in range(3)]
    real = Segmenter.predict_prepared
    calls = []

    def stop_at_third(self, episode):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(self, episode)

    monkeypatch.setattr(Segmenter, "predict_prepared", stop_at_third)
    out = tmp_path / "out"
    code, _, err = _run(["segment", "--support", _photo(tmp_path, "s.png"), "--mask", _mask(tmp_path, "m.png"),
                         "--query", *queries, "--out", out, "--no-progress"], capsys)
    assert code == 130 and "2 of 3 queries finished" in err and "fsdiff_outputs.jsonl" in err
    done = [json.loads(x) for x in (out / "fsdiff_outputs.jsonl").read_text().splitlines()]
    assert [e["stem"] for e in done if e["state"] == "done"] == ["q0", "q1"]
    assert not (out / "q2_mask.png").exists()


def test_out_of_memory_is_a_clear_error(tmp_path, capsys, monkeypatch):
    from fsdiff.api import Segmenter

    def no_memory(self, episode):
        raise MemoryError

    monkeypatch.setattr(Segmenter, "predict_prepared", no_memory)
    code, _, err = _run(["segment", "--support", _photo(tmp_path, "s.png"), "--mask", _mask(tmp_path, "m.png"),
                         "--query", _photo(tmp_path, "q.png"), "--out", tmp_path / "out", "--no-progress"], capsys)
    assert code == 2 and "out of memory in `fsdiff segment`" in err and "Traceback" not in err
    assert not list(tmp_path.glob("out/q*"))  # no prediction file, whole or partial


def test_methods_lists_every_method_with_its_state(capsys):
    code, stdout, _ = _run(["methods"], capsys)
    assert code == 0
    rows = {line.split()[0]: line for line in stdout.splitlines() if line and not line.startswith(" ")}
    assert set(rows) == {"prototype", "diffup", "diffseg", "diffseg-prior"}
    assert "ready" in rows["prototype"] and "NOT READY" in rows["diffseg-prior"]
    assert "hf download kandinsky-community/kandinsky-2-2-prior" in stdout


def test_help_describes_methods_and_encoders(capsys):
    with pytest.raises(SystemExit):
        main(["segment", "--help"])
    out = capsys.readouterr().out
    for line in ("prototype: training-free", "diffup: DiffUp", "efficientnet-lite2: EfficientNet-Lite2", "hf:ID|DIR"):
        assert line in out
    with pytest.raises(SystemExit) as exc:
        main(["eval", "--dataset", "folder", "--root", "x", "--out", "y", "--method", "nope"])
    assert exc.value.code == 2 and "invalid choice: 'nope'" in capsys.readouterr().err


def test_eval_visualize_writes_pictures(tmp_path, capsys):
    root = _user_folder(tmp_path / "ds")
    out = tmp_path / "report"
    code, _, err = _run(["eval", "--dataset", "folder", "--root", root, "--episodes", "4", "--visualize", "2",
                         "--out", out, "--no-progress"], capsys)
    assert code == 0, err
    chart = np.asarray(Image.open(out / "per_class_iou.png"))
    sheet = np.asarray(Image.open(out / "episodes_best_worst.png"))
    assert chart.ndim == 3 and chart.shape[0] > 30 and sheet.shape[0] > 4 * 140
    summary = json.loads((out / "summary.json").read_text())
    assert summary["encoder"] == "efficientnet-lite0" and summary["processes"] == 1


@pytest.mark.parametrize("argv, message", [
    (["segment", "--support", "{s}", "--mask", "{m}", "--query", "{s}", "--augment", "hed:2",
      "--augment-resolution", "100000"], "resolution=100000 exceeds the limit of 1,024"),
    (["train", "diffup", "--dataset", "folder", "--root", "{t}/nowhere", "--input-size", "100000"],
     "input_size=100000 exceeds the limit of 2,048"),
    (["eval", "--dataset", "folder", "--root", "{t}/nowhere", "--resolution", "100000"],
     "resolution=100000 exceeds the limit of 4,096"),
])
def test_huge_sizes_are_refused_before_any_allocation(tmp_path, capsys, argv, message):
    fill = dict(s=_photo(tmp_path, "s.png"), m=_mask(tmp_path, "m.png"), t=tmp_path)
    code, _, err = _run([a.format(**fill) for a in argv] + ["--out", tmp_path / "o"], capsys)
    assert code == 2 and message in err and "Traceback" not in err and not (tmp_path / "o").exists()


def test_refinement_is_on_by_default_recorded_and_switchable(tmp_path, capsys):
    root = _user_folder(tmp_path / "ds")
    specs = {}
    for extra in ([], ["--refine", "off"]):
        out = tmp_path / f"r{len(extra)}"
        code, _, err = _run(["eval", "--dataset", "folder", "--root", root, "--episodes", "4", "--out", out,
                             "--no-progress", *extra], capsys)
        assert code == 0, err
        specs[len(extra)] = json.loads((out / "summary.json").read_text())["refine"]
    assert specs[0].startswith("guided:") and specs[2] == "off"
    code, _, err = _run(["eval", "--dataset", "folder", "--root", root, "--refine", "guided:radius=x",
                         "--out", tmp_path / "bad", "--no-progress"], capsys)
    assert code == 2 and "--refine 'guided:radius=x': radius needs an integer" in err and not (tmp_path / "bad").exists()


def test_weak_supports_are_estimated_and_the_estimate_is_written(tmp_path, capsys):
    s, q = _photo(tmp_path, "s.png"), _photo(tmp_path, "q.png", seed=1)
    out = tmp_path / "out"
    code, stdout, err = _run(["segment", "--support", s, "--box", "10,8,54,40", "--query", q, "--out", out,
                              "--no-progress"], capsys)
    assert code == 0, err
    assert f"estimated from the weak labels: {out / 'support1_s_estimate.png'}" in stdout
    est = np.asarray(Image.open(out / "support1_s_estimate.png"))
    truth = np.asarray(Image.open(_mask(tmp_path, "m.png"))) == 255
    assert set(np.unique(est)) <= {0, 128, 255}
    inter, union = ((est == 255) & truth).sum(), ((est == 255) | truth).sum()
    assert inter / union > 0.8  # the red square inside the loose box is recovered
    assert not est[:, :8].any() and not est[42:].any()  # nothing outside the box is object
    off = tmp_path / "off"
    code, stdout, err = _run(["segment", "--support", s, "--box", "10,8,54,40", "--query", q, "--out", off,
                              "--support-masks", "off", "--no-progress"], capsys)
    assert code == 0, err
    assert not list(off.glob("*_estimate.png")) and "estimated" not in stdout
