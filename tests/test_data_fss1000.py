"""FSS-1000 source: HSNet's 520/240/240 split lists and a synthetic class-folder tree."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fsdiff.data import Fss1000Source, build_episode, sample_episodes
from fsdiff.errors import FsdiffError

_JPG = io.BytesIO()
Image.fromarray(np.full((6, 8, 3), 90, np.uint8)).save(_JPG, format="JPEG")
_MASK = np.zeros((6, 8), np.uint8)
_MASK[:, :4] = 200
_MASK[0, 0] = 127
_MASK[0, 7] = 128
_PNG = io.BytesIO()
Image.fromarray(_MASK).save(_PNG, format="PNG")


def _tree(root: Path, classes: list[str], n: int = 10) -> Path:
    for c in classes:
        d = root / c
        d.mkdir(parents=True, exist_ok=True)
        for i in range(1, n + 1):
            (d / f"{i}.jpg").write_bytes(_JPG.getvalue())
            (d / f"{i}.png").write_bytes(_PNG.getvalue())
    return root


@pytest.fixture(scope="module")
def splits(shared_data: Path) -> Path:
    return shared_data / "fss-splits" / "hsnet"


@pytest.fixture(scope="module")
def test_tree(splits: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    names = (splits / "fss" / "test.txt").read_text().split()
    return _tree(tmp_path_factory.mktemp("fss") / "FSS-1000", names)


def test_split_sizes(splits: Path) -> None:
    sizes = {s: len((splits / "fss" / f"{s}.txt").read_text().split()) for s in ("trn", "val", "test")}
    assert sizes == {"trn": 520, "val": 240, "test": 240}


def test_test_split_ids_and_queries(test_tree: Path, splits: Path) -> None:
    src = Fss1000Source(root=test_tree.parent, split="test", splits_dir=splits)  # finds FSS-1000/ inside
    names = sorted((splits / "fss" / "test.txt").read_text().split())
    assert src.classes == [(760 + i, n) for i, n in enumerate(names)]
    items = src.query_items()
    assert len(items) == 2400
    first = names[0]
    assert [k for k, _ in items[:3]] == [f"{first}/1", f"{first}/10", f"{first}/2"]  # HSNet's sorted glob
    assert src.images_of_class(760)[:3] == [f"{first}/1", f"{first}/2", f"{first}/3"]
    specs = sample_episodes(src, shots=5)
    assert len(specs) == 2400 and all(s.query_keys[0] not in s.support_keys for s in specs)


def test_hsnet_fss_sampling_rule(test_tree: Path, splits: Path) -> None:
    """HSNet: np.random.choice(range(1, 11)) per support, rejecting the query, from seed 0."""
    src = Fss1000Source(root=test_tree, split="test", splits_dir=splits)
    specs = sample_episodes(src, shots=2)[:50]
    rng = np.random.RandomState(0)
    for spec, (query, cid) in zip(specs, src.query_items()):
        cname, q = query.split("/")
        sup = []
        while True:
            n = rng.choice(range(1, 11), 1, replace=False)[0]
            if str(n) != q:
                sup.append(f"{cname}/{n}")
            if len(sup) == 2:
                break
        assert spec.class_id == cid and spec.support_keys == tuple(sup)


def test_mask_threshold(tmp_path: Path) -> None:
    lists = tmp_path / "splits" / "fss"
    lists.mkdir(parents=True)
    (lists / "val.txt").write_text("zebra\nant\n")
    root = _tree(tmp_path / "data", ["ant", "zebra"], n=3)
    src = Fss1000Source(root=root, split="val", splits_dir=tmp_path / "splits")
    assert src.classes == [(520, "ant"), (521, "zebra")]
    img, mask = src.load("ant/2", 520)
    assert img.shape == (6, 8, 3) and mask.dtype == np.uint8
    assert mask[0, 0] == 0 and mask[0, 7] == 1 and mask[1, 0] == 1 and mask[1, 7] == 0
    assert Fss1000Source(root=root, split="val", splits_dir=tmp_path / "splits", threshold=100).load("ant/2", 520)[1][0, 0] == 1
    rgb = np.repeat(_MASK[:, :, None], 3, axis=2)
    Image.fromarray(rgb).save(root / "ant" / "3.png")
    assert np.array_equal(src.load("ant/3", 520)[1], mask)
    ep = build_episode(src, sample_episodes(src, shots=1)[0])
    assert ep.class_name == "ant"
    with pytest.raises(FsdiffError, match="not of class"):
        src.load("ant/1", 521)


def test_errors(tmp_path: Path, splits: Path, test_tree: Path) -> None:
    with pytest.raises(FsdiffError, match="fss/trn.txt"):
        Fss1000Source(root=test_tree, split="trn", splits_dir=tmp_path)
    with pytest.raises(FsdiffError, match="no folds"):
        Fss1000Source(root=test_tree, split="test", splits_dir=splits, fold=2)
    with pytest.raises(FsdiffError, match="split"):
        Fss1000Source(root=test_tree, split="dev", splits_dir=splits)
    with pytest.raises(FsdiffError, match="class folder"):
        Fss1000Source(root=test_tree, split="val", splits_dir=splits)
    lists = tmp_path / "s" / "fss"
    lists.mkdir(parents=True)
    (lists / "test.txt").write_text("cls\n")
    root = _tree(tmp_path / "d", ["cls"], n=2)
    (root / "cls" / "2.png").unlink()
    src = Fss1000Source(root=root, split="test", splits_dir=tmp_path / "s")
    with pytest.raises(FsdiffError, match="2.png"):
        src.load("cls/2", 760)
    assert src.check() == [str(root / "cls" / "2.png")]
    with pytest.raises(FsdiffError, match="1 besides the query"):
        sample_episodes(src, shots=2)
    shutil.rmtree(root / "cls")
    with pytest.raises(FsdiffError, match="missing"):
        Fss1000Source(root=root, split="test", splits_dir=tmp_path / "s")
