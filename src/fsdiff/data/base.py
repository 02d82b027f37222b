"""The common interface of every few-shot data source (splits and folds: docs/DATASETS.md).

A source is one dataset restricted to one fold and split: it names its classes, lists the images of
each class in a stable order, lists the (image, class) query pairs in the order of the reference
code (HSNet's ``img_metadata``), and loads an image with its {0, 1, 255} mask for one class. The
benchmark sampler (:mod:`fsdiff.data.sampler`) only talks to this interface.
"""

from __future__ import annotations

import abc

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from fsdiff.errors import FsdiffError
from fsdiff.registry import Registry

SPLITS_ENV = "FSDIFF_SPLITS"
"""Environment variable naming the folder that holds HSNet's ``data/splits`` lists."""

HSNET_SPLITS_URL = "https://github.com/juhongm999/hsnet (folder data/splits)"


class FewShotSource(abc.ABC):
    """One dataset in one fold and split: classes, per-class image lists, query pairs, loading."""

    name: str = ""
    hsnet_query_mode: str = "cycle"
    """How HSNet picks queries: 'cycle' walks :meth:`query_items` in order (PASCAL, FSS-1000);
    'class_random' draws a class, then a query image of it (COCO)."""
    default_episodes: int | None = None
    """Episodes per fold in the HSNet protocol; None means one per query item (FSS-1000)."""
    test_split: str | None = "val"
    """The split a benchmark scores by default (None: the source has no splits)."""
    open_options: tuple[str, ...] = ()
    """Which benchmark options (``ann``, ``splits_dir``, ``convention``) :meth:`open` passes on to this source."""

    classes: list[tuple[int, str]]

    def __init__(self) -> None:
        self.classes = []

    @classmethod
    def open(cls, root: str | os.PathLike, *, fold: int | None = 0, split: str | None = None,
             **options: object) -> "FewShotSource":
        """The source as a benchmark names it: ``split`` defaults to :attr:`test_split`; an option the source
        does not take (see :attr:`open_options`) is an error rather than silently ignored."""
        given = {k: v for k, v in options.items() if v is not None}
        bad = sorted(set(given) - set(cls.open_options))
        if bad:
            takes = ", ".join(cls.open_options) or "none of them"
            raise FsdiffError(f"{', '.join(bad)}: not used by the {cls.name} source (of ann, splits_dir, convention "
                              f"it takes {takes}); drop it.")
        if split is not None and cls.test_split is None:
            raise FsdiffError(f"split={split!r}: a {cls.name} source has no splits; leave split unset.")
        return cls._open(root, fold=fold, split=split or cls.test_split, **given)

    @classmethod
    def _open(cls, root: str | os.PathLike, *, fold: int | None, split: str | None, **options: object) -> "FewShotSource":
        return cls(root=root, fold=fold, split=split, **options)  # type: ignore[call-arg]

    # -- the interface ---------------------------------------------------------------------
    @abc.abstractmethod
    def images_of_class(self, class_id: int) -> list[str]:
        """Image keys holding ``class_id``, in the reference (stable) order."""

    @abc.abstractmethod
    def query_items(self) -> list[tuple[str, int]]:
        """The (image key, class id) query pairs in the reference order."""

    @abc.abstractmethod
    def load(self, image_key: str, class_id: int) -> tuple[np.ndarray, np.ndarray]:
        """The RGB uint8 image and its {0, 1, 255} uint8 mask for ``class_id``."""

    # -- defaults --------------------------------------------------------------------------
    def class_ids(self) -> list[int]:
        """The class ids of this fold and split, in order."""
        return [cid for cid, _ in self.classes]

    def select_classes(self, classes: Sequence[int] | None = None) -> list[int]:
        """The source's class ids in its order, restricted to ``classes`` (None = all); unknown ids raise."""
        known = self.class_ids()
        if classes is None:
            return known
        bad = [c for c in classes if c not in known]
        if bad:
            raise FsdiffError(f"classes {bad} are not classes of the {self.name} source (it has {known[:20]}...).")
        wanted = set(classes)
        return [c for c in known if c in wanted]

    def class_name(self, class_id: int) -> str:
        """The name of ``class_id``; FsdiffError if the class is not in this fold and split."""
        for cid, name in self.classes:
            if cid == class_id:
                return name
        self._unknown_class(class_id)
        raise AssertionError  # unreachable

    def image_keys(self) -> list[str]:
        """Every image of the split in list order (the query list of BAM's protocol)."""
        seen: dict[str, None] = {}
        for key, _ in self.query_items():
            seen.setdefault(key, None)
        return list(seen)

    def class_pixels(self, image_key: str) -> dict[int, int]:
        """Pixel count of each of this source's classes present in ``image_key`` (loads masks)."""
        out: dict[int, int] = {}
        for cid in self.class_ids():
            if image_key in self.images_of_class(cid):
                _, mask = self.load(image_key, cid)
                n = int(np.count_nonzero(mask == 1))
                if n:
                    out[cid] = n
        return out

    def check(self) -> list[str]:
        """Files the source needs but cannot find (empty when everything is in place)."""
        return []

    def describe(self) -> dict:
        """What identifies this source in an episode list file (dataset, fold, split, ...)."""
        return {"dataset": self.name, "fold": None, "split": None}

    def _unknown_class(self, class_id: int) -> None:
        ids = self.class_ids()
        shown = ", ".join(str(c) for c in ids[:25]) + (" ..." if len(ids) > 25 else "")
        raise FsdiffError(
            f"class {class_id!r} is not one of the {self.name} classes of this fold and split ({shown}); "
            "pick a class from source.classes or change fold/split."
        )


