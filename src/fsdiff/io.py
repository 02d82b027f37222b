"""Reading and writing images and masks, with clear errors and atomic writes.

Images come back as RGB ``uint8`` arrays (H, W, 3) after EXIF rotation; grayscale, palette, RGBA,
CMYK and 16-bit inputs are converted. Masks come back as ``uint8`` (H, W) arrays holding
0 (background), 1 (the chosen class) and 255 (ignore), the convention of PASCAL VOC and of every
FSS reference codebase.

Reading is bounded (:mod:`fsdiff.limits`): an image's size is checked from its header before any pixel
is decoded, JSON files are checked for size and nesting, and :func:`resolve_inside` keeps paths named
by data files inside their dataset folder. Masks that a lossy format (JPEG) or anti-aliasing turned
into many grey values, alpha-only masks and photos passed as scribbles are recognised and reported.
Atomic writes create their temporary file with mode 0666 minus the umask, like any other program's
output.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import stat
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from fsdiff.errors import FsdiffError
from fsdiff.limits import (
    FOLLOW_SYMLINKS_ENV,
    MAX_IMAGE_PIXELS,
    MAX_JSON_BYTES,
    check_image_size,
    follow_symlinks,
)

ImageFile.LOAD_TRUNCATED_IMAGES = False

IGNORE = 255
"""Label value for pixels that are excluded from training and scoring."""

_BINARY_SETS = ({0, 1}, {0, 255}, {0, 1, 255})


def _pil_pixels(exc: Exception) -> str:
    """The pixel count in PIL's decompression-bomb message, or '' if it has none."""
    m = re.search(r"\((\d+) pixels\)", str(exc))
    return f"{int(m.group(1)):,} pixels, " if m else ""


def _open(path: str | os.PathLike, what: str, max_pixels: int | None = None) -> Image.Image:
    """Open an image file, check its size from the header, then decode it; errors name the file.

    ``max_pixels`` defaults to :data:`fsdiff.limits.MAX_IMAGE_PIXELS` (``$FSDIFF_MAX_IMAGE_PIXELS``).
    """
    p = Path(path)
    if not p.exists():
        raise FsdiffError(f"{what} file not found: {p}. Check the path.")
    if p.is_dir():
        raise FsdiffError(f"{what} path is a directory, not a file: {p}.")
    top = MAX_IMAGE_PIXELS.value() if max_pixels is None else int(max_pixels)
    if Image.MAX_IMAGE_PIXELS is not None and top > Image.MAX_IMAGE_PIXELS:
        Image.MAX_IMAGE_PIXELS = top  # PIL's own bomb check must not refuse what the fsdiff limit allows
    try:
        with warnings.catch_warnings():  # PIL's warning is superseded by the fsdiff limit checked here
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(p)
            check_image_size(img.size[0], img.size[1], f"{what} {p}", max_pixels)
            img.load()
    except FsdiffError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        how = MAX_IMAGE_PIXELS.hint() if max_pixels is None else "pass a larger max_pixels"
        raise FsdiffError(
            f"{what} {p} is too large ({_pil_pixels(exc)}above the limit of {top:,} pixels, "
            f"{MAX_IMAGE_PIXELS.name}); downscale the image, or {how}."
        ) from None
    except UnidentifiedImageError:
        raise FsdiffError(
            f"cannot read {what} {p}: not an image file PIL can decode (use JPEG or PNG)."
        ) from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise FsdiffError(
            f"cannot read {what} {p}: the file is truncated or corrupt ({exc}); re-export or re-download it."
        ) from None
    return img


def open_image(path: str | os.PathLike, what: str = "image", max_pixels: int | None = None) -> Image.Image:
    """A decoded PIL image, refused before decoding above ``max_pixels`` (default :data:`~fsdiff.limits.MAX_IMAGE_PIXELS`)."""
    return _open(path, what, max_pixels)


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


def read_image(path: str | os.PathLike, *, max_pixels: int | None = None) -> np.ndarray:
    """Read an image file as an RGB uint8 array (H, W, 3), EXIF rotation applied.

    Files above ``max_pixels`` (default :data:`fsdiff.limits.MAX_IMAGE_PIXELS`) are refused before decoding.
    """
    return image_to_rgb_array(_open(path, "image", max_pixels))


