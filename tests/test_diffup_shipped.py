"""Shipped DiffUp checkpoints: which one a benchmark gets, the float16 export, and the weak-label support
conversion used by the annotation-type benchmarks."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from fsdiff.episode import BoxAnnotation, Episode, MaskAnnotation, Query, ScribbleAnnotation, Shot
from fsdiff.errors import FsdiffError
from fsdiff.methods.diffup import shipped
from fsdiff.methods.diffup.segmenter import build_diffup, load_diffup
from fsdiff.synth import convert_supports
from test_diffup_segmenter import checkpoint, episode, source  # noqa: F401  (module fixtures)


@pytest.fixture
def fake_root(tmp_path, monkeypatch, checkpoint):  # noqa: F811
    """A shipped-checkpoint folder holding copies of the tiny checkpoint under every shipped name."""
    root = tmp_path / "checkpoints"
    for name in [shipped.ALL_CLASSES] + [shipped.fold_name(f) for f in shipped.SHIPPED_FOLDS]:
        shutil.copytree(checkpoint, root / name)
    monkeypatch.setattr(shipped, "shipped_root", lambda: root)
    return root


def test_benchmark_routing(fake_root):
    assert shipped.shipped_checkpoint() == fake_root / "diffup-coco-all"
    assert shipped.shipped_checkpoint("folder", 0) == fake_root / "diffup-coco-all"
    for f in range(4):
        assert shipped.shipped_checkpoint("coco", f) == fake_root / f"diffup-coco-fold{f}"
    with pytest.raises(FsdiffError, match="contiguous"):
        shipped.shipped_checkpoint("coco", 1, "contiguous")
    with pytest.raises(FsdiffError, match="every PASCAL VOC class"):
        shipped.shipped_checkpoint("pascal", 0)
    with pytest.raises(FsdiffError, match="fss1000.*fsdiff train diffup"):
        shipped.shipped_checkpoint("fss1000", None)
    with pytest.raises(FsdiffError, match="fold 7"):
        shipped.shipped_checkpoint("coco", 7)
    shutil.rmtree(fake_root / "diffup-coco-fold2")
    with pytest.raises(FsdiffError, match="missing from this installation"):
        shipped.shipped_checkpoint("coco", 2)


def test_build_diffup_picks_the_benchmark_checkpoint(fake_root, source):  # noqa: F811
    seg = build_diffup(benchmark=dict(dataset="coco", fold=3, convention="interleaved"))
    assert seg.checkpoint == fake_root / "diffup-coco-fold3"
    assert build_diffup().checkpoint == fake_root / "diffup-coco-all"
    explicit = build_diffup(checkpoint=fake_root / "diffup-coco-fold1", benchmark=dict(dataset="pascal", fold=0))
    assert explicit.checkpoint == fake_root / "diffup-coco-fold1"  # --checkpoint wins, no PASCAL error
    # through the API, every method takes the benchmark; only diffup acts on it
    from fsdiff.api import build_segmenter

    assert build_segmenter("diffup", benchmark=dict(dataset="coco", fold=2)).checkpoint == fake_root / "diffup-coco-fold2"
    proto = build_segmenter("prototype", benchmark=dict(dataset="pascal", fold=0), size=64)
    assert proto.name == "prototype"


def test_export_float16_round_trip(checkpoint, tmp_path, source):  # noqa: F811
    dst = shipped.export_checkpoint(checkpoint, tmp_path / "out" / "fp16")
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]  # no temp folder left
    cfg0, uapf0, uqdd0, meta0 = load_diffup(checkpoint)
    cfg1, uapf1, uqdd1, meta1 = load_diffup(dst)
    assert cfg0 == cfg1 and meta1["exported_dtype"] == "float16" and meta1["encoder"] == meta0["encoder"]
    for a, b in zip(uqdd0.state_dict().values(), uqdd1.state_dict().values()):
        assert b.dtype == torch.float32 and torch.equal(a.half().float(), b)  # loaded back as float32
    size = sum(p.stat().st_size for p in Path(dst).rglob("*.safetensors"))
    full = sum(p.stat().st_size for p in Path(checkpoint).rglob("*.safetensors"))
    assert size < 0.6 * full
    a = build_diffup(checkpoint=checkpoint).predict(episode(source))[0]
    b = build_diffup(checkpoint=dst).predict(episode(source))[0]
    assert np.abs(a - b).max() < 0.02  # float16 weights change the output very little
    assert shipped.main([str(tmp_path / "nowhere"), str(tmp_path / "x")]) == 2
    assert not (tmp_path / "x").exists()


def test_convert_supports_box_and_scribble():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (60, 80, 3), dtype=np.uint8)
    m = np.zeros((60, 80), np.uint8)
    m[10:40, 20:60] = 1
    m[45:50, 0:10] = 255
    ep = Episode(1, "thing", (Shot(img, MaskAnnotation(m), "s0"), Shot(img, BoxAnnotation((1, 1, 5, 5)), "s1")),
                 (Query(img, image_id="q"),), episode_id="e1")
    assert convert_supports(ep, "mask") is ep
    box = convert_supports(ep, "box")
    assert isinstance(box.shots[0].annotation, BoxAnnotation) and box.shots[0].annotation.box == (20.0, 10.0, 60.0, 40.0)
    assert box.shots[1].annotation == ep.shots[1].annotation  # a non-mask support is kept
    s1, s2 = convert_supports(ep, "scribble", seed=0), convert_supports(ep, "scribble", seed=0)
    strokes = s1.shots[0].annotation.strokes
    assert isinstance(s1.shots[0].annotation, ScribbleAnnotation) and np.array_equal(strokes, s2.shots[0].annotation.strokes)
    assert (strokes == 1).any() and np.all(m[strokes == 1] == 1)  # strokes lie on the object
    other = convert_supports(ep, "scribble", seed=1).shots[0].annotation.strokes
    assert not np.array_equal(strokes, other)
    with pytest.raises(FsdiffError, match="polygon"):
        convert_supports(ep, "polygon")


# --------------------------------------------------------------------------------------------------
# the checkpoints that ship in the package
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fold", shipped.SHIPPED_FOLDS)
def test_shipped_fold_checkpoint_never_saw_its_fold(fold):
    from fsdiff.data.coco import coco_fold_classes

    path = shipped.shipped_checkpoint("coco", fold)
    config, _, _, meta = load_diffup(path)
    novel = set(coco_fold_classes(80, fold, "interleaved"))
    base = set(meta["base_classes"])
    assert base and not (base & novel)  # honest novel-class evaluation
    assert meta["source"]["fold"] == fold and meta["encoder"] == "efficientnet-lite0"
    assert meta["exported_dtype"] == "float16" and meta["step"] == meta["trainer"]["steps"]
    assert config.query_channels == 0 and config.uapf_anchor and config.residual_prior
    from fsdiff.methods.diffup.training import cpu_config

    assert config == cpu_config()  # the recipe, with its inference defaults (input 473, prior check, 1 step)
    size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    assert size < 8e6


def test_shipped_all_classes_checkpoint_runs_on_the_demo(tmp_path):
    from fsdiff.api import demo

    path = shipped.shipped_checkpoint()
    _, _, _, meta = load_diffup(path)
    assert meta["source"]["fold"] is None and len(meta["base_classes"]) > 60
    results = demo(tmp_path / "demo", segmenter=build_diffup())
    assert len(results) == 5 and all(40 < r.iou <= 100 for r in results)  # the fish is found in every case
