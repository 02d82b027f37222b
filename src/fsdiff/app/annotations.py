"""Support annotations from what the page collects: painted editor layers, clicks on a shown image.

The editor (gradio's ImageEditor) returns its drawing as RGBA layers at the size of the picture it shows,
which the app may have scaled down (docs/APP.md "Drawing"). Painted pixels (alpha > 0) are read by colour:
the object brush (:data:`OBJECT_HEX`, green) marks the object, the background brush (:data:`BACKGROUND_HEX`,
red) marks background; later layers paint over earlier ones and the eraser leaves alpha 0. Labels are mapped
back to the original image with nearest-neighbour resizing. Clicks arrive in the shown picture's pixel
coordinates and are scaled to the original image: two clicks are the opposite corners of a box, single clicks
are object or background points. Pure numpy / OpenCV; the library validates the result (:func:`fsdiff.api.load_shot`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import cv2
import numpy as np

from fsdiff.errors import FsdiffError

OBJECT_COLOUR = (0, 192, 0)
BACKGROUND_COLOUR = (224, 0, 0)
OBJECT_HEX = "#00c000"
BACKGROUND_HEX = "#e00000"
NONE, OBJECT, BACKGROUND = 0, 1, 2
"""Stroke labels, as :class:`fsdiff.episode.ScribbleAnnotation` reads them."""
ASPECT_TOLERANCE = 0.02


def _rgba(layer: np.ndarray) -> np.ndarray:
    """A layer as (H, W, 4) uint8; an RGB layer counts as painted where it is not black."""
    arr = np.asarray(layer)
    if arr.ndim == 3 and arr.shape[2] == 4:
        return arr.astype(np.uint8, copy=False)
    if arr.ndim == 3 and arr.shape[2] == 3:
        alpha = np.where(arr.any(axis=2), 255, 0).astype(np.uint8)
        return np.dstack([arr.astype(np.uint8), alpha])
    raise FsdiffError(f"editor layer: expected an RGBA (H, W, 4) image, got an array of shape {arr.shape}.")


def stroke_labels(layers: Sequence[np.ndarray]) -> np.ndarray:
    """{0, 1, 2} labels at the layers' size: painted pixels by nearest brush colour, later layers on top."""
    if not layers:
        raise FsdiffError("editor: nothing painted; paint the object with the green brush.")
    first = _rgba(layers[0])
    out = np.zeros(first.shape[:2], np.uint8)
    obj, bg = np.asarray(OBJECT_COLOUR, np.int32), np.asarray(BACKGROUND_COLOUR, np.int32)
    for layer in layers:
        rgba = _rgba(layer)
        if rgba.shape[:2] != out.shape:
            raise FsdiffError(f"editor: layers of different sizes ({rgba.shape[1]}x{rgba.shape[0]} and "
                              f"{out.shape[1]}x{out.shape[0]}); clear the drawing and paint again.")
        painted = rgba[:, :, 3] > 0
        rgb = rgba[:, :, :3].astype(np.int32)
        closer_to_bg = ((rgb - bg) ** 2).sum(axis=2) < ((rgb - obj) ** 2).sum(axis=2)
        out[painted] = np.where(closer_to_bg[painted], BACKGROUND, OBJECT)
    return out


def to_shape(labels: np.ndarray, shape: tuple[int, int], what: str = "drawing") -> np.ndarray:
    """``labels`` resized (nearest) to ``shape`` (H, W); refuses a different aspect ratio (a foreign canvas)."""
    h, w = labels.shape[:2]
    H, W = shape
    if (h, w) == (H, W):
        return labels
    if abs((w / h) / (W / H) - 1.0) > ASPECT_TOLERANCE:
        raise FsdiffError(f"{what}: its size {w}x{h} does not have the proportions of the image ({W}x{H}); "
                          "clear the drawing and paint on the image shown.")
    return cv2.resize(labels, (W, H), interpolation=cv2.INTER_NEAREST)


def editor_layers(value: Mapping | None) -> list[np.ndarray]:
    """The painted layers of an ImageEditor value (``{'background', 'layers', 'composite'}``)."""
    if not value:
        return []
    return [np.asarray(x) for x in (value.get("layers") or []) if x is not None]


def mask_from_editor(value: Mapping | None, shape: tuple[int, int]) -> np.ndarray:
    """A {0, 1} uint8 mask at ``shape``: pixels painted with the object brush (background strokes erase)."""
    labels = stroke_labels(editor_layers(value))
    return (to_shape(labels, shape, "painted mask") == OBJECT).astype(np.uint8)


