"""fsdiff.api as a library: in-memory inputs equal file inputs, one Segmenter reused, neutral error messages,
api.train mirrors `fsdiff train`, and the package's import structure."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fsdiff.api import Segmenter, load_query, load_shot, segment
from fsdiff.errors import FsdiffError

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src" / "fsdiff"


def _scene(seed: int = 0, h: int = 48, w: int = 64) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 60, (h, w, 3), dtype=np.uint8)
    img[h // 4: 3 * h // 4, w // 4: 3 * w // 4] = (200, 40, 40)
    mask = np.zeros((h, w), np.uint8)
    mask[h // 4: 3 * h // 4, w // 4: 3 * w // 4] = 1
    return img, mask


@pytest.fixture(scope="module")
def seg():
    return Segmenter("prototype")


@pytest.fixture
def files(tmp_path):
    img, mask = _scene()
    qimg, _ = _scene(1)
    Image.fromarray(img).save(tmp_path / "s.png")
    Image.fromarray(mask * 255).save(tmp_path / "m.png")
    Image.fromarray(qimg).save(tmp_path / "q.png")
    return tmp_path, img, mask, qimg


def test_each_input_kind_gives_the_file_result(seg, files):
    d, img, mask, qimg = files
    from_files = seg.segment([load_shot(d / "s.png", mask=d / "m.png")], [d / "q.png"])[0].prob
    variants = [
        load_shot(img, mask=mask.astype(bool)),
        load_shot(img, mask=mask * 255),
        load_shot(Image.fromarray(img), mask=Image.fromarray(mask * 255)),
        load_shot(img.astype(np.float32) / 255.0, mask=mask.astype(np.float32)),
        load_shot(np.dstack([img, np.full(mask.shape, 7, np.uint8)]), mask=mask),  # RGBA drops alpha like a file
    ]
    for shot in variants:
        for query in (qimg, Image.fromarray(qimg), load_query(qimg)):
            assert np.array_equal(seg.segment([shot], [query])[0].prob, from_files)
    grey = load_shot(img[:, :, 0], mask=mask)
    assert grey.image.shape == (48, 64, 3) and np.array_equal(grey.image[:, :, 2], img[:, :, 0])


def test_weak_annotations_as_plain_values(files):
    _, img, mask, _ = files
    box = load_shot(img, box=(16, 12, 48, 36))
    assert box.annotation.kind == "box" and load_shot(img, box="16,12,48,36").annotation.box == box.annotation.box
    pts = load_shot(img, points=[(30, 20), (2, 2, 0)]).annotation
    assert pts.points.tolist() == [[30, 20], [2, 2]] and pts.labels.tolist() == [1, 0]
    strokes = np.zeros(mask.shape, np.uint8)
    strokes[24, 20:40], strokes[2, :] = 1, 2
    scr = load_shot(img, scribble=strokes).annotation
    assert (scr.strokes == 1).sum() == 20 and (scr.strokes == 2).sum() == 64
    assert np.array_equal(load_shot(img, scribble=Image.fromarray(strokes)).annotation.strokes, scr.strokes)


@pytest.mark.parametrize("kwargs, message", [
    (dict(box=(1, 2, 3)), r"support array 48x64x3: box=\(1, 2, 3\): expected four numbers"),
    (dict(box=(10, 10, 5, 20)), "is empty"),
    (dict(points=[(1, 2, 5)]), "label 1 \\(object\\) or 0"),
    (dict(points=[]), "no click given"),
    (dict(points=[(500, 2)]), "outside the 64x48 image"),
    (dict(points=[(5, 5, 0)]), "no positive point"),
    (dict(mask=np.full((48, 64), 0.5, np.float32)), "float mask must hold only 0.0 and 1.0"),
    (dict(mask=np.zeros((10, 10), bool)), "does not match its image"),
    (dict(), "give exactly one annotation"),
    (dict(mask=np.ones((48, 64), bool), box=(0, 0, 5, 5)), "mask and box"),
])
def test_bad_values_name_the_argument_in_library_terms(files, kwargs, message):
    _, img, _, _ = files
    with pytest.raises(FsdiffError, match=message) as exc:
        load_shot(img, **kwargs)
    assert not re.search(r"(?<![\w-])--[a-z]", str(exc.value))


@pytest.mark.parametrize("image, message", [
    (np.zeros((4, 4, 3), np.float32) + 2.0, "finite values in \\[0, 1\\]"),
    (np.zeros((4, 4), bool), "boolean array is a mask"),
    (np.zeros((4, 4, 5), np.uint8), "shape \\(H, W\\)"),
    ([[1, 2]], "a file path, a PIL image or a numpy array"),
])
def test_bad_images(image, message):
    with pytest.raises(FsdiffError, match=message):
        load_query(image)


def test_one_segmenter_reused_loads_its_model_once(files):
    d, img, mask, qimg = files
    seg = Segmenter("prototype", threshold=0.4)
    assert seg.encoder_name == "efficientnet-lite0" and seg.threshold == 0.4 and seg.name == "prototype"
    encoder = seg.method.encoder
    first = seg.segment([load_shot(img, mask=mask)], [qimg])[0]
    second = seg.segment([load_shot(img, box=(16, 12, 48, 36))], [qimg, qimg])
    assert seg.method.encoder is encoder and len(second) == 2
    assert np.array_equal(first.mask, first.prob > 0.4)
    with pytest.raises(FsdiffError, match="threshold=1.5: must be a number strictly between 0 and 1"):
        Segmenter("prototype", threshold=1.5)
    with pytest.raises(FsdiffError, match="unknown method 'nope'"):
        Segmenter("nope")


def test_queries_are_streamed_one_by_one(files):
    d, img, mask, qimg = files
    seg = Segmenter("prototype")
    seen = []
    original = seg.method.predict
    seg.method.predict = lambda ep: seen.append(len(ep.queries)) or original(ep)
    results = list(seg.iter_segment([load_shot(img, mask=mask)], [d / "q.png"] * 3))
    assert seen == [1, 1, 1] and len(results) == 3
    assert all(np.array_equal(r.prob, results[0].prob) for r in results)


def test_augmenter_sees_the_estimated_masks_of_weak_supports(files):
    """Pipeline order: the support step turns a box into a mask before DifFSS generates from it."""
    d, img, mask, _ = files
    seg = Segmenter("prototype")
    seen = []

    class Recorder:
        spec = "recorder"

        def augment(self, episode):
            seen.extend(s.annotation for s in episode.shots)
            return episode

    seg.augmenter = Recorder()
    seg.segment([load_shot(img, box=(14, 10, 50, 38))], [d / "q.png"])
    (ann,) = seen
    assert ann.kind == "mask"
    est = ann.mask == 1
    true = mask.astype(bool)
    assert (est & true).sum() / (est | true).sum() > 0.8  # the red square, not the whole box
    assert not est[:, :14].any() and not est[:10].any()  # nothing outside the box
    seg.support_step = None  # off: the augmenter gets the box itself
    seen.clear()
    seg.segment([load_shot(img, box=(14, 10, 50, 38))], [d / "q.png"])
    assert seen[0].kind == "box"


def test_segment_writes_and_reports_files(files):
    d, img, mask, qimg = files
    res = segment([load_shot(img, mask=mask)], [d / "q.png", qimg], out=d / "out", formats=("png", "npz", "coco"))
    names = sorted(p.name for p in (d / "out").iterdir())
    assert names == ["fsdiff_outputs.jsonl", "predictions.coco.json", "q_mask.png", "q_overlay.jpg", "q_prob.npz",
                     "q_prob.png", "query1_mask.png", "query1_overlay.jpg", "query1_prob.npz", "query1_prob.png"]
    npz = np.load(d / "out" / "q_prob.npz")
    assert np.array_equal(npz["prob"], res[0].prob) and float(npz["threshold"]) == 0.5


def test_messages_of_the_library_name_no_cli_flag():
    """No FsdiffError raised in fsdiff.api, fsdiff.benchmark, fsdiff.inputs or fsdiff.methods names a CLI flag."""
    offenders = []
    files = [SRC / "api.py", SRC / "benchmark.py", SRC / "inputs.py", SRC / "pipeline.py", SRC / "output.py",
             *sorted((SRC / "methods").rglob("*.py"))]
    for path in files:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", "")) in (
                    "FsdiffError", "MissingModelError"):
                text = "".join(c.value for arg in node.args for c in ast.walk(arg)
                               if isinstance(c, ast.Constant) and isinstance(c.value, str))
                for name in re.findall(r"(?<![\w-])--[a-z][\w-]*", text):
                    offenders.append(f"{path.relative_to(REPO)}:{node.lineno}: {name}")
    assert not offenders, offenders


def test_evaluate_does_not_import_the_methods_package():
    code = ("import sys, fsdiff.evaluate, fsdiff.benchmark, fsdiff.pipeline; "
            "print(sorted(m for m in sys.modules if m.startswith('fsdiff.methods')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    for name in ("evaluate.py", "benchmark.py", "pipeline.py", "protocol.py"):
        imports = [n for n in ast.walk(ast.parse((SRC / name).read_text()))
                   if isinstance(n, (ast.Import, ast.ImportFrom))]
        modules = [getattr(n, "module", None) or n.names[0].name for n in imports]
        assert not [m for m in modules if m and m.startswith("fsdiff.methods")], name


def test_import_fsdiff_is_light():
    code = "import sys, fsdiff, fsdiff.api; print(sorted(m for m in ('diffusers', 'transformers', 'gradio') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_train_mirrors_the_command(tmp_path):
    pytest.importorskip("transformers")
    from conftest import write_folder_dataset
    from fsdiff.api import train
    from fsdiff.checkpoint import read_checkpoint

    write_folder_dataset(tmp_path / "ds", 4)
    res = train("diffup", "folder", tmp_path / "ds", tmp_path / "run", config={"query_channels": 0}, input_size=64,
                steps=1, batch_size=1, warmup=0, num_threads=1, progress=False, save_every=0)
    info = read_checkpoint(res.final_dir, "diffup")
    assert info.config["input_size"] == 64 and info.config["query_channels"] == 0 and info.encoder == "efficientnet-lite0"
    with pytest.raises(FsdiffError, match="prototype' is training-free"):
        train("prototype", "folder", tmp_path / "ds", tmp_path / "x")
    with pytest.raises(FsdiffError, match="no_such_field: not a field of the diffup config"):
        train("diffup", "folder", tmp_path / "ds", tmp_path / "x", config={"no_such_field": 1})
    with pytest.raises(FsdiffError, match="input_size=64 disagrees with the config's input_size \\(96\\)"):
        train("diffup", "folder", tmp_path / "ds", tmp_path / "x", config={"input_size": 96}, input_size=64)
    assert not (tmp_path / "x").exists()


def test_limits_apply_to_in_memory_inputs(monkeypatch):
    monkeypatch.setenv("FSDIFF_MAX_IMAGE_PIXELS", "1000")
    big = np.zeros((40, 40, 3), np.uint8)
    for value in (big, Image.fromarray(big)):
        with pytest.raises(FsdiffError, match="1,600 pixels, above the limit of 1,000.*FSDIFF_MAX_IMAGE_PIXELS"):
            load_query(value)
    with pytest.raises(FsdiffError, match="above the limit"):
        load_shot(np.zeros((20, 20, 3), np.uint8), mask=np.zeros((40, 40), bool))
    photo = np.random.default_rng(0).integers(0, 255, (20, 20), dtype=np.uint8)
    with pytest.raises(FsdiffError, match="does not look like a scribble"):
        load_shot(np.zeros((20, 20, 3), np.uint8), scribble=photo)


def test_sizes_and_counts_are_bounded_before_any_allocation():
    from fsdiff.augment.controls import parse_condition
    from fsdiff.methods.diffseg.config import DiffSegConfig
    from fsdiff.methods.diffup.config import DiffUpConfig
    from fsdiff.metrics import check_resolution

    with pytest.raises(FsdiffError, match="input_size=100000 exceeds the limit of 2,048"):
        DiffUpConfig(input_size=100000)
    with pytest.raises(FsdiffError, match="input_size=100000 exceeds the limit"):
        DiffSegConfig(input_size=100000)
    with pytest.raises(FsdiffError, match="resolution=100000 exceeds the limit of 4,096"):
        check_resolution(100000)
    with pytest.raises(FsdiffError, match="exceeds the limit of 64"):
        parse_condition("hed:1000")
