"""COCO-format source: real coco-mini, COCO-20i folds in both conventions, synthetic error cases."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from fsdiff.data import SOURCES, CocoSource, build_episode, build_source, coco_fold_classes
from fsdiff.data.sampler import EpisodeSpec
from fsdiff.errors import FsdiffError


@pytest.fixture(scope="module")
def coco_dir(shared_data: Path) -> Path:
    return shared_data / "coco-mini"


@pytest.fixture(scope="module")
def coco_json(coco_dir: Path) -> dict:
    return json.loads((coco_dir / "instances.json").read_text())


# -- real data ------------------------------------------------------------------------------
def test_coco_mini_classes_and_files(coco_dir: Path) -> None:
    src = CocoSource(root=coco_dir)
    assert len(src.classes) == 80 and src.class_ids() == list(range(80))
    assert src.classes[0] == (0, "person") and src.classes[-1][1] == "toothbrush"
    assert len(src.image_keys()) == 378
    assert src.images_dir == coco_dir / "images"
    assert src.check() == []
    assert all(len(src.images_of_class(k)) >= 2 for k in src.class_ids())


@pytest.mark.parametrize("fold", range(4))
def test_fold_class_sets_both_conventions(coco_dir: Path, fold: int) -> None:
    inter = CocoSource(root=coco_dir, fold=fold, convention="interleaved")
    assert inter.class_ids() == [4 * m + fold for m in range(20)]
    contig = CocoSource(root=coco_dir, fold=fold, convention="contiguous")
    assert contig.class_ids() == list(range(20 * fold, 20 * fold + 20))
    for conv, val in (("interleaved", inter), ("contiguous", contig)):
        trn = CocoSource(root=coco_dir, fold=fold, convention=conv, split="trn")
        assert len(trn.classes) == 60
        assert sorted(trn.class_ids() + val.class_ids()) == list(range(80))
    assert CocoSource(root=coco_dir, fold=fold, split="test").class_ids() == inter.class_ids()


def test_folds_partition_classes() -> None:
    for conv in ("interleaved", "contiguous"):
        folds = [coco_fold_classes(80, f, conv) for f in range(4)]
        assert all(len(f) == 20 for f in folds)
        assert sorted(sum(folds, [])) == list(range(80))


def _single_polygon_case(js: dict) -> tuple[dict, dict, int]:
    """An (image, category) with exactly one non-crowd single-polygon instance and no crowd."""
    cats = sorted(c["id"] for c in js["categories"])
    by_pair: dict[tuple[int, int], list[dict]] = {}
    for a in js["annotations"]:
        by_pair.setdefault((a["image_id"], a["category_id"]), []).append(a)
    for (iid, cid), anns in sorted(by_pair.items()):
        a = anns[0]
        if len(anns) == 1 and not a["iscrowd"] and isinstance(a["segmentation"], list) and len(a["segmentation"]) == 1 and a["area"] > 5000:
            image = next(im for im in js["images"] if im["id"] == iid)
            return image, a, cats.index(cid)
    raise AssertionError("no single-polygon instance in coco-mini")


def test_polygon_mask_matches_independent_raster(coco_dir: Path, coco_json: dict) -> None:
    image, ann, k = _single_polygon_case(coco_json)
    src = CocoSource(root=coco_dir)
    img, mask = src.load(image["file_name"], k)
    assert img.shape == (image["height"], image["width"], 3) and mask.shape == img.shape[:2]
    assert set(np.unique(mask)) <= {0, 1}
    ref = np.zeros(mask.shape, np.uint8)
    pts = np.round(np.asarray(ann["segmentation"][0]).reshape(-1, 2)).astype(np.int32)
    cv2.fillPoly(ref, [pts], 1)
    inter = np.logical_and(ref == 1, mask == 1).sum()
    union = np.logical_or(ref == 1, mask == 1).sum()
    assert inter / union > 0.95
    assert abs(int(mask.sum()) - ann["area"]) / ann["area"] < 0.05


def test_union_of_instances_and_crowd_ignore(coco_dir: Path, coco_json: dict) -> None:
    cats = sorted(c["id"] for c in coco_json["categories"])
    crowd = next(a for a in coco_json["annotations"] if a["iscrowd"] and a["area"] > 10000)
    image = next(im for im in coco_json["images"] if im["id"] == crowd["image_id"])
    same = [a for a in coco_json["annotations"] if a["image_id"] == crowd["image_id"]
            and a["category_id"] == crowd["category_id"] and not a["iscrowd"]]  # fmt: skip
    src = CocoSource(root=coco_dir)
    _, mask = src.load(image["file_name"], cats.index(crowd["category_id"]))
    n1, n255 = int((mask == 1).sum()), int((mask == 255).sum())
    assert n255 > 0.5 * crowd["area"]  # crowd region is ignore (minus what instances cover)
    assert n1 <= sum(a["area"] for a in same) * 1.05 + 100  # union never exceeds the sum of areas
    assert n1 > 0.5 * max(a["area"] for a in same)
    assert src.class_pixels(image["file_name"])[cats.index(crowd["category_id"])] == n1


def test_build_episode_through_registry(coco_dir: Path) -> None:
    src = build_source("coco", root=coco_dir, fold=0)
    assert "coco" in SOURCES
    k = src.class_ids()[0]
    q, s = src.images_of_class(k)[:2]
    ep = build_episode(src, EpisodeSpec("e0", k, (q,), (s,)))
    assert ep.class_name == "person" and ep.k == 1 and ep.queries[0].gt is not None


def test_hsnet_lists_order_and_missing(coco_dir: Path, shared_data: Path) -> None:
    splits = shared_data / "fss-splits" / "hsnet"
    with pytest.raises(FsdiffError, match="allow_missing"):
        CocoSource(root=coco_dir, fold=0, hsnet_lists=True, splits_dir=splits)
    src = CocoSource(root=coco_dir, fold=0, hsnet_lists=True, splits_dir=splits, allow_missing=True)
    assert src.missing_from_json > 0
    import pickle

    with open(splits / "coco" / "val" / "fold0.pkl", "rb") as f:
        lists = pickle.load(f)
    ids = {int(Path(k).stem) for k in src.image_keys()}
    expected = [n for n in lists[0] if int(n.split("_")[-1][:-4]) in ids]
    assert [int(Path(k).stem) for k in src.images_of_class(0)] == [int(n.split("_")[-1][:-4]) for n in expected]


def test_min_pixels_filter(coco_dir: Path) -> None:
    plain = CocoSource(root=coco_dir, fold=0)
    big = CocoSource(root=coco_dir, fold=0, min_pixels=2 * 32 * 32)
    k = 0
    assert set(big.images_of_class(k)) <= set(plain.images_of_class(k))
    assert len(big.images_of_class(k)) < len(plain.images_of_class(k))


# -- synthetic exports ----------------------------------------------------------------------
def _write_export(tmp: Path, n_cats: int = 2, images: tuple[str, ...] = ("a.jpg", "b.png")) -> Path:
    (tmp / "images").mkdir(parents=True)
    for name in images:
        Image.fromarray(np.full((20, 30, 3), 100, np.uint8)).save(tmp / "images" / name)
    rle_full = np.zeros((20, 30), np.uint8, order="F")
    rle_full[2:6, 3:9] = 1
    comp = mask_utils.encode(np.asfortranarray(rle_full))
    comp["counts"] = comp["counts"].decode("ascii")
    crowd = np.zeros((20, 30), np.uint8)
    crowd[10:20, 0:30] = 1
    flat = crowd.flatten(order="F")
    counts, prev, run = [], 0, 0
    for v in flat:
        if v != prev:
            counts.append(run)
            run, prev = 0, v
        run += 1
    counts.append(run)
    data = {
        "images": [{"id": i + 1, "file_name": n, "height": 20, "width": 30} for i, n in enumerate(images)],
        "categories": [{"id": 10 * (c + 1), "name": f"thing{c}"} for c in range(n_cats)][::-1],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 10, "iscrowd": 0,
             "segmentation": [[10, 10, 20, 10, 20, 15, 10, 15]]},
            {"id": 2, "image_id": 1, "category_id": 10, "iscrowd": 0, "segmentation": comp},
            {"id": 3, "image_id": 1, "category_id": 10, "iscrowd": 1,
             "segmentation": {"size": [20, 30], "counts": counts}},
            {"id": 4, "image_id": 2, "category_id": 20, "iscrowd": 0,
             "segmentation": [[0, 0, 5, 0, 5, 5, 0, 5]]},
        ],
    }  # fmt: skip
    (tmp / "instances.json").write_text(json.dumps(data))
    return tmp / "instances.json"


def test_synthetic_polygon_rle_crowd(tmp_path: Path) -> None:
    ann = _write_export(tmp_path)
    src = CocoSource(ann=ann)
    assert src.classes == [(0, "thing0"), (1, "thing1")]  # sorted by category id, not file order
    assert src.images_of_class(0) == ["a.jpg"] and src.images_of_class(1) == ["b.png"]
    _, m = src.load("a.jpg", 0)
    assert m.dtype == np.uint8 and m.shape == (20, 30)
    assert (m[2:6, 3:9] == 1).all()  # compressed RLE
    assert (m[11:15, 11:20] == 1).all()  # polygon wins over the crowd region it overlaps
    assert m[18, 2] == 255 and m[0, 0] == 0  # crowd -> ignore
    _, m2 = src.load("a.jpg", 1)
    assert not m2.any()
    assert src.query_items() == [("a.jpg", 0), ("b.png", 1)]


def test_user_export_folds(tmp_path: Path) -> None:
    ann = _write_export(tmp_path, n_cats=6)
    assert CocoSource(ann=ann, fold=None).class_ids() == list(range(6))
    assert CocoSource(ann=ann, fold=1).class_ids() == [1, 5]
    assert CocoSource(ann=ann, fold=1, split="trn").class_ids() == [0, 2, 3, 4]
    assert CocoSource(ann=ann, fold=1, convention="contiguous").class_ids() == [1, 2]


@pytest.mark.parametrize("fold", [4, -1, "1", 1.5, True])
def test_fold_out_of_range(tmp_path: Path, fold: object) -> None:
    ann = _write_export(tmp_path)
    with pytest.raises(FsdiffError, match=r"fold=.*0\.\.3"):
        CocoSource(ann=ann, fold=fold)


def test_bad_convention(tmp_path: Path) -> None:
    with pytest.raises(FsdiffError, match="interleaved"):
        CocoSource(ann=_write_export(tmp_path), fold=0, convention="pan")


@pytest.mark.parametrize(
    "text, pattern",
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "top level"),
        (json.dumps({"images": [], "categories": []}), "annotations"),
    ],
)
def test_malformed_json(tmp_path: Path, text: str, pattern: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(FsdiffError, match=pattern) as exc:
        CocoSource(ann=path)
    assert str(path) in str(exc.value)


@pytest.mark.parametrize("field, value, pattern", [("image_id", 99, "image_id 99"), ("category_id", 77, "category_id 77")])
def test_unknown_ids(tmp_path: Path, field: str, value: int, pattern: str) -> None:
    ann = _write_export(tmp_path)
    data = json.loads(ann.read_text())
    data["annotations"][0][field] = value
    ann.write_text(json.dumps(data))
    with pytest.raises(FsdiffError, match=pattern) as exc:
        CocoSource(ann=ann)
    assert str(ann) in str(exc.value)


def test_missing_image_file(tmp_path: Path) -> None:
    ann = _write_export(tmp_path)
    (tmp_path / "images" / "b.png").unlink()
    src = CocoSource(ann=ann)  # construction does not touch images
    assert src.check() == [str(tmp_path / "images" / "b.png")]
    src.load("a.jpg", 0)
    with pytest.raises(FsdiffError) as exc:
        src.load("b.png", 1)
    assert "b.png" in str(exc.value) and str(ann) in str(exc.value)


def test_json_size_mismatch(tmp_path: Path) -> None:
    ann = _write_export(tmp_path)
    Image.fromarray(np.zeros((21, 30, 3), np.uint8)).save(tmp_path / "images" / "b.png")
    with pytest.raises(FsdiffError, match="30x21"):
        CocoSource(ann=ann).load("b.png", 1)


def test_missing_json_and_images_override(tmp_path: Path) -> None:
    with pytest.raises(FsdiffError, match="not found"):
        CocoSource(ann=tmp_path / "nope.json")
    ann = _write_export(tmp_path / "export")
    moved = tmp_path / "pics"
    (tmp_path / "export" / "images").rename(moved)
    assert CocoSource(ann=ann, images=moved).check() == []
