"""UAPF: uncertainty-aware prior fusion (DiffUp, arXiv 2407.16182, Fig. 3, UAPF).

Established by the paper: UAPF fuses the backbone-agnostic priors of 0..K shots of mixed annotation
types into two maps, a mean and a variance. Everything below is fsdiff's reconstruction [R]:

* a tiny CNN, shared across shots, maps one shot's prior tensor R_k (B, C, h, w), concatenated with a
  learned annotation-type embedding broadcast over the map, to a prior logit μ_k and a log-variance
  s_k (squashed into [log_var_min, log_var_max] by a scaled sigmoid, 0 at initialisation);
* fusion by precision weighting over the *present* shots,
  ``μ = Σ_k e^{−s_k} μ_k / Σ_k e^{−s_k}`` and ``σ² = 1 / Σ_k e^{−s_k}``, computed stably as a softmax
  over −s_k and ``log σ² = −logsumexp_k(−s_k)``; padding shots (``present = False``) are excluded, so
  one batch can hold episodes with different K;
* **anchor** (``anchor_channels``, a fsdiff choice [R]): μ_k = logit(mean of the shot's contrast maps) +
  the CNN's output, whose last convolution starts at zero, so an untrained UAPF already gives the
  training-free prototype estimate and training learns a correction of it (the text prior, which has no
  contrast maps, is anchored on its own replicated map);
* the text prior is one more "shot" (type ``text``), so K = 0 with text falls out naturally;
* K = 0 *without* text has no evidence at all: the output is μ = 0 (logit, p = 0.5) and
  σ² = ``empty_variance`` (default 1000, above the largest single-shot variance e^{6} ≈ 403), i.e. an
  honest "don't know";
* the heteroscedastic loss on the fused map, per pixel, with s = log σ²:
  ``L = BCE(μ, Y) · e^{−s} + s``, averaged over valid pixels of episodes with at least one shot
  (an empty episode's output is a constant and carries no gradient).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.utils import BaseOutput
from torch import nn

from fsdiff.errors import FsdiffError


def _groups(channels: int) -> int:
    """GroupNorm group count with at least 4 channels per group where possible."""
    g = max(1, min(32, channels // 4))
    while channels % g:
        g -= 1
    return g


class UAPFOutput(BaseOutput):
    """UAPF result: fused logit ``mu``, variance ``var`` and ``log_var`` (B, 1, h, w); per-shot
    ``mu_k``/``s_k`` (B, K, 1, h, w, zero where absent) and ``has_evidence`` (B,) bool."""

    mu: torch.Tensor
    var: torch.Tensor
    log_var: torch.Tensor
    mu_k: torch.Tensor
    s_k: torch.Tensor
    has_evidence: torch.Tensor


def fuse_precision(
    mu_k: torch.Tensor, s_k: torch.Tensor, present: torch.Tensor, empty_variance: float = 1000.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Precision-weighted fusion over present shots: (μ, log σ²), each (B, 1, h, w).

    ``mu_k``/``s_k`` are (B, K, 1, h, w), ``present`` is (B, K) bool. Rows with no present shot get
    μ = 0 and log σ² = log(empty_variance).
    """
    if mu_k.shape != s_k.shape or mu_k.ndim != 5 or present.shape != mu_k.shape[:2]:
        raise FsdiffError(
            f"fuse_precision: need mu_k and s_k of shape (B, K, 1, h, w) and present (B, K); got "
            f"{tuple(mu_k.shape)}, {tuple(s_k.shape)}, {tuple(present.shape)}."
        )
    b, k = present.shape
    h, w = mu_k.shape[-2:]
    empty_lv = torch.full((b, 1, h, w), float(torch.log(torch.tensor(float(empty_variance)))), dtype=mu_k.dtype,
                          device=mu_k.device)
    if k == 0:
        return torch.zeros_like(empty_lv), empty_lv
    pres = present.to(torch.bool).reshape(b, k, 1, 1, 1)
    neg_s = torch.where(pres, -s_k, torch.full_like(s_k, float("-inf")))
    any_pres = present.any(dim=1).reshape(b, 1, 1, 1)
    # Guard the all-absent rows (softmax over all -inf is NaN): give them zeros, then overwrite.
    neg_s_safe = torch.where(any_pres.unsqueeze(1), neg_s, torch.zeros_like(neg_s))
    weights = torch.softmax(neg_s_safe, dim=1)  # e^{-s_k} / Σ e^{-s_j}
    mu = (weights * torch.where(pres, mu_k, torch.zeros_like(mu_k))).sum(dim=1)
    log_var = -torch.logsumexp(neg_s_safe, dim=1)  # log(1 / Σ e^{-s_k})
    mu = torch.where(any_pres, mu, torch.zeros_like(mu))
    log_var = torch.where(any_pres, log_var, empty_lv)
    return mu, log_var


