"""Uploaded files into validated pictures: size and pixel limits first, then the CLI's decoding.

Each image is checked from its header against the pixel limit before any pixel is decoded, then decoded by
:func:`fsdiff.inputs.to_image` (:mod:`fsdiff.io`: EXIF rotation, 16-bit, RGBA, palette and truncated files
handled exactly as ``fsdiff segment`` handles them). A zip of queries is read in memory, never extracted to
disk: only image members count, their number and their total uncompressed size are bounded before reading.
Messages name the uploaded file by its own name, never by the server's temporary path.
"""

from __future__ import annotations

import io
import os
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from fsdiff.app.config import AppConfig
from fsdiff.app.render import fit
from fsdiff.app.session import Picture, safe_name
from fsdiff.errors import FsdiffError
from fsdiff.inputs import to_image

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
ZIP_SUFFIX = ".zip"


def check_pixels(img: Image.Image, name: str, config: AppConfig) -> None:
    """Refuse an opened (not yet decoded) image above the pixel limit."""
    w, h = img.size
    top = config.pixels()
    if w * h > top:
        raise FsdiffError(f"{name} is {w}x{h} = {w * h:,} pixels, above the app's limit of {top:,} pixels; "
                          "downscale it (fsdiff works at a few hundred pixels per side).")


def _header_check(source: str | io.BytesIO, name: str, config: AppConfig) -> None:
    try:
        with Image.open(source) as img:
            check_pixels(img, name, config)
    except UnidentifiedImageError:
        raise FsdiffError(f"{name} is not an image file fsdiff can read; upload JPEG or PNG "
                          f"({', '.join(IMAGE_SUFFIXES)}).") from None
    except Image.DecompressionBombError:
        raise FsdiffError(f"{name} declares an enormous image size; it is refused.") from None
    except OSError as exc:
        raise FsdiffError(f"{name} cannot be read as an image ({exc}).") from None


def _renamed(exc: FsdiffError, path: str, name: str) -> FsdiffError:
    return FsdiffError(str(exc).replace(os.fspath(path), name))


def check_file_size(path: str | os.PathLike, name: str, config: AppConfig) -> None:
    """Refuse a file above ``max_file_mb`` (gradio refuses it before upload; this covers direct API calls)."""
    size = Path(path).stat().st_size
    if size > config.max_file_mb * 1_000_000:
        raise FsdiffError(f"{name} is {size / 1e6:.1f} MB, above the upload limit of {config.max_file_mb} MB.")


def read_image_file(path: str | os.PathLike, name: str, config: AppConfig) -> np.ndarray:
    """An uploaded image file as RGB uint8, after the size and pixel checks (see the module docstring)."""
    check_file_size(path, name, config)
    _header_check(os.fspath(path), name, config)
    try:
        return to_image(os.fspath(path), name)
    except FsdiffError as exc:
        raise _renamed(exc, os.fspath(path), name) from None


def read_image_bytes(data: bytes, name: str, config: AppConfig) -> np.ndarray:
    """An image held in memory (a zip member) as RGB uint8, after the pixel check."""
    _header_check(io.BytesIO(data), name, config)
    img = Image.open(io.BytesIO(data))
    return to_image(img, name)


def picture(image: np.ndarray, name: str, config: AppConfig) -> Picture:
    """A session picture: the image and its scaled copy for the page."""
    return Picture(safe_name(name), image, fit(image, config.display_side))


def upload_name(path: str | os.PathLike) -> str:
    """The user's file name of an upload (gradio keeps it as the file's name)."""
    return safe_name(Path(path).name)


def _zip_members(path: str | os.PathLike, name: str, config: AppConfig, room: int) -> Iterator[tuple[str, bytes]]:
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise FsdiffError(f"{name} is not a readable zip file ({exc}).") from None
    with zf:
        members = [m for m in zf.infolist() if not m.is_dir() and Path(m.filename).suffix.lower() in IMAGE_SUFFIXES
                   and not Path(m.filename).name.startswith(".") and "__MACOSX" not in m.filename]
        if not members:
            raise FsdiffError(f"{name} holds no image ({', '.join(IMAGE_SUFFIXES)}).")
        if len(members) > room:
            raise FsdiffError(f"{name} holds {len(members)} images; this session takes {room} more query image(s) "
                              f"(limit {config.max_queries}).")
        budget = config.max_zip_mb * 1_000_000
        if sum(m.file_size for m in members) > budget:
            raise FsdiffError(f"{name} unpacks to more than {config.max_zip_mb} MB; upload fewer images at once.")
        for m in members:
            with zf.open(m) as fh:
                data = fh.read(budget + 1)
            budget -= len(data)
            if budget < 0:
                raise FsdiffError(f"{name} unpacks to more than {config.max_zip_mb} MB; upload fewer images at once.")
            yield Path(m.filename).name, data


def read_query_uploads(paths: Sequence[str | os.PathLike], config: AppConfig, room: int) -> list[Picture]:
    """Pictures from uploaded query files: images, or zips of images; at most ``room`` of them."""
    out: list[Picture] = []
    for path in paths:
        name = upload_name(path)
        if Path(name).suffix.lower() == ZIP_SUFFIX:
            check_file_size(path, name, config)
            for member, data in _zip_members(path, name, config, room - len(out)):
                label = f"{name}/{member}"
                out.append(picture(read_image_bytes(data, label, config), member, config))
            continue
        if len(out) >= room:
            raise FsdiffError(f"too many query images: this session takes at most {config.max_queries}; "
                              "export and clear the queries, then upload the rest.")
        out.append(picture(read_image_file(path, name, config), name, config))
    return out


def discard_upload(path: str | os.PathLike | None, upload_root: str | os.PathLike | None) -> None:
    """Delete an upload's file (and its now empty folder) once read, if it lies inside ``upload_root``."""
    if not path or not upload_root:
        return
    p, root = Path(path).resolve(), Path(upload_root).resolve()
    if root not in p.parents or not p.is_file():
        return
    try:
        p.unlink()
        if p.parent != root and not any(p.parent.iterdir()):
            p.parent.rmdir()
    except OSError:
        pass
