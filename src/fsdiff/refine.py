"""Edge-aware refinement of a coarse foreground probability map (method-neutral post-processing).

Every fsdiff method returns a float32 (H, W) probability per query, often computed on a coarse feature
grid and upsampled bilinearly, so its 0.5 level set is smooth and misses the object's edges.
:func:`refine` snaps such a map to the edges of the query image and returns a refined *probability*
(float32 (H, W) in [0, 1]), so the probability PNG, thresholds and calibration keep working on its output.

Methods (:class:`RefineConfig` ``method``):

* ``"guided"`` — the colour guided filter of He, Sun and Tang, "Guided Image Filtering" (ECCV 2010;
  TPAMI 35(6) 2013, Sec. 3.5, Eq. 19-21): in every (2r+1)^2 window the output is a linear function
  ``q = a^T I + b`` of the RGB guide ``I``, with ``a = (Sigma + eps U)^-1 cov(I, p)`` and
  ``b = mean(p) - a^T mean(I)``; ``a`` and ``b`` are averaged over the windows that cover a pixel. With
  ``domain="logit"`` the filter runs on the clipped logit of the map and the result goes back through a
  sigmoid, so confident regions stay confident and only the uncertain band moves. ``detail = d`` in [0, 1]
  outputs ``GF(p) + d (p - box(box(p)))`` (``box`` = the window mean): where the guide is flat the filter
  reduces to ``box(box(p))``, so d = 1 keeps ``p`` there and only adds what the image's edges change (a
  small object is not eroded by a window larger than itself), d = 0 is the plain filter (a fsdiff variant).
  The coefficients are computed at a working size whose long side is ``size`` pixels and resized to the
  query's own resolution (at most APPLY_MAX_SIDE px, then the map is upsampled) before they are applied to
  the photo as the guide: the fast guided filter of He and Sun, "Fast Guided Filter" (arXiv:1505.00996,
  Sec. 2). Cost is O(size^2) plus a few passes over the output, whatever the photo's size.
* ``"grabcut"`` — OpenCV's GrabCut (Rother, Kolmogorov and Blake, "GrabCut", SIGGRAPH 2004) on the working-size
  image, seeded by the map: ``p >= sure`` is sure foreground, ``p <= 1 - sure`` sure background, the rest
  probable foreground / background by ``p > 0.5``. GrabCut returns a hard mask ``m``; the refined probability
  is ``(p + m) / 2`` (at 0.5 it thresholds to GrabCut's mask, and it keeps ``p``'s order within each side).
  OpenCV's random generator is seeded (``cv2.setRNGSeed``) so the result is deterministic.
* ``"off"`` — the input map, unchanged (the same array object).

:class:`QueryRefiner` is the refinement stage of the shared pipeline (:class:`fsdiff.pipeline.Pipeline`), so
maps are refined before anything thresholds, writes or scores them (and threshold calibration sees refined
maps). The method and parameters that won on coco-mini and Weizmann horses, and where
refinement helps, are in ``docs/bench/refine.md``.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from fsdiff.errors import FsdiffError

METHODS = ("off", "guided", "grabcut")
"""Refinement methods :class:`RefineConfig` accepts."""
DOMAINS = ("prob", "logit")
"""What the guided filter smooths: the probability itself, or its logit (then a sigmoid)."""
LOGIT_CLIP = 1e-4
"""The map is clipped to [LOGIT_CLIP, 1 - LOGIT_CLIP] before its logit is taken (logits within about ±9.2)."""
GRABCUT_SEED = 0
"""Seed of OpenCV's random generator before every GrabCut call (its GMM initialisation uses k-means)."""
APPLY_MAX_SIDE = 1024
"""The guided filter's coefficients multiply the photo at most this many pixels on its long side; a larger
photo's refined map is upsampled bilinearly from there (keeps the cost of a 12-megapixel photo near that of
its prediction)."""


