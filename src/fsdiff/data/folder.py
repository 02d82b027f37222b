"""A user's own folder of images and binary masks as a few-shot source (docs/DATASETS.md §5).

Layouts (mask = same file stem, preferably ``.png``; 0/255 or 0/1 binary, 255 may also mean ignore
in a 0/1/255 mask, see :func:`fsdiff.io.mask_from_array`)::

    root/images/x.jpg           root/masks/x.png            one class (name: class_name or root's name)
    root/images/<class>/x.jpg   root/masks/<class>/x.png    one class per subfolder (names sorted)

Image keys are ``x`` (flat) or ``<class>/x``; class ids are 0..n-1 in sorted folder-name order.
Every file must lie inside ``images/`` or ``masks/`` with symlinks resolved (a link out of the folder
is refused unless ``$FSDIFF_FOLLOW_SYMLINKS=1``; see :func:`fsdiff.io.resolve_inside`).
There is no reference protocol for a user folder: the HSNet-style sampler walks every image once
as a query (``query_items`` order: classes, then files sorted by name).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from fsdiff.data.base import SOURCES, FewShotSource, check_pair
from fsdiff.errors import FsdiffError
from fsdiff.io import read_image, read_mask, resolve_inside

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
MASK_EXTS = (".png", ".bmp", ".tif", ".tiff", ".gif", ".jpg", ".jpeg", ".webp")


def _files(folder: Path, exts: tuple[str, ...]) -> list[str]:
    return sorted(f for f in os.listdir(folder) if not f.startswith(".") and Path(f).suffix.lower() in exts
                  and (folder / f).is_file())  # fmt: skip


class FolderSource(FewShotSource):
    """``images/`` + ``masks/`` folders, flat (one class) or one subfolder per class."""

    name = "folder"
    hsnet_query_mode = "cycle"
    default_episodes = None
    test_split = None

    @classmethod
    def _open(cls, root, *, fold, split, **options) -> "FolderSource":
        return cls(root=root, fold=fold, **options)

    def __init__(
        self,
        root: str | os.PathLike,
        class_name: str | None = None,
        fold: int | None = None,
        split: str | None = None,
        images: str = "images",
        masks: str = "masks",
        class_value: int | tuple[int, int, int] | None = None,
    ) -> None:
        super().__init__()
        if fold not in (None, 0):
            raise FsdiffError(f"fold={fold!r}: a folder source has no folds; leave fold unset.")
        self.root = Path(root).expanduser()
        self.images_dir, self.masks_dir = self.root / images, self.root / masks
        layout = (f"expected {self.images_dir}/NAME.jpg with {self.masks_dir}/NAME.png, or "
                  f"{self.images_dir}/CLASS/NAME.jpg with {self.masks_dir}/CLASS/NAME.png")  # fmt: skip
        for d in (self.images_dir, self.masks_dir):
            if not d.is_dir():
                raise FsdiffError(f"folder {d} does not exist; {layout}.")
        self.class_value = class_value
        subdirs = sorted(d.name for d in self.images_dir.iterdir() if d.is_dir() and not d.name.startswith("."))
        flat = _files(self.images_dir, IMAGE_EXTS)
        if subdirs and flat:
            raise FsdiffError(
                f"{self.images_dir} mixes image files ({flat[0]}, ...) with class subfolders ({subdirs[0]}, ...); "
                "use one layout: all images in one folder, or one subfolder per class."
            )
        self.per_class = bool(subdirs)
        names = subdirs if self.per_class else [class_name or self.root.resolve().name]
        self.classes = list(enumerate(names))
        self._entries: dict[int, list[tuple[str, Path, Path]]] = {}
        for cid, cname in self.classes:
            rel = Path(cname) if self.per_class else Path()
            prefix = cname if self.per_class else ""
            self._entries[cid] = self._pairs(self.images_dir / rel, self.masks_dir / rel, prefix)
        self._by_key = {key: (cid, ip, mp) for cid, ents in self._entries.items() for key, ip, mp in ents}

    @staticmethod
    def _pairs(img_dir: Path, mask_dir: Path, prefix: str) -> list[tuple[str, Path, Path]]:
        files = _files(img_dir, IMAGE_EXTS)
        if not files:
            raise FsdiffError(f"no image ({', '.join(IMAGE_EXTS)}) in {img_dir}; add images or fix the path.")
        masks = {}
        if mask_dir.is_dir():
            for f in _files(mask_dir, MASK_EXTS):
                masks.setdefault(Path(f).stem, []).append(f)
        out, seen = [], set()
        for f in files:
            stem = Path(f).stem
            if stem in seen:
                raise FsdiffError(f"{img_dir} holds two images named {stem!r} (different extensions); rename one.")
            seen.add(stem)
            cands = sorted(masks.get(stem, []), key=lambda m: MASK_EXTS.index(Path(m).suffix.lower()))
            if not cands:
                raise FsdiffError(
                    f"image {img_dir / f} has no mask: expected {mask_dir / (stem + '.png')}; add the mask "
                    "(same file name, .png) or remove the image."
                )
            out.append((f"{prefix}/{stem}" if prefix else stem, img_dir / f, mask_dir / cands[0]))
        return out

    # -- interface -------------------------------------------------------------------------
    def images_of_class(self, class_id: int) -> list[str]:
        """Image keys of the class, sorted by file name."""
        if class_id not in self._entries:
            self._unknown_class(class_id)
        return [k for k, _, _ in self._entries[class_id]]

    def query_items(self) -> list[tuple[str, int]]:
        """Every image once: classes in order, files sorted by name."""
        return [(k, cid) for cid, _ in self.classes for k, _, _ in self._entries[cid]]

    def paths(self, image_key: str) -> tuple[Path, Path]:
        """The image and mask file of ``image_key`` (FsdiffError if either resolves outside its folder)."""
        if image_key not in self._by_key:
            raise FsdiffError(f"image {image_key!r} is not in {self.images_dir}; use a key from source.query_items().")
        _, ip, mp = self._by_key[image_key]
        resolve_inside(ip, self.images_dir, f"image {image_key!r} of the folder dataset {self.root}")
        resolve_inside(mp, self.masks_dir, f"mask of image {image_key!r} of the folder dataset {self.root}")
        return ip, mp

    def load(self, image_key: str, class_id: int) -> tuple[np.ndarray, np.ndarray]:
        """Image and {0,1,255} mask read with :func:`fsdiff.io.read_mask`."""
        img_path, mask_path = self.paths(image_key)
        if self._by_key[image_key][0] != class_id:
            raise FsdiffError(f"image {image_key!r} is not of class {class_id} ({self.class_name(class_id)}).")
        image = read_image(img_path)
        mask = read_mask(mask_path, class_value=self.class_value)
        check_pair(image, mask, img_path, mask_path)
        return image, mask

    def describe(self) -> dict:
        """Dataset, folder and class layout."""
        return {"dataset": self.name, "fold": None, "split": None, "root": str(self.root), "per_class": self.per_class}


SOURCES.register("folder")(FolderSource)