SOURCES: Registry[FewShotSource] = Registry("data source")
"""Data sources by name: 'coco', 'pascal', 'fss1000', 'folder' (keyword-argument factories)."""


def check_fold(fold: object, n_folds: int, dataset: str) -> int:
    """Return ``fold`` as an int in 0..n_folds-1, or raise an FsdiffError naming the valid range."""
    if isinstance(fold, bool) or not isinstance(fold, (int, np.integer)) or not 0 <= int(fold) < n_folds:
        raise FsdiffError(f"fold={fold!r} is out of range for {dataset}; use an integer in 0..{n_folds - 1}.")
    return int(fold)


def normalise_split(split: object, dataset: str, allowed: dict[str, str]) -> str:
    """Map a split name (e.g. 'test' -> 'val') through ``allowed`` or raise an FsdiffError."""
    key = str(split).lower() if split is not None else None
    if key not in allowed:
        choices = ", ".join(sorted(allowed))
        raise FsdiffError(f"split={split!r} is not a {dataset} split; use one of: {choices}.")
    return allowed[key]


def resolve_splits_dir(splits_dir: str | os.PathLike | None, required: list[str], dataset: str) -> Path:
    """The folder holding HSNet's split lists (argument, else $FSDIFF_SPLITS) with ``required`` files."""
    base = splits_dir if splits_dir is not None else os.environ.get(SPLITS_ENV) or None
    how = (
        f"fsdiff does not ship these lists (they come without a licence). Download the folder "
        f"data/splits of the HSNet repository, {HSNET_SPLITS_URL}, and pass splits_dir=<that folder> "
        f"or set {SPLITS_ENV}=<that folder>; see docs/DATASETS.md."
    )
    if base is None:
        raise FsdiffError(f"{dataset} needs the split list file(s) {', '.join(required[:4])}. {how}")
    root = Path(base).expanduser()
    missing = [r for r in required if not (root / r).is_file()]
    if missing:
        shown = ", ".join(str(root / m) for m in missing[:4]) + (" ..." if len(missing) > 4 else "")
        raise FsdiffError(f"{dataset}: split list file(s) not found: {shown}. {how}")
    return root


def check_pair(image: np.ndarray, mask: np.ndarray, image_path: object, mask_path: object) -> None:
    """Raise an FsdiffError naming both files when an image and its mask differ in size."""
    if image.shape[:2] != mask.shape[:2]:
        raise FsdiffError(
            f"mask {mask_path} is {mask.shape[1]}x{mask.shape[0]} (WxH) but its image {image_path} is "
            f"{image.shape[1]}x{image.shape[0]}; resize the mask with nearest-neighbour interpolation "
            "or pair the right files."
        )
