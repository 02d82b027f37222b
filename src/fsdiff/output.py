"""Writing predictions: binary mask PNGs, probability maps and overlay images, each written atomically."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from fsdiff.io import write_image

OVERLAY_COLOUR = (255, 64, 32)


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


@dataclass(frozen=True)
class WrittenPrediction:
    """Paths written for one query."""

    mask: Path
    prob: Path
    overlay: Path


def unique_stems(names: list[str]) -> list[str]:
    """File stems for ``names``, made unique by suffixing a counter where two share a stem."""
    seen: dict[str, int] = {}
    out = []
    for name in names:
        stem = Path(name).stem or "query"
        n = seen.get(stem, 0)
        seen[stem] = n + 1
        out.append(stem if n == 0 else f"{stem}_{n}")
    return out


def write_prediction(out_dir: Path, stem: str, image: np.ndarray, prob: np.ndarray, threshold: float) -> WrittenPrediction:
    """Write ``stem_mask.png`` (0/255), ``stem_prob.png`` (probability x 255) and ``stem_overlay.jpg``."""
    mask = prob > threshold
    paths = WrittenPrediction(out_dir / f"{stem}_mask.png", out_dir / f"{stem}_prob.png", out_dir / f"{stem}_overlay.jpg")
    write_image(paths.mask, mask.astype(np.uint8) * 255)
    write_image(paths.prob, (np.clip(prob, 0, 1) * 255).round().astype(np.uint8))
    write_image(paths.overlay, overlay(image, mask))
    return paths
