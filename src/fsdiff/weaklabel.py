"""Estimate a support's object mask from a weak label (box, scribble, clicks) and its image.

A box support used as-is is a mask of the whole box, a scribble is its strokes and clicks are small
disks, so a method's foreground prototype mixes in the background inside the box and sees little of the
object under a stroke. This step turns the weak label into a dense mask once, before any method runs:

1. the label gives hard seeds: outside a box is background; foreground strokes / positive clicks are
   object; background strokes / negative clicks are background (evidence, never ignored);
2. an initial guess of the rest from frozen encoder features (``features``), scored as the ``prototype``
   method scores a query (prototype + pixel-max cosine, PANet / PFENet) but on the support image itself:
   strokes / clicks: how alike each cell is to the seeded object cells against the most alike of the
   background regions (the user's background seeds, and everything outside the seeds' bounding box grown
   by ``far_margin`` of the image, ``points_far_margin`` for clicks); a box covering at least
   ``box_features_min_area`` of the image: the box cells the outside explains worst (lowest
   ``box_quantile`` of their background score) seed the object score, compared with the outside's score.
   The guess is the map thresholded at ``seed_threshold`` (inside the box for a box); without features a
   box guesses its inside and strokes / clicks a disk around themselves;
3. GrabCut (Rother, Kolmogorov & Blake, "GrabCut", SIGGRAPH 2004: colour GMMs + graph cut, iterated) from
   the seeds (hard) and the guess (probable), ``iterations`` rounds, OpenCV's RNG seeded. It runs on the
   image shrunk to ``working_size`` (long side) — for a box, on the box grown by ``box_context`` of its size
   on every side, enlarged at most ``max_upscale`` times when small — so the time per support is bounded
   whatever the photo's size. Only the object components touching a foreground seed are kept
   (``keep_seeded_components``);
4. the result is upsampled to the image's resolution and the label's hard constraints are re-imposed there;
   optionally a band of ``uncertain_band`` of the object's size around the outline becomes 255 (ignore);
5. optionally, strokes / clicks: the object pixels that the feature guess doubts (probability below
   ``doubt_threshold``, not a seed) become 255 (ignore). GrabCut's colour model leaks into background of a
   similar colour, and a method is hurt more by background labelled object than by object left out. Off
   by default (0): it gains on cluttered COCO photos and loses on object-centric ones, where the guess's
   far-background assumption doubts real object parts (``docs/bench/weak_supports.md``).

When GrabCut cannot run or returns no object pixel (a box under ``MIN_SIDE`` working pixels, a box
covering the whole image so there is no background sample, an empty result) the label's own regions are
used instead (:func:`label_mask`). ``method="off"`` always returns the label's own regions, so a pipeline
can switch the step off and a method sees exactly what it saw from the raw label. The defaults and their
measured effect (support-mask IoU and ``prototype`` mIoU on Weizmann horses and coco-mini):
``docs/bench/weak_supports.md``.
"""

from __future__ import annotations

import dataclasses
import threading
from dataclasses import dataclass

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from fsdiff.episode import (
    Annotation,
    BoxAnnotation,
    Episode,
    MaskAnnotation,
    PointsAnnotation,
    ScribbleAnnotation,
    TextAnnotation,
    check_image,
)
from fsdiff.errors import FsdiffError
from fsdiff.io import IGNORE

METHODS = ("grabcut", "off")
"""Estimation methods: GrabCut from the label's seeds, or off (the label's own regions)."""
MIN_SIDE = 4
"""A box narrower than this many working pixels is used as-is (GrabCut has nothing to separate)."""
PROTO_WEIGHT = 0.5
"""Weight of the prototype cosine against the pixel-max cosine in the similarity map (as ``prototype``)."""
TEMPERATURE = 0.1
"""Temperature of the similarity map's sigmoid on fg-vs-bg cosine differences (as ``prototype``)."""


