"""The one currency of fsdiff: an episode (the K-shot task of DiffSeg §3 "Task description", Eq. (1), widened
as in DiffUp, arXiv 2407.16182, to 0..K shots and weak annotations).

An episode holds a class (id and name), 0..K annotated support shots and 1..Q query images (with
ground truth when evaluating). Support annotations are a dense mask, a box, a scribble, points, or the
class name alone (0-shot). Every object is validated when it is built, so a segmenter never sees a
mask of the wrong size, an empty mask or a box outside its image.

Images are RGB ``uint8`` arrays (H, W, 3); masks are ``uint8`` arrays (H, W) with 0 = background,
1 = the episode's class, 255 = ignore.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import cv2
import numpy as np

from fsdiff.errors import FsdiffError
from fsdiff.io import IGNORE

ANNOTATION_KINDS = ("mask", "box", "scribble", "points", "text")

NORMALISED_BOX_MIN_SIDE = 8
"""A box whose coordinates all lie in [-1, 1] is refused as normalised on images with a side above this
many pixels (a box in pixels that small is a 1-pixel box on a real photo, never intended)."""


def check_image(image: np.ndarray, source: str) -> None:
    """Raise unless ``image`` is an RGB uint8 array (H, W, 3)."""
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        desc = f"{image.dtype} array of shape {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise FsdiffError(f"{source}: expected an RGB uint8 image of shape (H, W, 3), got {desc}.")
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise FsdiffError(f"{source}: the image is empty (shape {image.shape}).")


def check_label(mask: np.ndarray, shape: tuple[int, int], source: str) -> np.ndarray:
    """Raise unless ``mask`` is a {0,1,255} uint8 array of the given (H, W); return its value counts."""
    if not isinstance(mask, np.ndarray) or mask.ndim != 2:
        desc = f"array of shape {mask.shape}" if isinstance(mask, np.ndarray) else type(mask).__name__
        raise FsdiffError(f"{source}: expected a 2-D mask, got {desc}.")
    if tuple(mask.shape) != tuple(shape):
        raise FsdiffError(
            f"{source}: mask size {mask.shape[1]}x{mask.shape[0]} (WxH) does not match its image "
            f"{shape[1]}x{shape[0]}; resize the mask with nearest-neighbour interpolation or pick the right file."
        )
    if mask.dtype != np.uint8:
        raise FsdiffError(f"{source}: mask must be uint8 with values 0, 1, 255, got dtype {mask.dtype}.")
    counts = np.bincount(mask.ravel(), minlength=256)
    bad = [int(v) for v in np.flatnonzero(counts) if v not in (0, 1, IGNORE)]
    if bad:
        raise FsdiffError(
            f"{source}: mask holds values {bad[:8]}; expected 0 (background), 1 (class) and 255 (ignore). "
            "Read it with fsdiff.io.read_mask and a class value."
        )
    return counts


def _default_background(fg: np.ndarray, margin: float = 0.1) -> np.ndarray:
    """Background for sparse annotations: everything outside the strokes' box grown by ``margin``."""
    h, w = fg.shape
    ys, xs = np.nonzero(fg)
    my, mx = int(round(margin * h)), int(round(margin * w))
    y0, y1 = max(0, ys.min() - my), min(h, ys.max() + 1 + my)
    x0, x1 = max(0, xs.min() - mx), min(w, xs.max() + 1 + mx)
    bg = np.ones((h, w), bool)
    bg[y0:y1, x0:x1] = False
    return bg