@dataclass(frozen=True)
class RefineConfig:
    """How :func:`refine` snaps a probability map to image edges (``method="off"`` returns it unchanged).

    ``size``: long side in pixels of the working image (the photo is resized to it, up or down, so the
    radius means the same fraction of the object whatever the photo's resolution, and the cost is bounded).
    ``radius``, ``eps``, ``domain``, ``detail``: the guided filter's window radius (working pixels),
    regulariser (for a guide in [0, 1]), input domain and the fraction of the map's own detail kept.
    ``iterations``, ``sure``: GrabCut's iteration count and the probability beyond which a pixel is a sure seed.
    The defaults (guided, 384, 16, 1e-4, prob, 0.5) were chosen on coco-mini's base classes and on separate
    Weizmann-horse episodes (docs/bench/refine.md).
    """

    method: str = "guided"
    size: int = 384
    radius: int = 16
    eps: float = 1e-4
    domain: str = "prob"
    detail: float = 0.5
    iterations: int = 3
    sure: float = 0.9

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise FsdiffError(f"RefineConfig method {self.method!r}: use one of {', '.join(METHODS)}.")
        if not (isinstance(self.detail, (int, float, np.floating)) and not isinstance(self.detail, bool)
                and 0.0 <= float(self.detail) <= 1.0):
            raise FsdiffError(f"RefineConfig detail {self.detail!r}: give the fraction of the map's own detail to keep, in [0, 1].")
        if self.domain not in DOMAINS:
            raise FsdiffError(f"RefineConfig domain {self.domain!r}: use one of {', '.join(DOMAINS)}.")
        if isinstance(self.size, bool) or not isinstance(self.size, (int, np.integer)) or not 16 <= self.size <= 4096:
            raise FsdiffError(f"RefineConfig size {self.size!r}: give the working long side as an integer in 16..4096.")
        if isinstance(self.radius, bool) or not isinstance(self.radius, (int, np.integer)) or not 1 <= self.radius <= 256:
            raise FsdiffError(f"RefineConfig radius {self.radius!r}: give an integer window radius in 1..256 pixels.")
        if not (isinstance(self.eps, (int, float, np.floating)) and np.isfinite(self.eps) and self.eps > 0):
            raise FsdiffError(f"RefineConfig eps {self.eps!r}: the guided filter's regulariser must be a finite number > 0.")
        if isinstance(self.iterations, bool) or not isinstance(self.iterations, (int, np.integer)) \
                or not 1 <= self.iterations <= 50:
            raise FsdiffError(f"RefineConfig iterations {self.iterations!r}: give GrabCut's iteration count as an integer in 1..50.")
        if not (isinstance(self.sure, (int, float, np.floating)) and 0.5 < float(self.sure) <= 1.0):
            raise FsdiffError(f"RefineConfig sure {self.sure!r}: the sure-seed probability must lie in (0.5, 1].")


    def spec(self) -> str:
        """The config as text that :func:`parse_refine` reads back, e.g. ``guided:radius=8,eps=0.001,domain=prob``."""
        if self.method == "off":
            return "off"
        keys = ("size", "radius", "eps", "domain", "detail") if self.method == "guided" else ("size", "iterations", "sure")
        return f"{self.method}:" + ",".join(f"{k}={getattr(self, k)}" for k in keys)


OFF = RefineConfig(method="off")
"""No refinement."""

_FIELDS = {"size": int, "radius": int, "eps": float, "domain": str, "detail": float, "iterations": int, "sure": float}


