"""Seeded annotation synthesis for DiffUp training and the weak-label benchmarks of every method (DiffUp, Chen et al.,
arXiv 2407.16182, Sec. IV: training and testing on "all annotation types"), made deterministic by a seed.

The paper trains on "all annotation types"; how boxes and scribbles are made from GT masks is not
published, so this is fsdiff's own reconstruction:

* box = the tight bounding box of the mask's class pixels (:meth:`BoxAnnotation.from_mask`);
* scribble (PASCAL-Scribble style) = a random connected sub-path, drawn ``width`` = 5 px wide, of the
  skeleton of the eroded mask. The skeleton is a Zhang–Suen thinning written here with numpy (OpenCV's
  ``ximgproc.thinning`` is not in opencv-python-headless), computed on the object's crop scaled to at
  most ``max_side`` pixels and mapped back; the erosion radius is ``erode_ratio``·√area, halved until
  the eroded mask is non-empty. The sub-path runs between a random skeleton pixel u and a random pixel
  v whose geodesic distance from u is at least a random fraction (``length_range``) of the farthest
  one, on the largest 8-connected skeleton component; the drawn strokes are intersected with the class
  pixels, so they never touch background or ignore (255) pixels. Thinning collapses compact blobs
  (discs, squares) to a dot, which no annotator would draw: when the path is shorter than
  ``min_length_ratio``·√area of the eroded mask, the stroke is instead a random sub-segment of the
  chord along the principal axis (jittered by up to ±15°) through the centroid-nearest pixel. Tiny or
  thin objects whose skeleton is empty fall back to a disk around the class pixel nearest the mask's
  centroid;
* per episode K ~ U{0..max_shots}, per-shot types ~ U{mask, box, scribble}, and a text prior with
  probability 0.5, always when K = 0.

For the weak-label benchmarks of every method two more kinds simulate what a user gives (fsdiff's own
choice, not from the paper): ``points`` = 1-3 clicks deep inside the object (where the distance to its
border is at least half its largest value, spread apart) and 0-2 clicks on the background just off it;
``scribble-fgbg`` = the ``scribble`` stroke (the same one for the same generator) plus 1-2 background
strokes, each a random arc of the object's outline dilated by 10-30 % of sqrt(area), cut to background
pixels.

Everything draws from an explicit ``numpy.random.Generator``; :func:`episode_rng` derives a stable one
per (seed, episode key), so box/scribble results are reproducible per episode (the trainer derives its
batch generators with it too). The module is method-neutral and light (numpy, OpenCV), so
``fsdiff eval --support-annotation`` does not import any diffusion code.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from fsdiff.episode import (
    Annotation,
    BoxAnnotation,
    Episode,
    MaskAnnotation,
    PointsAnnotation,
    ScribbleAnnotation,
    TextAnnotation,
    check_label,
)
from fsdiff.errors import FsdiffError

SHOT_TYPES = ("mask", "box", "scribble")
"""Spatial annotation types sampled per training shot (DiffUp, arXiv 2407.16182, Sec. IV: every annotation type)."""


# ----------------------------------------------------------------------------------------------------
# randomness
# ----------------------------------------------------------------------------------------------------
def as_rng(seed: int | np.random.Generator | None) -> np.random.Generator:
    """A numpy Generator from a seed (a Generator passes through; None means seed 0)."""
    if isinstance(seed, np.random.Generator):
        return seed
    return np.random.default_rng(0 if seed is None else int(seed))


def episode_rng(seed: int, *keys: str | int) -> np.random.Generator:
    """A Generator determined by a seed and episode keys (stable across runs and machines)."""
    digest = hashlib.sha256("\x1f".join(str(k) for k in keys).encode("utf-8")).digest()
    words = [int.from_bytes(digest[i : i + 4], "little") for i in range(0, 16, 4)]
    return np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, *words]))


# ----------------------------------------------------------------------------------------------------
# skeleton
# ----------------------------------------------------------------------------------------------------
def _zhang_suen_tables() -> tuple[np.ndarray, np.ndarray]:
    """Deletion look-up tables over the 8-neighbour code (bit i = P_{i+2}, P2 = north, clockwise)."""
    t1 = np.zeros(256, bool)
    t2 = np.zeros(256, bool)
    for code in range(256):
        p = [(code >> i) & 1 for i in range(8)]  # P2, P3, ..., P9
        b = sum(p)
        a = sum(1 for i in range(8) if p[i] == 0 and p[(i + 1) % 8] == 1)
        if not (2 <= b <= 6 and a == 1):
            continue
        p2, p4, p6, p8 = p[0], p[2], p[4], p[6]
        t1[code] = p2 * p4 * p6 == 0 and p4 * p6 * p8 == 0
        t2[code] = p2 * p4 * p8 == 0 and p2 * p6 * p8 == 0
    return t1, t2


_ZS1, _ZS2 = _zhang_suen_tables()
# neighbour offsets (dy, dx) for P2..P9: N, NE, E, SE, S, SW, W, NW
_NEIGH = ((-1, 0), (-1, 1), (0, 1), (1, 1), (1, 0), (1, -1), (0, -1), (-1, -1))


def zhang_suen_skeleton(binary: np.ndarray, max_iter: int = 10_000) -> np.ndarray:
    """The Zhang–Suen (1984) thinning of a 2-D binary map, as a bool array (8-connected, 1 px wide)."""
    img = np.pad(np.asarray(binary).astype(bool), 1).astype(np.uint8)
    h, w = img.shape
    for _ in range(max_iter):
        changed = False
        for table in (_ZS1, _ZS2):
            code = np.zeros((h - 2, w - 2), np.uint8)
            for bit, (dy, dx) in enumerate(_NEIGH):
                code |= img[1 + dy : h - 1 + dy, 1 + dx : w - 1 + dx] << bit
            core = img[1:-1, 1:-1]
            delete = (core == 1) & table[code]
            if delete.any():
                core[delete] = 0
                changed = True
        if not changed:
            break
    return img[1:-1, 1:-1].astype(bool)


# ----------------------------------------------------------------------------------------------------
# annotations
# ----------------------------------------------------------------------------------------------------
def _as_label(mask: np.ndarray, source: str = "mask") -> np.ndarray:
    """A validated {0,1,255} uint8 mask (a bool mask is accepted as {0,1})."""
    if isinstance(mask, np.ndarray) and mask.dtype == bool:
        mask = mask.astype(np.uint8)
    if not isinstance(mask, np.ndarray) or mask.ndim != 2:
        raise FsdiffError(f"{source}: expected a 2-D mask array, got {getattr(mask, 'shape', type(mask).__name__)}.")
    counts = check_label(mask, mask.shape, source)
    if counts[1] == 0:
        raise FsdiffError(f"{source}: the mask has no class pixel (value 1); cannot synthesise an annotation from it.")
    return mask


def synthesize_box(mask: np.ndarray) -> BoxAnnotation:
    """The tight box around the mask's class pixels."""
    return BoxAnnotation.from_mask(_as_label(mask))


