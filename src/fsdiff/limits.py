"""Upper bounds on what fsdiff accepts from files and arguments, and the checks that enforce them.

fsdiff reads images, masks and annotation files that may come from people the operator does not know
(the web app takes uploads). Every bound lives here as a named :class:`Limit` with its default, its unit
and, where a user can legitimately need more, the environment variable that overrides it (read at each
check, so a running service can be reconfigured between calls). Every check raises an
:class:`~fsdiff.errors.FsdiffError` that names the argument or file, the limit, the value found and how
to raise the limit. The reasons for each default are in ``docs/bench/hardening.md``.

Images are checked from their header, before any pixel is decoded (:func:`fsdiff.io.read_image`);
COCO polygons and RLE masks are checked against their image size before ``pycocotools`` rasterises them
(:mod:`fsdiff.data.coco`); paths named by data files must stay inside their dataset folder
(:func:`fsdiff.io.resolve_inside`, policy switch :data:`FOLLOW_SYMLINKS_ENV`).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np

from fsdiff.errors import FsdiffError


@dataclass(frozen=True)
class Limit:
    """One upper bound: default value, unit, and the environment variable that overrides it (or None)."""

    name: str
    default: int
    unit: str
    env: str | None = None

    def value(self) -> int:
        """The bound in force: ``$env`` when set (a positive integer), else the default."""
        if self.env is None:
            return self.default
        text = os.environ.get(self.env, "").strip()
        if not text:
            return self.default
        try:
            value = int(float(text)) if "e" in text.lower() else int(text.replace("_", ""))
        except ValueError:
            value = 0
        if value < 1:
            raise FsdiffError(
                f"environment variable {self.env}={text!r} is not a positive integer; set it to the maximum "
                f"number of {self.unit} ({self.name}, default {self.default:,}) or unset it."
            )
        return value

    def hint(self) -> str:
        """How a user raises this limit (the environment variable), or that it is fixed."""
        if self.env is None:
            return "this limit is fixed"
        return f"raise the limit with the environment variable {self.env}=N"


MAX_IMAGE_PIXELS = Limit("MAX_IMAGE_PIXELS", 50_000_000, "pixels", "FSDIFF_MAX_IMAGE_PIXELS")
"""Largest image or mask (width x height) any reader decodes: 50 MP covers a 48 MP phone photo
(8000x6000) and 45 MP full-frame cameras. ``fsdiff segment`` with a 48 MP support and a 48 MP query
peaks at 2.6 GB resident (0.33 GB with 64x48 images): ~24 bytes per decoded pixel. Checked from the
file header, before decoding; also bounds image sizes that annotation files claim (COCO
``height`` x ``width``)."""

MAX_JSON_BYTES = Limit("MAX_JSON_BYTES", 1 << 30, "bytes", "FSDIFF_MAX_JSON_BYTES")
"""Largest annotation / episode-list / cache-record JSON file read (1 GiB; COCO 2017's
``instances_train2017.json`` is 448 MB). Nesting depth is bounded by Python's recursion limit
(~1000 levels; a COCO json nests 5): deeper files are refused with a clear error."""

MAX_CACHE_RECORD_BYTES = Limit("MAX_CACHE_RECORD_BYTES", 16 << 20, "bytes")
"""Largest DifFSS cache record (``meta.json``) read; fsdiff's own are about 2 KB. A larger one is treated
as not committed."""

MAX_POLYGON_POINTS = Limit("MAX_POLYGON_POINTS", 100_000, "points", "FSDIFF_MAX_POLYGON_POINTS")
"""Most polygon vertices in one COCO annotation (all its polygons together; COCO's largest have a few
thousand)."""

MAX_POLYGONS = Limit("MAX_POLYGONS", 10_000, "polygons", "FSDIFF_MAX_POLYGONS")
"""Most polygons in one COCO annotation."""

POLYGON_MARGIN = 0.1
"""How far polygon vertices may lie outside the image, as a fraction of the longer image side (at least
:data:`POLYGON_MARGIN_MIN_PX`): vertices must satisfy -m <= x <= W + m and -m <= y <= H + m. Exports
clip to the frame or overshoot by a pixel; a vertex far outside is a corrupt or hostile file (a
vertex at 1e9 crashes ``pycocotools``)."""

POLYGON_MARGIN_MIN_PX = 2.0
"""The smallest margin of :data:`POLYGON_MARGIN`, in pixels."""

MAX_POLYGON_PERIMETER = 100
"""Bound on the summed outline length of one annotation's polygons, in units of (W + H) of its image.
``pycocotools`` rasterises an outline with ~80 bytes per pixel of length; real COCO annotations stay
below 4 (W + H), so 100 (W + H) bounds the memory (9 MB on a 640x480 image) without refusing any real
outline."""

MAX_SIDE = Limit("MAX_SIDE", 2048, "pixels", "FSDIFF_MAX_SIDE")
"""Largest network input side (``input_size`` of DiffUp / DiffSeg, training crops): 384-512 is usual;
memory grows with the square (a side of 100000 asks for gigabytes before the first layer)."""

MAX_GENERATION_RESOLUTION = Limit(
    "MAX_GENERATION_RESOLUTION", 1024, "pixels", "FSDIFF_MAX_GENERATION_RESOLUTION"
)
"""Largest short side of DifFSS generated images (``resolution``; 512 is SD 1.5's native size; 768
and 1024 are used for detail, beyond that SD 1.5 repeats objects and attention memory explodes)."""

MAX_SCORE_RESOLUTION = Limit("MAX_SCORE_RESOLUTION", 4096, "pixels", "FSDIFF_MAX_SCORE_RESOLUTION")
"""Largest fixed scoring size (evaluation ``resolution``: HSNet scores at 400 or 473)."""

MAX_EPISODES = Limit("MAX_EPISODES", 1_000_000, "episodes", "FSDIFF_MAX_EPISODES")
"""Most episodes in one run or one episode-list file (benchmarks use 1000 to 5x1000)."""

MAX_SHOTS = Limit("MAX_SHOTS", 1000, "shots", "FSDIFF_MAX_SHOTS")
"""Most support shots (or queries) per episode (benchmarks use 1 and 5)."""

MAX_GENERATED_PER_SUPPORT = Limit("MAX_GENERATED_PER_SUPPORT", 64, "images", "FSDIFF_MAX_GENERATED_PER_SUPPORT")
"""Most DifFSS images generated per support (DifFSS uses 1 to 4)."""

MAX_KEY_CHARS = 4096
"""Longest image key or file name accepted from a data file (PATH_MAX on Linux)."""

FOLLOW_SYMLINKS_ENV = "FSDIFF_FOLLOW_SYMLINKS"
"""Set to 1 to allow symlinks inside a dataset folder that point outside it (datasets assembled from
per-file links). Unset (the default), a file that resolves outside its dataset folder is refused; names
in data files that lead outside the folder (``../``, absolute paths) are refused either way."""


def follow_symlinks() -> bool:
    """Whether :data:`FOLLOW_SYMLINKS_ENV` allows symlinks that leave their dataset folder."""
    return os.environ.get(FOLLOW_SYMLINKS_ENV, "").strip().lower() in ("1", "true", "yes")


def _as_int(value: object, name: str, unit: str) -> int:
    """``value`` as an int (integral floats too), or an FsdiffError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise FsdiffError(f"{name} must be an integer number of {unit}, got {value!r}.")
    if isinstance(value, (float, np.floating)) and not (math.isfinite(float(value)) and float(value).is_integer()):
        raise FsdiffError(f"{name} must be an integer number of {unit}, got {value!r}.")
    return int(value)