def parse_refine(text: str) -> RefineConfig:
    """Read ``METHOD[:key=value,...]`` (e.g. ``off``, ``guided``, ``guided:radius=16,domain=logit``) into a RefineConfig."""
    if not isinstance(text, str) or not text.strip():
        raise FsdiffError(f"refine={text!r}: give METHOD[:key=value,...] with METHOD one of {', '.join(METHODS)}.")
    method, _, rest = text.strip().partition(":")
    kwargs: dict = {}
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or key not in _FIELDS:
            raise FsdiffError(f"refine={text!r}: {item!r} is not key=value with a key among {', '.join(_FIELDS)}.")
        try:
            kwargs[key] = _FIELDS[key](value.strip())
        except ValueError:
            kind = {int: "an integer", float: "a number", str: "a word"}[_FIELDS[key]]
            raise FsdiffError(f"refine={text!r}: {key} needs {kind}, got {value.strip()!r}.") from None
    return RefineConfig(method=method.strip(), **kwargs)


def _check(image: np.ndarray, prob: np.ndarray) -> np.ndarray:
    """Validate ``image`` (H, W, 3) uint8 and ``prob`` (H, W) finite float in [0, 1]; prob as float32."""
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        got = f"{image.dtype} array of shape {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise FsdiffError(f"refine: image must be an (H, W, 3) uint8 RGB array, got {got}.")
    if not isinstance(prob, np.ndarray) or prob.ndim != 2 or not np.issubdtype(prob.dtype, np.floating):
        got = f"{prob.dtype} array of shape {prob.shape}" if isinstance(prob, np.ndarray) else type(prob).__name__
        raise FsdiffError(f"refine: prob must be a float (H, W) probability array, got {got}.")
    if prob.shape != image.shape[:2]:
        raise FsdiffError(f"refine: prob has shape {prob.shape} but image is {image.shape[:2]}; give the "
                          "probability map at the image's resolution.")
    if prob.size == 0:
        raise FsdiffError("refine: image and prob are empty (0 pixels).")
    lo, hi = float(prob.min()), float(prob.max())  # NaN propagates into both
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise FsdiffError("refine: prob contains NaN or infinite values; pass a probability map in [0, 1].")
    if lo < -1e-6 or hi > 1 + 1e-6:
        raise FsdiffError(f"refine: prob must lie in [0, 1], got values in [{lo:.4g}, {hi:.4g}].")
    prob = prob.astype(np.float32, copy=False)
    return np.clip(prob, 0.0, 1.0) if lo < 0 or hi > 1 else prob


def working_shape(shape: tuple[int, int], size: int) -> tuple[int, int]:
    """(h, w) with the aspect ratio of ``shape`` and long side ``size`` (each side at least 1)."""
    h, w = int(shape[0]), int(shape[1])
    scale = float(size) / max(h, w)
    return max(1, round(h * scale)), max(1, round(w * scale))