@dataclass(frozen=True)
class WeakLabelConfig:
    """How a weak support label becomes a mask (``method="off"``: the label's own regions); the fields are
    described in the module docstring."""

    method: str = "grabcut"
    iterations: int = 5
    working_size: int = 400
    features: str | None = "efficientnet-lite0"
    feature_size: int = 473
    feature_levels: tuple[int, ...] = (1, 2)
    box_features: bool = True
    box_quantile: float = 0.3
    box_features_min_area: float = 0.05
    seed_threshold: float = 0.5
    far_margin: float = 0.1
    points_far_margin: float = 0.25
    box_context: float = 0.5
    max_upscale: float = 3.0
    keep_seeded_components: bool = True
    uncertain_band: float = 0.0
    doubt_threshold: float = 0.0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise FsdiffError(f"method={self.method!r} is not a weak-label method; use one of {', '.join(METHODS)}.")
        if isinstance(self.iterations, bool) or not isinstance(self.iterations, (int, np.integer)) or self.iterations < 1:
            raise FsdiffError(f"iterations={self.iterations!r} must be a positive integer (GrabCut rounds).")
        if isinstance(self.working_size, bool) or not isinstance(self.working_size, (int, np.integer)) or self.working_size < 32:
            raise FsdiffError(f"working_size={self.working_size!r} must be an integer >= 32 (pixels of the long side).")
        if not 0.0 < float(self.seed_threshold) < 1.0:
            raise FsdiffError(f"seed_threshold={self.seed_threshold!r} must lie strictly between 0 and 1.")
        if not 0.0 <= float(self.doubt_threshold) < 1.0:
            raise FsdiffError(f"doubt_threshold={self.doubt_threshold!r} must lie in [0, 1) (0 = keep every object pixel).")
        if not 0.0 <= float(self.uncertain_band) < 0.5:
            raise FsdiffError(f"uncertain_band={self.uncertain_band!r} must lie in [0, 0.5) (a fraction of the object's size).")
        for name in ("box_context", "far_margin", "points_far_margin"):
            if not float(getattr(self, name)) >= 0.0:
                raise FsdiffError(f"{name}={getattr(self, name)!r} must be >= 0 (a fraction of the box / image size).")
        if not 0.0 < float(self.box_quantile) < 1.0:
            raise FsdiffError(f"box_quantile={self.box_quantile!r} must lie strictly between 0 and 1.")
        if not 0.0 <= float(self.box_features_min_area) <= 1.0:
            raise FsdiffError(f"box_features_min_area={self.box_features_min_area!r} must lie in [0, 1] "
                              "(a fraction of the image).")
        if not float(self.max_upscale) >= 1.0:
            raise FsdiffError(f"max_upscale={self.max_upscale!r} must be >= 1 (1 = never enlarge a small box's window).")
        if self.features is not None and (not self.feature_levels or isinstance(self.feature_size, bool)
                                          or int(self.feature_size) < 32):
            raise FsdiffError(f"feature_levels={self.feature_levels!r} must name at least one level and "
                              f"feature_size={self.feature_size!r} be >= 32.")


OFF = WeakLabelConfig(method="off")
"""The step switched off: every weak label keeps its own regions."""


@dataclass(frozen=True, eq=False)
class EstimatedMaskAnnotation(MaskAnnotation):
    """A mask estimated from a weak label; ``source`` keeps the label the user gave (box, scribble, points)."""

    source: Annotation | None = None


# ----------------------------------------------------------------------------------------------------
# hard seeds of each label kind, at any resolution
# ----------------------------------------------------------------------------------------------------
def click_radius(points: PointsAnnotation, shape: tuple[int, int]) -> int:
    """The disk radius of a click on an image of ``shape``: the annotation's, else 1 % of the diagonal
    (at least 3 px), as :class:`~fsdiff.episode.PointsAnnotation` draws them."""
    h, w = shape
    return int(points.radius) or max(3, int(round(0.01 * np.hypot(h, w))))


def _disks(points: np.ndarray, shape: tuple[int, int], radius: int) -> np.ndarray:
    out = np.zeros(shape, np.uint8)
    for x, y in points:
        cv2.circle(out, (int(round(float(x))), int(round(float(y)))), int(radius), 1, thickness=-1)
    return out.astype(bool)