def check_side(value: object, name: str, limit: Limit = MAX_SIDE, minimum: int = 1) -> int:
    """``value`` as an int in [minimum, limit]: an image side, input size or resolution named ``name``."""
    v = _as_int(value, name, limit.unit)
    top = limit.value()
    if v < minimum:
        raise FsdiffError(f"{name}={v} is too small; use at least {minimum} {limit.unit}.")
    if v > top:
        raise FsdiffError(
            f"{name}={v} exceeds the limit of {top:,} {limit.unit} ({limit.name}); use a smaller value, "
            f"or {limit.hint()}."
        )
    return v


def check_count(value: object, name: str, limit: Limit, minimum: int = 0) -> int:
    """``value`` as an int in [minimum, limit]: a count (episodes, shots, images) named ``name``."""
    v = _as_int(value, name, limit.unit)
    top = limit.value()
    if v < minimum:
        raise FsdiffError(f"{name}={v} must be at least {minimum}.")
    if v > top:
        raise FsdiffError(
            f"{name}={v} exceeds the limit of {top:,} {limit.unit} ({limit.name}); use a smaller value, "
            f"or {limit.hint()}."
        )
    return v


def check_image_size(width: int, height: int, source: str, max_pixels: int | None = None) -> None:
    """Raise unless a ``width`` x ``height`` image fits :data:`MAX_IMAGE_PIXELS` (or ``max_pixels``)."""
    top = MAX_IMAGE_PIXELS.value() if max_pixels is None else int(max_pixels)
    if width < 1 or height < 1:
        raise FsdiffError(f"{source}: the image is empty ({width}x{height}).")
    if width * height > top:
        how = MAX_IMAGE_PIXELS.hint() if max_pixels is None else "pass a larger max_pixels"
        raise FsdiffError(
            f"{source} is {width}x{height} = {width * height:,} pixels, above the limit of {top:,} pixels "
            f"({MAX_IMAGE_PIXELS.name}); downscale the image (fsdiff works at a few hundred pixels per side), "
            f"or {how}."
        )


__all__ = [
    "FOLLOW_SYMLINKS_ENV",
    "MAX_CACHE_RECORD_BYTES",
    "MAX_EPISODES",
    "MAX_GENERATED_PER_SUPPORT",
    "MAX_GENERATION_RESOLUTION",
    "MAX_IMAGE_PIXELS",
    "MAX_JSON_BYTES",
    "MAX_KEY_CHARS",
    "MAX_POLYGONS",
    "MAX_POLYGON_PERIMETER",
    "MAX_POLYGON_POINTS",
    "MAX_SCORE_RESOLUTION",
    "MAX_SHOTS",
    "MAX_SIDE",
    "POLYGON_MARGIN",
    "POLYGON_MARGIN_MIN_PX",
    "Limit",
    "check_count",
    "check_image_size",
    "check_side",
    "follow_symlinks",
]