def _largest_component(binary: np.ndarray) -> np.ndarray:
    n, labels, stats, _ = cv2.connectedComponentsWithStats(binary.astype(np.uint8), connectivity=8)
    if n <= 1:
        return np.zeros_like(binary, bool)
    best = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    return labels == best


def _random_path(skel: np.ndarray, rng: np.random.Generator, length_range: tuple[float, float]) -> np.ndarray:
    """A random geodesic path (N, 2) of (y, x) on an 8-connected skeleton component."""
    ys, xs = np.nonzero(skel)
    index = {(int(y), int(x)): i for i, (y, x) in enumerate(zip(ys, xs))}
    n = len(ys)
    start = int(rng.integers(n))
    dist = np.full(n, -1, np.int64)
    parent = np.full(n, -1, np.int64)
    dist[start] = 0
    queue = deque([start])
    while queue:
        i = queue.popleft()
        y, x = int(ys[i]), int(xs[i])
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                j = index.get((y + dy, x + dx))
                if j is not None and dist[j] < 0:
                    dist[j] = dist[i] + 1
                    parent[j] = i
                    queue.append(j)
    far = int(dist.max())
    frac = float(rng.uniform(*length_range))
    candidates = np.flatnonzero(dist >= max(0, int(np.ceil(frac * far))))
    end = int(candidates[int(rng.integers(len(candidates)))])
    path = [end]
    while path[-1] != start:
        path.append(int(parent[path[-1]]))
    return np.stack([ys[path], xs[path]], axis=1)