def _resize(arr: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Resize an (H, W) or (H, W, C) map or image: area averaging to shrink, bilinear to enlarge.

    A source more than twice the target's size is first brought to twice the target bilinearly (cheap,
    and almost alias-free at that factor), so shrinking a 12-megapixel photo costs a few milliseconds.
    """
    h, w = int(shape[0]), int(shape[1])
    if tuple(arr.shape[:2]) == (h, w):
        return arr
    if h * w >= arr.shape[0] * arr.shape[1]:
        return cv2.resize(arr, (w, h), interpolation=cv2.INTER_LINEAR)
    if arr.shape[0] > 2 * h and arr.shape[1] > 2 * w:
        arr = cv2.resize(arr, (2 * w, 2 * h), interpolation=cv2.INTER_LINEAR)
    return cv2.resize(arr, (w, h), interpolation=cv2.INTER_AREA)


def _box(x: np.ndarray, r: int) -> np.ndarray:
    """Mean over the (2r+1)^2 window (reflected borders) of a 2-D map or of each channel of a 3-D one."""
    if x.ndim == 3 and x.shape[2] > 4:  # OpenCV's box filter is fastest on up to 4 channels
        return np.dstack([_box(np.ascontiguousarray(x[..., c]), r) for c in range(x.shape[2])])
    return cv2.boxFilter(x, -1, (2 * r + 1, 2 * r + 1), normalize=True, borderType=cv2.BORDER_REFLECT)


def guided_coefficients(guide: np.ndarray, p: np.ndarray, radius: int, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """Window-averaged coefficients (mean_a (H, W, 3), mean_b (H, W)) of the colour guided filter (He et al., Eq. 19-21).

    ``guide``: float32 (H, W, 3) in [0, 1]; ``p``: float32 (H, W). The filtered map is
    ``(mean_a * guide).sum(-1) + mean_b``.
    """
    r = int(radius)
    ch = [np.ascontiguousarray(guide[..., c], dtype=np.float32) for c in range(3)]
    p = np.ascontiguousarray(p, dtype=np.float32)
    mean_i = [_box(c, r) for c in ch]
    mean_p = _box(p, r)
    c0, c1, c2 = (_box(c * p, r) - m * mean_p for c, m in zip(ch, mean_i))

    def var(i: int, j: int) -> np.ndarray:
        return _box(ch[i] * ch[j], r) - mean_i[i] * mean_i[j]

    # the symmetric 3x3 covariance of the guide in each window plus eps on the diagonal, inverted by its adjugate
    rr, rg, rb, gg, gb, bb = var(0, 0) + eps, var(0, 1), var(0, 2), var(1, 1) + eps, var(1, 2), var(2, 2) + eps
    i_rr = gg * bb - gb * gb
    i_rg = gb * rb - rg * bb
    i_rb = rg * gb - gg * rb
    i_gg = rr * bb - rb * rb
    i_gb = rb * rg - rr * gb
    i_bb = rr * gg - rg * rg
    inv_det = 1.0 / (rr * i_rr + rg * i_rg + rb * i_rb)
    a = [(i_rr * c0 + i_rg * c1 + i_rb * c2) * inv_det,
         (i_rg * c0 + i_gg * c1 + i_gb * c2) * inv_det,
         (i_rb * c0 + i_gb * c1 + i_bb * c2) * inv_det]
    b = mean_p - a[0] * mean_i[0] - a[1] * mean_i[1] - a[2] * mean_i[2]
    return np.dstack([_box(x, r) for x in a]), _box(b, r)


def guided_filter(guide: np.ndarray, p: np.ndarray, radius: int, eps: float) -> np.ndarray:
    """The colour guided filter of ``p`` (float32 (H, W)) with guide ``guide`` (float32 (H, W, 3) in [0, 1])."""
    mean_a, mean_b = guided_coefficients(guide, p, radius, eps)
    return (mean_a * guide).sum(axis=-1) + mean_b


def _logit(p: np.ndarray) -> np.ndarray:
    q = np.clip(p, LOGIT_CLIP, 1.0 - LOGIT_CLIP)
    return np.log(q / (1.0 - q)).astype(np.float32)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return (0.5 * (1.0 + np.tanh(0.5 * x))).astype(np.float32)


def _refine_guided(image: np.ndarray, prob: np.ndarray, config: RefineConfig) -> np.ndarray:
    shape = image.shape[:2]
    work = working_shape(shape, config.size)
    guide_w = _resize(image, work).astype(np.float32) * np.float32(1.0 / 255.0)
    p = _resize(prob, work)
    x = _logit(p) if config.domain == "logit" else p
    mean_a, mean_b = guided_coefficients(guide_w, x, config.radius, float(config.eps))
    if config.detail > 0:  # add back the map's own detail, x - box(box(x)), that a flat guide smooths away
        mean_b = mean_b + np.float32(config.detail) * (x - _box(_box(x, config.radius), config.radius))
    if tuple(work) != tuple(shape):  # fast guided filter: coefficients enlarged, applied to the finer guide
        apply = working_shape(shape, APPLY_MAX_SIDE) if max(shape) > APPLY_MAX_SIDE else shape
        guide = _resize(image, apply)
        coef = _resize(np.dstack([mean_a * np.float32(1.0 / 255.0), mean_b]), apply)
        out = coef[..., 3].copy()
        for c in range(3):
            out += coef[..., c] * guide[..., c]
    else:
        out = (mean_a * guide_w).sum(axis=-1) + mean_b
    out = _sigmoid(out) if config.domain == "logit" else out
    out = np.clip(out, 0.0, 1.0, out=out).astype(np.float32, copy=False)
    return _resize(out, shape)


def _refine_grabcut(image: np.ndarray, prob: np.ndarray, config: RefineConfig) -> np.ndarray:
    shape = image.shape[:2]
    work = working_shape(shape, config.size)
    img_w = _resize(image, work)
    p = _resize(prob, work)
    sure = float(config.sure)
    seeds = np.where(p > 0.5, cv2.GC_PR_FGD, cv2.GC_PR_BGD).astype(np.uint8)
    seeds[p >= sure] = cv2.GC_FGD
    seeds[p <= 1.0 - sure] = cv2.GC_BGD
    fg = (seeds == cv2.GC_FGD) | (seeds == cv2.GC_PR_FGD)
    if not fg.any() or fg.all():  # GrabCut needs samples of both colour models
        return prob
    bgd = np.zeros((1, 65), np.float64)
    fgd = np.zeros((1, 65), np.float64)
    cv2.setRNGSeed(GRABCUT_SEED)
    cv2.grabCut(np.ascontiguousarray(img_w[..., ::-1]), seeds, None, bgd, fgd, int(config.iterations),
                cv2.GC_INIT_WITH_MASK)
    m = ((seeds == cv2.GC_FGD) | (seeds == cv2.GC_PR_FGD)).astype(np.float32)
    m = _resize(m, shape) if tuple(work) != tuple(shape) else m
    m = (m > 0.5).astype(np.float32)
    return np.clip(0.5 * (prob + m), 0.0, 1.0).astype(np.float32)


def refine(image: np.ndarray, prob: np.ndarray, config: RefineConfig = RefineConfig()) -> np.ndarray:
    """Snap ``prob`` (float (H, W) in [0, 1]) to the edges of ``image`` ((H, W, 3) uint8 RGB).

    Returns a float32 (H, W) probability in [0, 1] (``config.method == "off"``: ``prob`` itself); deterministic.
    """
    if not isinstance(config, RefineConfig):
        raise FsdiffError(f"refine: config must be a RefineConfig, got {type(config).__name__}.")
    p = _check(image, prob)
    if config.method == "off":
        return prob
    if config.method == "guided":
        return _refine_guided(image, p, config)
    return _refine_grabcut(image, p, config)


class QueryRefiner:
    """The refinement stage of :class:`fsdiff.pipeline.Pipeline`: every query's map through :func:`refine`."""

    def __init__(self, config: RefineConfig = RefineConfig()) -> None:
        if not isinstance(config, RefineConfig):
            raise FsdiffError(f"refine: expected a RefineConfig, got {type(config).__name__}.")
        self.config = config

    def __call__(self, episode, probs: list[np.ndarray]) -> list[np.ndarray]:
        """The maps of ``episode``'s queries, each refined against its query image."""
        return [refine(q.image, np.asarray(p), self.config) for q, p in zip(episode.queries, probs)]

    def __repr__(self) -> str:
        return f"QueryRefiner({self.config.spec()!r})"


def as_refiner(value: "str | RefineConfig | None") -> QueryRefiner | None:
    """A pipeline refiner from a spec (``'guided'``, ``'off'``, ``'grabcut:size=256'``), a RefineConfig, or None (off)."""
    if value is None:
        return None
    config = parse_refine(value) if isinstance(value, str) else value
    if not isinstance(config, RefineConfig):
        raise FsdiffError(f"refine={value!r}: give a spec such as 'guided' or 'off', or a RefineConfig.")
    return None if config.method == "off" else QueryRefiner(config)
