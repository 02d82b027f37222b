"""BAFT: the backbone-agnostic feature transform of DiffUp (Chen et al., arXiv 2407.16182, Fig. 3, BAFT).

Established by the paper: BAFT turns frozen-backbone multi-scale support/query features and a text
embedding of "a photo of a {class}" into unified, coarse, backbone-agnostic priors, so the backbone can
be swapped at test time without re-training. Everything concrete below is fsdiff's
reconstruction [R]:

* **Only dimension-free similarities** leave this module, so no learned weight ever sees a backbone
  channel: for every feature level l (3 levels at fixed relative depths) and support shot k,
  ``P_proto(x) = cos(f_q(x), MAP(f_s, A))`` and ``P_pix(x) = max_{y in A} cos(f_q(x), f_s(y))``
  (:mod:`fsdiff.priors`), each min-max normalised per episode (per query map) on its own grid, then
  resized bilinearly to the prior grid (``DiffUpConfig.prior_size``). Channel order of one shot's
  tensor R_k (``levels * 2`` channels): ``[l0 proto, l0 pix, l1 proto, l1 pix, l2 proto, l2 pix]``.
* **Contrast** (a fsdiff addition [R], ``DiffUpConfig.prior_maps`` default): per level a third map
  ``sigmoid((s_fg − s_bg) / T)`` with ``s = a·P_proto + (1 − a)·P_pix`` computed against the support's
  foreground and against its background (outside the mask or box; the scribble's own background or
  the area far from it), unnormalised: the training-free prototype method's per-level probability.
  Still dimension-free; it keeps the fg-vs-bg evidence that per-episode min-max normalisation of
  fg-only cosines throws away (without it, the first CPU-trained model lost to the prototype method,
  docs/BENCHMARKS.md). The maps of one level are then ``[proto, pix, contrast]``.
* **Self-support** (a fsdiff addition [R], the CPU recipe's 4th map and UAPF anchor): the mean contrast of
  ``self_levels`` is a first estimate; per level, query cells above 0.7 / below 0.6 give the query's own
  fg / bg prototypes, mixed half-half with the support's (SSP, Fan et al. ECCV 2022), and the fg
  pixel-max also runs over the confident query cells (the query's object matches itself better than
  the support's): :func:`fsdiff.priors.self_support_map`. Still dimension-free (only cosines leave).
* **Box / scribble / points** supports go through the same operators with A = their foreground region
  (``annotation.regions(shape)[0]``); a box gives a coarser prior (its background cells join A), a
  scribble a sparser one. Scribble (and points) regions are first **dilated** by a disk of radius
  ``SCRIBBLE_DILATION`` x max(H, W) (1 % of the long side, at least 1 px): a 5-px stroke on a 500-px
  image covers < 1/8 of a stride-8 cell, so without dilation the area-resized weights are tiny and the
  prototype is dominated by a handful of border pixels; 1 % (about one stride-8 cell at 384-px input)
  keeps the stroke mostly inside the object. Points have no type of their own and use the
  ``scribble`` type id (both are sparse clicks/strokes on the object).
* **Text** (0-shot or added): ``P_txt(x) = cos(g_q(x), t)`` with t the CLIP text embedding of
  "a photo of a {class}" and g_q dense CLIP image features, computed with a separate frozen CLIP
  (:class:`TextPrior`; default ``openai/clip-vit-base-patch16``, value-value dense features in the
  style of MaskCLIP / CLIP Surgery, see :meth:`TextPrior.dense_features`), min-max normalised,
  resized and **replicated** to the same ``levels * 2`` channels, annotation type ``text``. Without a
  CLIP model (offline, nothing cached) there is no text prior.
* **query_extra** (UQDD's backbone-agnostic query information, 1 channel): the per-pixel cosine of the
  deepest-level query feature to the query's own mean feature, min-max normalised — a global
  self-affinity summary (what looks like "the rest of the image" vs. distinctive regions).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from fsdiff.episode import Annotation
from fsdiff.methods.diffup.config import PRIOR_MAPS
from fsdiff.errors import FsdiffError
from fsdiff.priors import (
    SELF_BG_THRESHOLD,
    SELF_FG_THRESHOLD,
    SELF_MIX,
    self_support_map,
    l2_normalise,
    masked_average_pooling,
    minmax_normalise,
    pixel_max_cosine,
    prototype_cosine,
    region_weights,
)

SCRIBBLE_DILATION = 0.01
"""Scribble/points regions are dilated by a disk of this fraction of the image's long side (>= 1 px)."""
CONTRAST_TEMPERATURE = 0.1
"""T of the contrast map (the prototype method's temperature)."""
CONTRAST_PROTO_WEIGHT = 0.5
"""a of the contrast map's class score (the prototype method's weight)."""
PIXEL_THRESHOLD = 0.5
"""A support cell joins the pixel-max set A when its region weight is >= this fraction of the largest."""
DEFAULT_CLIP = "openai/clip-vit-base-patch16"
"""The CLIP used for the text prior when the backbone is not a CLIP (the paper's CLIP text branch)."""
TEXT_TEMPLATE = "a photo of a {}"
"""Prompt of the text prior (the paper's text annotation: "a photo of a {class}")."""
SPARSE_KINDS = ("scribble", "points")


