"""User folder source: weizmann-horse pairs, per-class layout, missing/mismatched masks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fsdiff.data import FolderSource, build_episode, build_source
from fsdiff.data.sampler import EpisodeSpec
from fsdiff.errors import FsdiffError


def _pair(root: Path, rel: str, size: tuple[int, int] = (12, 16), mask_size: tuple[int, int] | None = None) -> None:
    img, mask = root / "images" / f"{rel}.jpg", root / "masks" / f"{rel}.png"
    img.parent.mkdir(parents=True, exist_ok=True)
    mask.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((*size, 3), 80, np.uint8)).save(img)
    m = np.zeros(mask_size or size, np.uint8)
    m[2:6, 3:8] = 255
    Image.fromarray(m).save(mask)


def test_weizmann_horse(shared_data: Path) -> None:
    root = shared_data / "weizmann-horse"
    src = build_source("folder", root=root)
    assert src.classes == [(0, "weizmann-horse")] and not src.per_class
    items = src.query_items()
    assert len(items) == 328 and items[0] == ("horse001", 0)
    assert src.images_of_class(0) == sorted(src.images_of_class(0))
    for key in ("horse001", "horse200"):
        img, mask = src.load(key, 0)
        assert img.shape[:2] == mask.shape and mask.dtype == np.uint8
        assert set(np.unique(mask)) <= {0, 1} and mask.sum() > 0
    ep = build_episode(src, EpisodeSpec("h", 0, ("horse001",), ("horse002", "horse003")), class_name="horse")
    assert ep.class_name == "horse" and ep.k == 2
    assert FolderSource(root=root, class_name="horse").classes == [(0, "horse")]


def test_per_class_layout(tmp_path: Path) -> None:
    for rel in ("zebra/a", "zebra/b", "cat/x", "cat/y", "cat/z"):
        _pair(tmp_path, rel)
    src = FolderSource(root=tmp_path)
    assert src.per_class and src.classes == [(0, "cat"), (1, "zebra")]
    assert src.images_of_class(0) == ["cat/x", "cat/y", "cat/z"]
    assert src.query_items()[-1] == ("zebra/b", 1)
    img, mask = src.load("zebra/a", 1)
    assert mask[3, 4] == 1 and mask[0, 0] == 0
    with pytest.raises(FsdiffError, match="not of class"):
        src.load("zebra/a", 0)


def test_missing_mask_names_both_paths(tmp_path: Path) -> None:
    _pair(tmp_path, "a")
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "images" / "b.jpg")
    with pytest.raises(FsdiffError) as exc:
        FolderSource(root=tmp_path)
    msg = str(exc.value)
    assert str(tmp_path / "images" / "b.jpg") in msg and str(tmp_path / "masks" / "b.png") in msg


def test_size_mismatch_through_episode(tmp_path: Path) -> None:
    _pair(tmp_path, "a")
    _pair(tmp_path, "b", mask_size=(12, 15))
    src = FolderSource(root=tmp_path)
    with pytest.raises(FsdiffError, match="b.png") as exc:
        build_episode(src, EpisodeSpec("e", 0, ("a",), ("b",)))
    assert "15x12" in str(exc.value) and "b.jpg" in str(exc.value)


def test_layout_errors(tmp_path: Path) -> None:
    with pytest.raises(FsdiffError, match="images"):
        FolderSource(root=tmp_path)
    _pair(tmp_path, "a")
    _pair(tmp_path, "cls/b")
    with pytest.raises(FsdiffError, match="mixes"):
        FolderSource(root=tmp_path)
    with pytest.raises(FsdiffError, match="no folds"):
        FolderSource(root=tmp_path / "x", fold=1)


def test_non_binary_mask(tmp_path: Path) -> None:
    _pair(tmp_path, "a")
    Image.fromarray(np.arange(12 * 16, dtype=np.uint8).reshape(12, 16)).save(tmp_path / "masks" / "a.png")
    with pytest.raises(FsdiffError, match="class_value="):
        FolderSource(root=tmp_path).load("a", 0)
