"""Dimension-free support-query priors, shared by the training-free ``prototype`` segmenter and DiffUp.

They are fsdiff's reconstruction of the priors of DiffUp's BAFT block (arXiv 2407.16182, Fig. 3): the paper
asks for priors that do not depend on the backbone, so every prior here is a similarity (cosine) or a
normalisation of one, and no learned weight ever sees a backbone's channel width.

* :func:`region_weights` — an annotation region (bool / soft map at image resolution) resized to the
  feature grid by area averaging (each feature cell gets the fraction of its pixels inside the region).
* :func:`masked_average_pooling` — MAP, the PANet / PFENet prototype ``p = sum_x w(x) f(x) / sum_x w(x)``.
* :func:`prototype_cosine` — ``P_proto(x) = cos(f_q(x), p)`` (BAFT's prototype prior).
* :func:`pixel_max_cosine` — ``P_pix(x) = max_{y in A} cos(f_q(x), f_s(y))`` (PFENet's training-free prior
  mask, BAFT's pixel prior), chunked over query pixels so memory stays bounded.
* :func:`minmax_normalise` — per-map min-max normalisation to [0, 1] (fsdiff's BAFT priors are each min-max normalised).
* :func:`self_support_map` — the self-support refinement of SSP (Fan et al., "Self-Support Few-Shot Semantic
  Segmentation", ECCV 2022, Sec. 3.2, adapted): query cells a first estimate is confident about give the
  query's own fg / bg prototypes, each mixed with the support's; the fg pixel-max also runs over the
  confident query cells (a fsdiff addition: the query's object matches itself better than the support's).

All functions are pure torch, work on CPU and GPU, and accept an optional leading batch dimension where
noted.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from fsdiff.errors import FsdiffError

EPS = 1e-6
"""Guard against division by zero in normalisations."""
SELF_FG_THRESHOLD = 0.7
"""Query cells whose first estimate exceeds this form the query's own fg prototype (SSP's 0.7)."""
SELF_BG_THRESHOLD = 0.6
"""Query cells whose first estimate is below this form the query's own bg prototype (SSP's 0.6)."""
SELF_MIX = 0.5
"""Weight of the support prototype against the query's own one in the self-support map (SSP's 0.5)."""
DEFAULT_CHUNK_ELEMENTS = 1 << 22
"""Pixel-max works on blocks of at most this many query x support similarities (16 MiB in float32)."""


def _as_tensor(x, device=None, dtype=torch.float32) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    if not isinstance(x, torch.Tensor):
        raise FsdiffError(f"expected a numpy array or torch tensor, got {type(x).__name__}.")
    return x.to(device=device, dtype=dtype)


def region_weights(region, size: tuple[int, int], mode: str = "area") -> torch.Tensor:
    """Resize a (H, W) bool/soft region to a (h, w) float weight map in [0, 1] ("area" or "bilinear")."""
    w = _as_tensor(region)
    if w.ndim != 2:
        raise FsdiffError(f"region must be a 2-D (H, W) map, got shape {tuple(w.shape)}.")
    h, wd = int(size[0]), int(size[1])
    if tuple(w.shape) == (h, wd):
        return w.clamp(0, 1)
    x = w[None, None]
    if mode == "area":
        out = F.interpolate(x, size=(h, wd), mode="area")
    elif mode == "bilinear":
        out = F.interpolate(x, size=(h, wd), mode="bilinear", align_corners=False, antialias=True)
    else:
        raise FsdiffError(f"region resize mode must be 'area' or 'bilinear', got {mode!r}.")
    return out[0, 0].clamp(0, 1)


def masked_average_pooling(feats: torch.Tensor, weights: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """Prototype ``sum_x w(x) f(x) / sum_x w(x)``: feats (C, h, w) or (B, C, h, w), weights (h, w) or (B, h, w)."""
    if feats.ndim == 3:
        if weights.ndim != 2:
            raise FsdiffError(f"weights for (C, h, w) features must be (h, w), got {tuple(weights.shape)}.")
        return masked_average_pooling(feats[None], weights[None], eps)[0]
    if feats.ndim != 4 or weights.ndim != 3 or weights.shape[0] != feats.shape[0]:
        raise FsdiffError(
            f"masked_average_pooling expects feats (B, C, h, w) and weights (B, h, w), got "
            f"{tuple(feats.shape)} and {tuple(weights.shape)}."
        )
    if tuple(weights.shape[-2:]) != tuple(feats.shape[-2:]):
        raise FsdiffError(
            f"weights {tuple(weights.shape[-2:])} do not match the feature grid {tuple(feats.shape[-2:])}; "
            "resize them with region_weights first."
        )
    w = weights.to(feats.dtype)
    num = torch.einsum("bchw,bhw->bc", feats, w)
    return num / (w.sum(dim=(1, 2))[:, None] + eps)


def l2_normalise(x: torch.Tensor, dim: int, eps: float = EPS) -> torch.Tensor:
    """``x / max(||x||, eps)`` along ``dim``."""
    return x / x.norm(dim=dim, keepdim=True).clamp_min(eps)


def prototype_cosine(query: torch.Tensor, proto: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """``P_proto(x) = cos(f_q(x), p)``: query (C, h, w) or (B, C, h, w), proto (C,) or (B, C) -> (h, w) / (B, h, w)."""
    if query.ndim == 3:
        return prototype_cosine(query[None], proto.reshape(1, -1), eps)[0]
    if proto.ndim == 1:
        proto = proto[None].expand(query.shape[0], -1)
    if proto.shape != query.shape[:2]:
        raise FsdiffError(f"prototype {tuple(proto.shape)} does not match query features {tuple(query.shape)}.")
    q = l2_normalise(query, 1, eps)
    p = l2_normalise(proto, 1, eps)
    return torch.einsum("bchw,bc->bhw", q, p)


def pixel_max_cosine(
    query: torch.Tensor,
    support: torch.Tensor,
    region: torch.Tensor,
    threshold: float = 0.5,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    eps: float = EPS,
    matmul_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``P_pix(x) = max_{y in A} cos(f_q(x), f_s(y))``: query (C, h, w), support (C, hs, ws) -> (h, w).

    ``matmul_dtype`` (e.g. ``torch.bfloat16``, ~3x faster on CPUs with bf16 units) runs the similarity
    matmul in that type after normalising in the query's type (cosines then carry ~0.4 % error).

    ``region`` is the (hs, ws) weight map on the support grid; A holds the cells whose weight is at least
    ``threshold`` times the largest weight (for a dense mask: cells at least half inside; a thin scribble
    whose cells are all partly covered still keeps its best-covered cells). An all-zero region gives -1
    everywhere (nothing matches). Work is chunked over query pixels: at most ``chunk_elements``
    similarities exist at a time.
    """
    if query.ndim != 3 or support.ndim != 3 or query.shape[0] != support.shape[0]:
        raise FsdiffError(
            f"pixel_max_cosine expects query (C, h, w) and support (C, hs, ws) with the same C, got "
            f"{tuple(query.shape)} and {tuple(support.shape)}."
        )
    if tuple(region.shape) != tuple(support.shape[1:]):
        raise FsdiffError(f"region {tuple(region.shape)} does not match the support grid {tuple(support.shape[1:])}.")
    c, h, w = query.shape
    r = region.reshape(-1)
    top = float(r.max()) if r.numel() else 0.0
    if top <= 0:
        return query.new_full((h, w), -1.0)
    sel = r >= threshold * top
    s = l2_normalise(support.reshape(c, -1)[:, sel], 0, eps)  # (C, Ns)
    q = l2_normalise(query.reshape(c, -1), 0, eps)  # (C, Nq)
    if matmul_dtype is not None:
        q, s = q.to(matmul_dtype), s.to(matmul_dtype)
    n_s = s.shape[1]
    step = max(1, int(chunk_elements) // max(1, n_s))
    out = torch.empty(h * w, dtype=query.dtype, device=query.device)
    for a in range(0, h * w, step):
        out[a:a + step] = (q[:, a:a + step].T @ s).amax(dim=1).to(out.dtype)
    return out.reshape(h, w)


def minmax_normalise(x: torch.Tensor, dims: tuple[int, ...] | None = None, eps: float = EPS) -> torch.Tensor:
    """``(x - min) / (max - min)`` over ``dims`` (default: all), 0 where the map is constant."""
    if dims is None:
        lo, hi = x.min(), x.max()
    else:
        lo, hi = x.amin(dim=dims, keepdim=True), x.amax(dim=dims, keepdim=True)
    return (x - lo) / (hi - lo).clamp_min(eps)


def self_support_map(
    q: torch.Tensor,
    estimate: torch.Tensor,
    fg: tuple[torch.Tensor, torch.Tensor | None],
    bg: tuple[torch.Tensor, torch.Tensor | None] | None,
    *,
    fg_threshold: float = SELF_FG_THRESHOLD,
    bg_threshold: float = SELF_BG_THRESHOLD,
    mix: float = SELF_MIX,
    temperature: float = 0.1,
    proto_weight: float = 0.5,
    pixel_threshold: float = 0.5,
    matmul_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """The self-support probability (h, w) of one level (SSP, Fan et al. ECCV 2022, adapted; module doc).

    ``q`` (C, h, w) query features, ``estimate`` (h, w) a first foreground probability on the same grid,
    ``fg`` / ``bg`` the support's (prototype (C,), pixel-max cosine map (h, w)) for its foreground /
    background (``bg`` None without background evidence; the pixel-max map may be None when
    ``proto_weight`` is 1). Query cells with estimate > ``fg_threshold`` (at least the best cell) give a
    query fg prototype, cells < ``bg_threshold`` a query bg prototype; each is mixed with the support's
    (``mix`` x support + (1 - mix) x query), the fg pixel-max also runs over the confident query cells,
    and the result is sigmoid((s_fg - s_bg) / T) with s = a * prototype cosine + (1 - a) * pixel-max.
    """
    a = float(proto_weight)
    if a < 1 and (fg[1] is None or (bg is not None and bg[1] is None)):
        raise FsdiffError("self_support_map: proto_weight < 1 needs the support's pixel-max maps.")
    fg_cells = (estimate > float(fg_threshold)).to(q.dtype)
    if float(fg_cells.sum()) <= 0:
        fg_cells = (estimate >= estimate.max()).to(q.dtype)
    proto_fg = float(mix) * fg[0] + (1 - float(mix)) * masked_average_pooling(q, fg_cells)
    s_fg = a * prototype_cosine(q, proto_fg)
    if a < 1:
        own = pixel_max_cosine(q, q, fg_cells, threshold=pixel_threshold, matmul_dtype=matmul_dtype)
        s_fg = s_fg + (1 - a) * torch.maximum(fg[1], own)
    if bg is None:
        s_bg = s_fg.mean().expand_as(s_fg)
    else:
        proto_bg = bg[0]
        bg_cells = (estimate < float(bg_threshold)).to(q.dtype)
        if float(bg_cells.sum()) > 0:
            proto_bg = float(mix) * proto_bg + (1 - float(mix)) * masked_average_pooling(q, bg_cells)
        s_bg = a * prototype_cosine(q, proto_bg)
        if a < 1:
            s_bg = s_bg + (1 - a) * bg[1]
    return torch.sigmoid((s_fg - s_bg) / float(temperature))