# ----------------------------------------------------------------------------------------------------
# regions and type names
# ----------------------------------------------------------------------------------------------------
def prior_type(kind: str) -> str:
    """The DiffUp annotation type of an episode annotation kind (points count as scribbles)."""
    if kind == "points":
        return "scribble"
    if kind in ("mask", "box", "scribble", "text"):
        return kind
    raise FsdiffError(f"DiffUp cannot use a {kind!r} support annotation; use mask, box, scribble, points or text.")


def dilate_region(fg: np.ndarray, fraction: float = SCRIBBLE_DILATION) -> np.ndarray:
    """Dilate a bool (H, W) region by a disk of radius max(1, round(fraction * max(H, W)))."""
    r = max(1, int(round(float(fraction) * max(fg.shape))))
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))
    return cv2.dilate(fg.astype(np.uint8), kernel) > 0


def support_region(annotation: Annotation, shape: tuple[int, int], dilation: float = SCRIBBLE_DILATION) -> np.ndarray:
    """The bool (H, W) foreground region A of a spatial annotation (sparse kinds dilated, see module doc)."""
    return support_regions(annotation, shape, dilation)[0]


def support_regions(
    annotation: Annotation, shape: tuple[int, int], dilation: float = SCRIBBLE_DILATION
) -> tuple[np.ndarray, np.ndarray]:
    """Bool (H, W) foreground A (sparse kinds dilated) and background (the annotation's, minus A)."""
    fg, bg = annotation.regions(shape)
    fg = np.asarray(fg, bool)
    if annotation.kind in SPARSE_KINDS:
        fg = dilate_region(fg, dilation)
    if not fg.any():
        raise FsdiffError(
            f"the {annotation.kind} support annotation has an empty foreground region; give a mask with "
            "object pixels, a box inside the image or a non-empty scribble."
        )
    return fg, np.asarray(bg, bool) & ~fg


