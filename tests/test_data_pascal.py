"""PASCAL-5i source: HSNet fold lists, voc-mini palette labels with 255 ignore, error cases."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fsdiff.data import SPLITS_ENV, VOC_CLASSES, PascalSource, build_episode, pascal_fold_classes
from fsdiff.data.sampler import EpisodeSpec
from fsdiff.errors import FsdiffError

VAL_COUNTS = (346, 451, 725, 346)


@pytest.fixture(scope="module")
def voc(shared_data: Path) -> Path:
    return shared_data / "voc-mini"


@pytest.fixture(scope="module")
def splits(shared_data: Path) -> Path:
    return shared_data / "fss-splits" / "hsnet"


@pytest.mark.parametrize("fold", range(4))
def test_val_fold_counts_and_classes(voc: Path, splits: Path, fold: int) -> None:
    src = PascalSource(root=voc, fold=fold, split="val", splits_dir=splits)
    items = src.query_items()
    assert len(items) == VAL_COUNTS[fold]
    assert src.class_ids() == [5 * fold + i for i in range(1, 6)] == pascal_fold_classes(fold)
    assert [n for _, n in src.classes] == list(VOC_CLASSES[5 * fold : 5 * fold + 5])
    assert {c for _, c in items} == set(src.class_ids())
    assert sum(len(src.images_of_class(c)) for c in src.class_ids()) == len(items)
    first = (splits / "pascal" / "val" / f"fold{fold}.txt").read_text().split("\n")[0]
    assert items[0] == (first.split("__")[0], int(first.split("__")[1]))


def test_trn_split_reads_other_folds(voc: Path, splits: Path) -> None:
    src = PascalSource(root=voc, fold=1, split="trn", splits_dir=splits)
    n = sum(len((splits / "pascal" / "trn" / f"fold{f}.txt").read_text().splitlines()) for f in (0, 2, 3))
    assert len(src.query_items()) == n
    assert len(src.classes) == 15 and 6 not in src.class_ids()


def test_voc_mini_palette_labels(voc: Path, splits: Path) -> None:
    src = PascalSource(root=voc, fold=2, splits_dir=splits)  # fold 2 tests classes 11..15
    assert src.ann_dir.name == "SegmentationClass"
    img, mask = src.load("2011_000003", 15)
    assert img.shape == (338, 500, 3) and mask.dtype == np.uint8
    values, counts = np.unique(mask, return_counts=True)
    assert dict(zip(values.tolist(), counts.tolist())) == {0: 125767 + 873, 1: 32900, 255: 9460}
    assert src.class_pixels("2011_000003") == {15: 32900}
    assert src.image_keys() == ["2011_000003", "2011_000006", "2011_000025"]


def test_episode_from_voc_mini(voc: Path, splits: Path) -> None:
    src = PascalSource(root=voc, fold=0, split="trn", splits_dir=splits)
    assert {"2011_000003", "2011_000006"} <= set(src.images_of_class(15))
    ep = build_episode(src, EpisodeSpec("x", 15, ("2011_000003",), ("2011_000006",)))
    assert ep.class_name == "person" and ep.k == 1
    assert set(np.unique(ep.queries[0].gt)) == {0, 1, 255}
    assert len(src.check()) > 0  # most listed images are not in voc-mini


def test_env_var_and_missing_lists(voc: Path, splits: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(SPLITS_ENV, raising=False)
    with pytest.raises(FsdiffError) as exc:
        PascalSource(root=voc, fold=0)
    msg = str(exc.value)
    assert "pascal/val/fold0.txt" in msg and "hsnet" in msg.lower() and SPLITS_ENV in msg and "data/splits" in msg
    with pytest.raises(FsdiffError, match="not found"):
        PascalSource(root=voc, fold=3, splits_dir=tmp_path)
    monkeypatch.setenv(SPLITS_ENV, str(splits))
    assert len(PascalSource(root=voc, fold=3).query_items()) == 346


@pytest.mark.parametrize("fold", [4, -1, None])
def test_fold_out_of_range(voc: Path, splits: Path, fold: object) -> None:
    with pytest.raises(FsdiffError, match=r"0\.\.3"):
        PascalSource(root=voc, fold=fold, splits_dir=splits)


def test_bad_split_and_root(voc: Path, splits: Path, tmp_path: Path) -> None:
    with pytest.raises(FsdiffError, match="split"):
        PascalSource(root=voc, fold=0, split="dev", splits_dir=splits)
    with pytest.raises(FsdiffError, match="JPEGImages"):
        PascalSource(root=tmp_path, fold=0, splits_dir=splits)


def _tiny_voc(tmp: Path, line: str = "img1__03\n") -> tuple[Path, Path]:
    voc = tmp / "VOC2012"
    for d in ("JPEGImages", "SegmentationClass", "SegmentationClassAug"):
        (voc / d).mkdir(parents=True)
    Image.fromarray(np.zeros((8, 10, 3), np.uint8)).save(voc / "JPEGImages" / "img1.jpg")
    lab = np.zeros((8, 10), np.uint8)
    lab[2:4, 2:4] = 3
    Image.fromarray(lab).save(voc / "SegmentationClassAug" / "img1.png")
    Image.fromarray(np.zeros((8, 10), np.uint8)).save(voc / "SegmentationClass" / "img1.png")
    lists = tmp / "splits"
    (lists / "pascal" / "val").mkdir(parents=True)
    (lists / "pascal" / "val" / "fold0.txt").write_text(line)
    return tmp, lists


def test_aug_labels_preferred(tmp_path: Path) -> None:
    root, lists = _tiny_voc(tmp_path)
    src = PascalSource(root=root, fold=0, splits_dir=lists)
    assert src.ann_dir.name == "SegmentationClassAug"
    assert src.load("img1", 3)[1].sum() == 4
    assert PascalSource(root=root, fold=0, splits_dir=lists, ann="voc").load("img1", 3)[1].sum() == 0


@pytest.mark.parametrize("line, pattern", [("img1-03\n", "IMAGEID__CLASS"), ("img1__07\n", "class 7")])
def test_malformed_list(tmp_path: Path, line: str, pattern: str) -> None:
    root, lists = _tiny_voc(tmp_path, line)
    with pytest.raises(FsdiffError, match=pattern) as exc:
        PascalSource(root=root, fold=0, splits_dir=lists)
    assert "fold0.txt line 1" in str(exc.value)


def test_missing_image_and_size_mismatch(tmp_path: Path) -> None:
    root, lists = _tiny_voc(tmp_path)
    src = PascalSource(root=root, fold=0, splits_dir=lists)
    Image.fromarray(np.zeros((8, 11), np.uint8)).save(src.ann_dir / "img1.png")
    with pytest.raises(FsdiffError, match="img1.png") as exc:
        src.load("img1", 3)
    assert "img1.jpg" in str(exc.value)
    (root / "VOC2012" / "JPEGImages" / "img1.jpg").unlink()
    with pytest.raises(FsdiffError, match="img1.jpg"):
        src.load("img1", 3)
    assert str(root / "VOC2012" / "JPEGImages" / "img1.jpg") in src.check()
