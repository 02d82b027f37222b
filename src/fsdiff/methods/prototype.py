"""The training-free ``prototype`` segmenter: frozen multi-level features, masked average pooling
(PANet / PFENet prototypes) and dense pixel-max matching (PFENet prior): the priors of :mod:`fsdiff.priors`,
which fsdiff's DiffUp also builds on (its BAFT block, arXiv 2407.16182 Fig. 3).

For every feature level l (shallow to deep) and query pixel x, with fg/bg prototypes p_fg, p_bg from masked
average pooling over the support regions and pixel-max priors over the support fg/bg cells:

    s_fg(x) = a * cos(f_q(x), p_fg) + (1 - a) * max_{y in fg} cos(f_q(x), f_s(y))
    s_bg(x) = a * cos(f_q(x), p_bg) + (1 - a) * max_{y in bg} cos(f_q(x), f_s(y))
    P_l(x)  = softmax([s_fg, s_bg] / T)_fg = sigmoid((s_fg(x) - s_bg(x)) / T)

and the output is P(x) = mean_l P_l(x) (coarser levels upsampled bilinearly to the finest one), then
upsampled bilinearly to the query's own resolution. Defaults (a = PROTO_WEIGHT, T = TEMPERATURE, LEVELS,
INPUT_SIZE) were chosen on a few Weizmann-horse 1-shot episodes only; see the constants.

K shots: fg/bg prototypes are the mean of the per-shot prototypes (each shot counts equally, whatever its
object size); the pixel-max runs over the union of all shots' cells, i.e. the max over shots.
Each support annotation (mask, box, scribble, points) enters the same way through
``annotation.regions(shape)``; text annotations are skipped (at least one spatial shot is required).
A support without any background cell contributes no bg evidence; when no shot has any, the bg score is
replaced by the query-wide mean of the fg score (pixels more similar than average are foreground).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from fsdiff.episode import Episode
from fsdiff.errors import FsdiffError
from fsdiff.features import Encoder, FeatureCache, build_encoder
from fsdiff.features.base import as_size
from fsdiff.priors import (
    masked_average_pooling,
    pixel_max_cosine,
    prototype_cosine,
    region_weights,
    self_support_map,
)

INPUT_SIZE = 473
"""Square side every image is resized to before encoding: PFENet's and BAM's PASCAL crop size (stride-8 grid
60x60). On 30 Weizmann-horse tuning episodes (lite0, levels 1+2): 320 -> 0.740, 400 -> 0.767, 473 -> 0.787 mIoU."""
LEVELS = (1, 2)
"""Feature levels used (0 = stride 8, 1 = stride 16, 2 = stride 32 for EfficientNet-Lite). Tuning episodes at 473:
(1, 2) 0.787, (0, 1, 2) 0.746, (1,) 0.730, (2,) 0.624, (0, 1) 0.634 — the stride-8 level is too low-level."""
TEMPERATURE = 0.1
"""Softmax temperature T on cosine-score differences (cosines live in [-1, 1]; a 0.1 margin -> 73%). Only
matters through the averaging over levels (a single level thresholds s_fg > s_bg at 0.5 for any T);
T in 0.05..0.2 moved tuning mIoU by <= 0.015."""
PROTO_WEIGHT = 0.5
"""Weight a of the prototype cosine against the pixel-max cosine in each class score. Tuning episodes at 473,
levels (1, 2): a = 0 (pixel-max only) 0.750, 0.5 -> 0.787, 1 (prototype only) 0.761."""
PIXEL_THRESHOLD = 0.5
"""A support cell joins the pixel-max set when its region weight is >= this fraction of the largest."""


def _spatial_shots(episode: Episode) -> list:
    shots = [s for s in episode.shots if s.annotation.kind != "text"]
    if not shots:
        kinds = ", ".join(episode.annotation_kinds()) or "none"
        raise FsdiffError(
            f"episode {episode.episode_id or '(unnamed)'}: the prototype method needs at least one spatial "
            f"support annotation (mask, box, scribble or points), got {episode.k} shot(s) of kind: {kinds}; "
            "add an annotated support image or use a method that accepts text-only episodes."
        )
    return shots


class PrototypeSegmenter:
    """Training-free FSS by prototype + pixel-max cosine matching on frozen multi-level features."""

    name = "prototype"

    def __init__(
        self,
        encoder: str | Encoder = "efficientnet-lite0",
        size: int | Sequence[int] = INPUT_SIZE,
        levels: Sequence[int] | None = LEVELS,
        threshold: float = 0.5,
        temperature: float = TEMPERATURE,
        proto_weight: float = PROTO_WEIGHT,
        pixel_threshold: float = PIXEL_THRESHOLD,
        self_support: bool | str = False,
        device: str | torch.device = "cpu",
        precision: str | None = "auto",
        cache: FeatureCache | None = None,
    ):
        """Build the encoder (by name, or use the given one) and an own feature cache unless one is passed.

        ``self_support=True`` refines the output once with :func:`fsdiff.priors.self_support_map` per level
        (query prototypes from the confident cells of the first output; SSP, ECCV 2022); ``"auto"`` does so
        for one support shot only (where it helped on both base and novel classes, docs/BENCHMARKS.md); off
        by default, so ``prototype`` stays the plain training-free baseline of the benchmarks.

        ``precision`` applies to an encoder built by name: "auto" = bfloat16 autocast where the device runs
        it natively (same horse mIoU as fp32 to 0.001, ~2x faster encoding on an AVX512-BF16 CPU), else fp32.
        """
        if isinstance(encoder, str):
            encoder = build_encoder(encoder, device=device, precision=precision)
        self.encoder = encoder
        if not isinstance(self.encoder, Encoder):
            raise FsdiffError(f"encoder must be an encoder name or an fsdiff Encoder, got {type(encoder).__name__}.")
        self.size = as_size(size, "size")
        lv = tuple(range(self.encoder.levels)) if levels is None else tuple(levels)
        bad = [v for v in lv if not isinstance(v, (int, np.integer)) or not 0 <= v < self.encoder.levels]
        if not lv or bad:
            raise FsdiffError(
                f"levels must be a non-empty list of level indices in 0..{self.encoder.levels - 1} for encoder "
                f"{self.encoder.name}, got {levels!r}."
            )
        self.levels = tuple(sorted(set(int(v) for v in lv)))
        if not 0.0 < float(threshold) < 1.0:
            raise FsdiffError(f"threshold must lie strictly between 0 and 1, got {threshold!r}.")
        if not float(temperature) > 0:
            raise FsdiffError(f"temperature must be > 0, got {temperature!r}.")
        if not 0.0 <= float(proto_weight) <= 1.0:
            raise FsdiffError(f"proto_weight must lie in [0, 1], got {proto_weight!r}.")
        if not 0.0 < float(pixel_threshold) <= 1.0:
            raise FsdiffError(f"pixel_threshold must lie in (0, 1], got {pixel_threshold!r}.")
        self.threshold = float(threshold)
        self.temperature = float(temperature)
        self.proto_weight = float(proto_weight)
        self.pixel_threshold = float(pixel_threshold)
        if isinstance(self_support, (bool, np.bool_)):
            self.self_support: bool | str = bool(self_support)
        elif self_support == "auto":
            self.self_support = "auto"
        else:
            raise FsdiffError(f"self_support must be true, false or 'auto' (one support shot only), got {self_support!r}.")
        self.cache = cache if cache is not None else FeatureCache()

    @property
    def encoder_name(self) -> str:
        """The frozen encoder's name."""
        return self.encoder.name

    @staticmethod
    def _support_level(sup: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> dict:
        """K-shot fusion for one level: mean fg/bg prototypes over the shots that have the region."""
        fg = [masked_average_pooling(f, wf) for f, wf, _ in sup if float(wf.sum()) > 0]
        bg = [masked_average_pooling(f, wb) for f, _, wb in sup if float(wb.sum()) > 0]
        return {
            "fg_proto": torch.stack(fg).mean(0),
            "bg_proto": torch.stack(bg).mean(0) if bg else None,
            "fg_cells": [(f, wf) for f, wf, _ in sup if float(wf.sum()) > 0],
            "bg_cells": [(f, wb) for f, _, wb in sup if float(wb.sum()) > 0],
        }

    def _class_parts(self, q: torch.Tensor, proto: torch.Tensor | None, cells: list) -> tuple | None:
        """(prototype, max over shots of the pixel-max cosine or None when a = 1); None without a prototype."""
        if proto is None:
            return None
        pix = None
        if self.proto_weight < 1:
            pix = torch.stack([pixel_max_cosine(q, f, w, self.pixel_threshold) for f, w in cells]).amax(0)
        return proto, pix

    def _class_score(self, q: torch.Tensor, parts: tuple) -> torch.Tensor:
        """a * cos(f_q, p) + (1 - a) * max over shots of the pixel-max cosine."""
        a = self.proto_weight
        score = a * prototype_cosine(q, parts[0])
        return score if parts[1] is None else score + (1 - a) * parts[1]

    def _level_prob(self, q: torch.Tensor, fg: tuple, bg: tuple | None) -> torch.Tensor:
        """sigmoid((s_fg - s_bg) / T) on one level's query grid (s_bg = mean of s_fg without background)."""
        s_fg = self._class_score(q, fg)
        s_bg = s_fg.mean().expand_as(s_fg) if bg is None else self._class_score(q, bg)
        return torch.sigmoid((s_fg - s_bg) / self.temperature)

    def _mean_over_levels(self, probs: dict, fine: tuple) -> torch.Tensor:
        """Mean over the levels of the per-level probability maps, each upsampled to the ``fine`` grid."""
        acc = None
        for p in probs.values():
            if tuple(p.shape) != fine:
                p = F.interpolate(p[None, None], size=fine, mode="bilinear", align_corners=False)[0, 0]
            acc = p if acc is None else acc + p
        return acc / len(probs)

    def predict(self, episode: Episode) -> list[np.ndarray]:
        """Foreground probability (float32 (H, W) in [0, 1]) for every query, at the query's resolution."""
        if not isinstance(episode, Episode):
            raise FsdiffError(f"predict expects an fsdiff Episode, got {type(episode).__name__}.")
        shots = _spatial_shots(episode)
        images = [s.image for s in shots] + [q.image for q in episode.queries]
        dev = self.encoder.device
        feats = [[t.to(dev) for t in f] for f in self.cache.features(self.encoder, images, self.size)]
        sup_feats, qry_feats = feats[: len(shots)], feats[len(shots):]
        regions = [s.annotation.regions(s.shape) for s in shots]
        with torch.inference_mode():
            support = {}
            for lv in self.levels:
                sup = []
                for sf, (fg, bg) in zip(sup_feats, regions):
                    grid = tuple(sf[lv].shape[-2:])
                    sup.append((sf[lv], region_weights(fg, grid).to(dev), region_weights(bg, grid).to(dev)))
                support[lv] = self._support_level(sup)
            out = []
            for query, qf in zip(episode.queries, qry_feats):
                fine = tuple(qf[self.levels[0]].shape[-2:])
                parts = {lv: (self._class_parts(qf[lv], support[lv]["fg_proto"], support[lv]["fg_cells"]),
                              self._class_parts(qf[lv], support[lv]["bg_proto"], support[lv]["bg_cells"]))
                         for lv in self.levels}
                prob = self._mean_over_levels({lv: self._level_prob(qf[lv], *parts[lv]) for lv in self.levels}, fine)
                if self.self_support is True or (self.self_support == "auto" and len(shots) == 1):  # second pass
                    refined = {}
                    for lv, (fg, bg) in parts.items():
                        grid = tuple(qf[lv].shape[-2:])
                        est = F.interpolate(prob[None, None], size=grid, mode="bilinear", align_corners=False)[0, 0]
                        refined[lv] = self_support_map(qf[lv], est, fg, bg, temperature=self.temperature,
                                                       proto_weight=self.proto_weight,
                                                       pixel_threshold=self.pixel_threshold)
                    prob = self._mean_over_levels(refined, fine)
                prob = F.interpolate(prob[None, None], size=query.shape, mode="bilinear", align_corners=False)[0, 0]
                out.append(prob.clamp_(0.0, 1.0).to(torch.float32).cpu().numpy())
        return out