# ----------------------------------------------------------------------------------------------------
# the operators
# ----------------------------------------------------------------------------------------------------
def _resize_map(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of a (h, w) or (C, h, w) map to ``size`` (identity when equal)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    squeeze = x.ndim == 2
    y = x[None, None] if squeeze else x[None]
    y = F.interpolate(y, size=tuple(size), mode="bilinear", align_corners=False)
    return y[0, 0] if squeeze else y[0]


def level_priors(
    query: torch.Tensor,
    support: torch.Tensor,
    weights: torch.Tensor,
    pixel_threshold: float = PIXEL_THRESHOLD,
    matmul_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Raw (2, h, w) [P_proto, P_pix] cosines of one level: query (C, h, w), support (C, hs, ws), weights (hs, ws)."""
    return torch.stack(_pooled_parts(query, [(support, weights)], pixel_threshold, matmul_dtype)[1:])


def contrast_map(
    fg_raw: torch.Tensor,
    bg_raw: torch.Tensor | None,
    temperature: float = CONTRAST_TEMPERATURE,
    proto_weight: float = CONTRAST_PROTO_WEIGHT,
) -> torch.Tensor:
    """sigmoid((s_fg - s_bg) / T) with s = a * P_proto + (1 - a) * P_pix from raw (2, h, w) level priors.

    Without background evidence (``bg_raw`` None) s_bg is the query-wide mean of s_fg, as in the
    prototype method (pixels more similar than average are foreground).
    """
    a = float(proto_weight)
    s_fg = a * fg_raw[0] + (1 - a) * fg_raw[1]
    s_bg = s_fg.mean().expand_as(s_fg) if bg_raw is None else a * bg_raw[0] + (1 - a) * bg_raw[1]
    return torch.sigmoid((s_fg - s_bg) / float(temperature))


def shot_prior(
    query_feats: Sequence[torch.Tensor],
    support_feats: Sequence[torch.Tensor],
    region: np.ndarray | torch.Tensor,
    size: int | tuple[int, int],
    pixel_threshold: float = PIXEL_THRESHOLD,
    *,
    background: np.ndarray | torch.Tensor | None = None,
    maps: Sequence[str] = ("proto", "pix"),
    temperature: float = CONTRAST_TEMPERATURE,
    proto_weight: float = CONTRAST_PROTO_WEIGHT,
    matmul_dtype: torch.dtype | None = None,
    **self_kwargs,
) -> torch.Tensor:
    """One shot's prior R_k (levels * len(maps), h, w) in [0, 1] from per-level features and its region A.

    ``maps`` per level, in order: ``proto`` / ``pix`` (min-max normalised cosines to the fg region) and
    ``contrast`` (:func:`contrast_map` against the ``background`` region, not normalised) and ``self``
    (:func:`self_support_map`; ``self_kwargs`` are :func:`pooled_prior`'s ``self_*`` arguments).
    """
    return pooled_prior(query_feats, [(support_feats, region, background)], size, pixel_threshold, maps=maps,
                        temperature=temperature, proto_weight=proto_weight, matmul_dtype=matmul_dtype,
                        **self_kwargs)


def _pooled_parts(q: torch.Tensor, sups: list[tuple[torch.Tensor, torch.Tensor]], pixel_threshold: float,
                  matmul_dtype: torch.dtype | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean prototype (C,), its cosine map (h, w), max over shots of the pixel-max cosine (h, w))."""
    for s, _ in sups:
        if q.ndim != 3 or s.ndim != 3 or q.shape[0] != s.shape[0]:
            raise FsdiffError(
                f"BAFT: query and support features of one level must be (C, h, w) with the same C, got "
                f"{tuple(q.shape)} and {tuple(s.shape)}."
            )
    proto = torch.stack([masked_average_pooling(s, w) for s, w in sups]).mean(0)
    p_pix = torch.stack([pixel_max_cosine(q, s, w, threshold=pixel_threshold, matmul_dtype=matmul_dtype)
                         for s, w in sups]).amax(0)
    return proto, prototype_cosine(q, proto), p_pix


def pooled_prior(
    query_feats: Sequence[torch.Tensor],
    supports: Sequence[tuple[Sequence[torch.Tensor], np.ndarray | torch.Tensor, np.ndarray | torch.Tensor | None]],
    size: int | tuple[int, int],
    pixel_threshold: float = PIXEL_THRESHOLD,
    *,
    maps: Sequence[str] = ("proto", "pix"),
    temperature: float = CONTRAST_TEMPERATURE,
    proto_weight: float = CONTRAST_PROTO_WEIGHT,
    matmul_dtype: torch.dtype | None = None,
    self_levels: Sequence[int] | None = None,
    self_fg_threshold: float = SELF_FG_THRESHOLD,
    self_bg_threshold: float = SELF_BG_THRESHOLD,
    self_mix: float = SELF_MIX,
) -> torch.Tensor:
    """One prior from several shots ``(features, fg region, bg region or None)`` pooled like the prototype
    method: the prototype is the mean of the shots' prototypes and the pixel-max runs over every shot's
    cells (bg likewise over the shots that have background); one shot gives :func:`shot_prior`."""
    if not supports:
        raise FsdiffError("BAFT: pooling needs at least one support shot.")
    for feats, _, _ in supports:
        if len(query_feats) != len(feats):
            raise FsdiffError(f"BAFT: the query has {len(query_feats)} feature levels but the support {len(feats)}.")
    unknown = [m for m in maps if m not in PRIOR_MAPS]
    if unknown or not maps:
        raise FsdiffError(f"BAFT: unknown prior maps {unknown or list(maps)}; use {', '.join(PRIOR_MAPS)}.")
    size = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    use_bg = "contrast" in maps or "self" in maps
    parts = []  # per level: (query, fg parts, bg parts or None, contrast map)
    for lvl, q in enumerate(query_feats):
        fg_sups, bg_sups = [], []
        for feats, region, background in supports:
            s = feats[lvl].to(q.device, q.dtype)
            grid = tuple(s.shape[-2:])
            w = region_weights(region, grid).to(q.device, q.dtype)
            if float(w.sum()) <= 0:
                raise FsdiffError("BAFT: the support region is empty on the feature grid.")
            fg_sups.append((s, w))
            if background is not None and use_bg:
                wb = region_weights(background, grid).to(q.device, q.dtype)
                if float(wb.sum()) > 0:
                    bg_sups.append((s, wb))
        fg = _pooled_parts(q, fg_sups, pixel_threshold, matmul_dtype)
        bg = _pooled_parts(q, bg_sups, pixel_threshold, matmul_dtype) if bg_sups and use_bg else None
        contrast = None
        if use_bg:
            contrast = contrast_map(torch.stack(fg[1:]), None if bg is None else torch.stack(bg[1:]),
                                    temperature, proto_weight)
        parts.append((q, fg, bg, contrast))
    estimate = None
    if "self" in maps:  # the first estimate: mean contrast of the chosen levels, on the prior grid
        chosen = range(len(parts)) if self_levels is None else sorted(set(int(v) for v in self_levels))
        if any(not 0 <= v < len(parts) for v in chosen):
            raise FsdiffError(f"BAFT: self_levels {list(chosen)} must lie in 0..{len(parts) - 1}.")
        estimate = torch.stack([_resize_map(parts[v][3], size) for v in chosen]).mean(0)
    out = []
    for q, fg, bg, contrast in parts:
        norm = minmax_normalise(torch.stack(fg[1:]), dims=(1, 2))  # per map, per episode
        level = []
        for name in maps:
            if name == "proto":
                level.append(norm[0])
            elif name == "pix":
                level.append(norm[1])
            elif name == "contrast":
                level.append(contrast)
            else:
                est = _resize_map(estimate, tuple(q.shape[-2:]))
                level.append(self_support_map(
                    q, est, (fg[0], fg[2]), None if bg is None else (bg[0], bg[2]), fg_threshold=self_fg_threshold, bg_threshold=self_bg_threshold, mix=self_mix,
                    temperature=temperature, proto_weight=proto_weight, pixel_threshold=pixel_threshold,
                    matmul_dtype=matmul_dtype))
        out.append(_resize_map(torch.stack(level), size))
    return torch.cat(out, 0).clamp_(0.0, 1.0)


def config_prior_kwargs(config) -> dict:
    """The :func:`shot_prior` keyword arguments a DiffUpConfig asks for (maps, contrast T and weight)."""
    dtype = {"float32": None, "bfloat16": torch.bfloat16}[config.prior_matmul_dtype]
    return dict(maps=tuple(config.prior_maps), temperature=float(config.contrast_temperature),
                proto_weight=float(config.contrast_proto_weight), matmul_dtype=dtype,
                self_levels=config.self_levels, self_fg_threshold=float(config.self_fg_threshold),
                self_bg_threshold=float(config.self_bg_threshold), self_mix=float(config.self_mix))


def query_extra(query_feats: Sequence[torch.Tensor], size: int | tuple[int, int]) -> torch.Tensor:
    """UQDD's query info (1, h, w) in [0, 1]: cos of each deepest-level feature to the query's mean feature."""
    size = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    deep = query_feats[-1]
    c = deep.shape[0]
    mean = l2_normalise(deep.reshape(c, -1), 0).mean(dim=1)
    cos = prototype_cosine(deep, mean)
    return _resize_map(minmax_normalise(cos), size)[None].clamp_(0.0, 1.0)


def replicate_text(prior: torch.Tensor, channels: int) -> torch.Tensor:
    """A (h, w) or (1, h, w) text prior replicated to ``channels`` maps (C, h, w)."""
    p = prior.reshape(1, *prior.shape[-2:])
    return p.expand(int(channels), -1, -1).clone()


# ----------------------------------------------------------------------------------------------------
# text prior (CLIP)
# ----------------------------------------------------------------------------------------------------
class TextPrior:
    """A frozen CLIP giving dense image-text cosine maps (the BAFT text prior)."""

    def __init__(self, model: torch.nn.Module, tokenizer, name: str, mean, std, size: int = 448,
                 dense: str = "vv", template: str = TEXT_TEMPLATE) -> None:
        if dense not in ("vv", "value"):
            raise FsdiffError(f"TextPrior: dense must be 'vv' or 'value', got {dense!r}.")
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.tokenizer = tokenizer
        self.name = name
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)
        self.patch = int(model.config.vision_config.patch_size)
        self.size = max(self.patch, int(round(size / self.patch)) * self.patch)
        self.dense = dense
        self.template = template
        self._text_cache: dict[str, torch.Tensor] = {}

    @property
    def device(self) -> torch.device:
        """Device of the CLIP weights."""
        return next(self.model.parameters()).device

    def preprocess(self, image: np.ndarray) -> torch.Tensor:
        """RGB uint8 (H, W, 3) -> normalised (1, 3, S, S) at the CLIP input side."""
        arr = cv2.resize(np.ascontiguousarray(image), (self.size, self.size), interpolation=cv2.INTER_AREA
                         if image.shape[0] * image.shape[1] > self.size**2 else cv2.INTER_LINEAR)
        x = torch.from_numpy(arr).permute(2, 0, 1).unsqueeze(0).float().div_(255.0)
        x = (x - torch.tensor(self.mean).view(1, 3, 1, 1)) / torch.tensor(self.std).view(1, 3, 1, 1)
        return x.to(self.device)

    @torch.inference_mode()
    def text_embedding(self, class_name: str) -> torch.Tensor:
        """The unit-norm CLIP text embedding (D,) of "a photo of a {class_name}" (cached)."""
        if class_name not in self._text_cache:
            tok = self.tokenizer([self.template.format(class_name)], padding=True, return_tensors="pt")
            tok = {k: v.to(self.device) for k, v in tok.items()}
            out = self.model.get_text_features(**tok)
            emb = out if isinstance(out, torch.Tensor) else getattr(out, "pooler_output", out[0])
            self._text_cache[class_name] = l2_normalise(emb[0].float(), 0).cpu()
        return self._text_cache[class_name]

    @torch.inference_mode()
    def dense_features(self, image: np.ndarray) -> torch.Tensor:
        """Unit-norm dense CLIP features (D, S/p, S/p) in the joint space.

        The last vision block's attention is replaced by value-value attention (``dense='vv'``,
        CLIP Surgery) or by the value path alone (``dense='value'``, MaskCLIP); residual and MLP of
        that block are dropped, then the post-layernorm and the visual projection apply per token.
        """
        x = self.preprocess(image)
        vm = self.model.vision_model
        out = vm(pixel_values=x, output_hidden_states=True, interpolate_pos_encoding=True)
        h_in = out.hidden_states[-2]  # input of the last encoder layer
        layer = vm.encoder.layers[-1]
        attn = layer.self_attn
        v = attn.v_proj(layer.layer_norm1(h_in))
        if self.dense == "vv":
            b, n, d = v.shape
            heads = int(getattr(attn, "num_heads", 1))
            vh = v.reshape(b, n, heads, d // heads).transpose(1, 2)
            vh = F.scaled_dot_product_attention(vh, vh, vh)
            v = vh.transpose(1, 2).reshape(b, n, d)
        tokens = attn.out_proj(v)
        feats = self.model.visual_projection(vm.post_layernorm(tokens))[0]  # (N, D)
        g = self.size // self.patch
        grid = feats[feats.shape[0] - g * g:].T.reshape(-1, g, g).float()
        return l2_normalise(grid, 0).cpu()

    def prior_from_features(self, dense: torch.Tensor, class_name: str, size: int | tuple[int, int]) -> torch.Tensor:
        """The (1, h, w) text prior in [0, 1] from :meth:`dense_features` output."""
        size = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
        t = self.text_embedding(class_name).to(dense.dtype)
        cos = torch.einsum("dhw,d->hw", dense.float(), t.float())
        return _resize_map(minmax_normalise(cos), size)[None].clamp_(0.0, 1.0)

    def prior(self, image: np.ndarray, class_name: str, size: int | tuple[int, int]) -> torch.Tensor:
        """The (1, h, w) text prior of ``class_name`` on ``image``."""
        return self.prior_from_features(self.dense_features(image), class_name, size)


CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _clip_stats(src: str, local_only: bool) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) from the checkpoint's preprocessor_config.json (read as JSON), else OpenAI CLIP's."""
    import json

    from transformers.utils import cached_file

    try:
        path = cached_file(src, "preprocessor_config.json", local_files_only=local_only,
                           _raise_exceptions_for_missing_entries=False)
        if path:
            doc = json.loads(Path(path).read_text(encoding="utf-8"))
            if doc.get("image_mean") and doc.get("image_std"):
                return tuple(doc["image_mean"]), tuple(doc["image_std"])
    except (OSError, ValueError):
        pass
    return CLIP_MEAN, CLIP_STD


def load_text_prior(
    name: str | None = DEFAULT_CLIP,
    device: str | torch.device = "cpu",
    download: bool | None = None,
    size: int = 448,
    dense: str = "vv",
    required: bool = False,
) -> TextPrior | None:
    """A :class:`TextPrior` from a CLIP hub id or local directory, or None when it is not available.

    ``download``: None = only if the HF offline variables are unset; False = local cache/directory only.
    ``required=True`` raises an FsdiffError (saying what to download) instead of returning None.
    """
    if name is None:
        return None
    try:
        import transformers
    except ImportError:
        if required:
            raise FsdiffError("the DiffUp text prior needs the transformers package (`pip install transformers`).") from None
        return None
    from fsdiff.features.hub import _download_hint, _quiet_transformers, offline_mode

    src = str(name)
    is_dir = Path(src).expanduser().is_dir()
    allow = (not offline_mode()) if download is None else bool(download)
    attempts = [True] if is_dir or not allow else [True, False]
    last: Exception | None = None
    for local_only in attempts:
        try:
            with _quiet_transformers():
                model = transformers.CLIPModel.from_pretrained(src, local_files_only=local_only)
                tokenizer = transformers.AutoTokenizer.from_pretrained(src, local_files_only=local_only)
                mean, std = _clip_stats(src, local_only)
            return TextPrior(model.to(device), tokenizer, src, mean, std, size=size, dense=dense)
        except (OSError, ValueError, KeyError) as exc:
            last = exc
    if required:
        raise FsdiffError(
            f"the DiffUp text prior cannot load CLIP {src!r} ({str(last).splitlines()[0] if last else 'not found'}); "
            f"{_download_hint(src) if not is_dir else 'check that the directory holds a CLIPModel and its tokenizer'}."
        )
    return None