def label_seeds(annotation: Annotation, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(sure object, sure background, box region or None) of a box / scribble / points label on ``shape``.

    Only what the label says for certain: a box says nothing sure about its inside (its outside is sure
    background); strokes and click disks are sure; unmarked pixels are in neither map.
    """
    h, w = shape
    if isinstance(annotation, BoxAnnotation):
        inside, _ = annotation.regions(shape)
        return np.zeros(shape, bool), ~inside, inside
    if isinstance(annotation, ScribbleAnnotation):
        s = annotation.strokes
        return s == 1, s == 2, None
    if isinstance(annotation, PointsAnnotation):
        pts = np.asarray(annotation.points, np.float64).reshape(-1, 2)
        lab = np.asarray(annotation.labels).reshape(-1)
        r = click_radius(annotation, shape)
        fg = _disks(pts[lab == 1], shape, r)
        bg = _disks(pts[lab != 1], shape, r) & ~fg
        return fg, bg, None
    raise FsdiffError(f"a {annotation.kind} annotation has no seeds to grow a mask from; give a box, scribble or points.")


def label_mask(annotation: Annotation, shape: tuple[int, int]) -> np.ndarray:
    """The label's own regions (:meth:`Annotation.regions`) as a {0,1,255} mask: foreground = 1,
    background = 0, the rest 255; a method reading it sees exactly what it sees from the label itself."""
    if isinstance(annotation, MaskAnnotation):
        return annotation.mask
    fg, bg = annotation.regions(shape)
    out = np.full(shape, IGNORE, np.uint8)
    out[bg] = 0
    out[fg] = 1
    return out


# ----------------------------------------------------------------------------------------------------
# the feature similarity map
# ----------------------------------------------------------------------------------------------------
_ENCODERS: dict[str, object] = {}
_LOCK = threading.Lock()


def _encoder(name: str):
    """The frozen encoder ``name``, built once per process (fp32, CPU; deterministic)."""
    from fsdiff.features import build_encoder

    with _LOCK:
        if name not in _ENCODERS:
            _ENCODERS[name] = build_encoder(name, precision=None)
        return _ENCODERS[name]


def _features(image: np.ndarray, encoder: str, size: int, cache) -> list[torch.Tensor]:
    """The image's frozen-encoder feature levels (through ``cache``, or a small private one)."""
    from fsdiff.features import FeatureCache

    cache = cache if cache is not None else FeatureCache(max_bytes=64 * 1024**2)
    return cache.features(_encoder(encoder), [image], size)[0]


def _region_score(f: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``a cos(f(x), p_r) + (1 - a) max_{y in r} cos(f(x), f(y))`` for a region given as cell ``weights``."""
    from fsdiff.priors import masked_average_pooling, pixel_max_cosine, prototype_cosine

    s = PROTO_WEIGHT * prototype_cosine(f, masked_average_pooling(f, weights))
    return s + (1 - PROTO_WEIGHT) * pixel_max_cosine(f, f, weights)


def _average_levels(probs: list[torch.Tensor], out_shape: tuple[int, int]) -> np.ndarray:
    """Mean of per-level (1, 1, h, w) maps at the finest level's size, resized to ``out_shape``."""
    fine = tuple(probs[0].shape[-2:])
    acc = sum(F.interpolate(p, size=fine, mode="bilinear", align_corners=False) for p in probs) / len(probs)
    out = F.interpolate(acc, size=tuple(out_shape), mode="bilinear", align_corners=False)[0, 0]
    return out.clamp(0, 1).numpy().astype(np.float32)


def similarity_map(
    image: np.ndarray,
    fg: np.ndarray,
    bg: list[np.ndarray],
    out_shape: tuple[int, int],
    *,
    encoder: str = "efficientnet-lite0",
    size: int = 473,
    levels: tuple[int, ...] = (1, 2),
    cache=None,
) -> np.ndarray:
    """P(object) per pixel of ``out_shape`` from how alike each cell is to the ``fg`` cells vs the cells of
    each background region in ``bg``.

    ``s_r(x) = a cos(f(x), p_r) + (1 - a) max_{y in r} cos(f(x), f(y))`` per region r and feature level
    (the ``prototype`` method's score applied to the support image itself), the background score is the
    largest over the ``bg`` regions (so a small user-marked region is not averaged away by a large guessed
    one), and ``sigmoid((s_fg - s_bg) / T)`` is averaged over ``levels``. Without any background cell the
    background score is the image mean of ``s_fg``.
    """
    from fsdiff.priors import region_weights

    feats = _features(image, encoder, size, cache)

    def score(f: torch.Tensor, region: np.ndarray) -> torch.Tensor | None:
        wr = region_weights(region.astype(np.float32), tuple(f.shape[-2:]))
        return None if float(wr.sum()) <= 0 else _region_score(f, wr)

    probs = []
    with torch.inference_mode():
        for lv in levels:
            f = feats[lv]
            s_fg = score(f, fg)
            if s_fg is None:
                raise FsdiffError("similarity_map: the object region is empty; give at least one object seed.")
            s_bg = [s for s in (score(f, r) for r in bg if r.any()) if s is not None]
            s_bg = torch.stack(s_bg).amax(0) if s_bg else s_fg.mean().expand_as(s_fg)
            probs.append(torch.sigmoid((s_fg - s_bg) / TEMPERATURE)[None, None])
        return _average_levels(probs, out_shape)


def box_similarity_map(
    image: np.ndarray,
    box: np.ndarray,
    out_shape: tuple[int, int],
    *,
    encoder: str = "efficientnet-lite0",
    size: int = 473,
    levels: tuple[int, ...] = (1, 2),
    quantile: float = 0.3,
    cache=None,
) -> np.ndarray:
    """P(object) per pixel of ``out_shape`` inside a box region: the box cells the outside explains worst
    (background score ``s_out`` in the lowest ``quantile``) seed the object score; ``sigmoid((s_obj - s_out) / T)``
    averaged over ``levels`` (scores as in :func:`similarity_map`)."""
    from fsdiff.priors import region_weights

    feats = _features(image, encoder, size, cache)

    probs = []
    with torch.inference_mode():
        for lv in levels:
            f = feats[lv]
            grid = tuple(f.shape[-2:])
            w_in = region_weights(box.astype(np.float32), grid)
            w_out = region_weights((~box).astype(np.float32), grid)
            if float(w_out.sum()) <= 0 or float((w_in >= 0.5).sum()) < 2:
                continue
            s_out = _region_score(f, w_out)
            inside = w_in >= 0.5
            cut = torch.quantile(s_out[inside], quantile)
            seeds = (inside & (s_out <= cut)).float()
            probs.append(torch.sigmoid((_region_score(f, seeds) - s_out) / TEMPERATURE)[None, None])
        if not probs:
            return box.astype(np.float32) if tuple(box.shape) == tuple(out_shape) else np.ones(out_shape, np.float32)
        return _average_levels(probs, out_shape)


# ----------------------------------------------------------------------------------------------------
# the estimator
# ----------------------------------------------------------------------------------------------------
def _resize_bool(region: np.ndarray, size: tuple[int, int], any_cover: bool) -> np.ndarray:
    """A bool map resized to (W, H) ``size``: pixels covered at all (``any_cover``) or at least half."""
    if region.shape[::-1] == tuple(size):
        return region.copy()
    a = cv2.resize(region.astype(np.float32), size, interpolation=cv2.INTER_AREA)
    return a > 0 if any_cover else a >= 0.5


def _far_background(fg: np.ndarray, margin: float = 0.1) -> np.ndarray:
    """Pixels outside the seeds' bounding box grown by ``margin`` of the image (a guess, never a hard seed)."""
    h, w = fg.shape
    ys, xs = np.nonzero(fg)
    my, mx = int(round(margin * h)), int(round(margin * w))
    out = np.ones((h, w), bool)
    out[max(0, ys.min() - my): min(h, ys.max() + 1 + my), max(0, xs.min() - mx): min(w, xs.max() + 1 + mx)] = False
    return out


def _components_with(mask: np.ndarray, seeds: np.ndarray) -> np.ndarray:
    """The 8-connected components of ``mask`` that touch a seed pixel."""
    n, labels = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
    keep = np.unique(labels[seeds & mask])
    keep = keep[keep > 0]
    return np.isin(labels, keep)


def _check_annotation(annotation: Annotation, shape: tuple[int, int]) -> None:
    if not isinstance(annotation, Annotation):
        raise FsdiffError(
            f"annotation must be an fsdiff annotation (mask, box, scribble, points, text), got {type(annotation).__name__}."
        )
    annotation.validate(shape, "annotation")


def estimate_mask(
    image: np.ndarray,
    annotation: Annotation,
    config: WeakLabelConfig | None = None,
    seed: int = 0,
    *,
    cache=None,
) -> np.ndarray:
    """The object's {0,1,255} uint8 (H, W) mask estimated from a weak ``annotation`` and ``image``.

    A mask annotation passes through unchanged; a text annotation raises (it has no spatial region).
    ``seed`` seeds OpenCV's RNG before GrabCut, so the result is a function of the inputs. ``cache`` is an
    optional :class:`~fsdiff.features.FeatureCache` for the similarity map's features.
    """
    cfg = config if config is not None else WeakLabelConfig()
    if not isinstance(cfg, WeakLabelConfig):
        raise FsdiffError(f"config must be a WeakLabelConfig, got {type(cfg).__name__}.")
    check_image(image, "image")
    shape = image.shape[:2]
    _check_annotation(annotation, shape)
    if isinstance(annotation, MaskAnnotation):
        return annotation.mask
    if isinstance(annotation, TextAnnotation):
        raise FsdiffError("annotation: a text annotation has no spatial region to estimate a mask from; "
                          "give a box, scribble or points.")
    if cfg.method == "off":
        return label_mask(annotation, shape)
    found = _grabcut(image, annotation, cfg, int(seed), cache)
    if found is None:
        return label_mask(annotation, shape)
    return _finish(*found, annotation, cfg)


def _window(annotation: Annotation, shape: tuple[int, int], context: float) -> tuple[int, int, int, int]:
    """The (y0, y1, x0, x1) part of the image GrabCut works on: a box grown by ``context`` times its size on
    every side (the object plus a ring of its own surroundings for the colour model), else the whole image."""
    h, w = shape
    if isinstance(annotation, BoxAnnotation):
        x0, y0, x1, y1 = annotation.pixel_bounds()
        my, mx = int(np.ceil(context * (y1 - y0))), int(np.ceil(context * (x1 - x0)))
        return max(0, y0 - my), min(h, y1 + my), max(0, x0 - mx), min(w, x1 + mx)
    return 0, h, 0, w


def _grabcut(image: np.ndarray, annotation: Annotation, cfg: WeakLabelConfig, seed: int,
             cache) -> tuple[np.ndarray, np.ndarray | None] | None:
    """GrabCut at the working size: the object (bool, full resolution, constraints held) and its pixels the
    features doubt (:func:`doubted`; None unless ``doubt_threshold`` is set), or None to fall back."""
    from fsdiff.features import resize_image

    h, w = image.shape[:2]
    fg_full, bg_full, box_full = label_seeds(annotation, (h, w))
    wy0, wy1, wx0, wx1 = _window(annotation, (h, w), cfg.box_context)
    crop = image[wy0:wy1, wx0:wx1]
    ch, cw = crop.shape[:2]
    upscale = float(cfg.max_upscale) if box_full is not None else 1.0  # only a small box gains from more pixels
    scale = min(upscale, cfg.working_size / max(ch, cw))
    ws = (max(1, int(round(cw * scale))), max(1, int(round(ch * scale))))
    small = resize_image(crop, ws[::-1])
    win = (slice(wy0, wy1), slice(wx0, wx1))
    fg = _resize_bool(fg_full[win], ws, any_cover=True)
    bg = _resize_bool(bg_full[win], ws, any_cover=False)
    both = fg & bg
    fg &= ~both
    bg &= ~both
    gc = np.full(small.shape[:2], cv2.GC_PR_BGD, np.uint8)
    prob = None  # the strokes / clicks feature map, kept only when its doubts are used
    if box_full is not None:
        box = _resize_bool(box_full[win], ws, any_cover=True)
        ys, xs = np.nonzero(box)
        if ys.max() - ys.min() + 1 < MIN_SIDE or xs.max() - xs.min() + 1 < MIN_SIDE or box.all():
            return None
        guess = box.copy()
        if cfg.box_features and cfg.features and box_full.mean() >= cfg.box_features_min_area:
            box_prob = box_similarity_map(image, box_full, (h, w), encoder=cfg.features, size=cfg.feature_size,
                                          levels=cfg.feature_levels, quantile=cfg.box_quantile, cache=cache)
            guess = box & (resize_image(box_prob[win], ws[::-1]) >= cfg.seed_threshold)
            if not guess.any():
                guess = box.copy()
        gc[box] = cv2.GC_PR_BGD
        gc[guess] = cv2.GC_PR_FGD
        gc[~box] = cv2.GC_BGD
    else:
        if cfg.features:
            margin = cfg.points_far_margin if isinstance(annotation, PointsAnnotation) else cfg.far_margin
            far = _far_background(fg_full, margin)
            prob = similarity_map(image, fg_full, [far & ~fg_full, bg_full], small.shape[:2], encoder=cfg.features,
                                  size=cfg.feature_size, levels=cfg.feature_levels, cache=cache)
            guess = prob >= cfg.seed_threshold
            if not cfg.doubt_threshold > 0:
                prob = None
        else:
            r = max(2, int(round(0.05 * max(small.shape[:2]))))
            guess = cv2.dilate(fg.astype(np.uint8), cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1,) * 2)) > 0
        gc[guess] = cv2.GC_PR_FGD
    gc[fg] = cv2.GC_FGD
    gc[bg] = cv2.GC_BGD
    is_fg = (gc == cv2.GC_FGD) | (gc == cv2.GC_PR_FGD)
    if is_fg.all():  # GrabCut needs background samples: the frame of the image becomes probable background
        frame = np.ones(gc.shape, bool)
        frame[1:-1, 1:-1] = False
        gc[frame & (gc == cv2.GC_PR_FGD)] = cv2.GC_PR_BGD
        is_fg = (gc == cv2.GC_FGD) | (gc == cv2.GC_PR_FGD)
    if not is_fg.any() or is_fg.all():
        return None
    bgd_model = np.zeros((1, 65), np.float64)
    fgd_model = np.zeros((1, 65), np.float64)
    cv2.setRNGSeed(seed)
    cv2.grabCut(np.ascontiguousarray(small[..., ::-1]), gc, None, bgd_model, fgd_model, int(cfg.iterations),
                cv2.GC_INIT_WITH_MASK)
    obj = (gc == cv2.GC_FGD) | (gc == cv2.GC_PR_FGD)
    if cfg.keep_seeded_components and fg.any():
        obj = _components_with(obj, fg) | fg
    if not obj.any():
        return None
    full = np.zeros((h, w), bool)
    full[win] = obj if ws == (cw, ch) else resize_image(obj.astype(np.float32), (ch, cw)) >= 0.5
    if box_full is not None:
        full &= box_full
    full |= fg_full
    full &= ~bg_full
    if not full.any():
        return None
    if prob is None:
        return full, None
    return full, doubted(full, resize_image(prob, (h, w)), fg_full, cfg.doubt_threshold)


