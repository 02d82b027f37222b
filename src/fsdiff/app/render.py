"""Pictures the page shows: scaled copies, annotation previews, overlays, probability and uncertainty maps.

Display only: nothing here is written to exports. Maps use perceptual colour maps (viridis for probability,
magma for uncertainty) on a fixed [0, 1] scale, so pictures of different queries compare.
"""

from __future__ import annotations

import cv2
import numpy as np

from fsdiff.app.annotations import BACKGROUND, BACKGROUND_COLOUR, OBJECT, OBJECT_COLOUR
from fsdiff.output import overlay

ESTIMATE_COLOUR = (255, 210, 0)
BOX_COLOUR = OBJECT_COLOUR


def fit(image: np.ndarray, side: int) -> np.ndarray:
    """``image`` scaled down (area interpolation) so its longer side is at most ``side``; unchanged if smaller."""
    h, w = image.shape[:2]
    scale = side / max(h, w)
    if scale >= 1:
        return image
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)


def fit_map(values: np.ndarray, shape: tuple[int, int], nearest: bool = False) -> np.ndarray:
    """A 2-D map resized to ``shape`` (H, W)."""
    if values.shape[:2] == tuple(shape):
        return values
    mode = cv2.INTER_NEAREST if nearest else cv2.INTER_AREA
    return cv2.resize(values, (shape[1], shape[0]), interpolation=mode)


def _thickness(shape: tuple[int, int]) -> int:
    return max(2, round(min(shape) / 150))


def colour_map(values: np.ndarray, colormap: int) -> np.ndarray:
    """A [0, 1] map as an RGB picture in ``colormap`` (an OpenCV colour map id)."""
    grey = (np.clip(np.nan_to_num(values, nan=0.0), 0.0, 1.0) * 255).round().astype(np.uint8)
    return cv2.cvtColor(cv2.applyColorMap(grey, colormap), cv2.COLOR_BGR2RGB)


def probability_picture(prob: np.ndarray) -> np.ndarray:
    """The probability map in viridis (dark = 0, yellow = 1)."""
    return colour_map(prob, cv2.COLORMAP_VIRIDIS)


def uncertainty_picture(uncertainty: np.ndarray) -> np.ndarray:
    """The uncertainty map in magma (black = certain, light = uncertain)."""
    return colour_map(uncertainty, cv2.COLORMAP_MAGMA)


def result_picture(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The predicted mask over the image (the CLI's overlay)."""
    return overlay(image, mask.astype(bool))


def annotation_picture(image: np.ndarray, annotation: dict | None, estimate: np.ndarray | None = None) -> np.ndarray:
    """A support picture with its annotation drawn, and the estimated mask outlined in yellow when given.

    ``annotation`` holds one of ``mask`` ({0,1}), ``scribble`` ({0,1,2}), ``box`` ((x0, y0, x1, y1)),
    ``points`` ([(x, y, label)]) or ``corners`` (clicked box corners, not yet a box), all at ``image``'s size.
    """
    out = image.copy()
    shape = image.shape[:2]
    t = _thickness(shape)
    ann = annotation or {}
    if estimate is not None:
        est = fit_map(estimate.astype(np.uint8), shape, nearest=True) == 1
        out = overlay(out, est, ESTIMATE_COLOUR, alpha=0.35)
    if ann.get("mask") is not None:
        out = overlay(out, fit_map(np.asarray(ann["mask"], np.uint8), shape, nearest=True) == 1, OBJECT_COLOUR)
    if ann.get("scribble") is not None:
        s = fit_map(np.asarray(ann["scribble"], np.uint8), shape, nearest=True)
        grown = cv2.dilate(s, np.ones((t, t), np.uint8))
        out[grown == OBJECT] = OBJECT_COLOUR
        out[grown == BACKGROUND] = BACKGROUND_COLOUR
    if ann.get("box") is not None:
        x0, y0, x1, y1 = (int(round(v)) for v in ann["box"])
        cv2.rectangle(out, (x0, y0), (max(x0, x1 - 1), max(y0, y1 - 1)), BOX_COLOUR, t)
    for x, y in ann.get("corners", ()):
        cv2.drawMarker(out, (int(round(x)), int(round(y))), BOX_COLOUR, cv2.MARKER_CROSS, 6 * t, t)
    for x, y, label in ann.get("points", ()):
        colour = OBJECT_COLOUR if int(label) == 1 else BACKGROUND_COLOUR
        cv2.circle(out, (int(round(x)), int(round(y))), 3 * t, colour, -1)
        cv2.circle(out, (int(round(x)), int(round(y))), 3 * t, (255, 255, 255), max(1, t // 2))
    return out


def scale_annotation(annotation: dict, shape: tuple[int, int], display_shape: tuple[int, int]) -> dict:
    """An annotation in original pixels (``load_shot`` keywords) drawn at ``display_shape`` instead."""
    sy, sx = display_shape[0] / shape[0], display_shape[1] / shape[1]
    out: dict = {}
    for key in ("mask", "scribble"):
        if annotation.get(key) is not None:
            out[key] = fit_map(np.asarray(annotation[key], np.uint8), display_shape, nearest=True)
    if annotation.get("box") is not None:
        x0, y0, x1, y1 = annotation["box"]
        out["box"] = (x0 * sx, y0 * sy, x1 * sx, y1 * sy)
    if annotation.get("points") is not None:
        out["points"] = [((x + 0.5) * sx - 0.5, (y + 0.5) * sy - 0.5, lab) for x, y, lab in annotation["points"]]
    return out