ALPHA_THRESHOLD = 128
"""An alpha-only mask (constant colour, the shape in the alpha channel) marks the object where alpha >= 128."""

_NEAR = 16
"""Values within this distance of 0 or 255 count as 'near' in the lossy-mask test."""


def _looks_lossy(arr: np.ndarray) -> tuple[bool, int]:
    """Whether a 2-D uint8 label array looks like a 0/255 mask blurred by JPEG or anti-aliasing; its value count.

    The signature: >= 90% of the pixels within 16 of 0 or 255, and values just below 255 (239..254), which
    class-index masks (0..N and 255 for ignore) do not hold.
    """
    if arr.dtype != np.uint8:
        return False, int(np.unique(arr).size)
    counts = np.bincount(arr.ravel(), minlength=256)
    distinct = int(np.count_nonzero(counts))
    near = int(counts[: _NEAR + 1].sum() + counts[255 - _NEAR :].sum())
    below_white = bool(counts[255 - _NEAR : 255].any())
    return near >= 0.9 * arr.size and below_white, distinct


def _lossy_error(source: str, distinct: int, jpeg: bool) -> FsdiffError:
    cause = "it is a JPEG, and lossy compression" if jpeg else "lossy (JPEG) compression or anti-aliasing"
    return FsdiffError(
        f"{source} looks like a binary 0/255 mask whose edges {cause} turned into {distinct} grey values, "
        "so it cannot be read as a binary or class-index mask; re-save the mask as PNG (lossless) with only "
        "0 and 255 (threshold the grey values at 128)."
    )


def mask_from_array(
    arr: np.ndarray,
    *,
    class_value: int | tuple[int, int, int] | None = None,
    source: str = "mask",
    palette: bool = False,
    lossy: bool = False,
) -> np.ndarray:
    """Turn a label array into a {0, 1, 255} mask for one class.

    Binary masks ({0,1}, {0,255}, {0,1,255}; not for palette images) need no class. Class-index and
    palette masks need ``class_value``; their 255 stays ignore (so ``class_value=255`` is refused).
    Colour (H, W, 3) masks need an RGB ``class_value``. (H, W, 2) gray+alpha and (H, W, 4) RGBA arrays
    whose colour is constant while the alpha varies are alpha-only masks: object where alpha >= 128.
    ``lossy`` (the file was a JPEG) turns an unreadable mask's error into a "re-save as PNG" hint; grey
    values that look like a blurred 0/255 mask get the same hint.
    """
    if isinstance(class_value, (int, np.integer)) and not isinstance(class_value, bool) and int(class_value) == IGNORE:
        raise FsdiffError(
            f"{source}: class_value=255 is the ignore label (pixels of value 255 are excluded everywhere), "
            "so the mask would be empty. For a 0/255 binary mask leave class_value unset (255 is then the "
            "object); for a class-index mask give the label value of the class."
        )
    if arr.ndim == 3:
        if arr.shape[2] in (2, 4):
            color, alpha = arr[..., :-1], arr[..., -1]
            if class_value is None and color.min() == color.max() and alpha.min() != alpha.max():
                return (alpha >= ALPHA_THRESHOLD).astype(np.uint8)
            arr = color if arr.shape[2] == 4 else color[..., 0]
    if arr.ndim == 3:
        if arr.shape[2] == 1 or (np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 0], arr[..., 2])):
            arr = arr[..., 0]
        else:
            if not (isinstance(class_value, tuple) and len(class_value) == 3):
                raise FsdiffError(
                    f"{source} is a colour-coded mask; pass the class colour as class_value=R,G,B "
                    "(e.g. class_value=128,0,0) or save the mask as a class-index or binary PNG."
                )
            fg = np.all(arr == np.asarray(class_value, dtype=arr.dtype), axis=2)
            return fg.astype(np.uint8)
    if arr.ndim != 2:
        raise FsdiffError(f"{source} must be a 2-D label image, got an array of shape {arr.shape}.")
    values = set(np.unique(arr).tolist())
    binary = not palette and any(values <= s for s in _BINARY_SETS)
    if lossy and not binary:
        raise _lossy_error(source, len(values), jpeg=True)
    if class_value is None:
        if binary:
            if values == {IGNORE}:
                raise FsdiffError(
                    f"{source} is 255 everywhere: read as a 0/255 mask it marks the whole image as the object "
                    "with no background, and 255 is also the ignore label. A mask needs 0 for background; if "
                    "the object really fills the image, save the mask as all 1 (a 0/1 mask)."
                )
            fg_value = 255 if values <= {0, 255} else 1
            out = np.zeros(arr.shape, np.uint8)
            out[arr == fg_value] = 1
            if fg_value == 1:
                out[arr == IGNORE] = IGNORE
            return out
        if not palette and values <= {0, 65535}:
            return (arr == 65535).astype(np.uint8)
        if not palette:
            blurred, distinct = _looks_lossy(arr)
            if blurred:
                raise _lossy_error(source, distinct, jpeg=False)
        shown = sorted(values)[:12]
        raise FsdiffError(
            f"{source} is a class-index or palette mask (values {shown}); choose the class with "
            "class_value=N (the label value of the class to segment)."
        )
    if isinstance(class_value, tuple):
        raise FsdiffError(
            f"{source} is a single-channel mask; give class_value=N as one integer, not a colour."
        )
    out = np.zeros(arr.shape, np.uint8)
    out[arr == class_value] = 1
    out[arr == IGNORE] = IGNORE
    return out