def scribble_from_editor(value: Mapping | None, shape: tuple[int, int]) -> np.ndarray:
    """A {0, 1, 2} stroke map at ``shape``: 1 object strokes, 2 background strokes, 0 unmarked."""
    return to_shape(stroke_labels(editor_layers(value)), shape, "scribble")


def mask_layer(mask: np.ndarray, shape: tuple[int, int] | None = None) -> np.ndarray:
    """An RGBA layer with ``mask`` painted in the object colour (resized, nearest, to ``shape`` when given)."""
    m = mask.astype(np.uint8)
    if shape is not None and m.shape != tuple(shape):
        m = cv2.resize(m, (shape[1], shape[0]), interpolation=cv2.INTER_NEAREST)
    out = np.zeros((*m.shape, 4), np.uint8)
    out[m > 0] = (*OBJECT_COLOUR, 255)
    return out


def _scale(display_shape: tuple[int, int], shape: tuple[int, int]) -> tuple[float, float]:
    return shape[1] / display_shape[1], shape[0] / display_shape[0]


def box_from_corners(a: tuple[float, float], b: tuple[float, float], display_shape: tuple[int, int],
                     shape: tuple[int, int]) -> tuple[int, int, int, int]:
    """The box (x0, y0, x1, y1), x1/y1 exclusive, in original pixels, spanned by two clicked corner pixels.

    A box whose corners share a row or a column has zero area and is refused.
    """
    (xa, ya), (xb, yb) = (float(a[0]), float(a[1])), (float(b[0]), float(b[1]))
    if xa == xb or ya == yb:
        raise FsdiffError(f"box: the corners ({xa:.0f}, {ya:.0f}) and ({xb:.0f}, {yb:.0f}) share a "
                          f"{'column' if xa == xb else 'row'}, so the box has zero area; click two opposite corners "
                          "of the object.")
    sx, sy = _scale(display_shape, shape)
    H, W = shape
    x0, x1 = sorted((xa, xb))
    y0, y1 = sorted((ya, yb))
    return (max(0, int(np.floor(x0 * sx))), max(0, int(np.floor(y0 * sy))),
            min(W, int(np.ceil((x1 + 1) * sx))), min(H, int(np.ceil((y1 + 1) * sy))))


def point_to_original(x: float, y: float, display_shape: tuple[int, int], shape: tuple[int, int]) -> tuple[float, float]:
    """A clicked pixel's centre in original coordinates (clipped to the image)."""
    sx, sy = _scale(display_shape, shape)
    H, W = shape
    return (float(np.clip((x + 0.5) * sx - 0.5, 0, W - 1)), float(np.clip((y + 0.5) * sy - 0.5, 0, H - 1)))


@dataclass
class Clicks:
    """Clicks on one support picture, in the shown picture's pixels: box corners and labelled points."""

    corners: list[tuple[float, float]] = field(default_factory=list)
    points: list[tuple[float, float, int]] = field(default_factory=list)

    def add(self, x: float, y: float, mode: str) -> None:
        """Record a click; ``mode`` is ``'box'``, ``'object'`` or ``'background'`` (a third corner starts a new box)."""
        if mode == "box":
            if len(self.corners) == 2:
                self.corners = []
            self.corners.append((float(x), float(y)))
        elif mode in ("object", "background"):
            self.points.append((float(x), float(y), 1 if mode == "object" else 0))
        else:
            raise FsdiffError(f"click mode {mode!r}: use box, object or background.")

    def annotation(self, display_shape: tuple[int, int], shape: tuple[int, int]) -> dict:
        """``{'box': (x0, y0, x1, y1)}`` or ``{'points': [(x, y, label)]}`` in original pixels for ``load_shot``."""
        if self.corners and self.points:
            raise FsdiffError("clicks: a support takes a box or points, not both; press 'Clear clicks' and "
                              "click again.")
        if len(self.corners) == 1:
            raise FsdiffError("box: only one corner clicked; click the opposite corner too.")
        if self.corners:
            return {"box": box_from_corners(self.corners[0], self.corners[1], display_shape, shape)}
        if self.points:
            return {"points": [(*point_to_original(x, y, display_shape, shape), lab) for x, y, lab in self.points]}
        raise FsdiffError("clicks: nothing clicked; click two opposite corners of a box, or points on the object.")
