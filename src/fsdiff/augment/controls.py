"""DifFSS control conditions: seg, HED and scribble maps from a support (DifFSS, arXiv 2307.00773; [C]).

Follows ``FSSpregenerate.py`` of the official code (ControlNet4FSS), with its known bugs fixed:

* ``resize_for_generation`` is ControlNet's ``resize_image``: short side to 512, H and W rounded
  (``np.round``, half to even) to multiples of 64, INTER_AREA when shrinking (or k == 1), LANCZOS4
  when enlarging.
* **seg**: class pixels get the class's ADE colour (:mod:`fsdiff.augment.palette`), background *and
  ignore* pixels get ``palette[0]`` = (120, 120, 120) 'wall', then a nearest-neighbour resize.
* **hed**: the binary class mask is resized (nearest) to the edge map, dilated **once** with a 14x14
  elliptical structuring element (the official ``cv2.dilate(m, k, 10)`` passes 10 as ``dst``, so it
  is one iteration, not ten), multiplied into the edge map and copied to 3 channels.
* **scribble**: the same masked HED map, 3 channels, passed through ``resize_for_generation`` and
  hard-thresholded: min over channels > 127 -> 255, else 0 (no NMS, no blur).
* The class-id filter of the released script (only ids 0..20) is not reproduced: controls work for
  any class name.

Box, scribble and point support annotations (not in DifFSS, [R]): see :func:`support_regions`.

Edge maps come from an HED detector (``fsdiff.features.hed``) run on
``resize_for_generation(image)``; this module takes the edge map as an argument and never runs a model.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import cv2
import numpy as np

from fsdiff.augment.palette import BACKGROUND_COLOR, resolve_class
from fsdiff.errors import FsdiffError

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from fsdiff.episode import Annotation

CONDITIONS: tuple[str, ...] = ("seg", "hed", "scribble")
"""The DifFSS guidance kinds (``--guidance`` in the official script)."""

DEFAULT_RESOLUTION = 512
"""``image_resolution`` / ``detect_resolution`` of the official script."""
DEFAULT_SAMPLES = 4
"""Auxiliary images per (support, class): ``shot = 4`` in the official script."""
DILATE_SIZE = 14
"""Side of the elliptical structuring element used to gate HED edges."""
SCRIBBLE_THRESHOLD = 127
"""Scribble pixels are those whose min over channels exceeds this."""

ADDED_PROMPT = "best quality, extremely detailed"
"""``a_prompt`` of the official script."""
NEGATIVE_PROMPT = (
    "longbody, lowres, bad anatomy, bad hands, missing fingers, extra digit, fewer digits, cropped, "
    "worst quality, low quality, artwork"
)
"""``n_prompt`` of the official script (the unconditional branch's prompt)."""


@dataclass(frozen=True)
class ControlConfig:
    """DifFSS control and prompt settings; defaults are the official script's."""

    resolution: int = DEFAULT_RESOLUTION
    dilate_size: int = DILATE_SIZE
    scribble_threshold: int = SCRIBBLE_THRESHOLD
    fix_double_comma: bool = False
    scribble_stroke_frac: float = 0.02
    sparse_gate_margin: float = 0.1


def build_prompt(name: str, *, fix_double_comma: bool = False) -> str:
    """The positive prompt, literally ``f"a real shot photo of {name}," + ", " + ADDED_PROMPT``.

    The official code concatenates ``prompt + ', ' + a_prompt`` onto a prompt that already ends in a
    comma, giving "a real shot photo of dog,, best quality, extremely detailed". We keep the double
    comma by default for fidelity; ``fix_double_comma=True`` gives "..., of dog, best quality, ...".
    Pass the name through :func:`fsdiff.augment.palette.prompt_name` first to get DifFSS's spelling.
    """
    if not isinstance(name, str) or not name.strip():
        raise FsdiffError(f"prompt class name must be a non-empty string, got {name!r}.")
    head = f"a real shot photo of {name},"
    if fix_double_comma:
        return head + " " + ADDED_PROMPT
    return head + ", " + ADDED_PROMPT


def parse_condition(text: str, *, default_n: int = DEFAULT_SAMPLES) -> tuple[str, int]:
    """Parse a CLI condition spec ``kind[:n]`` ('hed:4', 'seg', 'scribble:2') into (kind, n)."""
    if not isinstance(text, str) or not text.strip():
        raise FsdiffError(f"condition spec is empty; use one of {', '.join(CONDITIONS)}, optionally ':N' (e.g. seg:4).")
    kind, sep, count = text.strip().partition(":")
    kind = kind.strip().lower()
    if kind not in CONDITIONS:
        raise FsdiffError(
            f"unknown condition {kind!r} in {text!r}; choose one of {', '.join(CONDITIONS)}, "
            "optionally followed by ':N' images per support (e.g. hed:4)."
        )
    if not sep:
        return kind, int(default_n)
    try:
        n = int(count.strip())
    except ValueError:
        raise FsdiffError(
            f"condition {text!r}: the count after ':' must be a whole number (e.g. {kind}:4), got {count!r}."
        ) from None
    if n < 1:
        raise FsdiffError(f"condition {text!r}: the number of generated images must be at least 1, got {n}.")
    from fsdiff.limits import MAX_GENERATED_PER_SUPPORT, check_count

    return kind, check_count(n, f"images per support in {text!r}", MAX_GENERATED_PER_SUPPORT, minimum=1)


# ----------------------------------------------------------------------------------------------
# sizes
# ----------------------------------------------------------------------------------------------


def generation_size(height: int, width: int, resolution: int = DEFAULT_RESOLUTION) -> tuple[int, int]:
    """(H, W) that ``resize_image`` gives an image of ``height`` x ``width``: short side to
    ``resolution``, each side rounded (half to even) to a multiple of 64."""
    if height < 1 or width < 1:
        raise FsdiffError(f"image size {width}x{height} (WxH) is empty.")
    if resolution < 64:
        raise FsdiffError(f"resolution must be at least 64, got {resolution}.")
    k = float(resolution) / min(float(height), float(width))
    h = int(np.round(float(height) * k / 64.0)) * 64
    w = int(np.round(float(width) * k / 64.0)) * 64
    return h, w


_MAX_SIDE = 8192


def resize_for_generation(image: np.ndarray, resolution: int = DEFAULT_RESOLUTION) -> np.ndarray:
    """ControlNet's ``resize_image``: short side to ``resolution``, sides multiples of 64
    (INTER_AREA when shrinking or unchanged, LANCZOS4 when enlarging)."""
    if not isinstance(image, np.ndarray) or image.ndim not in (2, 3) or image.size == 0:
        desc = f"array of shape {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise FsdiffError(f"resize_for_generation: expected an (H, W[, C]) image array, got {desc}.")
    H, W = image.shape[:2]
    h, w = generation_size(H, W, resolution)
    if max(h, w) > _MAX_SIDE:
        raise FsdiffError(
            f"image of {W}x{H} (WxH) would become {w}x{h} at short side {resolution}; the aspect ratio "
            f"is too extreme for generation (limit {_MAX_SIDE} px). Crop the support image."
        )
    k = float(resolution) / min(float(H), float(W))
    interp = cv2.INTER_LANCZOS4 if k > 1 else cv2.INTER_AREA
    return cv2.resize(image, (w, h), interpolation=interp)


def hwc3(x: np.ndarray) -> np.ndarray:
    """ControlNet's ``HWC3`` for uint8 maps: (H, W) or (H, W, 1) -> (H, W, 3)."""
    if x.ndim == 2:
        x = x[:, :, None]
    if x.shape[2] == 3:
        return x
    if x.shape[2] == 1:
        return np.concatenate([x, x, x], axis=2)
    raise FsdiffError(f"expected a 1- or 3-channel map, got shape {x.shape}.")


def ellipse_kernel(size: int = DILATE_SIZE) -> np.ndarray:
    """The ``cv2.MORPH_ELLIPSE`` structuring element of ``size`` x ``size`` (uint8 0/1)."""
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (int(size), int(size)))