def read_mask(
    path: str | os.PathLike,
    *,
    class_value: int | tuple[int, int, int] | None = None,
    max_pixels: int | None = None,
) -> np.ndarray:
    """Read a mask file as a {0, 1, 255} uint8 array for one class (see :func:`mask_from_array`)."""
    return mask_from_pil(
        _open(path, "mask", max_pixels), class_value=class_value, source=f"mask {path}", max_pixels=max_pixels
    )


def mask_from_pil(
    img: Image.Image,
    *,
    class_value: int | tuple[int, int, int] | None = None,
    source: str = "mask",
    max_pixels: int | None = None,
) -> np.ndarray:
    """A PIL mask image as a {0, 1, 255} uint8 array for one class (see :func:`mask_from_array`).

    Its size is checked against ``max_pixels`` (default :data:`~fsdiff.limits.MAX_IMAGE_PIXELS`) before it
    is decoded. An image decoded from a JPEG (``img.format``) that is not exactly binary is refused with a
    "re-save as PNG" hint.
    """
    check_image_size(img.width, img.height, source, max_pixels)
    palette = img.mode == "P"
    if img.mode == "1":
        arr = np.asarray(img.convert("L")) // 255
    elif img.mode in ("RGB", "RGBA", "LA"):
        arr = np.asarray(img)
    elif img.mode == "PA":
        arr = np.asarray(img.convert("RGBA"))
        palette = False
    elif img.mode in ("L", "P"):
        arr = np.asarray(img)
    elif img.mode.startswith("I"):
        arr = np.asarray(img).astype(np.int64)
    else:
        arr = np.asarray(img.convert("L"))
    return mask_from_array(arr, class_value=class_value, source=source, palette=palette, lossy=img.format == "JPEG")


def read_label(path: str | os.PathLike, *, max_pixels: int | None = None) -> np.ndarray:
    """Read a class-index label image (e.g. VOC ``SegmentationClass``) as raw integer values."""
    img = _open(path, "label", max_pixels)
    if img.mode not in ("P", "L", "I", "I;16", "I;16B", "I;16L", "1"):
        raise FsdiffError(
            f"label {path} has mode {img.mode}; expected a palette or single-channel class-index PNG."
        )
    return np.asarray(img).astype(np.int64 if img.mode.startswith("I") else np.uint8)


SCRIBBLE_VALUES = (0, 1, 2, 128, 255)
"""The values a scribble image may hold: 0 unknown, 1 or 255 object stroke, 2 or 128 background stroke."""

SCRIBBLE_MAX_OTHER = 0.1
"""A scribble may have at most this share of pixels with other values (anti-aliased stroke edges)."""

SCRIBBLE_MAX_STROKE = 0.5
"""A scribble's object strokes may cover at most this share of the image (strokes are sparse)."""


