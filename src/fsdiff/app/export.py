"""The export zip: one ``NAME_mask.png`` (0/255) per query plus COCO instance files for annotation tools.

* ``annotations.coco.json``: RLE masks (``iscrowd`` 0, exact; :func:`fsdiff.output.coco_document`). CVAT's
  COCO 1.0 import (Datumaro) reads a compressed-RLE ``segmentation`` dict as a mask whatever ``iscrowd`` says;
  pycocotools and detectron2 read it too.
* ``annotations_polygons.coco.json``: the same masks as polygons. Label Studio's COCO import (label-studio-sdk
  ``convert_coco_to_ls``) reads polygons only: it iterates ``segmentation`` as a list of polygons, so an RLE
  dict is not imported. The outlines are traced on the mask upsampled 2x (nearest) and shifted by half an
  upsampled pixel, which pycocotools rasterises back to exactly the mask's pixels; holes are filled.

The zip is written atomically inside the session folder (:func:`fsdiff.io.atomic_path`).
"""

from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
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


def polygons(mask: np.ndarray) -> list[list[float]]:
    """COCO polygons ``[[x0, y0, x1, y1, ...], ...]`` of a binary mask's outer outlines (see the module docstring)."""
    m = np.asarray(mask).astype(np.uint8)
    h, w = m.shape
    up = cv2.resize(m, (2 * w, 2 * h), interpolation=cv2.INTER_NEAREST)
    contours, _ = cv2.findContours(up, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    out = []
    for c in contours:
        pts = c.reshape(-1, 2).astype(np.float64)
        if len(pts) < 3:
            continue
        out.append([round(float(v), 2) for v in ((pts + 0.5) / 2.0).ravel()])
    return out


def polygon_document(document: dict, masks: Sequence[np.ndarray]) -> dict:
    """``document`` (from :func:`fsdiff.output.coco_document`) with each RLE segmentation replaced by polygons."""
    by_image = {i: m for i, m in enumerate(masks, start=1)}
    anns = []
    for ann in document["annotations"]:
        polys = polygons(by_image[ann["image_id"]])
        if polys:
            anns.append({**ann, "segmentation": polys})
    return {**document, "annotations": anns}


def _png(mask: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(mask.astype(np.uint8) * 255).save(buf, format="PNG")
    return buf.getvalue()


def write_export(folder: str | Path, items: Sequence[ExportItem], class_name: str) -> Path:
    """Write ``folder/fsdiff-masks.zip`` (masks and both COCO files) atomically; returns its path."""
    if not items:
        raise FsdiffError("export: no segmented query yet; add queries and press Segment first.")
    name = class_name.strip() or "object"
    doc = coco_document([(it.file_name, it.mask.astype(bool), it.score) for it in items], name)
    poly = polygon_document(doc, [it.mask for it in items])
    target = Path(folder) / ZIP_NAME
    with atomic_path(target) as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for it in items:
                zf.writestr(f"{it.stem}_mask.png", _png(it.mask))
            zf.writestr(COCO_RLE, json.dumps(doc, indent=1) + "\n")
            zf.writestr(COCO_POLYGONS, json.dumps(poly, indent=1) + "\n")
    return target