def doubted(obj: np.ndarray, prob: np.ndarray, seeds: np.ndarray, threshold: float) -> np.ndarray:
    """The object pixels whose feature probability is below ``threshold``, except the user's own seeds;
    nothing when that would leave no object pixel."""
    doubt = obj & (prob < threshold) & ~seeds
    return doubt if (obj & ~doubt).any() else np.zeros_like(obj)


def _finish(obj: np.ndarray, doubt: np.ndarray | None, annotation: Annotation, cfg: WeakLabelConfig) -> np.ndarray:
    """The {0,1,255} mask: the object with its doubted pixels and an optional band around its outline
    ignored, hard seeds kept."""
    out = obj.astype(np.uint8)
    if doubt is not None:
        out[doubt] = IGNORE
    if cfg.uncertain_band > 0:
        ys, xs = np.nonzero(obj)
        size = np.sqrt(float(len(ys)))
        r = max(1, int(round(cfg.uncertain_band * size)))
        k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))
        u8 = obj.astype(np.uint8)
        band = (cv2.dilate(u8, k) > 0) & ~(cv2.erode(u8, k) > 0)
        fg_full, bg_full, box_full = label_seeds(annotation, obj.shape)
        band &= ~fg_full & ~bg_full
        if box_full is not None:
            band &= box_full
        out[band] = IGNORE
        if not (out == 1).any():  # a thin object vanishes under its band: keep the object itself
            out = obj.astype(np.uint8)
    return out


