"""The export zip: one ``NAME_mask.png`` (0/255) per query plus COCO instance files for annotation tools.

* ``annotations.coco.json``: RLE masks (``iscrowd`` 0, exact; :func:`fsdiff.output.coco_document`). CVAT's
  COCO 1.0 import (Datumaro) reads a compressed-RLE ``segmentation`` dict as a mask whatever ``iscrowd`` says;
  pycocotools and detectron2 read it too.
* ``annotations_polygons.coco.json``: the same masks as polygons. Label Studio's COCO import (label-studio-sdk
  ``convert_coco_to_ls``) reads polygons only: it iterates ``segmentation`` as a list of polygons, so an RLE
  dict is not imported (:func:`fsdiff.output.coco_polygons`: exact up to filled holes).

The zip is written atomically inside the session folder (:func:`fsdiff.io.atomic_path`).
"""

from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from fsdiff.errors import FsdiffError
from fsdiff.io import atomic_path
from fsdiff.output import coco_document

ZIP_NAME = "fsdiff-masks.zip"
COCO_RLE = "annotations.coco.json"
COCO_POLYGONS = "annotations_polygons.coco.json"


@dataclass(frozen=True)
class ExportItem:
    """One query's export: its image file name, the stem of its mask file, the binary mask and a score."""

    file_name: str
    stem: str
    mask: np.ndarray
    score: float


def _png(mask: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(mask.astype(np.uint8) * 255).save(buf, format="PNG")
    return buf.getvalue()


def write_export(folder: str | Path, items: Sequence[ExportItem], class_name: str) -> Path:
    """Write ``folder/fsdiff-masks.zip`` (masks and both COCO files) atomically; returns its path."""
    if not items:
        raise FsdiffError("export: no segmented query yet; add queries and press Segment first.")
    name = class_name.strip() or "object"
    entries = [(it.file_name, it.mask.astype(bool), it.score) for it in items]
    doc, poly = coco_document(entries, name), coco_document(entries, name, segmentation="polygons")
    target = Path(folder) / ZIP_NAME
    with atomic_path(target) as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for it in items:
                zf.writestr(f"{it.stem}_mask.png", _png(it.mask))
            zf.writestr(COCO_RLE, json.dumps(doc, indent=1) + "\n")
            zf.writestr(COCO_POLYGONS, json.dumps(poly, indent=1) + "\n")
    return target
