"""fsdiff.app.export: the zip of PNG masks and COCO files, read back with PIL and pycocotools."""

from __future__ import annotations

import io
import json
import zipfile

import cv2
import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from fsdiff.app.export import COCO_POLYGONS, COCO_RLE, ZIP_NAME, ExportItem, write_export
from fsdiff.output import coco_polygons as polygons
from fsdiff.errors import FsdiffError


def blob_mask(h=60, w=80):
    m = np.zeros((h, w), np.uint8)
    m[10:30, 20:50] = 1
    cv2.circle(m, (62, 42), 11, 1, -1)
    m[3:5, 3:5] = 1  # a 2x2 speck
    return m


def rasterise(polys, h, w):
    from pycocotools import mask as mu

    return mu.decode(mu.merge(mu.frPyObjects(polys, h, w)))


def test_polygons_rasterise_back_to_exactly_the_mask():
    m = blob_mask()
    polys = polygons(m)
    assert len(polys) == 3 and all(len(p) >= 6 and len(p) % 2 == 0 for p in polys)
    assert np.array_equal(rasterise(polys, *m.shape), m)


def read_coco(zf: zipfile.ZipFile, name: str, tmp_path) -> COCO:
    path = tmp_path / name
    path.write_bytes(zf.read(name))
    return COCO(str(path))


def test_export_zip_masks_and_both_coco_files_read_back(tmp_path):
    a = blob_mask()
    b = np.zeros((40, 30), np.uint8)
    b[5:35, 10:20] = 1
    empty = np.zeros((20, 20), np.uint8)
    items = [ExportItem("a.jpg", "a", a, 0.9), ExportItem("b.png", "b", b, 1.0), ExportItem("c.jpg", "c", empty, 0.0)]
    path = write_export(tmp_path, items, "fish")
    assert path == tmp_path / ZIP_NAME
    assert sorted(p.name for p in tmp_path.iterdir()) == [ZIP_NAME]  # nothing else left (atomic write)
    with zipfile.ZipFile(path) as zf:
        assert sorted(zf.namelist()) == sorted(["a_mask.png", "b_mask.png", "c_mask.png", COCO_RLE, COCO_POLYGONS])
        for it in items:
            png = np.asarray(Image.open(io.BytesIO(zf.read(f"{it.stem}_mask.png"))))
            assert set(np.unique(png)) <= {0, 255}
            assert np.array_equal(png == 255, it.mask == 1)
        for name in (COCO_RLE, COCO_POLYGONS):
            coco = read_coco(zf, name, tmp_path)
            assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == ["fish"]
            imgs = {im["file_name"]: im for im in coco.loadImgs(coco.getImgIds())}
            assert set(imgs) == {"a.jpg", "b.png", "c.jpg"}
            for it in items:
                im = imgs[it.file_name]
                assert (im["height"], im["width"]) == it.mask.shape
                anns = coco.loadAnns(coco.getAnnIds(imgIds=[im["id"]]))
                if not it.mask.any():
                    assert anns == []
                    continue
                assert len(anns) == 1 and anns[0]["iscrowd"] == 0 and anns[0]["score"] == pytest.approx(it.score)
                assert np.array_equal(coco.annToMask(anns[0]), it.mask)
        rle = json.loads(zf.read(COCO_RLE))
        poly = json.loads(zf.read(COCO_POLYGONS))
    # CVAT / Datumaro read the compressed RLE dict; Label Studio's COCO import iterates polygon lists
    assert all(isinstance(a["segmentation"], dict) and isinstance(a["segmentation"]["counts"], str)
               for a in rle["annotations"])
    assert all(isinstance(a["segmentation"], list) and all(len(p) % 2 == 0 and len(p) >= 6 for p in a["segmentation"])
               for a in poly["annotations"])
    assert [a["bbox"] for a in rle["annotations"]] == [a["bbox"] for a in poly["annotations"]]


def test_export_without_any_result_is_refused_and_writes_nothing(tmp_path):
    with pytest.raises(FsdiffError, match="no segmented query"):
        write_export(tmp_path, [], "x")
    assert list(tmp_path.iterdir()) == []