def estimate_supports(episode: Episode, config: WeakLabelConfig | None = None, seed: int = 0, *, cache=None) -> Episode:
    """The episode with every box / scribble / points shot carrying its estimated mask
    (:class:`EstimatedMaskAnnotation`, ``source`` = the original label); other shots are kept."""
    if not isinstance(episode, Episode):
        raise FsdiffError(f"episode must be an fsdiff Episode, got {type(episode).__name__}.")
    cfg = config if config is not None else WeakLabelConfig()
    shots = []
    for shot in episode.shots:
        ann = shot.annotation
        if isinstance(ann, (BoxAnnotation, ScribbleAnnotation, PointsAnnotation)):
            mask = estimate_mask(shot.image, ann, cfg, seed, cache=cache)
            shot = dataclasses.replace(shot, annotation=EstimatedMaskAnnotation(mask, source=ann))
        shots.append(shot)
    return dataclasses.replace(episode, shots=tuple(shots))


class SupportMaskStep:
    """The support stage of :class:`fsdiff.pipeline.Pipeline`: weak-label shots get their estimated masks.

    Estimates are remembered per (image, label) for the last ``memo`` supports, so a support that recurs
    across episodes (benchmarks) or calls (the web app) is estimated once.
    """

    def __init__(self, config: WeakLabelConfig | None = None, seed: int = 0, memo: int = 256) -> None:
        self.config = config if config is not None else WeakLabelConfig()
        if not isinstance(self.config, WeakLabelConfig):
            raise FsdiffError(f"support_masks: expected a WeakLabelConfig, got {type(self.config).__name__}.")
        self.seed, self.memo = int(seed), int(memo)
        self._memo: dict[tuple, np.ndarray] = {}
        self._lock = threading.Lock()

    def _key(self, image: np.ndarray, ann: Annotation) -> tuple:
        from fsdiff.features import image_digest

        parts = [np.asarray(getattr(ann, f)) for f in ("box", "strokes", "points", "labels") if hasattr(ann, f)]
        return (image_digest(image), type(ann).__name__, *(image_digest(np.ascontiguousarray(p)) for p in parts))

    def estimate(self, image: np.ndarray, ann: Annotation) -> np.ndarray:
        """The estimated mask of one weak label (remembered)."""
        key = self._key(image, ann)
        with self._lock:
            if key in self._memo:
                return self._memo[key]
        mask = estimate_mask(image, ann, self.config, self.seed)
        with self._lock:
            self._memo[key] = mask
            while len(self._memo) > self.memo:
                self._memo.pop(next(iter(self._memo)))
        return mask

    def __call__(self, episode: Episode) -> Episode:
        shots = []
        for shot in episode.shots:
            ann = shot.annotation
            if isinstance(ann, (BoxAnnotation, ScribbleAnnotation, PointsAnnotation)):
                shot = dataclasses.replace(shot, annotation=EstimatedMaskAnnotation(self.estimate(shot.image, ann),
                                                                                    source=ann))
            shots.append(shot)
        return dataclasses.replace(episode, shots=tuple(shots))

    @property
    def spec(self) -> str:
        """The step as text for reports (``grabcut``, or ``grabcut`` with its non-default settings)."""
        changed = [f"{f.name}={getattr(self.config, f.name)}" for f in dataclasses.fields(self.config)
                   if f.name != "method" and getattr(self.config, f.name) != f.default]
        return self.config.method + (":" + ",".join(changed) if changed else "")


def as_support_step(value: "str | WeakLabelConfig | None") -> SupportMaskStep | None:
    """The pipeline's support stage from ``'grabcut'`` (the default estimator), ``'off'``/None (weak labels
    used as they are) or a WeakLabelConfig."""
    if value is None or value == "off":
        return None
    if value == "grabcut":
        return SupportMaskStep()
    if isinstance(value, WeakLabelConfig):
        return None if value.method == "off" else SupportMaskStep(value)
    raise FsdiffError(f"support_masks={value!r}: use 'grabcut' (estimate a mask from each box, scribble or "
                      "clicks), 'off' (use the labels as they are) or a fsdiff.weaklabel.WeakLabelConfig.")
