"""PASCAL-5i (Shaban et al., BMVC 2017; docs/DATASETS.md §2): VOC2012 + SBD, fold i tests classes 5i+1..5i+5.

Episode metadata comes from HSNet's fold lists ``{splits_dir}/pascal/{trn,val}/fold{i}.txt`` (lines
``IMAGEID__CLASS``, classes 1..20), read exactly as HSNet's ``DatasetPASCAL`` does: 'val' is the fold's
own val list, 'trn' the trn lists of the three other folds in fold order. The lists are not shipped
(no licence); see :func:`fsdiff.data.base.resolve_splits_dir`. Class ids are the VOC label values
1..20; masks keep VOC's 255 (object boundaries) as ignore. Labels come from SBD's
``SegmentationClassAug/`` when present (as HSNet uses it), else ``SegmentationClass/``. Image ids from
list files (and episode lists) must name files inside ``JPEGImages/`` and the label folder
(:func:`fsdiff.io.resolve_inside`).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from fsdiff.data.base import (
    SOURCES,
    FewShotSource,
    check_fold,
    check_pair,
    normalise_split,
    resolve_splits_dir,
)
from fsdiff.errors import FsdiffError
from fsdiff.io import mask_from_array, read_image, read_label, resolve_inside

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip
"""VOC class names; class id = index + 1 (the label value)."""

N_FOLDS = 4
CLASSES_PER_FOLD = 5
_SPLITS = {"val": "val", "test": "val", "trn": "trn", "train": "trn"}
_ANN_DIRS = {"aug": "SegmentationClassAug", "voc": "SegmentationClass"}


def pascal_fold_classes(fold: int) -> list[int]:
    """The VOC class ids (1..20) tested in PASCAL-5i fold ``fold``."""
    fold = check_fold(fold, N_FOLDS, "PASCAL-5i")
    return [CLASSES_PER_FOLD * fold + i + 1 for i in range(CLASSES_PER_FOLD)]


def _find_voc(root: Path) -> Path:
    """The VOC2012 folder: ``root`` itself, ``root/VOC2012`` or ``root/VOCdevkit/VOC2012``."""
    for cand in (root, root / "VOC2012", root / "VOCdevkit" / "VOC2012"):
        if (cand / "JPEGImages").is_dir():
            return cand
    raise FsdiffError(
        f"PASCAL root {root} holds no JPEGImages/ folder (looked in {root}, {root / 'VOC2012'} and "
        f"{root / 'VOCdevkit' / 'VOC2012'}); point root at the VOC2012 folder (see docs/DATASETS.md)."
    )


class PascalSource(FewShotSource):
    """PASCAL-5i in HSNet's protocol: fold lists from HSNet, VOC/SBD images and labels."""

    name = "pascal"
    hsnet_query_mode = "cycle"
    default_episodes = 1000
    open_options = ("splits_dir",)

    def __init__(
        self,
        root: str | os.PathLike,
        fold: int = 0,
        split: str = "val",
        splits_dir: str | os.PathLike | None = None,
        ann: str = "auto",
    ) -> None:
        super().__init__()
        self.fold = check_fold(fold, N_FOLDS, "PASCAL-5i")
        self.split = normalise_split(split, "PASCAL-5i", _SPLITS)
        self.voc = _find_voc(Path(root).expanduser())
        self.ann_dir = self._find_ann(ann)
        test_ids = pascal_fold_classes(self.fold)
        ids = test_ids if self.split == "val" else [c for c in range(1, 21) if c not in test_ids]
        self.classes = [(c, VOC_CLASSES[c - 1]) for c in ids]
        folds = [self.fold] if self.split == "val" else [f for f in range(N_FOLDS) if f != self.fold]
        rel = [f"pascal/{self.split}/fold{f}.txt" for f in folds]
        base = resolve_splits_dir(splits_dir, rel, "PASCAL-5i")
        self.list_files = [base / r for r in rel]
        self._items: list[tuple[str, int]] = []
        for path in self.list_files:
            self._items += self._read_list(path, set(ids))
        self._classwise: dict[int, list[str]] = {c: [] for c in ids}
        for key, c in self._items:
            self._classwise[c].append(key)

    def _find_ann(self, ann: str) -> Path:
        if ann == "auto":
            aug = self.voc / _ANN_DIRS["aug"]
            return aug if aug.is_dir() else self.voc / _ANN_DIRS["voc"]
        if ann in _ANN_DIRS:
            path = self.voc / _ANN_DIRS[ann]
        else:
            path = Path(ann).expanduser()
        if not path.is_dir():
            raise FsdiffError(
                f"PASCAL label folder {path} does not exist; use ann='auto', 'aug' (SegmentationClassAug), "
                "'voc' (SegmentationClass) or a folder of class-index PNGs."
            )
        return path

    @staticmethod
    def _read_list(path: Path, allowed: set[int]) -> list[tuple[str, int]]:
        """Parse an HSNet fold list (``IMAGEID__CLASS`` lines, classes 1..20)."""
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise FsdiffError(f"cannot read the PASCAL-5i fold list {path}: {exc}.") from None
        items = []
        for lineno, line in enumerate(text.splitlines(), 1):
            line = line.strip()
            if not line:
                continue
            name, sep, cls = line.rpartition("__")
            if not sep or not name or not cls.isdigit() or "/" in name or "\\" in name or name.startswith("."):
                raise FsdiffError(
                    f"{path} line {lineno}: expected IMAGEID__CLASS (e.g. 2007_000033__01), got {line!r}; "
                    "use the unmodified HSNet list files."
                )
            c = int(cls)
            if c not in allowed:
                raise FsdiffError(
                    f"{path} line {lineno}: class {c} does not belong to this fold and split "
                    f"(classes {sorted(allowed)}); is the file in the right folder?"
                )
            items.append((name, c))
        return items

    # -- interface -------------------------------------------------------------------------
    def images_of_class(self, class_id: int) -> list[str]:
        """Images of ``class_id`` in list order (HSNet's ``img_metadata_classwise``)."""
        if class_id not in self._classwise:
            self._unknown_class(class_id)
        return list(self._classwise[class_id])

    def query_items(self) -> list[tuple[str, int]]:
        """The (image id, class) pairs of the fold list(s), in file order."""
        return list(self._items)

    def image_paths(self, image_key: str) -> tuple[Path, Path]:
        """The JPEG and label PNG of ``image_key`` (FsdiffError if either would lie outside its folder)."""
        if not isinstance(image_key, str) or not image_key or "\0" in image_key:
            raise FsdiffError(f"PASCAL image id {image_key!r} is not a VOC image id (e.g. 2007_000033).")
        images = self.voc / "JPEGImages"
        img, lab = images / f"{image_key}.jpg", self.ann_dir / f"{image_key}.png"
        resolve_inside(img, images, f"PASCAL image id {image_key!r}")
        resolve_inside(lab, self.ann_dir, f"PASCAL image id {image_key!r}")
        return img, lab

    def load(self, image_key: str, class_id: int) -> tuple[np.ndarray, np.ndarray]:
        """Image and {0,1,255} mask of ``class_id`` (VOC's 255 boundary stays ignore)."""
        if class_id not in self._classwise:
            self._unknown_class(class_id)
        img_path, lab_path = self.image_paths(image_key)
        image = read_image(img_path)
        label = read_label(lab_path)
        mask = mask_from_array(label, class_value=int(class_id), source=f"label {lab_path}")
        check_pair(image, mask, img_path, lab_path)
        return image, mask

    def image_keys(self) -> list[str]:
        """VOC's ``ImageSets/Segmentation/val.txt`` order for 'val' (BAM's query list), else list order."""
        listing = self.voc / "ImageSets" / "Segmentation" / "val.txt"
        if self.split == "val" and listing.is_file():
            return [ln.strip() for ln in listing.read_text(encoding="utf-8").splitlines() if ln.strip()]
        return super().image_keys()

    def class_pixels(self, image_key: str) -> dict[int, int]:
        """Pixels of each class of this split in the label of ``image_key``."""
        _, lab_path = self.image_paths(image_key)
        counts = np.bincount(np.asarray(read_label(lab_path)).ravel().astype(np.int64), minlength=256)
        return {c: int(counts[c]) for c in self._classwise if c < len(counts) and counts[c] > 0}

    def check(self) -> list[str]:
        """Image and label files of the fold list(s) that are missing."""
        missing = []
        for key in dict.fromkeys(k for k, _ in self._items):
            missing += [str(p) for p in self.image_paths(key) if not p.is_file()]
        return missing

    def describe(self) -> dict:
        """Dataset, fold, split and label folder."""
        return {"dataset": self.name, "fold": self.fold, "split": self.split, "ann": self.ann_dir.name}


SOURCES.register("pascal")(PascalSource)