def dilate_once(mask: np.ndarray, size: int = DILATE_SIZE) -> np.ndarray:
    """Dilate a 0/1 mask once with the ``size`` x ``size`` ellipse (cv2 default anchor)."""
    return cv2.dilate(np.ascontiguousarray(mask, dtype=np.uint8), ellipse_kernel(size), iterations=1)


# ----------------------------------------------------------------------------------------------
# supports -> regions
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SupportRegions:
    """Binary maps (uint8 0/1, image resolution) a support annotation contributes to its controls.

    ``seg``: the pixels painted in the class colour. ``gate``: the pixels whose HED edges are kept,
    before the 14x14 dilation that every control applies.
    """

    seg: np.ndarray
    gate: np.ndarray


def _dense_mask(mask: np.ndarray, source: str) -> np.ndarray:
    """0/1 class map of a {0,1,255} (or boolean) support mask; raise if it is empty."""
    if not isinstance(mask, np.ndarray) or mask.ndim != 2:
        desc = f"array of shape {mask.shape}" if isinstance(mask, np.ndarray) else type(mask).__name__
        raise FsdiffError(f"{source}: expected a 2-D support mask (0 = background, 1 = class, 255 = ignore), got {desc}.")
    fg = (mask == 1) if mask.dtype != bool else mask
    if not fg.any():
        raise FsdiffError(
            f"{source}: the support mask is empty (no pixel equals 1, the class); annotate the object "
            "or drop this support before generating auxiliary images."
        )
    return fg.astype(np.uint8)