def check_scribble(arr: np.ndarray, source: str) -> None:
    """Raise unless a 2-D uint8 array looks like a scribble: mostly 0 with few stroke values, not a photo."""
    if not isinstance(arr, np.ndarray) or arr.ndim != 2 or arr.dtype != np.uint8:
        desc = f"{arr.dtype} array of shape {arr.shape}" if isinstance(arr, np.ndarray) else type(arr).__name__
        raise FsdiffError(f"{source}: a scribble is a 2-D uint8 image, got {desc}.")
    counts = np.bincount(arr.ravel(), minlength=256)
    total = max(1, arr.size)
    other = 1.0 - counts[list(SCRIBBLE_VALUES)].sum() / total
    stroke = (counts[1] + counts[255]) / total
    layout = ("a scribble is a black (0) image with object strokes of value 255 (or 1) and optional background "
              "strokes of value 128 (or 2), drawn at the size of the support image")
    if other > SCRIBBLE_MAX_OTHER:
        raise FsdiffError(
            f"{source} does not look like a scribble: {other:.0%} of its pixels hold other values than "
            f"{', '.join(map(str, SCRIBBLE_VALUES))} ({int(np.count_nonzero(counts))} distinct values; a photo?); "
            f"{layout}."
        )
    if stroke > SCRIBBLE_MAX_STROKE:
        raise FsdiffError(
            f"{source} does not look like a scribble: object strokes (255 or 1) cover {stroke:.0%} of the image "
            f"(a white background or a filled mask?); {layout}; pass a filled mask as a mask instead."
        )


def read_scribble(path: str | os.PathLike, *, max_pixels: int | None = None) -> np.ndarray:
    """Read a scribble image as a 2-D uint8 array (the max over colour channels), refusing photos.

    Feed the result to :meth:`fsdiff.episode.ScribbleAnnotation.from_array`.
    """
    arr = image_to_rgb_array(_open(path, "scribble", max_pixels)).max(axis=2)
    check_scribble(arr, f"scribble {path}")
    return arr


def _reject_constant(name: str) -> float:
    raise ValueError(f"the file holds {name}, which is not a JSON number")


def read_json(path: str | os.PathLike, what: str, fix: str = "re-create the file", *, allow_nan: bool = False) -> object:
    """Parse a JSON file of at most :data:`fsdiff.limits.MAX_JSON_BYTES`; every failure names ``what`` and ``path``.

    NaN and Infinity are refused unless ``allow_nan`` (then the caller validates the fields it uses);
    nesting deeper than Python's recursion limit gives an FsdiffError, not a RecursionError. ``fix`` is
    the advice appended to parse errors.
    """
    p = Path(path)
    try:
        size = p.stat().st_size
    except FileNotFoundError:
        raise FsdiffError(f"{what} {p} not found; check the path.") from None
    except OSError as exc:
        raise FsdiffError(f"cannot read {what} {p}: {exc.strerror}.") from None
    if p.is_dir():
        raise FsdiffError(f"{what} {p} is a folder, not a JSON file.")
    top = MAX_JSON_BYTES.value()
    if size > top:
        raise FsdiffError(
            f"{what} {p} is {size:,} bytes, above the limit of {top:,} bytes ({MAX_JSON_BYTES.name}); "
            f"split the file, or {MAX_JSON_BYTES.hint()}."
        )
    try:
        return json.loads(p.read_bytes(), parse_constant=None if allow_nan else _reject_constant)
    except json.JSONDecodeError as exc:
        raise FsdiffError(
            f"{what} {p} is not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}); {fix}."
        ) from None
    except RecursionError:
        raise FsdiffError(
            f"{what} {p} nests lists or objects more than ~{sys.getrecursionlimit()} levels deep, which no "
            f"valid file does; {fix}."
        ) from None
    except UnicodeDecodeError:
        raise FsdiffError(f"{what} {p} is not UTF-8 text; {fix}.") from None
    except ValueError as exc:  # NaN/Infinity, integers with thousands of digits
        raise FsdiffError(f"{what} {p}: {exc}; {fix}.") from None
    except OSError as exc:
        raise FsdiffError(f"cannot read {what} {p}: {exc.strerror or exc}.") from None