def _chord_path(region: np.ndarray, rng: np.random.Generator, length_range: tuple[float, float]) -> np.ndarray:
    """A random sub-segment (2, 2) of (y, x) of the chord along the region's principal axis through
    its centroid-nearest pixel, the axis jittered by up to ±15°."""
    ys, xs = np.nonzero(region)
    cy, cx = ys.mean(), xs.mean()
    k = int(np.argmin((ys - cy) ** 2 + (xs - cx) ** 2))
    c = np.array([ys[k], xs[k]], np.float64)
    if len(ys) > 1:
        cov = np.cov(np.stack([ys, xs]).astype(np.float64))
        evals, evecs = np.linalg.eigh(cov)
        d = evecs[:, int(np.argmax(evals))]
    else:
        d = np.array([0.0, 1.0])
    ang = float(rng.uniform(-np.pi / 12, np.pi / 12))
    d = np.array([d[0] * np.cos(ang) - d[1] * np.sin(ang), d[0] * np.sin(ang) + d[1] * np.cos(ang)])
    h, w = region.shape

    def walk(sign: float) -> float:
        r = 0.0
        while True:
            y, x = np.round(c + sign * (r + 0.5) * d).astype(int)
            if not (0 <= y < h and 0 <= x < w and region[y, x]):
                return r
            r += 0.5

    lo_r, hi_r = -walk(-1.0), walk(1.0)
    span = hi_r - lo_r
    length = float(rng.uniform(*length_range)) * span
    start = lo_r + float(rng.uniform(0.0, max(0.0, span - length)))
    return np.stack([c + start * d, c + (start + length) * d])


def _centroid_disk(fg: np.ndarray, radius: int) -> np.ndarray:
    """A disk around the class pixel nearest the centroid, cut to the class pixels."""
    ys, xs = np.nonzero(fg)
    cy, cx = ys.mean(), xs.mean()
    k = int(np.argmin((ys - cy) ** 2 + (xs - cx) ** 2))
    out = np.zeros(fg.shape, np.uint8)
    out[ys[k], xs[k]] = 1
    out = cv2.dilate(out, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1)))
    return (out > 0) & fg


