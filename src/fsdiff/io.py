"""Reading and writing images and masks, with clear errors and atomic writes.

Images come back as RGB ``uint8`` arrays (H, W, 3) after EXIF rotation; grayscale, palette, RGBA,
CMYK and 16-bit inputs are converted. Masks come back as ``uint8`` (H, W) arrays holding
0 (background), 1 (the chosen class) and 255 (ignore), the convention of PASCAL VOC and of every
FSS reference codebase.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from fsdiff.errors import FsdiffError

ImageFile.LOAD_TRUNCATED_IMAGES = False

IGNORE = 255
"""Label value for pixels that are excluded from training and scoring."""

_BINARY_SETS = ({0, 1}, {0, 255}, {0, 1, 255})


def _open(path: str | os.PathLike, what: str) -> Image.Image:
    """Open and fully decode an image file, or raise an FsdiffError naming the file."""
    p = Path(path)
    if not p.exists():
        raise FsdiffError(f"{what} file not found: {p}. Check the path.")
    if p.is_dir():
        raise FsdiffError(f"{what} path is a directory, not a file: {p}.")
    try:
        img = Image.open(p)
        img.load()
    except UnidentifiedImageError:
        raise FsdiffError(
            f"cannot read {what} {p}: not an image file PIL can decode (use JPEG or PNG)."
        ) from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise FsdiffError(
            f"cannot read {what} {p}: the file is truncated or corrupt ({exc}); re-export or re-download it."
        ) from None
    return img


def sixteen_bit_to_uint8(arr: np.ndarray) -> np.ndarray:
    """Scale a 16-bit (or 32-bit integer) array to 0..255."""
    arr = arr.astype(np.float64)
    top = 65535.0 if arr.max(initial=0) > 255 else 255.0
    return np.clip(np.round(arr * (255.0 / top)), 0, 255).astype(np.uint8)


def image_to_rgb_array(img: Image.Image) -> np.ndarray:
    """Convert a decoded PIL image (any mode, EXIF-rotated first) to an RGB uint8 array."""
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
        gray = sixteen_bit_to_uint8(np.asarray(img))
        return np.repeat(gray[:, :, None], 3, axis=2)
    if img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        gray = np.zeros(arr.shape, np.uint8) if hi <= lo else ((arr - lo) / (hi - lo) * 255).round().astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if img.mode in ("P", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
    if img.mode != "RGB":
        img = img.convert("RGB")
    return np.ascontiguousarray(np.asarray(img, dtype=np.uint8))


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read an image file as an RGB uint8 array (H, W, 3), EXIF rotation applied."""
    return image_to_rgb_array(_open(path, "image"))


def mask_from_array(
    arr: np.ndarray,
    *,
    class_value: int | tuple[int, int, int] | None = None,
    source: str = "mask",
    palette: bool = False,
) -> np.ndarray:
    """Turn a label array into a {0, 1, 255} mask for one class.

    Binary masks ({0,1}, {0,255}, {0,1,255}; not for palette images) need no class. Class-index and
    palette masks need ``class_value``; their 255 stays ignore. Colour (H, W, 3) masks need an RGB
    ``class_value``.
    """
    if arr.ndim == 3:
        if arr.shape[2] == 4:
            arr = arr[:, :, :3]
        if arr.shape[2] == 1 or (np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 0], arr[..., 2])):
            arr = arr[..., 0]
        else:
            if not (isinstance(class_value, tuple) and len(class_value) == 3):
                raise FsdiffError(
                    f"{source} is a colour-coded mask; pass the class colour as R,G,B "
                    "(e.g. --class-value 128,0,0) or save the mask as a class-index or binary PNG."
                )
            fg = np.all(arr == np.asarray(class_value, dtype=arr.dtype), axis=2)
            return fg.astype(np.uint8)
    if arr.ndim != 2:
        raise FsdiffError(f"{source} must be a 2-D label image, got an array of shape {arr.shape}.")
    values = set(np.unique(arr).tolist())
    if class_value is None:
        if not palette and any(values <= s for s in _BINARY_SETS):
            fg_value = 255 if values <= {0, 255} else 1
            out = np.zeros(arr.shape, np.uint8)
            out[arr == fg_value] = 1
            if fg_value == 1:
                out[arr == IGNORE] = IGNORE
            return out
        if not palette and values <= {0, 65535}:
            return (arr == 65535).astype(np.uint8)
        shown = sorted(values)[:12]
        raise FsdiffError(
            f"{source} is a class-index or palette mask (values {shown}); choose the class with "
            "--class-value N (the label value of the class to segment)."
        )
    if isinstance(class_value, tuple):
        raise FsdiffError(f"{source} is a single-channel mask; give --class-value as one integer, not a colour.")
    out = np.zeros(arr.shape, np.uint8)
    out[arr == class_value] = 1
    out[arr == IGNORE] = IGNORE
    return out


def read_mask(
    path: str | os.PathLike, *, class_value: int | tuple[int, int, int] | None = None
) -> np.ndarray:
    """Read a mask file as a {0, 1, 255} uint8 array for one class (see :func:`mask_from_array`)."""
    return mask_from_pil(_open(path, "mask"), class_value=class_value, source=f"mask {path}")


def mask_from_pil(
    img: Image.Image, *, class_value: int | tuple[int, int, int] | None = None, source: str = "mask"
) -> np.ndarray:
    """A decoded PIL mask image as a {0, 1, 255} uint8 array for one class (see :func:`mask_from_array`)."""
    palette = img.mode == "P"
    if img.mode == "1":
        arr = np.asarray(img.convert("L")) // 255
    elif img.mode in ("RGB", "RGBA"):
        arr = np.asarray(img)
    elif img.mode in ("L", "P"):
        arr = np.asarray(img)
    elif img.mode.startswith("I"):
        arr = np.asarray(img).astype(np.int64)
    else:
        arr = np.asarray(img.convert("L"))
    return mask_from_array(arr, class_value=class_value, source=source, palette=palette)


def read_label(path: str | os.PathLike) -> np.ndarray:
    """Read a class-index label image (e.g. VOC ``SegmentationClass``) as raw integer values."""
    img = _open(path, "label")
    if img.mode not in ("P", "L", "I", "I;16", "I;16B", "I;16L", "1"):
        raise FsdiffError(
            f"label {path} has mode {img.mode}; expected a palette or single-channel class-index PNG."
        )
    return np.asarray(img).astype(np.int64 if img.mode.startswith("I") else np.uint8)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp" + target.suffix, dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def write_image(path: str | os.PathLike, array: np.ndarray, *, format: str | None = None) -> None:
    """Write an RGB/gray uint8 array atomically (format from the suffix unless given)."""
    target = Path(path)
    fmt = format or {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG"}.get(target.suffix.lower(), "PNG")
    with atomic_path(target) as tmp:
        Image.fromarray(np.ascontiguousarray(array)).save(tmp, format=fmt)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write a text file atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
