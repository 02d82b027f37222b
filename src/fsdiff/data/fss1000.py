"""FSS-1000 in HSNet's protocol (arXiv 2104.01538): 1000 classes x 10 images, 520/240/240 split.

Layout ``root/<class_name>/<n>.jpg`` + ``<n>.png``. The class split is read from HSNet's
``{splits_dir}/fss/{trn,val,test}.txt`` (not shipped: no licence). As in HSNet's ``DatasetFSS``:
classes of a split are sorted by name and numbered from 0 (trn), 520 (val) or 760 (test); queries
are every ``.jpg`` of every class, class by class, files in sorted-name order; masks are converted to
8-bit gray (PIL ``convert('L')``) and binarised with gray >= 128 -> object (HSNet's rule; DifFSS's
generator uses >= 100, pass ``threshold=100`` for that). FSS-1000 masks have no ignore label. Class
names from the split list and the files in each class folder must lie inside the root
(:func:`fsdiff.io.resolve_inside`).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from fsdiff.data.base import (
    SOURCES,
    FewShotSource,
    check_pair,
    normalise_split,
    resolve_splits_dir,
)
from fsdiff.errors import FsdiffError
from fsdiff.io import read_image, resolve_inside

SPLIT_OFFSETS = {"trn": 0, "val": 520, "test": 760}
"""HSNet's class-id offsets of the three FSS-1000 splits."""
HSNET_THRESHOLD = 128
_SPLITS = {"trn": "trn", "train": "trn", "val": "val", "test": "test"}


def _numeric_first(stem: str) -> tuple[int, int | str]:
    return (0, int(stem)) if stem.isdigit() else (1, stem)


class Fss1000Source(FewShotSource):
    """FSS-1000 class folders with HSNet's trn/val/test class split."""

    name = "fss1000"
    hsnet_query_mode = "cycle"
    default_episodes = None
    test_split = "test"
    open_options = ("splits_dir",)

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "test",
        fold: int | None = None,
        splits_dir: str | os.PathLike | None = None,
        threshold: int = HSNET_THRESHOLD,
    ) -> None:
        super().__init__()
        if fold not in (None, 0):
            raise FsdiffError(f"fold={fold!r}: FSS-1000 has no folds; leave fold unset and choose split=trn/val/test.")
        self.split = normalise_split(split, "FSS-1000", _SPLITS)
        self.threshold = int(threshold)
        rel = f"fss/{self.split}.txt"
        list_path = resolve_splits_dir(splits_dir, [rel], "FSS-1000") / rel
        names = sorted(ln.strip() for ln in list_path.read_text(encoding="utf-8").splitlines() if ln.strip())
        if not names:
            raise FsdiffError(f"{list_path} lists no class; use the unmodified HSNet split file.")
        for lineno, n in enumerate(names, 1):
            if "/" in n or "\\" in n or n in (".", "..") or "\0" in n:
                raise FsdiffError(
                    f"{list_path}: class name {n!r} is not a folder name (it holds a path separator or is '.' "
                    "or '..'); use the unmodified HSNet split file."
                )
        self.root = self._find_root(Path(root).expanduser(), names[0])
        offset = SPLIT_OFFSETS[self.split]
        self.classes = [(offset + i, n) for i, n in enumerate(names)]
        self._id_of_name = {n: cid for cid, n in self.classes}
        self._files: dict[int, list[str]] = {}
        missing = []
        for cid, cname in self.classes:
            folder = self.root / cname
            resolve_inside(folder, self.root, f"FSS-1000 class {cname!r} (listed in {list_path})")
            if not folder.is_dir():
                missing.append(str(folder))
                continue
            jpgs = sorted(f for f in os.listdir(folder) if f.lower().endswith(".jpg") and not f.startswith("."))
            if not jpgs:
                raise FsdiffError(f"FSS-1000 class folder {folder} holds no .jpg image; re-download FSS-1000.")
            self._files[cid] = jpgs
        if missing:
            raise FsdiffError(
                f"FSS-1000: {len(missing)} class folder(s) of the {self.split} split are missing under {self.root}, "
                f"e.g. {missing[0]}; download the full FSS-1000 (see docs/DATASETS.md)."
            )

    @staticmethod
    def _find_root(root: Path, probe: str) -> Path:
        for cand in (root, root / "FSS-1000", root / "fewshot_data"):
            if (cand / probe).is_dir():
                return cand
        if not root.is_dir():
            raise FsdiffError(f"FSS-1000 root {root} does not exist; point root at the folder of class folders.")
        return root

    def _class_of_key(self, image_key: str) -> int:
        cname, _, stem = image_key.rpartition("/")
        if cname not in self._id_of_name or not stem:
            raise FsdiffError(f"FSS-1000 image key {image_key!r} is not '<class>/<n>' of a {self.split} class.")
        return self._id_of_name[cname]

    # -- interface -------------------------------------------------------------------------
    def images_of_class(self, class_id: int) -> list[str]:
        """Images of the class ordered 1..10 (HSNet draws supports from range(1, 11))."""
        if class_id not in self._files:
            self._unknown_class(class_id)
        cname = self.class_name(class_id)
        stems = sorted((f[:-4] for f in self._files[class_id]), key=_numeric_first)
        return [f"{cname}/{s}" for s in stems]

    def query_items(self) -> list[tuple[str, int]]:
        """Every image of every class: classes by name, files in sorted-name order (HSNet's glob)."""
        return [(f"{n}/{f[:-4]}", cid) for cid, n in self.classes for f in self._files[cid]]

    def paths(self, image_key: str) -> tuple[Path, Path]:
        """The ``.jpg`` image and ``.png`` mask of ``image_key``."""
        cname, _, stem = image_key.rpartition("/")
        folder = self.root / cname
        jpg = next((folder / f for f in self._files.get(self._class_of_key(image_key), []) if f[:-4] == stem), None)
        img, mask = (jpg or folder / f"{stem}.jpg"), folder / f"{stem}.png"
        for p in (img, mask):
            resolve_inside(p, self.root, f"FSS-1000 image {image_key!r}")
        return img, mask

    def load(self, image_key: str, class_id: int) -> tuple[np.ndarray, np.ndarray]:
        """Image and binary mask (gray >= threshold -> 1)."""
        if class_id not in self._files:
            self._unknown_class(class_id)
        if self._class_of_key(image_key) != class_id:
            raise FsdiffError(f"FSS-1000 image {image_key!r} is not of class {class_id} ({self.class_name(class_id)}).")
        img_path, mask_path = self.paths(image_key)
        image = read_image(img_path)
        if not mask_path.is_file():
            raise FsdiffError(f"mask {mask_path} of image {img_path} is missing; re-download FSS-1000.")
        gray = np.asarray(Image.fromarray(read_image(mask_path)).convert("L"))
        mask = (gray >= self.threshold).astype(np.uint8)
        check_pair(image, mask, img_path, mask_path)
        return image, mask

    def check(self) -> list[str]:
        """Mask files that are missing."""
        return [str(m) for k, _ in self.query_items() if not (m := self.paths(k)[1]).is_file()]

    def describe(self) -> dict:
        """Dataset, split and mask threshold."""
        return {"dataset": self.name, "fold": None, "split": self.split, "threshold": self.threshold}


SOURCES.register("fss1000")(Fss1000Source)