def synthesize_scribble(
    mask: np.ndarray,
    rng: int | np.random.Generator | None,
    *,
    width: int = 5,
    erode_ratio: float = 0.05,
    length_range: tuple[float, float] = (0.5, 1.0),
    max_side: int = 192,
    min_length_ratio: float = 0.5,
) -> ScribbleAnnotation:
    """A PASCAL-Scribble-style stroke: a random ``width``-px sub-path of the eroded mask's skeleton."""
    fg_full = _as_label(mask) == 1
    if width < 1:
        raise FsdiffError(f"scribble width must be >= 1 pixel, got {width}.")
    lo, hi = length_range
    if not 0.0 <= lo <= hi <= 1.0:
        raise FsdiffError(f"length_range must satisfy 0 <= lo <= hi <= 1, got {length_range}.")
    gen = as_rng(rng)
    h, w = fg_full.shape
    ys, xs = np.nonzero(fg_full)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    fg = fg_full[y0:y1, x0:x1]
    scale = min(1.0, max_side / max(fg.shape))
    small = fg
    if scale < 1.0:
        size = (max(1, round(fg.shape[1] * scale)), max(1, round(fg.shape[0] * scale)))
        small = cv2.resize(fg.astype(np.float32), size, interpolation=cv2.INTER_AREA) > 0.5
        if not small.any():
            small, scale = fg, 1.0
    sy, sx = small.shape[0] / fg.shape[0], small.shape[1] / fg.shape[1]

    radius = int(round(erode_ratio * np.sqrt(small.sum())))
    eroded = small
    while radius > 0:
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
        eroded = cv2.erode(np.pad(small, radius).astype(np.uint8), kernel)[radius:-radius, radius:-radius] > 0
        if eroded.any():
            break
        radius //= 2
        eroded = small
    skel = _largest_component(zhang_suen_skeleton(eroded))

    strokes = np.zeros((h, w), np.uint8)
    if skel.any():
        path = _random_path(skel, gen, (lo, hi)).astype(np.float64)
        # Thinning collapses compact blobs (discs, squares) to a dot; a scribbler would draw across them.
        if len(path) < min_length_ratio * np.sqrt(eroded.sum()):
            path = _chord_path(eroded, gen, (lo, hi))
        py = (path[:, 0] + 0.5) / sy - 0.5 + y0
        px = (path[:, 1] + 0.5) / sx - 0.5 + x0
        pts = np.round(np.stack([px, py], axis=1)).astype(np.int32).reshape(-1, 1, 2)
        # a 1-px centre line dilated by a width×width disk: exactly ``width`` px across (cv2's thick
        # lines come out about two pixels wider than asked)
        cv2.polylines(strokes, [pts], isClosed=False, color=1, thickness=1, lineType=cv2.LINE_8)
        strokes = cv2.dilate(strokes, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (width, width)))
        strokes = ((strokes > 0) & fg_full).astype(np.uint8)
    if not strokes.any():  # tiny/thin objects: a disk at the centroid-nearest class pixel
        strokes = _centroid_disk(fg_full, width // 2).astype(np.uint8)
    return ScribbleAnnotation(strokes)


def _distance_inside(fg: np.ndarray) -> np.ndarray:
    """Euclidean distance of every class pixel to the nearest non-class pixel (the image frame counts as
    outside, so a click is never drawn hugging the border)."""
    padded = np.pad(fg.astype(np.uint8), 1)
    return cv2.distanceTransform(padded, cv2.DIST_L2, 5)[1:-1, 1:-1]


def _pick(candidates: np.ndarray, weights: np.ndarray, gen: np.random.Generator) -> int:
    """Index of a candidate drawn with probability proportional to ``weights``."""
    p = weights.astype(np.float64)
    p = p / p.sum() if p.sum() > 0 else np.full(len(p), 1.0 / len(p))
    return int(candidates[int(gen.choice(len(candidates), p=p))])


def synthesize_points(
    mask: np.ndarray,
    rng: int | np.random.Generator | None,
    *,
    positive: tuple[int, int] = (1, 3),
    negative: tuple[int, int] = (0, 2),
    interior: float = 0.5,
    spacing: float = 0.5,
    near: tuple[float, float] = (0.1, 0.5),
) -> PointsAnnotation:
    """Clicks a user would give: ``positive`` (inclusive range) clicks deep inside the object and ``negative``
    clicks on the background near it.

    Positive clicks fall where the distance to the object's border is at least ``interior`` times its
    largest value (the first near the object's "centre"), drawn with probability proportional to that
    distance; each later click keeps ``spacing`` times that largest distance from the earlier ones when it
    can. Negative clicks fall on background pixels (never ignore) whose distance from the object lies in
    ``near`` times sqrt(object area) (a click just off the object), anywhere on the background when no
    pixel is that near, and are left out when the image has no background.
    """
    label = _as_label(mask)
    fg = label == 1
    lo, hi = positive
    nlo, nhi = negative
    if not 1 <= lo <= hi or not 0 <= nlo <= nhi:
        raise FsdiffError(f"positive={positive} must satisfy 1 <= lo <= hi and negative={negative} 0 <= lo <= hi.")
    gen = as_rng(rng)
    n_pos = int(gen.integers(lo, hi + 1))
    n_neg = int(gen.integers(nlo, nhi + 1))
    dist = _distance_inside(fg)
    top = float(dist.max())
    cand = np.flatnonzero((dist >= interior * top).ravel())
    cand_w = dist.ravel()[cand]
    h, w = fg.shape
    cy, cx = np.divmod(cand, w)
    points: list[tuple[float, float]] = []
    for _ in range(n_pos):
        ok = np.ones(len(cand), bool)
        for px, py in points:
            ok &= (cx - px) ** 2 + (cy - py) ** 2 >= (spacing * top) ** 2
        if not ok.any():
            ok = np.ones(len(cand), bool)
        k = _pick(cand[ok], cand_w[ok], gen)
        points.append((float(k % w), float(k // w)))
    labels = [1] * len(points)
    bg = label == 0
    if n_neg and bg.any():
        outside = cv2.distanceTransform((~fg).astype(np.uint8), cv2.DIST_L2, 5)
        size = np.sqrt(float(fg.sum()))
        band = bg & (outside >= near[0] * size) & (outside <= near[1] * size)
        pool = np.flatnonzero((band if band.any() else bg).ravel())
        for _ in range(n_neg):
            k = int(pool[int(gen.integers(len(pool)))])
            points.append((float(k % w), float(k // w)))
            labels.append(0)
    return PointsAnnotation(np.asarray(points, np.float64).reshape(-1, 2), np.asarray(labels, np.int64))


def synthesize_background_strokes(
    mask: np.ndarray,
    rng: int | np.random.Generator | None,
    *,
    count: tuple[int, int] = (1, 2),
    width: int = 5,
    distance: tuple[float, float] = (0.1, 0.3),
    arc: tuple[float, float] = (0.15, 0.4),
) -> np.ndarray:
    """Background strokes a user would draw around an object: bool (H, W), on background pixels only.

    Each of ``count`` (inclusive range) strokes is a random arc (``arc`` of the perimeter) of the outline
    of the object dilated by ``distance`` times sqrt(object area), ``width`` px wide, cut to background
    pixels (never the object, ignore pixels or outside the image). When nothing of the arc survives (the
    object fills the frame), the stroke is a disk at the background pixel farthest from the object; an
    image without background pixels gets no stroke.
    """
    label = _as_label(mask)
    fg = label == 1
    bg = label == 0
    gen = as_rng(rng)
    n = int(gen.integers(count[0], count[1] + 1))
    out = np.zeros(fg.shape, np.uint8)
    if not bg.any():
        return out.astype(bool)
    size = np.sqrt(float(fg.sum()))
    h, w = fg.shape
    for _ in range(n):
        d = max(width, int(round(float(gen.uniform(*distance)) * size)))
        grown = np.pad(fg, d).astype(np.uint8)
        grown = cv2.dilate(grown, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * d + 1, 2 * d + 1)))
        contours, _ = cv2.findContours(grown, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        contour = max(contours, key=len)[:, 0, :] - d  # (x, y) in image coordinates
        m = len(contour)
        length = max(2, int(round(float(gen.uniform(*arc)) * m)))
        start = int(gen.integers(m))
        path = contour[(start + np.arange(length)) % m].astype(np.int32)
        stroke = np.zeros((h, w), np.uint8)
        cv2.polylines(stroke, [path.reshape(-1, 1, 2)], isClosed=False, color=1, thickness=1, lineType=cv2.LINE_8)
        stroke = cv2.dilate(stroke, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (width, width)))
        stroke = (stroke > 0) & bg
        if not stroke.any():
            far = cv2.distanceTransform((~fg).astype(np.uint8), cv2.DIST_L2, 5)
            far[~bg] = -1
            k = int(np.argmax(far))
            dot = np.zeros((h, w), np.uint8)
            cv2.circle(dot, (k % w, k // w), max(1, width // 2), 1, thickness=-1)
            stroke = (dot > 0) & bg
        out |= stroke.astype(np.uint8)
    return out.astype(bool)


def synthesize_scribble_fgbg(
    mask: np.ndarray, rng: int | np.random.Generator | None, *, width: int = 5
) -> ScribbleAnnotation:
    """A foreground stroke (:func:`synthesize_scribble`, the same one for the same generator state) plus
    background strokes around the object (:func:`synthesize_background_strokes`, label 2)."""
    gen = as_rng(rng)
    strokes = synthesize_scribble(mask, gen, width=width).strokes.copy()
    bg = synthesize_background_strokes(mask, gen, width=width)
    strokes[bg & (strokes == 0)] = 2
    return ScribbleAnnotation(strokes)


def synthesize_annotation(
    mask: np.ndarray, kind: str, rng: int | np.random.Generator | None, *, scribble_width: int = 5
) -> Annotation:
    """A support annotation of ``kind`` (mask, box, scribble, scribble-fgbg, points or text) synthesised from
    a GT mask."""
    if kind == "mask":
        return MaskAnnotation(_as_label(mask).copy())
    if kind == "box":
        return synthesize_box(mask)
    if kind == "scribble":
        return synthesize_scribble(mask, rng, width=scribble_width)
    if kind == "scribble-fgbg":
        return synthesize_scribble_fgbg(mask, rng, width=scribble_width)
    if kind == "points":
        return synthesize_points(mask, rng)
    if kind == "text":
        return TextAnnotation()
    raise FsdiffError(
        f"cannot synthesise a {kind!r} annotation; use one of mask, box, scribble, scribble-fgbg, points, text."
    )


# ----------------------------------------------------------------------------------------------------
# episode layouts
# ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EpisodeLayout:
    """How a training episode is annotated: K shots with one type each, and whether text is added."""

    k: int
    shot_types: tuple[str, ...]
    use_text: bool

    def prior_types(self) -> tuple[str, ...]:
        """The types of all UAPF inputs: the shots, then ``text`` when used."""
        return self.shot_types + (("text",) if self.use_text else ())


def sample_episode_layout(
    rng: int | np.random.Generator | None,
    *,
    max_shots: int = 5,
    shot_types: Sequence[str] = SHOT_TYPES,
    text_prob: float = 0.5,
) -> EpisodeLayout:
    """K ~ U{0..max_shots}, per-shot types ~ U(shot_types), text with ``text_prob`` (always when K = 0)."""
    if max_shots < 0:
        raise FsdiffError(f"max_shots must be >= 0, got {max_shots}.")
    types = tuple(shot_types)
    if not types:
        raise FsdiffError("shot_types must name at least one annotation type.")
    for t in types:
        if t not in SHOT_TYPES:
            raise FsdiffError(f"shot type {t!r} is not one of {SHOT_TYPES}.")
    gen = as_rng(rng)
    k = int(gen.integers(0, max_shots + 1))
    chosen = tuple(types[int(i)] for i in gen.integers(0, len(types), size=k))
    use_text = bool(k == 0 or gen.random() < text_prob)
    return EpisodeLayout(k=k, shot_types=chosen, use_text=use_text)


# ----------------------------------------------------------------------------------------------------
# weak-label benchmarks
# ----------------------------------------------------------------------------------------------------
SUPPORT_ANNOTATIONS: tuple[str, ...] = SHOT_TYPES + ("scribble-fgbg", "points")
"""Support annotation kinds an evaluation can convert its mask supports to (``scribble-fgbg``: the
``scribble`` stroke plus background strokes; ``points``: clicks)."""


def convert_supports(episode: Episode, kind: str, seed: int = 0, scribble_width: int = 5) -> Episode:
    """The episode with every mask support replaced by a ``kind`` annotation synthesised from it.

    Used by the weak-label benchmarks (``fsdiff eval --support-annotation box``) for any method: boxes are
    the tight box, scribbles come from :func:`synthesize_scribble` (``scribble_width`` px, in the support
    image's pixels), ``scribble-fgbg`` adds background strokes to the same stroke
    (:func:`synthesize_scribble_fgbg`) and ``points`` are clicks (:func:`synthesize_points`), each with a
    generator keyed by (seed, episode id, shot index, image id), so every method sees the same labels.
    Non-mask supports are kept as they are.
    """
    if kind not in SUPPORT_ANNOTATIONS:
        raise FsdiffError(f"support annotation {kind!r}: use one of {', '.join(SUPPORT_ANNOTATIONS)}.")
    if kind == "mask":
        return episode
    shots = []
    for i, shot in enumerate(episode.shots):
        if isinstance(shot.annotation, MaskAnnotation):
            rng = episode_rng(seed, "support", episode.episode_id, i, shot.image_id)
            ann = synthesize_annotation(shot.annotation.mask, kind, rng, scribble_width=scribble_width)
            shot = dataclasses.replace(shot, annotation=ann)
        shots.append(shot)
    return dataclasses.replace(episode, shots=tuple(shots))