def _box_around(fg: np.ndarray, margin: float) -> np.ndarray:
    """Filled bounding box of ``fg`` grown by ``margin`` of the image size on each side."""
    h, w = fg.shape
    ys, xs = np.nonzero(fg)
    my, mx = int(round(margin * h)), int(round(margin * w))
    out = np.zeros((h, w), np.uint8)
    out[max(0, ys.min() - my): min(h, ys.max() + 1 + my), max(0, xs.min() - mx): min(w, xs.max() + 1 + mx)] = 1
    return out


def support_regions(
    annotation: np.ndarray | Annotation,
    image_shape: tuple[int, int] | None = None,
    *,
    config: ControlConfig = ControlConfig(),
) -> SupportRegions:
    """Seg region and HED gate of a support annotation at image resolution.

    * dense mask (array or ``MaskAnnotation``): seg = gate = the class pixels (DifFSS);
    * box [R]: seg = the filled box (ControlNet then paints a box-shaped object); gate = the box;
    * scribble / points [R]: seg = the positive strokes (or point disks) thickened by a disc of
      radius ``scribble_stroke_frac`` x the image diagonal (>= 3 px), a rough blob where the object
      is; gate = the strokes' bounding box grown by ``sparse_gate_margin`` of the image size per side.
    * text-only supports have no region: FsdiffError.
    """
    if isinstance(annotation, np.ndarray):
        fg = _dense_mask(annotation, "support mask")
        return SupportRegions(seg=fg, gate=fg)
    from fsdiff.episode import BoxAnnotation, MaskAnnotation, PointsAnnotation, ScribbleAnnotation

    if isinstance(annotation, MaskAnnotation):
        fg = _dense_mask(annotation.mask, "support mask")
        return SupportRegions(seg=fg, gate=fg)
    if isinstance(annotation, ScribbleAnnotation):
        image_shape = image_shape or annotation.strokes.shape
    if image_shape is None:
        raise FsdiffError(
            f"a {getattr(annotation, 'kind', type(annotation).__name__)} support needs image_shape=(H, W) "
            "to build its control region."
        )
    shape = (int(image_shape[0]), int(image_shape[1]))
    if isinstance(annotation, BoxAnnotation):
        annotation.validate(shape, "support box")
        fg = annotation.regions(shape)[0].astype(np.uint8)
        return SupportRegions(seg=fg, gate=fg)
    if isinstance(annotation, (ScribbleAnnotation, PointsAnnotation)):
        annotation.validate(shape, f"support {annotation.kind}")
        strokes = annotation.regions(shape)[0].astype(np.uint8)
        r = max(3, int(round(config.scribble_stroke_frac * float(np.hypot(*shape)))))
        disc = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))
        seg = cv2.dilate(strokes, disc, iterations=1)
        return SupportRegions(seg=seg, gate=_box_around(strokes, config.sparse_gate_margin))
    kind = getattr(annotation, "kind", type(annotation).__name__)
    raise FsdiffError(
        f"DifFSS needs a spatial support annotation (mask, box, scribble or points); got a {kind!r} "
        "annotation. Use a method that accepts text-only supports, or annotate the support."
    )


