"""What a caller holds (a file path, a PIL image, a numpy array, plain numbers) turned into fsdiff's values:
RGB uint8 images, {0, 1, 255} masks and support annotations, with the same validation as files (fsdiff.io).

Array images: uint8 (H, W, 3) as is; (H, W) or (H, W, 1) grey; (H, W, 4) RGBA drops alpha, as reading an RGBA
file does; uint16 / int32 scale to 0..255 like 16-bit files; floats must lie in [0, 1] (scaled by 255).
Array masks: bool, or integers read like a mask file (binary {0,1}, {0,255}, {0,1,255}; class-index masks need
``class_value``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, Union

import numpy as np
from PIL import Image

from fsdiff.episode import BoxAnnotation, PointsAnnotation, ScribbleAnnotation
from fsdiff.errors import FsdiffError
from fsdiff.io import sixteen_bit_to_uint8, image_to_rgb_array, mask_from_array, mask_from_pil, read_image, read_mask

ImageLike = Union[str, os.PathLike, Image.Image, np.ndarray]
"""A file path, a PIL image or a numpy array."""
ClassValue = Union[int, tuple[int, int, int], None]


def describe(value: Any) -> str:
    """A short name for ``value`` in messages and output names: the path, or the kind and size of the image."""
    if isinstance(value, (str, os.PathLike)):
        return os.fspath(value)
    if isinstance(value, Image.Image):
        return f"PIL image {value.width}x{value.height}"
    if isinstance(value, np.ndarray):
        return f"array {'x'.join(str(d) for d in value.shape)}"
    return type(value).__name__


def _array_to_rgb(arr: np.ndarray, what: str) -> np.ndarray:
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (3, 4)) or 0 in arr.shape[:2]:
        raise FsdiffError(f"{what}: expected an image array of shape (H, W), (H, W, 3) or (H, W, 4), got {arr.shape}.")
    if arr.dtype == bool:
        raise FsdiffError(f"{what}: a boolean array is a mask, not an image; pass it as the mask.")
    if np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all() or arr.min(initial=0) < 0 or arr.max(initial=0) > 1:
            raise FsdiffError(f"{what}: a float image must hold finite values in [0, 1]; convert it to uint8 0..255.")
        arr = np.round(arr * 255.0).astype(np.uint8)
    elif arr.dtype != np.uint8:
        if not np.issubdtype(arr.dtype, np.integer) or arr.min(initial=0) < 0:
            raise FsdiffError(f"{what}: unsupported image dtype {arr.dtype}; use uint8 (0..255) or uint16.")
        arr = sixteen_bit_to_uint8(arr)
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    return np.ascontiguousarray(arr[:, :, :3])


def to_image(value: ImageLike, what: str = "image") -> np.ndarray:
    """An RGB uint8 (H, W, 3) array from a path, a PIL image (EXIF rotation applied) or an array."""
    if isinstance(value, (str, os.PathLike)):
        return read_image(value)
    if isinstance(value, Image.Image):
        try:
            value.load()
        except (OSError, ValueError) as exc:
            raise FsdiffError(f"{what}: the PIL image cannot be decoded ({exc}).") from None
        return image_to_rgb_array(value)
    if isinstance(value, np.ndarray):
        return _array_to_rgb(value, what)
    raise FsdiffError(f"{what}: expected a file path, a PIL image or a numpy array, got {type(value).__name__}.")


def to_mask(value: ImageLike, class_value: ClassValue = None, what: str = "mask") -> np.ndarray:
    """A {0, 1, 255} uint8 mask from a path, a PIL image or an array (bool or label values)."""
    if isinstance(value, (str, os.PathLike)):
        return read_mask(value, class_value=class_value)
    if isinstance(value, Image.Image):
        return mask_from_pil(value, class_value=class_value, source=what)
    if not isinstance(value, np.ndarray):
        raise FsdiffError(f"{what}: expected a file path, a PIL image or a numpy array, got {type(value).__name__}.")
    if value.dtype == bool:
        return value.astype(np.uint8)
    if np.issubdtype(value.dtype, np.floating):
        if not np.isin(value, (0.0, 1.0)).all():
            raise FsdiffError(f"{what}: a float mask must hold only 0.0 and 1.0; threshold it first (e.g. prob > 0.5).")
        return value.astype(np.uint8)
    if not np.issubdtype(value.dtype, np.integer):
        raise FsdiffError(f"{what}: unsupported mask dtype {value.dtype}; use bool or integer labels.")
    return mask_from_array(value, class_value=class_value, source=what)


def to_box(value: str | Sequence[float], where: str = "") -> BoxAnnotation:
    """A box from ``"x0,y0,x1,y1"`` or four numbers, in pixels (x1, y1 exclusive); ``where`` prefixes messages."""
    parts = str(value).split(",") if isinstance(value, str) else value
    try:
        numbers = tuple(float(v) for v in parts)
    except (TypeError, ValueError):
        numbers = ()
    if len(numbers) != 4 or not all(np.isfinite(numbers)):
        raise FsdiffError(f"{where}box={value!r}: expected four numbers x0, y0, x1, y1 in pixels, e.g. (10, 20, 200, 180).")
    return BoxAnnotation(numbers)  # type: ignore[arg-type]


def to_scribble(value: ImageLike, what: str = "scribble") -> ScribbleAnnotation:
    """Strokes from a path, a PIL image or an array: 1 or 255 = object, 2 or 128 = background, else unknown."""
    if isinstance(value, np.ndarray) and value.ndim == 2 and (np.issubdtype(value.dtype, np.integer) or value.dtype == bool):
        return ScribbleAnnotation.from_array(value.astype(np.uint8))
    return ScribbleAnnotation.from_array(to_image(value, what).max(axis=2))


def to_points(value: Sequence[Sequence[float]], where: str = "") -> PointsAnnotation:
    """Clicks from ``[(x, y), ...]`` or ``[(x, y, label), ...]`` (label 1 = object, 0 = background; default 1)."""
    rows = []
    try:
        for p in value:
            p = [float(v) for v in p]
            if len(p) not in (2, 3) or not all(np.isfinite(p)) or (len(p) == 3 and p[2] not in (0.0, 1.0)):
                raise ValueError
            rows.append((p[0], p[1], int(p[2]) if len(p) == 3 else 1))
    except (TypeError, ValueError):
        raise FsdiffError(f"{where}points={value!r}: expected (x, y) or (x, y, label) per click, label 1 (object) or 0 "
                          "(background), e.g. [(120, 80), (30, 40, 0)].") from None
    if not rows:
        raise FsdiffError(f"{where}points=[]: no click given; pass at least one (x, y) on the object.")
    pts = np.asarray([(x, y) for x, y, _ in rows], np.float64)
    return PointsAnnotation(pts, np.asarray([lab for _, _, lab in rows], np.int64))