def _inside(path: str, root: str) -> bool:
    root = root.rstrip(os.sep) or os.sep
    return path.startswith(root + os.sep) if root != os.sep else path.startswith(os.sep)


_REAL_ROOTS: dict[str, tuple[int, int, str]] = {}
"""realpath of each dataset folder seen, with the (device, inode) it had: reused while the folder is the same."""


def _real_root(root_abs: str) -> str:
    try:
        st = os.stat(root_abs)
    except OSError:
        return os.path.realpath(root_abs)
    hit = _REAL_ROOTS.get(root_abs)
    if hit is not None and hit[:2] == (st.st_dev, st.st_ino):
        return hit[2]
    real = os.path.realpath(root_abs)
    _REAL_ROOTS[root_abs] = (st.st_dev, st.st_ino, real)
    return real


def _physically_inside(p_abs: str, root_abs: str) -> tuple[bool, str, str]:
    """Whether ``p_abs`` (lexically inside ``root_abs``) stays inside it with symlinks resolved; (ok, real, real_root).

    Fast path: if no component below the root is a symlink (one ``lstat`` per component; a missing one ends
    the walk), the path is physically where it is named. Otherwise both sides are resolved.
    """
    real_root = _real_root(root_abs)
    rel = p_abs[len(root_abs.rstrip(os.sep)) + 1 :]
    cur = root_abs.rstrip(os.sep)
    for part in rel.split(os.sep):
        cur = cur + os.sep + part
        try:
            if stat.S_ISLNK(os.lstat(cur).st_mode):
                break
        except OSError:
            return True, p_abs, real_root  # nothing more exists: no link to follow
    else:
        return True, p_abs, real_root
    real = os.path.realpath(p_abs)
    return _inside(real, real_root), real, real_root


def resolve_inside(path: str | os.PathLike, root: str | os.PathLike, what: str) -> Path:
    """Return ``path`` unchanged if it lies inside the folder ``root``; else raise an FsdiffError naming ``what``.

    The path must stay inside ``root`` as written (no ``..`` or absolute name leading out) and, with
    symlinks resolved, inside the resolved ``root`` (a link pointing out of the dataset), unless
    ``$FSDIFF_FOLLOW_SYMLINKS=1`` allows such links. ``what`` names the entry, e.g.
    "file_name '../x.jpg' of image id 3 in instances.json".
    """
    p = Path(path)
    root_abs = os.path.abspath(root)
    p_abs = os.path.abspath(p)
    if not _inside(p_abs, root_abs):
        raise FsdiffError(
            f"{what} leads outside its folder {root_abs} (to {p_abs}); names in data files must be relative "
            "paths inside the dataset folder (e.g. 'train2014/x.jpg'). Fix the entry, or move the file into "
            "the folder and name it relative to it."
        )
    if not follow_symlinks():
        ok, real, real_root = _physically_inside(p_abs, root_abs)
        if not ok:
            raise FsdiffError(
                f"{what}: {p_abs} is a symbolic link (or lies under one) that resolves to {real}, outside the "
                f"dataset folder {real_root}; copy the file into the folder, or set {FOLLOW_SYMLINKS_ENV}=1 if "
                "links out of the dataset folder are intended."
            )
    return p


def temp_beside(target: str | os.PathLike, suffix: str = ".tmp") -> tuple[int, Path]:
    """Create a new empty temporary file beside ``target``: (open write fd, path), hidden, ending in ``suffix``.

    The file is created with mode 0666 and the kernel applies the process umask (and any default ACL),
    so once renamed onto ``target`` it has the permissions any other program's output would have
    (``tempfile.mkstemp`` would leave 0600). ``O_EXCL`` never follows or reuses an existing name.
    """
    parent = Path(target).parent
    name = Path(target).name
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    for _ in range(100):
        tmp = parent / f".{name}.{secrets.token_hex(6)}{suffix}"
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue
    raise FsdiffError(f"cannot create a temporary file in {parent}: 100 names were taken.")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    The file gets the permissions of the umask (0644 under umask 022), see :func:`temp_beside`.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_path = temp_beside(target, ".tmp" + target.suffix)
    os.close(fd)
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
