"""COCO-20i and any COCO-format export (folds in both conventions: docs/DATASETS.md §3), read from an
``instances.json``.

Works for COCO 2014/2017 and for exports of CVAT, Label Studio, labelme (labelme2coco), Roboflow.
Segmentations may be polygons, uncompressed or compressed RLE (decoded with ``pycocotools.mask``).
The mask of (image, class) is 1 on the union of the class's non-crowd instances, 255 on the class's
crowd regions not covered by an instance, 0 elsewhere (other classes are background).

Class index k = position of the category in sorted category-id order (0..79 for COCO). Folds:

* ``interleaved`` (HSNet / FWB, BAM's ``use_split_coco=True``): fold i tests indexes {4m + i};
* ``contiguous`` (PANet): fold i tests indexes 20i..20i+19.

A dataset with another number of categories N is split the same way on its own sorted categories
(interleaved: k % n_folds == i; contiguous: [i*N//n_folds, (i+1)*N//n_folds)); ``fold=None`` keeps
every class. split 'val' (or 'test') = the fold's classes, 'trn' (or 'train') = the others.

Every entry is validated before use (ids, sizes, file names; polygons and RLE against the image size
before ``pycocotools`` rasterises them, with the bounds of :mod:`fsdiff.limits`), and image files must
lie inside the image folder (or, for the json-relative fallback, the json's folder): see
:func:`fsdiff.io.resolve_inside`. Errors name the json and the entry.

A class is present in an image when it has a non-crowd instance; ``min_pixels`` (default 0: no
filter) additionally requires that many pixels in the union mask. With ``hsnet_lists=True`` the
per-class image lists (and so HSNet's sampling) come from HSNet's ``coco/{trn,val}/fold{i}.pkl``.
"""

from __future__ import annotations

import math
import os
import pickle
import re
import warnings
from collections import OrderedDict
from pathlib import Path

import numpy as np

from fsdiff.data.base import (
    SOURCES,
    FewShotSource,
    check_fold,
    normalise_split,
    resolve_splits_dir,
)
from fsdiff.errors import FsdiffError
from fsdiff.io import IGNORE, read_image, read_json, resolve_inside
from fsdiff.limits import (
    MAX_KEY_CHARS,
    MAX_POLYGON_PERIMETER,
    MAX_POLYGON_POINTS,
    MAX_POLYGONS,
    POLYGON_MARGIN,
    POLYGON_MARGIN_MIN_PX,
    check_image_size,
)

CONVENTIONS = ("interleaved", "contiguous")
_SPLITS = {"val": "val", "test": "val", "trn": "trn", "train": "trn"}
_JSON_NAMES = ("instances.json", "annotations.json", "_annotations.coco.json", "result.json",
               "annotations/instances_default.json", "annotations/instances.json")  # fmt: skip
_CACHE_SIZE = 64


