"""Output folders (fsdiff.output): unique names, never replacing a user's file, per-query units, COCO/npz."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from fsdiff.errors import FsdiffError
from fsdiff.output import MANIFEST, OutputFolder, coco_document, unique_stems


def test_unique_stems():
    assert unique_stems(["a/q.jpg", "b/r.png"]) == ["q", "r"]
    assert unique_stems(["q.jpg", "q.png", "x.png"]) == ["q_jpg", "q_png", "x"]
    assert unique_stems(["a/q.jpg", "b/q.jpg"]) == ["q_jpg", "q_jpg_1"]
    assert unique_stems(["", "noext"]) == ["query", "noext"]


def _prob(h=6, w=8):
    p = np.zeros((h, w), np.float32)
    p[1:4, 2:6] = 0.9
    return p


def test_writes_a_unit_per_query_and_records_it(tmp_path):
    folder = OutputFolder(tmp_path / "o", ["q.jpg", "q.png"], formats=("png", "npz", "coco", "coco-polygons"))
    assert not (tmp_path / "o").exists()  # nothing is created before the first write
    img = np.zeros((6, 8, 3), np.uint8)
    folder.write(0, img, _prob(), 0.5)
    folder.write(1, img, _prob() * 0.1, 0.5)
    coco, polys = folder.finish("thing")
    lines = [json.loads(x) for x in (tmp_path / "o" / MANIFEST).read_text().splitlines()]
    assert [(e.get("stem"), e["state"]) for e in lines[:4]] == [("q_jpg", "writing"), ("q_jpg", "done"),
                                                                  ("q_png", "writing"), ("q_png", "done")]
    assert sorted(lines[1]["files"]) == ["q_jpg_mask.png", "q_jpg_overlay.jpg", "q_jpg_prob.npz", "q_jpg_prob.png"]
    from pycocotools import mask as mask_utils

    doc = json.loads(coco.read_text())
    assert [im["file_name"] for im in doc["images"]] == ["q.jpg", "q.png"] and len(doc["annotations"]) == 1
    ann = doc["annotations"][0]
    decoded = mask_utils.decode({"size": ann["segmentation"]["size"], "counts": ann["segmentation"]["counts"].encode()})
    assert np.array_equal(decoded.astype(bool), _prob() > 0.5)
    assert ann["bbox"] == [2, 1, 4, 3] and ann["area"] == 12 and doc["categories"][0]["name"] == "thing"
    poly = json.loads(polys.read_text())["annotations"][0]["segmentation"]
    rles = mask_utils.frPyObjects(poly, 6, 8)
    assert np.array_equal(mask_utils.decode(mask_utils.merge(rles)).astype(bool), _prob() > 0.5)


def test_coco_output_holds_encoded_records_not_masks(tmp_path):
    folder = OutputFolder(tmp_path / "o", ["a.jpg", "b.jpg"], formats=("coco",))
    img = np.zeros((6, 8, 3), np.uint8)
    folder.write(0, img, _prob(), 0.5)
    folder.write(1, img, _prob() * 0.1, 0.5)

    def arrays(x):
        if isinstance(x, dict):
            return sum(arrays(v) for v in x.values())
        if isinstance(x, (list, tuple)):
            return sum(arrays(v) for v in x)
        return int(isinstance(x, np.ndarray))

    assert arrays(folder._coco) == 0  # memory does not grow with the queries' pixels
    (path,) = folder.finish("thing")
    expected = coco_document([("a.jpg", _prob() > 0.5, float(_prob()[_prob() > 0.5].mean())),
                              ("b.jpg", np.zeros((6, 8), bool), 0.0)], "thing")
    assert json.loads(path.read_text()) == json.loads(json.dumps(expected))


def test_refuses_a_users_file_and_allows_its_own(tmp_path):
    out = tmp_path / "work"
    out.mkdir()
    (out / "b_mask.png").write_bytes(b"user's own")
    with pytest.raises(FsdiffError, match="b_mask.png already exist.*fsdiff did not write them.*overwrite=True"):
        OutputFolder(out, ["work/b.jpg"])
    assert (out / "b_mask.png").read_bytes() == b"user's own"
    OutputFolder(out, ["work/b.jpg"], overwrite=True).write(0, np.zeros((6, 8, 3), np.uint8), _prob(), 0.5)
    OutputFolder(out, ["work/b.jpg"])  # now fsdiff's own files: a re-run may replace them
    os.utime(out / "b_prob.png", ns=(1, 1))  # changed since fsdiff wrote it: refused again
    with pytest.raises(FsdiffError, match="b_prob.png"):
        OutputFolder(out, ["work/b.jpg"])


def test_out_must_be_a_folder(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(FsdiffError, match="out='.*f' is a file"):
        OutputFolder(tmp_path / "f", ["q.png"])
    with pytest.raises(FsdiffError, match="lies below the file"):
        OutputFolder(tmp_path / "f" / "sub", ["q.png"])
    with pytest.raises(FsdiffError, match="formats=\\['tiff'\\]"):
        OutputFolder(tmp_path / "o", ["q.png"], formats=("tiff",))


def test_temporaries_of_a_killed_run_are_removed(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    left = out / ".q_mask.png.abc123.tmp.png"
    left.write_bytes(b"half")
    (out / ".hidden_user_file").write_text("keep")
    OutputFolder(out, ["q.png"])
    assert not left.exists() and (out / ".hidden_user_file").exists()


def test_coco_document_of_empty_masks():
    doc = coco_document([("a.png", np.zeros((3, 3), bool), 0.0)], "x")
    assert doc["images"][0] == {"id": 1, "file_name": "a.png", "width": 3, "height": 3} and doc["annotations"] == []
