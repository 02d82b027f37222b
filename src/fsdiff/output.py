"""Writing predictions into an output folder safely: masks (PNG), probabilities (PNG or npz), overlays and one
COCO json with RLE masks.

Guarantees (README "Safety and limits"):

* every output name is planned before any work: one unique stem per query (``q.jpg`` and ``q.png`` become
  ``q_jpg`` and ``q_png``), and a file that exists but was not written by fsdiff is never replaced (the
  caller is told to pick another folder or pass ``overwrite=True``);
* each file is written atomically, and a query's files form a unit recorded in ``fsdiff_outputs.jsonl``:
  a line ``writing`` before its files are renamed into place and ``done`` after, so a run that is killed
  leaves at most one query unfinished and the record says which ones finished;
* temporaries left by a killed run are removed when the folder is opened again.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from fsdiff.errors import FsdiffError
from fsdiff.io import write_image, write_text
from fsdiff.jsonutil import dumps

OVERLAY_COLOUR = (255, 64, 32)
FORMATS = ("png", "coco", "coco-polygons", "npz")
"""Output formats: ``png`` (``NAME_mask.png`` 0/255 and ``NAME_prob.png`` probability x 255), ``coco`` (one
``predictions.coco.json`` with an RLE mask per query: CVAT, pycocotools), ``coco-polygons``
(``predictions.polygons.coco.json``: Label Studio), ``npz`` (``NAME_prob.npz``: float32 ``prob`` and ``threshold``)."""
MANIFEST = "fsdiff_outputs.jsonl"
COCO_FILES = {"coco": ("predictions.coco.json", "rle"), "coco-polygons": ("predictions.polygons.coco.json", "polygons")}


def overlay(image: np.ndarray, mask: np.ndarray, colour: tuple[int, int, int] = OVERLAY_COLOUR, alpha: float = 0.5) -> np.ndarray:
    """Blend ``colour`` into ``image`` where ``mask`` is set and draw the mask's outline."""
    out = image.astype(np.float32).copy()
    m = mask.astype(bool)
    out[m] = (1 - alpha) * out[m] + alpha * np.asarray(colour, np.float32)
    out = out.round().clip(0, 255).astype(np.uint8)
    contours, _ = cv2.findContours(m.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    thickness = max(1, round(min(image.shape[:2]) / 200))
    cv2.drawContours(out, contours, -1, colour, thickness)
    return out


def unique_stems(names: Sequence[str]) -> list[str]:
    """One file stem per name: the name's stem, or stem_ext where two names share a stem, then a counter."""
    stems = [Path(n).stem or "query" for n in names]
    counts: dict[str, int] = {}
    for s in stems:
        counts[s] = counts.get(s, 0) + 1
    out: list[str] = []
    for name, stem in zip(names, stems):
        cand = stem if counts[stem] == 1 else f"{stem}_{Path(name).suffix.lstrip('.') or 'noext'}"
        base, n = cand, 1
        while cand in out:
            cand, n = f"{base}_{n}", n + 1
        out.append(cand)
    return out


def check_output_dir(path: str | os.PathLike, what: str = "out", create: bool = False) -> Path:
    """Check that ``path`` is or can become a writable folder (created only with ``create``), else an
    FsdiffError naming ``what``; nothing is created on failure."""
    out = Path(path).expanduser()
    for parent in [out, *out.parents]:
        if parent.exists() and not parent.is_dir():
            where = "is a file" if parent == out else f"lies below the file {parent}"
            raise FsdiffError(f"{what}={os.fspath(path)!r} {where}; give a folder for the outputs.")
    existing = next(p for p in [out, *out.parents] if p.exists())
    if not os.access(existing, os.W_OK | os.X_OK):
        raise FsdiffError(f"{what}={os.fspath(path)!r}: {existing} is not writable; pick another folder.")
    if create:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise FsdiffError(f"{what}={os.fspath(path)!r}: cannot create the folder ({exc.strerror}).") from None
    return out


def remove_temporaries(folder: Path) -> list[Path]:
    """Delete the temporaries an interrupted atomic write left in ``folder`` (``.NAME.XXXX.tmp.EXT``)."""
    removed = []
    for p in folder.glob(".*.tmp*"):
        if p.is_file() and ".tmp" in p.name:
            with contextlib.suppress(OSError):
                p.unlink()
                removed.append(p)
    return removed


@dataclass(frozen=True)
class WrittenPrediction:
    """Paths written for one query (None for the kinds not asked for)."""

    mask: Path | None
    prob: Path | None
    overlay: Path | None
    npz: Path | None = None

    def paths(self) -> list[Path]:
        """Every written path."""
        return [p for p in (self.mask, self.prob, self.overlay, self.npz) if p is not None]


def coco_rle(mask: np.ndarray) -> dict:
    """The COCO RLE (``{'size': [h, w], 'counts': str}``) of a binary mask."""
    import warnings

    from pycocotools import mask as mask_utils

    with warnings.catch_warnings():  # pycocotools vs numpy 2's copy= keyword
        warnings.simplefilter("ignore", DeprecationWarning)
        rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def coco_polygons(mask: np.ndarray) -> list[list[float]]:
    """COCO polygons ``[[x0, y0, x1, y1, ...], ...]`` of a binary mask's outer outlines (holes filled).

    The outlines are traced on the mask upsampled 2x (nearest) and shifted by half an upsampled pixel, which
    pycocotools rasterises back to exactly the mask's pixels.
    """
    m = np.asarray(mask).astype(np.uint8)
    h, w = m.shape
    up = cv2.resize(m, (2 * w, 2 * h), interpolation=cv2.INTER_NEAREST)
    contours, _ = cv2.findContours(up, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    out = []
    for c in contours:
        pts = c.reshape(-1, 2).astype(np.float64)
        if len(pts) >= 3:
            out.append([round(float(v), 2) for v in ((pts + 0.5) / 2.0).ravel()])
    return out


def coco_item(name: str, mask: np.ndarray, score: float, segmentations: Sequence[str] = ("rle",)) -> dict:
    """One query's compact COCO record: its image entry and, for a non-empty mask, the annotation fields
    and one encoded segmentation per name in ``segmentations`` ('rle' and/or 'polygons'). Holding these
    instead of the masks keeps an output folder's memory small however many queries it writes."""
    bad = [s for s in segmentations if s not in ("rle", "polygons")]
    if bad:
        raise FsdiffError(f"segmentation={bad[0]!r}: use 'rle' or 'polygons'.")
    h, w = mask.shape
    item: dict = {"image": {"file_name": name, "width": int(w), "height": int(h)}, "ann": None, "seg": {}}
    if mask.any():
        ys, xs = np.nonzero(mask)
        x0, y0 = int(xs.min()), int(ys.min())
        item["ann"] = {"area": int(mask.sum()), "bbox": [x0, y0, int(xs.max()) + 1 - x0, int(ys.max()) + 1 - y0],
                       "iscrowd": 0, "score": float(score)}
        item["seg"] = {s: coco_rle(mask) if s == "rle" else coco_polygons(mask) for s in segmentations}
    return item


def coco_document_of(items: Sequence[dict], class_name: str, segmentation: str = "rle") -> dict:
    """A COCO instances document of :func:`coco_item` records (one image each, one annotation per non-empty mask)."""
    images, anns = [], []
    for i, item in enumerate(items, start=1):
        images.append({"id": i, **item["image"]})
        if item["ann"] is None:
            continue
        if segmentation not in item["seg"]:
            raise FsdiffError(f"segmentation={segmentation!r} was not encoded for {item['image']['file_name']}.")
        anns.append({"id": len(anns) + 1, "image_id": i, "category_id": 1,
                     "segmentation": item["seg"][segmentation], **item["ann"]})
    return {"info": {"description": "fsdiff predictions"}, "images": images, "annotations": anns,
            "categories": [{"id": 1, "name": class_name, "supercategory": "object"}]}


def coco_document(items: Sequence[tuple[str, np.ndarray, float]], class_name: str, *,
                  segmentation: str = "rle") -> dict:
    """A COCO instances document: one image per (file name, binary mask, score), one annotation per non-empty
    mask. ``segmentation='rle'`` (exact; CVAT, pycocotools, detectron2 read it) or ``'polygons'`` (Label Studio's
    COCO import reads polygons only)."""
    if segmentation not in ("rle", "polygons"):
        raise FsdiffError(f"segmentation={segmentation!r}: use 'rle' or 'polygons'.")
    records = [coco_item(name, mask, score, (segmentation,)) for name, mask, score in items]
    return coco_document_of(records, class_name, segmentation)


class OutputFolder:
    """An output folder: planned names per query, no foreign file replaced, per-query units, a completion record."""

    def __init__(self, out: str | os.PathLike, names: Sequence[str], *, formats: Sequence[str] = ("png",),
                 overlay: bool = True, overwrite: bool = False, what: str = "out", extra: Sequence[str] = ()) -> None:
        """``names``: the queries (one stem each); ``extra``: other file names the caller will write with
        :meth:`write_file`, checked like the per-query files."""
        bad = [f for f in formats if f not in FORMATS]
        if bad or not formats:
            raise FsdiffError(f"formats={list(formats)!r}: choose among {', '.join(FORMATS)}.")
        self.formats, self.overlay = tuple(dict.fromkeys(formats)), bool(overlay)
        self.dir = check_output_dir(out, what)
        if self.dir.is_dir():
            remove_temporaries(self.dir)
        self.names = list(names)
        self.extra = tuple(extra) + tuple(COCO_FILES[f][0] for f in self.formats if f in COCO_FILES)
        self.stems = unique_stems(self.names)
        self._ours = self._recorded()
        self._coco: list[dict] = []  # compact records (RLE / polygons), not masks
        self.done: list[str] = []
        if not overwrite:
            self._refuse_foreign()

    def planned(self, stem: str) -> WrittenPrediction:
        """The files a query with this stem gets."""
        d, png = self.dir, "png" in self.formats
        return WrittenPrediction(d / f"{stem}_mask.png" if png else None, d / f"{stem}_prob.png" if png else None,
                                 d / f"{stem}_overlay.jpg" if self.overlay else None,
                                 d / f"{stem}_prob.npz" if "npz" in self.formats else None)

    def _recorded(self) -> dict[str, list | None]:
        """File name -> [size, mtime_ns] when fsdiff finished writing it (None: it was being written)."""
        path = self.dir / MANIFEST
        files: dict[str, list | None] = {}
        if path.is_file():
            for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
                with contextlib.suppress(ValueError, TypeError, AttributeError):
                    entry = json.loads(line)
                    stats = entry.get("stats") or {}
                    for name in entry.get("files", []):
                        files[str(name)] = stats.get(name, files.get(str(name)))
        return files

    def _is_ours(self, path: Path) -> bool:
        """Whether fsdiff wrote ``path`` (and nobody replaced it since)."""
        if path.name not in self._ours:
            return False
        stat = self._ours[path.name]
        return stat is None or list(stat) == _stat(path)

    def _refuse_foreign(self) -> None:
        planned = [p for s in self.stems for p in self.planned(s).paths()] + [self.dir / n for n in self.extra]
        foreign = [p for p in planned if p.exists() and not self._is_ours(p)]
        if foreign:
            shown = ", ".join(str(p) for p in foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
            raise FsdiffError(f"{shown} already exist(s) in the output folder and fsdiff did not write them; choose "
                              "another output folder, move those files, or allow replacing them (overwrite=True).")

    def _record(self, entry: dict) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / MANIFEST, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(entry) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def write(self, index: int, image: np.ndarray, prob: np.ndarray, threshold: float) -> WrittenPrediction:
        """Write the outputs of query ``index`` as one unit and record it."""
        stem, mask = self.stems[index], prob > threshold
        files = self.planned(stem)
        self._record({"query": self.names[index], "stem": stem, "state": "writing",
                      "files": [p.name for p in files.paths()]})
        if files.mask is not None and files.prob is not None:
            write_image(files.mask, mask.astype(np.uint8) * 255)
            write_image(files.prob, (np.clip(prob, 0, 1) * 255).round().astype(np.uint8))
        if files.overlay is not None:
            write_image(files.overlay, overlay(image, mask))
        if files.npz is not None:
            _write_npz(files.npz, prob, threshold)
        if any(f in COCO_FILES for f in self.formats):
            kinds = [COCO_FILES[f][1] for f in self.formats if f in COCO_FILES]
            score = float(prob[mask].mean()) if mask.any() else 0.0
            self._coco.append(coco_item(Path(self.names[index]).name, mask, score, kinds))
        done = files.paths()
        self._record({"query": self.names[index], "stem": stem, "state": "done", "files": [p.name for p in done],
                      "stats": {p.name: _stat(p) for p in done}})
        self.done.append(self.names[index])
        return files

    def write_file(self, name: str, writer: Callable[[Path], None]) -> Path:
        """Write one of the ``extra`` files with ``writer(path)`` (an atomic writer) and record it."""
        if name not in self.extra:
            raise FsdiffError(f"{name} was not planned for {self.dir}; list it in extra= when opening the folder.")
        self._record({"state": "writing", "files": [name]})
        writer(self.dir / name)
        self._record({"state": "done", "files": [name], "stats": {name: _stat(self.dir / name)}})
        return self.dir / name

    def finish(self, class_name: str) -> list[Path]:
        """Write the COCO json(s) of the finished queries (when asked for); returns their paths."""
        written = []
        for fmt in (f for f in self.formats if f in COCO_FILES):
            name, kind = COCO_FILES[fmt]
            doc = coco_document_of(self._coco, class_name, kind)
            written.append(self.write_file(name, lambda p, d=doc: write_text(p, dumps(d) + "\n")))
        return written


def _stat(path: Path) -> list[int]:
    """[size, mtime_ns] of a file: what tells a file fsdiff wrote from one put there later."""
    st = path.stat()
    return [int(st.st_size), int(st.st_mtime_ns)]


def _write_npz(path: Path, prob: np.ndarray, threshold: float) -> None:
    from fsdiff.io import atomic_path

    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, prob=prob.astype(np.float32), threshold=np.float32(threshold))