def coco_fold_classes(n_classes: int, fold: int, convention: str = "interleaved", n_folds: int = 4) -> list[int]:
    """Class indexes (0..n_classes-1) tested in ``fold`` under ``convention``."""
    fold = check_fold(fold, n_folds, "COCO-20i")
    if convention == "interleaved":
        return [k for k in range(n_classes) if k % n_folds == fold]
    if convention == "contiguous":
        return list(range(fold * n_classes // n_folds, (fold + 1) * n_classes // n_folds))
    raise FsdiffError(f"convention={convention!r} is not a COCO-20i fold convention; use one of {CONVENTIONS}.")


class _NoGlobals(pickle.Unpickler):
    """Unpickler for HSNet's list files: plain dicts, lists, ints and strings only."""

    def find_class(self, module: str, name: str):  # noqa: D401
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: the file holds more than plain data")


def _short(value: object, n: int = 60) -> str:
    """repr of ``value`` cut to ``n`` characters (for messages about hostile entries)."""
    text = repr(value)
    return text if len(text) <= n else text[: n - 3] + "..."


def _rle_string_counts(s: bytes) -> np.ndarray:
    """The run lengths of a compressed COCO RLE string (pycocotools' ``rleFrString``), as int64.

    Raises ValueError on characters outside the alphabet, a truncated last run, or a run encoded in more
    than 6 characters (30 bits, beyond which pycocotools' C shifts overflow).
    """
    b = np.frombuffer(s, np.uint8).astype(np.int64) - 48
    if b.size == 0:
        return np.zeros(0, np.int64)
    if b.min() < 0 or b.max() > 63:
        raise ValueError("the RLE string holds characters outside its alphabet ('0'..'o')")
    more = (b & 0x20) != 0
    if more[-1]:
        raise ValueError("the RLE string is truncated")
    ends = np.flatnonzero(~more)
    starts = np.concatenate([[0], ends[:-1] + 1])
    lengths = ends - starts + 1
    if lengths.max() > 6:
        raise ValueError("the RLE string encodes a run in more than 6 characters")
    pos = np.arange(b.size) - np.repeat(starts, lengths)
    vals = np.add.reduceat((b & 0x1F) << (5 * pos), starts)
    vals = np.where((b[ends] & 0x10) != 0, vals - (np.int64(1) << (5 * lengths)), vals)
    cnts = vals.copy()
    cnts[1::2] = np.cumsum(vals[1::2])  # run i > 2 is stored as the difference to run i - 2
    if cnts.size > 2:
        cnts[2::2] = np.cumsum(vals[2::2])
    return cnts


def _id_in_name(name: str) -> int | None:
    m = re.search(r"(\d+)\.[A-Za-z]+$", name)
    return int(m.group(1)) if m else None


class CocoSource(FewShotSource):
    """A COCO-format instances json and its image folder, restricted to one fold and split."""

    name = "coco"
    hsnet_query_mode = "class_random"
    default_episodes = 1000
    open_options = ("ann", "convention", "splits_dir")

    @classmethod
    def _open(cls, root, *, fold, split, ann=None, **options) -> "CocoSource":
        """With ``ann`` (the instances json) ``root`` is the image folder, else the folder holding both."""
        if ann is not None:
            return cls(ann=ann, images=root, fold=fold, split=split, **options)
        return cls(root=root, fold=fold, split=split, **options)

    def __init__(
        self,
        ann: str | os.PathLike | None = None,
        root: str | os.PathLike | None = None,
        images: str | os.PathLike | None = None,
        fold: int | None = None,
        split: str = "val",
        convention: str = "interleaved",
        n_folds: int = 4,
        min_pixels: int = 0,
        splits_dir: str | os.PathLike | None = None,
        hsnet_lists: bool = False,
        allow_missing: bool = False,
    ) -> None:
        super().__init__()
        if convention not in CONVENTIONS:
            raise FsdiffError(f"convention={convention!r} is not a COCO-20i fold convention; use one of {CONVENTIONS}.")
        self.convention = convention
        self.n_folds = int(n_folds)
        self.split = normalise_split(split, "COCO", _SPLITS)
        self.min_pixels = int(min_pixels)
        self.ann = self._find_json(ann, root)
        self._parse(self._read_json())
        self.images_dir = self._find_images(images, root)
        n = len(self._cats)
        if fold is None:
            self.fold = None
            ids = list(range(n))
        else:
            self.fold = check_fold(fold, self.n_folds, "COCO-20i")
            test = coco_fold_classes(n, self.fold, convention, self.n_folds)
            ids = test if self.split == "val" else [k for k in range(n) if k not in set(test)]
            if not ids:
                raise FsdiffError(
                    f"{self.ann}: fold {self.fold} ({self.split}) has no class with {n} categories and "
                    f"{self.n_folds} folds; use fold=None for all classes or fewer folds."
                )
        self.classes = [(k, self._cats[k][1]) for k in ids]
        self._class_set = set(ids)
        self._mask_cache: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._pixel_cache: dict[tuple[int, int], int] = {}
        self._lists: dict[int, list[str]] | None = None
        self.hsnet_lists = bool(hsnet_lists)
        self.missing_from_json = 0
        if self.hsnet_lists:
            self._lists = self._read_hsnet_lists(splits_dir, allow_missing)

    # -- loading the json ------------------------------------------------------------------
    @staticmethod
    def _find_json(ann: str | os.PathLike | None, root: str | os.PathLike | None) -> Path:
        if ann is not None:
            path = Path(ann).expanduser()
            if path.is_dir():
                root, ann = path, None
            elif not path.is_file():
                raise FsdiffError(f"COCO annotation file not found: {path}; pass the instances json (ann=...).")
            else:
                return path
        if root is None:
            raise FsdiffError("a COCO source needs ann=<instances.json> or root=<folder holding it>.")
        base = Path(root).expanduser()
        if base.is_file():
            return base
        for name in _JSON_NAMES:
            if (base / name).is_file():
                return base / name
        raise FsdiffError(
            f"no COCO annotation json in {base} (looked for {', '.join(_JSON_NAMES)}); pass ann=<path to the json>."
        )

    def _read_json(self) -> dict:
        # NaN is allowed in the file (exporters write it into fields fsdiff never reads, e.g. 'area'); every
        # field that is used is validated: a NaN id or size is "not an integer", a NaN coordinate "non-finite".
        data = read_json(self.ann, "COCO annotation file", fix="re-export the annotations in COCO format", allow_nan=True)
        if not isinstance(data, dict):
            raise FsdiffError(f"{self.ann} is not a COCO annotation file: the top level is not an object.")
        missing = [k for k in ("images", "annotations", "categories") if not isinstance(data.get(k), list)]
        if missing:
            raise FsdiffError(
                f"{self.ann} is not a COCO instances file: key(s) {missing} missing or not a list "
                "(a COCO json needs 'images', 'annotations' and 'categories'); export as 'COCO instances'."
            )
        return data

    def _bad(self, what: str) -> FsdiffError:
        return FsdiffError(f"{self.ann}: {what}; fix or re-export the COCO json.")

    def _int(self, value: object, where: str, field: str) -> int:
        """An integer id/size field of ``where`` (ints, integral floats, digit strings), or an error naming it."""
        if isinstance(value, bool) or value is None:
            ok = False
        elif isinstance(value, int):
            return value
        elif isinstance(value, float):
            ok = value.is_integer()
        elif isinstance(value, str):
            ok = value.strip().lstrip("-").isdigit() and len(value) < 20
        else:
            ok = False
        if not ok:
            raise self._bad(f"{where} has {field} {_short(value)}, not an integer")
        return int(value)

    def _parse(self, data: dict) -> None:
        cats = []
        for i, c in enumerate(data["categories"]):
            if not isinstance(c, dict) or "id" not in c or "name" not in c:
                raise self._bad(f"categories[{i}] lacks 'id' or 'name'")
            if not isinstance(c["name"], (str, int)) or isinstance(c["name"], bool):
                raise self._bad(f"categories[{i}] has name {_short(c['name'])}, not a string")
            cats.append((self._int(c["id"], f"categories[{i}]", "id"), str(c["name"])))
        cats.sort()
        if len({c for c, _ in cats}) != len(cats):
            raise self._bad("two categories share an id")
        if not cats:
            raise self._bad("the json has no categories")
        self._cats = cats
        index_of_cat = {cid: k for k, (cid, _) in enumerate(cats)}

        self._images: dict[int, dict] = {}
        self._keys: list[str] = []
        self._id_of_key: dict[str, int] = {}
        for i, im in enumerate(data["images"]):
            if not isinstance(im, dict) or "id" not in im or "file_name" not in im:
                raise self._bad(f"images[{i}] lacks 'id' or 'file_name'")
            iid, key = self._int(im["id"], f"images[{i}]", "id"), im["file_name"]
            where = f"images[{i}] (id {iid})"
            if not isinstance(key, str) or not key.strip() or "\0" in key or len(key) > MAX_KEY_CHARS:
                raise self._bad(f"{where} has file_name {_short(key)}; it must be a non-empty relative path")
            if iid in self._images:
                raise self._bad(f"image id {iid} is listed twice")
            if key in self._id_of_key:
                raise self._bad(f"file_name {key!r} is listed twice")
            h, w = im.get("height"), im.get("width")
            h = self._int(h, where, "height") if h else None
            w = self._int(w, where, "width") if w else None
            if (h is not None and h < 1) or (w is not None and w < 1):
                raise self._bad(f"{where} has height {h} and width {w}; sizes must be positive")
            if h is not None and w is not None:
                check_image_size(w, h, f"{self.ann}: {where} ({key!r})")
            self._images[iid] = {"key": key, "h": h, "w": w}
            self._keys.append(key)
            self._id_of_key[key] = iid

        self._anns: dict[int, list[tuple[int, bool, object, object]]] = {}
        present: dict[int, set[int]] = {}
        for i, a in enumerate(data["annotations"]):
            if not isinstance(a, dict) or "image_id" not in a or "category_id" not in a:
                raise self._bad(f"annotations[{i}] lacks 'image_id' or 'category_id'")
            aid = a.get("id", i)
            if not isinstance(aid, (int, str)) or isinstance(aid, bool):
                raise self._bad(f"annotations[{i}] has id {_short(aid)}, not an integer")
            where = f"annotation {aid}" if "id" in a else f"annotations[{i}]"
            iid = self._int(a["image_id"], where, "image_id")
            cid = self._int(a["category_id"], where, "category_id")
            if iid not in self._images:
                raise self._bad(f"{where} refers to image_id {iid}, which is not in 'images'")
            if cid not in index_of_cat:
                raise self._bad(f"{where} refers to category_id {cid}, which is not in 'categories'")
            if not a.get("segmentation"):
                raise self._bad(
                    f"{where} has no 'segmentation' (a box-only export); few-shot segmentation needs "
                    "polygons or RLE masks"
                )
            if not isinstance(a["segmentation"], (list, dict)):
                raise self._bad(
                    f"{where} has a segmentation of type {type(a['segmentation']).__name__}; it must be a list "
                    "of polygons or an RLE object {'size', 'counts'}"
                )
            k, crowd = index_of_cat[cid], bool(a.get("iscrowd", 0))
            self._anns.setdefault(iid, []).append((k, crowd, a["segmentation"], aid))
            if not crowd:
                present.setdefault(k, set()).add(iid)
        pos = {iid: p for p, iid in enumerate(self._images)}
        self._present = {k: sorted(ids, key=pos.__getitem__) for k, ids in present.items()}

    def _find_images(self, images: str | os.PathLike | None, root: str | os.PathLike | None) -> Path:
        if images is not None:
            path = Path(images).expanduser()
            if not path.is_dir():
                raise FsdiffError(f"COCO image folder {path} does not exist; pass images=<folder with the images>.")
            return path
        cands = []
        if root is not None and Path(root).is_dir():
            cands.append(Path(root) / "images")
        jdir = self.ann.parent
        cands += [jdir / "images", jdir.parent / "images"]
        m = re.match(r"instances_(train|val)(\d{4})", self.ann.stem)
        if m:
            cands += [jdir.parent / f"{m.group(1)}{m.group(2)}", jdir.parent / "images" / f"{m.group(1)}{m.group(2)}"]
        for cand in cands:
            if cand.is_dir():
                return cand
        return jdir / "images"

    def _read_hsnet_lists(self, splits_dir, allow_missing: bool) -> dict[int, list[str]]:
        """Per-class image order from HSNet's ``coco/{split}/fold{i}.pkl`` (class index -> names)."""
        if self.fold is None or self.convention != "interleaved" or len(self._cats) != 80 or self.n_folds != 4:
            raise FsdiffError(
                "hsnet_lists=True needs the 80 COCO categories, fold 0..3, convention='interleaved' and 4 folds "
                "(HSNet's lists are COCO-20i in the interleaved convention)."
            )
        rel = f"coco/{self.split}/fold{self.fold}.pkl"
        path = resolve_splits_dir(splits_dir, [rel], "COCO-20i (HSNet lists)") / rel
        try:
            with open(path, "rb") as f:
                lists = _NoGlobals(f).load()
        except (OSError, pickle.UnpicklingError, EOFError, ValueError) as exc:
            raise FsdiffError(f"cannot read HSNet list {path}: {exc}; use the unmodified HSNet file.") from None
        if not isinstance(lists, dict) or not all(isinstance(v, list) for v in lists.values()):
            raise FsdiffError(f"{path} is not an HSNet COCO list (a dict: class index -> list of image names).")
        by_id = {iid: im["key"] for iid, im in self._images.items()}
        by_base = {Path(k).name: k for k in self._keys}
        out: dict[int, list[str]] = {}
        total = missing = 0
        for k in self.class_ids():
            keys = []
            for name in lists.get(k, []):
                total += 1
                key = by_base.get(Path(str(name)).name)
                if key is None:
                    key = by_id.get(_id_in_name(str(name)))
                if key is None:
                    missing += 1
                else:
                    keys.append(key)
            out[k] = keys
        self.missing_from_json = missing
        if missing and not allow_missing:
            raise FsdiffError(
                f"{missing} of the {total} images in {path} are not in {self.ann}; HSNet's episodes need the "
                "COCO 2014 json of that split (instances_val2014.json for 'val'), or pass allow_missing=True "
                "to drop them (the episodes then differ from HSNet's)."
            )
        return out

    # -- interface -------------------------------------------------------------------------
    def images_of_class(self, class_id: int) -> list[str]:
        """Images with a non-crowd instance of ``class_id`` (json order, or HSNet's list order)."""
        if class_id not in self._class_set:
            self._unknown_class(class_id)
        if self._lists is not None:
            return list(self._lists[class_id])
        ids = self._present.get(class_id, [])
        if self.min_pixels > 0:
            ids = [iid for iid in ids if self._pixels(iid, class_id) >= self.min_pixels]
        return [self._images[iid]["key"] for iid in ids]

    def query_items(self) -> list[tuple[str, int]]:
        """(image, class) pairs: images in json order, classes by index within each image."""
        members = {c: set(self.images_of_class(c)) for c in self.class_ids()}
        keys = self._keys if self._lists is None else sorted({k for v in members.values() for k in v})
        return [(key, c) for key in keys for c in self.class_ids() if key in members[c]]

    def image_keys(self) -> list[str]:
        """Every image in json order."""
        return list(self._keys)

    def image_path(self, image_key: str) -> Path:
        """Where the image file of ``image_key`` (its json file_name) is looked for.

        Candidates: the image folder joined with the name, the json's folder joined with the name, the
        image folder joined with the base name. A candidate counts only if it lies inside the folder it was
        joined to (symlinks resolved); if none does and the name leads outside, an FsdiffError names the entry.
        """
        iid = self._id_of_key.get(image_key)
        what = f"file_name {image_key!r}" + (f" (image id {iid})" if iid is not None else "") + f" in {self.ann}"
        first = self.images_dir / image_key
        escaped: FsdiffError | None = None
        for root, cand in ((self.images_dir, first), (self.ann.parent, self.ann.parent / image_key),
                           (self.images_dir, self.images_dir / Path(image_key).name)):  # fmt: skip
            try:
                resolve_inside(cand, root, what)
            except FsdiffError as exc:
                escaped = escaped or exc
                continue
            if cand.is_file():
                return cand
        if escaped is not None:
            raise escaped
        return first

    def _image_id(self, image_key: str) -> int:
        iid = self._id_of_key.get(image_key)
        if iid is None:
            raise FsdiffError(f"image {image_key!r} is not listed in {self.ann}; use a file_name from its 'images'.")
        return iid

    def _polygons(self, segm: list, h: int, w: int) -> list[list[float]]:
        """Validated polygons (finite, inside the frame up to the margin, bounded counts and outline length).

        Plain Python: COCO polygons have ~20 points, where a loop costs less than numpy's per-call overhead.
        """
        if len(segm) > MAX_POLYGONS.value():
            raise ValueError(f"it has {len(segm):,} polygons, above the limit of {MAX_POLYGONS.value():,} "
                             f"({MAX_POLYGONS.name}; {MAX_POLYGONS.hint()})")
        max_coords, n_coords = 2 * MAX_POLYGON_POINTS.value(), 0
        margin = max(POLYGON_MARGIN * max(h, w), POLYGON_MARGIN_MIN_PX)
        outline, polys = 0.0, []
        for j, p in enumerate(segm):
            if not isinstance(p, list):
                raise ValueError(f"polygon {j} is a {type(p).__name__}, not a list of x, y numbers")
            if len(p) % 2 or len(p) < 6:
                raise ValueError(f"polygon {j} has {len(p)} values; a polygon needs an even number (>= 6) of coordinates")
            n_coords += len(p)
            if n_coords > max_coords:
                raise ValueError(f"its polygons have more than {max_coords // 2:,} points, the limit "
                                 f"({MAX_POLYGON_POINTS.name}; {MAX_POLYGON_POINTS.hint()})")
            try:
                vals = [float(v) for v in p]
            except (TypeError, ValueError, OverflowError):
                raise ValueError(f"polygon {j} holds a value that is not a number") from None
            if not all(map(math.isfinite, vals)):
                raise ValueError(f"polygon {j} holds a non-finite coordinate (NaN or infinity)")
            xs, ys = vals[0::2], vals[1::2]
            if min(xs) < -margin or min(ys) < -margin or max(xs) > w + margin or max(ys) > h + margin:
                x, y = max(zip(xs, ys), key=lambda v: max(-v[0], v[0] - w, -v[1], v[1] - h))
                raise ValueError(
                    f"polygon {j} has the vertex ({x:.6g}, {y:.6g}), outside the {w}x{h} image by more than the "
                    f"allowed {margin:.0f} pixels (coordinates are pixels of the image, not normalised or of "
                    "another image)"
                )
            px, py = xs[-1], ys[-1]  # outline length as pycocotools walks it: max(|dx|, |dy|) per closed edge
            for x, y in zip(xs, ys):
                dx, dy = abs(x - px), abs(y - py)
                outline += dx if dx > dy else dy
                px, py = x, y
            polys.append(vals)
        if outline > MAX_POLYGON_PERIMETER * (w + h):
            raise ValueError(f"its polygon outlines are {outline:,.0f} pixels long, more than {MAX_POLYGON_PERIMETER} "
                             f"times (width + height) of the {w}x{h} image; no real outline is that long")
        return polys

    @staticmethod
    def _rle(segm: dict, h: int, w: int) -> dict:
        """A validated RLE (size [h, w], non-negative runs summing to h*w) in pycocotools' compressed form."""
        from pycocotools import mask as mask_utils

        size = segm["size"]
        if not isinstance(size, list) or len(size) != 2 or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in size
        ):
            raise ValueError(f"RLE size {_short(size)} is not [height, width]")
        if size != [h, w]:
            raise ValueError(f"RLE size {size} differs from the image size [{h}, {w}]")
        counts = segm["counts"]
        if isinstance(counts, list):
            if len(counts) > h * w + 1 or not all(isinstance(v, int) and not isinstance(v, bool) for v in counts):
                raise ValueError("RLE counts must be at most height*width + 1 integers")
            runs = np.asarray(counts, dtype=np.int64) if counts else np.zeros(0, np.int64)
        elif isinstance(counts, (str, bytes)):
            try:
                raw = counts.encode("ascii") if isinstance(counts, str) else counts
            except UnicodeEncodeError:
                raise ValueError("the RLE string holds characters outside its alphabet ('0'..'o')") from None
            runs = _rle_string_counts(raw)
        else:
            raise ValueError(f"RLE counts are a {type(counts).__name__}, neither a list nor a string")
        if runs.size and (runs.min() < 0 or runs.max() > h * w):
            raise ValueError("RLE counts hold a negative or oversized run")
        if int(runs.sum()) != h * w:
            raise ValueError(f"RLE runs cover {int(runs.sum()):,} pixels, not height*width = {h * w:,}")
        if isinstance(counts, list):
            return mask_utils.frPyObjects({"size": [h, w], "counts": counts}, h, w)
        return {"size": [h, w], "counts": raw}

    def _decode(self, segm: object, h: int, w: int, aid: object) -> np.ndarray:
        """One annotation's binary mask (polygons, uncompressed or compressed RLE), validated before rasterising."""
        from pycocotools import mask as mask_utils

        try:
            if isinstance(segm, list):
                rle = mask_utils.merge(mask_utils.frPyObjects(self._polygons(segm, h, w), h, w))
            elif isinstance(segm, dict) and "counts" in segm and "size" in segm:
                rle = self._rle(segm, h, w)
            else:
                raise ValueError("segmentation is neither a polygon list nor an RLE {'size', 'counts'}")
            with warnings.catch_warnings():  # pycocotools vs numpy 2 copy= keyword
                warnings.simplefilter("ignore", DeprecationWarning)
                m = mask_utils.decode(rle)
        except FsdiffError:
            raise
        except Exception as exc:  # pycocotools raises assorted types on bad input
            raise self._bad(f"annotation {_short(aid)} has an unreadable segmentation ({exc})") from None
        if m.ndim == 3:
            m = m.max(axis=2)
        return m.astype(bool)

    def _size(self, iid: int) -> tuple[int, int]:
        im = self._images[iid]
        if im["h"] is None or im["w"] is None:
            arr = read_image(self._require_file(iid))
            im["h"], im["w"] = arr.shape[:2]
        return im["h"], im["w"]

    def _class_mask(self, iid: int, class_id: int) -> np.ndarray:
        key = (iid, class_id)
        if key in self._mask_cache:
            self._mask_cache.move_to_end(key)
            return self._mask_cache[key]
        h, w = self._size(iid)
        mask = np.zeros((h, w), np.uint8)
        anns = [a for a in self._anns.get(iid, []) if a[0] == class_id]
        for _, crowd, segm, aid in anns:
            if crowd:
                mask[self._decode(segm, h, w, aid)] = IGNORE
        for _, crowd, segm, aid in anns:
            if not crowd:
                mask[self._decode(segm, h, w, aid)] = 1
        self._mask_cache[key] = mask
        if len(self._mask_cache) > _CACHE_SIZE:
            self._mask_cache.popitem(last=False)
        return mask

    def _pixels(self, iid: int, class_id: int) -> int:
        key = (iid, class_id)
        if key not in self._pixel_cache:
            self._pixel_cache[key] = int(np.count_nonzero(self._class_mask(iid, class_id) == 1))
        return self._pixel_cache[key]

    def _require_file(self, iid: int) -> Path:
        key = self._images[iid]["key"]
        path = self.image_path(key)
        if not path.is_file():
            raise FsdiffError(
                f"image file {path} (file_name {key!r}, listed in {self.ann}) is missing; copy it there, "
                "pass images=<folder with the images>, or remove it from the json. source.check() lists "
                "every missing file."
            )
        return path

    def load(self, image_key: str, class_id: int) -> tuple[np.ndarray, np.ndarray]:
        """Image and {0,1,255} mask of ``class_id`` (instances 1, crowd 255)."""
        if class_id not in self._class_set:
            self._unknown_class(class_id)
        iid = self._image_id(image_key)
        path = self._require_file(iid)
        image = read_image(path)
        im = self._images[iid]
        if im["h"] is not None and (im["h"], im["w"]) != image.shape[:2]:
            raise FsdiffError(
                f"image {path} is {image.shape[1]}x{image.shape[0]} (WxH) but {self.ann} says "
                f"{im['w']}x{im['h']}; re-export the json or use the original image."
            )
        im["h"], im["w"] = image.shape[:2]
        return image, self._class_mask(iid, class_id).copy()

    def class_pixels(self, image_key: str) -> dict[int, int]:
        """Pixels of each class of this split covered by its non-crowd instances."""
        iid = self._image_id(image_key)
        ks = sorted({a[0] for a in self._anns.get(iid, []) if not a[1] and a[0] in self._class_set})
        return {k: n for k in ks if (n := self._pixels(iid, k)) > 0}

    def check(self) -> list[str]:
        """Image files listed in the json that are missing on disk."""
        return [str(self.image_path(k)) for k in self._keys if not self.image_path(k).is_file()]

    def describe(self) -> dict:
        """Dataset, json, fold, split, convention and filters."""
        return {
            "dataset": self.name, "ann": str(self.ann), "fold": self.fold, "split": self.split,
            "convention": self.convention, "n_folds": self.n_folds, "min_pixels": self.min_pixels,
            "hsnet_lists": self.hsnet_lists,
        }  # fmt: skip


SOURCES.register("coco")(CocoSource)