class Annotation:
    """Base of the support annotation kinds."""

    kind: ClassVar[str] = ""

    def validate(self, shape: tuple[int, int], source: str) -> None:
        """Raise an FsdiffError if the annotation does not fit an image of ``shape``."""

    def regions(self, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """Boolean (foreground, background) regions on an image of ``shape`` (H, W)."""
        raise FsdiffError(f"a {self.kind} annotation has no spatial region; use a method that accepts it.")


@dataclass(frozen=True, eq=False)
class MaskAnnotation(Annotation):
    """A dense mask: 1 = class, 0 = background, 255 = ignore."""

    mask: np.ndarray
    kind: ClassVar[str] = "mask"

    def validate(self, shape: tuple[int, int], source: str) -> None:
        counts = check_label(self.mask, shape, source)
        if counts[IGNORE] == self.mask.size:
            raise FsdiffError(
                f"{source}: every pixel of the support mask is 255, the ignore label, so it marks no pixel of "
                "the class; use 1 for the object and 0 for background (a 0/255 file mask read with "
                "fsdiff.io.read_mask needs some 0 background), or drop this support."
            )
        if counts[1] == 0:
            raise FsdiffError(
                f"{source}: the support mask is empty (no pixel of the class); annotate the object, "
                "choose another class value, or drop this support."
            )

    def regions(self, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        return self.mask == 1, self.mask == 0


@dataclass(frozen=True, eq=False)
class BoxAnnotation(Annotation):
    """An axis-aligned box (x0, y0, x1, y1) in pixel coordinates, x1/y1 exclusive."""

    box: tuple[float, float, float, float]
    kind: ClassVar[str] = "box"

    def validate(self, shape: tuple[int, int], source: str) -> None:
        h, w = shape
        try:
            x0, y0, x1, y1 = (float(v) for v in self.box)
        except (TypeError, ValueError):
            raise FsdiffError(f"{source}: a box is four numbers x0,y0,x1,y1, got {self.box!r}.") from None
        if not all(np.isfinite((x0, y0, x1, y1))):
            raise FsdiffError(f"{source}: box {tuple(self.box)} holds a non-finite number; give four pixel coordinates.")
        if not (x1 > x0 and y1 > y0):
            raise FsdiffError(f"{source}: box {self.box} is empty; it needs x1 > x0 and y1 > y0.")
        if max(abs(x0), abs(y0), abs(x1), abs(y1)) <= 1 and max(h, w) > NORMALISED_BOX_MIN_SIDE:
            raise FsdiffError(
                f"{source}: box {tuple(self.box)} looks normalised (every value <= 1), but boxes are in pixels "
                f"of the {w}x{h} image; multiply x by {w} and y by {h} (e.g. "
                f"{x0 * w:g},{y0 * h:g},{x1 * w:g},{y1 * h:g})."
            )
        if x0 < 0 or y0 < 0 or x1 > w or y1 > h:
            raise FsdiffError(
                f"{source}: box {tuple(self.box)} lies (partly) outside the {w}x{h} image; "
                f"coordinates must satisfy 0 <= x0 < x1 <= {w} and 0 <= y0 < y1 <= {h}."
            )

    def pixel_bounds(self) -> tuple[int, int, int, int]:
        """Integer (x0, y0, x1, y1) covering every pixel the box touches, at least one pixel wide."""
        x0, y0, x1, y1 = (float(v) for v in self.box)
        ix0, iy0 = int(np.floor(x0)), int(np.floor(y0))
        ix1, iy1 = max(ix0 + 1, int(np.ceil(x1))), max(iy0 + 1, int(np.ceil(y1)))
        return ix0, iy0, ix1, iy1

    def regions(self, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        fg = np.zeros(shape, bool)
        x0, y0, x1, y1 = self.pixel_bounds()
        fg[y0:y1, x0:x1] = True
        return fg, ~fg

    @staticmethod
    def from_mask(mask: np.ndarray) -> "BoxAnnotation":
        """The tight box around a mask's class pixels (how fsdiff turns a mask into a box support)."""
        ys, xs = np.nonzero(mask == 1)
        if len(ys) == 0:
            raise FsdiffError("cannot build a box from an empty mask.")
        return BoxAnnotation((float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)))


@dataclass(frozen=True, eq=False)
class ScribbleAnnotation(Annotation):
    """Sparse strokes: ``strokes`` has 1 on the class, optionally 2 on background, 0 elsewhere."""

    strokes: np.ndarray
    kind: ClassVar[str] = "scribble"

    def validate(self, shape: tuple[int, int], source: str) -> None:
        s = self.strokes
        if not isinstance(s, np.ndarray) or s.ndim != 2 or tuple(s.shape) != tuple(shape):
            got = s.shape if isinstance(s, np.ndarray) else type(s).__name__
            raise FsdiffError(f"{source}: scribble map {got} does not match the image size {shape} (HxW).")
        if not np.any(s == 1):
            raise FsdiffError(f"{source}: the scribble has no foreground stroke (value 1); draw on the object.")

    def regions(self, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        fg = self.strokes == 1
        bg = self.strokes == 2
        if not bg.any():
            bg = _default_background(fg)
        return fg, bg

    @staticmethod
    def from_array(arr: np.ndarray) -> "ScribbleAnnotation":
        """Strokes from an image: 1 or 255 = class, 2 or 128 = background, anything else = unknown."""
        if arr.ndim == 3:
            arr = arr.max(axis=2)
        out = np.zeros(arr.shape[:2], np.uint8)
        out[(arr == 1) | (arr == 255)] = 1
        out[(arr == 2) | (arr == 128)] = 2
        return ScribbleAnnotation(out)


@dataclass(frozen=True, eq=False)
class PointsAnnotation(Annotation):
    """Clicked points (x, y) with labels 1 (class) or 0 (background)."""

    points: np.ndarray
    labels: np.ndarray
    radius: int = 0
    kind: ClassVar[str] = "points"

    def validate(self, shape: tuple[int, int], source: str) -> None:
        h, w = shape
        pts = np.asarray(self.points, dtype=np.float64)
        lab = np.asarray(self.labels)
        if pts.ndim != 2 or pts.shape[1] != 2 or lab.shape != (pts.shape[0],):
            raise FsdiffError(f"{source}: points must be (N, 2) x,y with N labels, got {pts.shape} and {lab.shape}.")
        if not np.any(lab == 1):
            raise FsdiffError(f"{source}: no positive point (label 1); click on the object at least once.")
        outside = (pts < 0).any(axis=1) | (pts[:, 0] >= w) | (pts[:, 1] >= h)
        if outside.any():
            x, y = pts[int(np.argmax(outside))]
            raise FsdiffError(f"{source}: point ({x:g}, {y:g}) lies outside the {w}x{h} image; give pixel "
                              f"coordinates with 0 <= x < {w} and 0 <= y < {h}.")

    def _disks(self, shape: tuple[int, int], label: int) -> np.ndarray:
        h, w = shape
        r = self.radius or max(3, int(round(0.01 * np.hypot(h, w))))
        out = np.zeros(shape, np.uint8)
        for (x, y), lab in zip(np.asarray(self.points), np.asarray(self.labels)):
            if lab == label:
                cv2.circle(out, (int(round(x)), int(round(y))), r, 1, thickness=-1)
        return out.astype(bool)

    def regions(self, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        fg = self._disks(shape, 1)
        bg = self._disks(shape, 0) & ~fg
        if not bg.any():
            bg = _default_background(fg)
        return fg, bg


@dataclass(frozen=True, eq=False)
class TextAnnotation(Annotation):
    """No spatial annotation: only the episode's class name (0-shot methods)."""

    kind: ClassVar[str] = "text"


@dataclass(frozen=True, eq=False)
class Shot:
    """One support example: an image and its annotation."""

    image: np.ndarray
    annotation: Annotation
    image_id: str = ""

    def __post_init__(self) -> None:
        source = f"support {self.image_id}".strip() if self.image_id else "support image"
        check_image(self.image, source)
        if not isinstance(self.annotation, Annotation):
            raise FsdiffError(f"{source}: annotation must be one of {ANNOTATION_KINDS}, got {type(self.annotation).__name__}.")
        self.annotation.validate(self.image.shape[:2], source)

    @property
    def shape(self) -> tuple[int, int]:
        """(H, W) of the image."""
        return self.image.shape[0], self.image.shape[1]


@dataclass(frozen=True, eq=False)
class Query:
    """One image to segment, with its {0,1,255} ground truth when evaluating."""

    image: np.ndarray
    gt: np.ndarray | None = None
    image_id: str = ""

    def __post_init__(self) -> None:
        source = f"query {self.image_id}".strip() if self.image_id else "query image"
        check_image(self.image, source)
        if self.gt is not None:
            check_label(self.gt, self.image.shape[:2], source + " ground truth")

    @property
    def shape(self) -> tuple[int, int]:
        """(H, W) of the image."""
        return self.image.shape[0], self.image.shape[1]


@dataclass(frozen=True, eq=False)
class Episode:
    """A class, its support shots and the queries to segment."""

    class_id: int
    class_name: str
    shots: tuple[Shot, ...]
    queries: tuple[Query, ...]
    episode_id: str = ""
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "shots", tuple(self.shots))
        object.__setattr__(self, "queries", tuple(self.queries))
        if not self.queries:
            raise FsdiffError("an episode needs at least one query image.")
        for s in self.shots:
            if not isinstance(s, Shot):
                raise FsdiffError(f"episode shots must be Shot objects, got {type(s).__name__}.")
        for q in self.queries:
            if not isinstance(q, Query):
                raise FsdiffError(f"episode queries must be Query objects, got {type(q).__name__}.")

    @property
    def k(self) -> int:
        """Number of support shots."""
        return len(self.shots)

    def annotation_kinds(self) -> tuple[str, ...]:
        """The annotation kind of each shot."""
        return tuple(s.annotation.kind for s in self.shots)