# ----------------------------------------------------------------------------------------------
# the three controls
# ----------------------------------------------------------------------------------------------


def _check_size(size: tuple[int, int]) -> tuple[int, int]:
    """Validate an (H, W) size."""
    try:
        h, w = (int(v) for v in size)
    except (TypeError, ValueError):
        raise FsdiffError(f"control size must be (height, width), got {size!r}.") from None
    if h < 1 or w < 1:
        raise FsdiffError(f"control size must be positive, got {size!r} (height, width).")
    return h, w


def seg_control(
    mask: np.ndarray | Annotation,
    class_name: str,
    size: tuple[int, int] | None = None,
    *,
    image_shape: tuple[int, int] | None = None,
    table: Mapping[str, int] | None = None,
    color: tuple[int, int, int] | None = None,
    config: ControlConfig = ControlConfig(),
) -> np.ndarray:
    """Seg control (H, W, 3) uint8: class pixels in the class's ADE colour, the rest ADE 'wall' grey.

    ``size`` is the (height, width) of the control, by default :func:`generation_size` of the mask.
    The resize is cv2 INTER_NEAREST, as in the official code. ``color`` overrides the class colour.
    A class whose colour is the background grey (ADE 'wall') gives a uniform map, as in DifFSS.
    """
    regions = support_regions(mask, image_shape, config=config)
    fg = regions.seg
    h, w = _check_size(size) if size is not None else generation_size(*fg.shape, config.resolution)
    rgb = np.asarray(color if color is not None else resolve_class(class_name, table=table).rgb, np.uint8)
    small = cv2.resize(fg, (w, h), interpolation=cv2.INTER_NEAREST).astype(bool)
    out = np.empty((h, w, 3), np.uint8)
    out[...] = np.asarray(BACKGROUND_COLOR, np.uint8)
    out[small] = rgb
    return out


def _edge_2d(edge_map: np.ndarray) -> np.ndarray:
    """Validate an HED edge map and return it as (H, W) uint8."""
    if not isinstance(edge_map, np.ndarray):
        raise FsdiffError(f"edge_map must be a uint8 numpy array (H, W), got {type(edge_map).__name__}.")
    e = edge_map
    if e.ndim == 3 and e.shape[2] == 1:
        e = e[:, :, 0]
    if e.ndim != 2 or e.size == 0:
        raise FsdiffError(f"edge_map must be a single-channel (H, W) map, got shape {edge_map.shape}.")
    if e.dtype != np.uint8:
        raise FsdiffError(
            f"edge_map must be uint8 in 0..255 (as HEDDetector.detect returns), got dtype {e.dtype}."
        )
    return e


