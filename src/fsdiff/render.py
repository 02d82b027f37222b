"""Pictures for people: annotations drawn on supports, masks on queries, panels tiled into sheets, bar charts.

Everything is plain RGB uint8 numpy drawn with OpenCV, so reports need no plotting library.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

from fsdiff.episode import Annotation, BoxAnnotation, MaskAnnotation, PointsAnnotation, ScribbleAnnotation

OBJECT = (40, 200, 60)
"""Colour of object annotations and ground truth (green)."""
BACKGROUND = (230, 50, 50)
"""Colour of background strokes and clicks (red)."""
PREDICTION = (255, 140, 0)
"""Colour of predicted masks (orange)."""
WHITE = (255, 255, 255)


def fit(image: np.ndarray, height: int) -> np.ndarray:
    """``image`` scaled to ``height`` pixels high, aspect kept (area filter when shrinking)."""
    h, w = image.shape[:2]
    width = max(1, round(w * height / h))
    interp = cv2.INTER_AREA if height < h else cv2.INTER_LINEAR
    return cv2.resize(np.ascontiguousarray(image), (width, height), interpolation=interp)


def _thickness(shape: tuple[int, ...]) -> int:
    return max(1, round(min(shape[:2]) / 150))


def outline(image: np.ndarray, mask: np.ndarray, colour: tuple[int, int, int], fill: float = 0.0) -> np.ndarray:
    """``image`` with ``mask``'s outline drawn (and its inside tinted by ``fill`` in [0, 1])."""
    out = image.copy()
    m = mask.astype(bool)
    if fill > 0:
        out[m] = ((1 - fill) * out[m] + fill * np.asarray(colour, np.float32)).round().astype(np.uint8)
    contours, _ = cv2.findContours(m.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(out, contours, -1, colour, _thickness(image.shape))
    return out


def draw_annotation(image: np.ndarray, annotation: Annotation) -> np.ndarray:
    """A support image with its annotation drawn: mask outline, box, strokes (object green, background red), clicks."""
    if isinstance(annotation, MaskAnnotation):
        return outline(image, annotation.mask == 1, OBJECT, fill=0.3)
    out = image.copy()
    t = _thickness(image.shape)
    if isinstance(annotation, BoxAnnotation):
        x0, y0, x1, y1 = annotation.pixel_bounds()
        cv2.rectangle(out, (x0, y0), (x1 - 1, y1 - 1), OBJECT, t + 1)
    elif isinstance(annotation, ScribbleAnnotation):
        for value, colour in ((1, OBJECT), (2, BACKGROUND)):
            grown = cv2.dilate((annotation.strokes == value).astype(np.uint8), np.ones((t, t), np.uint8))
            out[grown.astype(bool)] = colour
    elif isinstance(annotation, PointsAnnotation):
        r = max(4, round(min(image.shape[:2]) / 35))
        for (x, y), lab in zip(np.asarray(annotation.points), np.asarray(annotation.labels)):
            centre = (int(round(x)), int(round(y)))
            cv2.circle(out, centre, r, OBJECT if lab == 1 else BACKGROUND, -1)
            cv2.circle(out, centre, r, WHITE, max(1, r // 4))
    return out


def caption(panel: np.ndarray, text: str, height: int = 22) -> np.ndarray:
    """``panel`` with a white strip above it holding ``text``."""
    strip = np.full((height, panel.shape[1], 3), 255, np.uint8)
    cv2.putText(strip, text, (4, height - 7), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (20, 20, 20), 1, cv2.LINE_AA)
    return np.vstack([strip, panel])


def hstack(panels: Sequence[np.ndarray], gap: int = 6) -> np.ndarray:
    """Panels side by side, top-aligned, on white."""
    h = max(p.shape[0] for p in panels)
    w = sum(p.shape[1] for p in panels) + gap * (len(panels) - 1)
    out = np.full((h, w, 3), 255, np.uint8)
    x = 0
    for p in panels:
        out[: p.shape[0], x: x + p.shape[1]] = p
        x += p.shape[1] + gap
    return out


def vstack(rows: Sequence[np.ndarray], gap: int = 10) -> np.ndarray:
    """Rows one below the other, left-aligned, on white."""
    w = max(r.shape[1] for r in rows)
    h = sum(r.shape[0] for r in rows) + gap * (len(rows) - 1)
    out = np.full((h, w, 3), 255, np.uint8)
    y = 0
    for r in rows:
        out[y: y + r.shape[0], : r.shape[1]] = r
        y += r.shape[0] + gap
    return out


def bar_chart(labels: Sequence[str], values: Sequence[float], title: str, maximum: float = 100.0,
              bar_width: int = 360) -> np.ndarray:
    """A horizontal bar chart of ``values`` (0..``maximum``), one labelled row per value."""
    row, label_w = 18, max([60] + [8 * len(str(s)) for s in labels])
    h = 30 + row * len(labels) + 10
    out = np.full((h, label_w + bar_width + 70, 3), 255, np.uint8)
    cv2.putText(out, title, (6, 20), cv2.FONT_HERSHEY_SIMPLEX, 0.55, (20, 20, 20), 1, cv2.LINE_AA)
    for i, (name, v) in enumerate(zip(labels, values)):
        y = 30 + i * row
        cv2.putText(out, str(name), (6, y + 13), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (20, 20, 20), 1, cv2.LINE_AA)
        length = int(round(bar_width * min(max(float(v), 0.0), maximum) / maximum))
        cv2.rectangle(out, (label_w, y + 3), (label_w + max(length, 1), y + row - 3), (70, 110, 200), -1)
        cv2.putText(out, f"{float(v):.1f}", (label_w + length + 4, y + 13), cv2.FONT_HERSHEY_SIMPLEX, 0.4,
                    (20, 20, 20), 1, cv2.LINE_AA)
    return out