ANCHOR_EPS = 1e-3
"""The anchor probability is clamped to [eps, 1 - eps] before the logit (|logit| <= 6.9)."""


def anchor_logit(maps: torch.Tensor) -> torch.Tensor:
    """logit of the channel mean of (N, C, h, w) probability maps, clamped to [ANCHOR_EPS, 1 - ANCHOR_EPS]."""
    p = maps.mean(dim=1, keepdim=True).clamp(ANCHOR_EPS, 1.0 - ANCHOR_EPS)
    return torch.log(p) - torch.log1p(-p)


def heteroscedastic_loss(
    mu: torch.Tensor,
    log_var: torch.Tensor,
    target: torch.Tensor,
    valid: torch.Tensor | None = None,
    sample_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean over valid pixels of BCE(μ, Y)·e^{−s} + s with s = log σ² (all maps (B, 1, h, w)).

    ``valid`` (B, 1, h, w) masks ignore pixels; ``sample_weight`` (B,) excludes episodes (0 = drop).
    Returns 0 (with a graph) when nothing is valid.
    """
    bce = F.binary_cross_entropy_with_logits(mu, target, reduction="none")
    per_pixel = bce * torch.exp(-log_var) + log_var
    weight = torch.ones_like(per_pixel) if valid is None else valid.to(per_pixel.dtype)
    if sample_weight is not None:
        weight = weight * sample_weight.to(per_pixel.dtype).reshape(-1, 1, 1, 1)
    denom = weight.sum()
    if denom <= 0:
        return (per_pixel * 0).sum()
    return (per_pixel * weight).sum() / denom


class UAPF(ModelMixin, ConfigMixin):
    """Uncertainty-aware prior fusion: per-shot (μ_k, s_k) from a shared CNN, fused by precision."""

    config_name = "config.json"

    @register_to_config
    def __init__(
        self,
        prior_channels: int = 6,
        hidden_channels: int = 32,
        num_types: int = 4,
        type_embed_dim: int = 8,
        log_var_min: float = -6.0,
        log_var_max: float = 6.0,
        empty_variance: float = 1000.0,
        anchor_channels: list[int] | tuple[int, ...] | None = None,
    ) -> None:
        super().__init__()
        anchors = [int(a) for a in (anchor_channels or [])]
        if any(not 0 <= a < prior_channels for a in anchors):
            raise FsdiffError(f"UAPF: anchor channels {anchors} must lie in [0, {prior_channels}).")
        self.anchors = anchors
        if not log_var_min < log_var_max:
            raise FsdiffError(f"UAPF: log_var_min {log_var_min} must be below log_var_max {log_var_max}.")
        self.type_embed = nn.Embedding(num_types, type_embed_dim)
        c_in = prior_channels + type_embed_dim
        self.net = nn.Sequential(
            nn.Conv2d(c_in, hidden_channels, 3, padding=1),
            nn.GroupNorm(_groups(hidden_channels), hidden_channels),
            nn.SiLU(),
            nn.Conv2d(hidden_channels, hidden_channels, 3, padding=1),
            nn.GroupNorm(_groups(hidden_channels), hidden_channels),
            nn.SiLU(),
            nn.Conv2d(hidden_channels, 2, 1),
        )
        if anchors:  # start exactly at the anchor (μ_k = anchor logit, s_k = 0)
            nn.init.zeros_(self.net[-1].weight)
            nn.init.zeros_(self.net[-1].bias)

    def _squash(self, raw: torch.Tensor) -> torch.Tensor:
        """Map a raw log-variance into [log_var_min, log_var_max]; raw = 0 gives s = 0 when 0 is inside."""
        lo, hi = float(self.config.log_var_min), float(self.config.log_var_max)
        offset = math.log(-lo / hi) if lo < 0 < hi else 0.0  # logit((0 - lo) / (hi - lo))
        return lo + (hi - lo) * torch.sigmoid(raw + offset)

    def encode_shot(self, prior: torch.Tensor, type_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-shot (μ_k logit, s_k log-variance), each (N, 1, h, w), from priors (N, C, h, w) and type ids (N,)."""
        n, c, h, w = prior.shape
        if c != self.config.prior_channels:
            raise FsdiffError(f"UAPF expects {self.config.prior_channels} prior channels per shot, got {c}.")
        if type_ids.numel() and (type_ids.min() < 0 or type_ids.max() >= self.config.num_types):
            raise FsdiffError(f"UAPF: annotation type ids must lie in [0, {self.config.num_types}).")
        emb = self.type_embed(type_ids.long()).to(prior.dtype)[:, :, None, None].expand(n, -1, h, w)
        out = self.net(torch.cat([prior, emb], dim=1))
        mu = out[:, :1]
        if self.anchors:
            mu = mu + anchor_logit(prior[:, self.anchors])
        return mu, self._squash(out[:, 1:])

    def forward(
        self, priors: torch.Tensor, type_ids: torch.Tensor, present: torch.Tensor | None = None
    ) -> UAPFOutput:
        """Fuse priors (B, K, C, h, w) with type ids (B, K) over present shots (B, K) bool (default all)."""
        if priors.ndim != 5:
            raise FsdiffError(f"UAPF: priors must be (B, K, C, h, w), got shape {tuple(priors.shape)}.")
        b, k, c, h, w = priors.shape
        if type_ids.shape != (b, k):
            raise FsdiffError(f"UAPF: type ids must be ({b}, {k}), got {tuple(type_ids.shape)}.")
        if present is None:
            present = torch.ones(b, k, dtype=torch.bool, device=priors.device)
        elif present.shape != (b, k):
            raise FsdiffError(f"UAPF: the shot-presence mask must be ({b}, {k}), got {tuple(present.shape)}.")
        present = present.to(torch.bool)
        mu_k = priors.new_zeros(b, k, 1, h, w)
        s_k = priors.new_zeros(b, k, 1, h, w)
        idx = present.reshape(-1).nonzero().squeeze(1)
        if idx.numel():  # run the CNN only on real shots
            m, s = self.encode_shot(priors.reshape(b * k, c, h, w)[idx], type_ids.reshape(-1)[idx])
            mu_k = mu_k.reshape(b * k, 1, h, w).index_copy(0, idx, m).reshape(b, k, 1, h, w)
            s_k = s_k.reshape(b * k, 1, h, w).index_copy(0, idx, s).reshape(b, k, 1, h, w)
        mu, log_var = fuse_precision(mu_k, s_k, present, float(self.config.empty_variance))
        return UAPFOutput(
            mu=mu, var=log_var.exp(), log_var=log_var, mu_k=mu_k, s_k=s_k, has_evidence=present.any(dim=1)
        )

    def loss(self, out: UAPFOutput, target: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """Heteroscedastic loss of a UAPF output against a {0,1} target at the same resolution."""
        return heteroscedastic_loss(out.mu, out.log_var, target, valid, out.has_evidence.float())