def masked_edges(
    edge_map: np.ndarray,
    mask: np.ndarray | Annotation,
    *,
    image_shape: tuple[int, int] | None = None,
    config: ControlConfig = ControlConfig(),
) -> np.ndarray:
    """HED edges kept inside the dilated support region: (H, W) uint8 at the edge map's size."""
    e = _edge_2d(edge_map)
    gate = support_regions(mask, image_shape, config=config).gate
    gate = cv2.resize(gate, (e.shape[1], e.shape[0]), interpolation=cv2.INTER_NEAREST)
    dilated = dilate_once(gate, config.dilate_size)
    return np.multiply(e, dilated).astype(np.uint8)


def hed_control(
    edge_map: np.ndarray,
    mask: np.ndarray | Annotation,
    *,
    image_shape: tuple[int, int] | None = None,
    config: ControlConfig = ControlConfig(),
) -> np.ndarray:
    """HED control (H, W, 3) uint8: edges times the once-dilated class mask, at the edge map's size.

    Compute ``edge_map`` on ``resize_for_generation(image)`` so that its size is the generation size.
    For a box support the gate is the box, for scribbles/points the strokes' grown box (see
    :func:`support_regions`), each dilated like a mask.
    """
    return hwc3(masked_edges(edge_map, mask, image_shape=image_shape, config=config))


def scribble_control(
    edge_map: np.ndarray,
    mask: np.ndarray | Annotation,
    *,
    image_shape: tuple[int, int] | None = None,
    config: ControlConfig = ControlConfig(),
) -> np.ndarray:
    """Scribble control (H, W, 3) uint8 in {0, 255}: the masked HED map, resized for generation,
    255 where its min over channels exceeds 127 (hard threshold, no NMS or blur)."""
    m = hwc3(masked_edges(edge_map, mask, image_shape=image_shape, config=config))
    m = resize_for_generation(m, config.resolution)
    m = hwc3(m)  # cv2.resize keeps 3 channels; guard anyway
    out = np.zeros_like(m, dtype=np.uint8)
    out[np.min(m, axis=2) > config.scribble_threshold] = 255
    return out


def build_control(
    kind: str,
    mask: np.ndarray | Annotation,
    *,
    class_name: str | None = None,
    edge_map: np.ndarray | None = None,
    size: tuple[int, int] | None = None,
    image_shape: tuple[int, int] | None = None,
    table: Mapping[str, int] | None = None,
    config: ControlConfig = ControlConfig(),
) -> np.ndarray:
    """Dispatch to :func:`seg_control` (needs ``class_name``), :func:`hed_control` or
    :func:`scribble_control` (need ``edge_map``)."""
    if kind not in CONDITIONS:
        raise FsdiffError(f"unknown condition {kind!r}; choose one of {', '.join(CONDITIONS)}.")
    if kind == "seg":
        if class_name is None:
            raise FsdiffError("a seg control needs the class name (class_name=...) to pick its ADE colour.")
        return seg_control(mask, class_name, size, image_shape=image_shape, table=table, config=config)
    if edge_map is None:
        raise FsdiffError(
            f"a {kind} control needs an HED edge map (edge_map=...), e.g. "
            "fsdiff.features.hed.HEDDetector(...).detect(resize_for_generation(image))."
        )
    fn = hed_control if kind == "hed" else scribble_control
    return fn(edge_map, mask, image_shape=image_shape, config=config)


def control_to_tensor(control: np.ndarray) -> torch.Tensor:
    """A uint8 (H, W, 3) control map as a float tensor (1, 3, H, W) in [0, 1] (map / 255)."""
    import torch

    if not isinstance(control, np.ndarray) or control.dtype != np.uint8:
        desc = f"{control.dtype} array" if isinstance(control, np.ndarray) else type(control).__name__
        raise FsdiffError(f"control must be a uint8 (H, W, 3) array, got {desc}.")
    c = hwc3(control)
    t = torch.from_numpy(np.ascontiguousarray(c)).float().div_(255.0)
    return t.permute(2, 0, 1).unsqueeze(0).contiguous()
