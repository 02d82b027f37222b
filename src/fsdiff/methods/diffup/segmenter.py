"""The DiffUp segmenter (Chen et al., "No Re-Train, More Gain", arXiv 2407.16182, Fig. 2):
frozen encoder -> BAFT priors per shot -> UAPF fusion -> UQDD sampling from the prior, behind a prior check.

Inference for one episode ([R] = fsdiff's reconstruction where the paper gives no detail):

1. query and supports are encoded once through a :class:`~fsdiff.features.FeatureCache` (square resize to
   the inference input size: ``DiffUpConfig.inference_input_size``, else ``input_size``) by the encoder the
   checkpoint was trained with, or by any other registered encoder with the same number of levels (the
   paper's "backbone upgrade without re-training": BAFT only passes on dimension-free cosines, so nothing
   learned depends on the backbone's channel widths, nor on the input size);
2. **prior check** (``prior_gate``, a fsdiff addition, :mod:`fsdiff.methods.diffup.gate`; mask supports
   only): the training-free prototype method runs on the same features; where its query mask segments
   the support masks back well enough (score >= ``prior_gate``) its probability map is the answer and
   steps 3-5 are skipped for that query. Episodes whose supports are all of a ``prior_only`` type get
   the prior unchecked (the shipped models: scribbles and points, where the decoder lost on the horse
   validation episodes). The shipped decoder, trained on coco-mini's 342 base images, smooths masks into blobs: it gains
   where the prior failed and loses where the prior is good (docs/bench/diffup_vs_prototype.md);
3. one BAFT prior tensor R_k per spatial shot (mask, box, scribble; points use the scribble type) and,
   when a CLIP text model is given, one text prior (type ``text``) per query, plus the 1-channel
   query info (:mod:`fsdiff.methods.diffup.baft`);
4. UAPF fuses the shots into a logit mean μ and variance σ² on the prior grid;
5. UQDD samples the mask with DDIM from x_{t*} = √ᾱ_{t*}(2σ(μ)−1) + √(1−ᾱ_{t*})ε, t* by annotation type
   (the finest present type decides: mask 0.3, scribble 0.5, box 0.6, text 0.8 of T) or adaptive
   (t* = T(1 − î₀) from DQM), with a fixed seed, so the same seed always gives the same map; the
   probability and uncertainty maps (mask resolution) are resized bilinearly to each query's size.

**No evidence** (0 shots and no text model): UAPF's honest output is μ = 0 (p = 0.5) with σ² = its
``empty_variance``; the segmenter does not run the diffusion on it and returns p = 0.5 everywhere with
uncertainty 1.0 everywhere (so ``p > threshold`` is empty at the default threshold 0.5: nothing is
claimed without evidence).

Checkpoints are read by :mod:`fsdiff.methods.diffup.checkpoint`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import dataclasses

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from fsdiff.episode import Episode
from fsdiff.errors import FsdiffError
from fsdiff.features import Encoder, FeatureCache, build_encoder, native_bf16
from fsdiff.methods.diffup.baft import (
    DEFAULT_CLIP,
    TextPrior,
    load_text_prior,
    prior_type,
    query_extra,
    replicate_text,
    config_prior_kwargs,
    pooled_prior,
    shot_prior,
    support_regions,
)
from fsdiff.methods.diffup.checkpoint import check_checkpoint, load_diffup
from fsdiff.methods.diffup.gate import gate_decisions, prior_check
from fsdiff.methods.diffup.schedule import make_generator
from fsdiff.methods.prototype import PrototypeSegmenter


# ----------------------------------------------------------------------------------------------------
# shared preprocessing (training uses the same functions)
# ----------------------------------------------------------------------------------------------------
def rgb_at(image: np.ndarray, size: int) -> np.ndarray:
    """An RGB uint8 image resized to (size, size) (area filter when shrinking), as uint8 (3, size, size)."""
    shrink = image.shape[0] * image.shape[1] > size * size
    interp = cv2.INTER_AREA if shrink else cv2.INTER_LINEAR
    arr = cv2.resize(np.ascontiguousarray(image), (size, size), interpolation=interp)
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def rgb_tensor(rgb: np.ndarray) -> torch.Tensor:
    """uint8 (3, h, w) -> float (3, h, w) in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(rgb)).float().div_(255.0)


@dataclass
class DiffUpPrediction:
    """One query's DiffUp output at the query's resolution: ``prob`` and ``uncertainty`` float32 (H, W) in
    [0, 1], the start step ``t_start`` and the annotation ``types`` that were fused; ``check`` the prior
    check score (None without the check) and ``decoded`` whether the decoder made ``prob`` (False: the
    prior passed the check, ``prob`` is the prototype prior and ``t_start`` is 0)."""

    prob: np.ndarray
    uncertainty: np.ndarray
    t_start: int
    types: tuple[str, ...]
    check: float | None = None
    decoded: bool = True


# ----------------------------------------------------------------------------------------------------
# the segmenter
# ----------------------------------------------------------------------------------------------------
class DiffUpSegmenter:
    """DiffUp: BAFT priors -> UAPF -> UQDD diffusion from the prior (see the module docstring)."""

    name = "diffup"

    def __init__(
        self,
        checkpoint: str | os.PathLike,
        encoder: str | Encoder | None = None,
        steps: int | None = None,
        start: str = "prior",
        adaptive: bool | None = None,
        seed: int = 0,
        threshold: float = 0.5,
        text_model: str | TextPrior | None = None,
        device: str | torch.device = "cpu",
        precision: str | None = "auto",
        cache: FeatureCache | None = None,
        kshot: str = "pooled",
        input_size: int | None = None,
        prior_gate: float | bool | None = None,
        prior_only: Sequence[str] | None = None,
        prior_gate_kshot: float | bool | None = None,
    ) -> None:
        """Load ``checkpoint`` (a directory from :func:`save_diffup` or a training output with ``final/``).

        ``encoder``: None = the checkpoint's encoder; any registered name (or an Encoder) swaps it.
        ``steps``: DDIM steps (default: the config's ``ddim_steps``). ``start``: 'prior' (start at t*) or 'noise'
        (start at T). ``adaptive``: DQM-adaptive t* (default: the config's ``adaptive_start``).
        ``text_model``: a CLIP hub id / directory (or 'auto' = the default CLIP if it is in the local
        cache) for the text prior; None = no text prior.
        ``kshot``: how K > 1 spatial shots enter: "pooled" (default) = one prior pooled over the shots as
        the prototype method pools them (mean prototype, pixel-max over all shots' cells); "uapf" = one
        prior per shot fused by UAPF's precision weighting (the paper's design); "both" = the per-shot
        priors plus the pooled one. On coco-mini fold 0, 5-shot: pooled 24.5 mIoU, uapf 18.7, both 19.8
        (averaging per-shot logits acts like an AND of the shots; docs/BENCHMARKS.md).
        ``precision``: None/"fp32" = float32 everywhere; "bf16" = bfloat16 autocast for the encoder and
        the UAPF/UQDD passes; "auto" = bf16 where the device runs it natively (~1.5x faster sampling on
        an AVX512-BF16 CPU; the coco-mini mIoU difference is in docs/BENCHMARKS.md), else float32.
        ``input_size``: the encoder's input side (default: the config's ``inference_input_size``, else its
        ``input_size``); the priors and the mask scale with it (``// prior_stride``, ``// mask_stride``).
        ``prior_gate``: the prior check threshold in [0, 1] (:mod:`fsdiff.methods.diffup.gate`): a query whose
        prototype prior scores at least this is answered by the prior without the decoder; False turns the
        check off (the paper's behaviour: always decode); None = the config's ``prior_gate``.
        ``prior_gate_kshot``: the same threshold for mask episodes with more than one shot (0 = the prior
        always, without the check); None = the config's, else ``prior_gate``.
        ``prior_only``: annotation types (mask, box, scribble; points count as scribbles) whose episodes the
        prior answers without the decoder; None = the config's ``prior_only``, () = none.
        """
        self.checkpoint = check_checkpoint(checkpoint)
        self.device = torch.device(device)
        self.config, self.uapf, self.uqdd, self.meta = load_diffup(self.checkpoint, self.device)
        cfg = self.config
        if cfg.query_extra_channels not in (0, 1):
            raise FsdiffError(
                f"DiffUp checkpoint {self.checkpoint}: query_extra_channels={cfg.query_extra_channels}, but BAFT "
                "provides exactly one query-info map; re-train with query_extra_channels=1."
            )
        trained_with = self.meta.get("encoder") or ""
        if encoder is None:
            if not trained_with:
                raise FsdiffError(f"DiffUp checkpoint {self.checkpoint} does not name its encoder; pass encoder=NAME.")
            encoder = trained_with
        if kshot not in ("uapf", "pooled", "both"):
            raise FsdiffError(f"kshot must be 'uapf', 'pooled' or 'both', got {kshot!r}.")
        self.kshot = kshot
        if precision not in (None, "fp32", "float32", "bf16", "bfloat16", "auto"):
            raise FsdiffError(f"precision must be one of None, 'fp32', 'bf16', 'auto', got {precision!r}.")
        self.bf16 = precision in ("bf16", "bfloat16") or (precision == "auto" and native_bf16(self.device))
        if isinstance(encoder, str):
            encoder = build_encoder(encoder, device=self.device, precision=precision)
        if not isinstance(encoder, Encoder):
            raise FsdiffError(f"encoder must be an encoder name or an fsdiff Encoder, got {type(encoder).__name__}.")
        if int(encoder.levels) != cfg.prior_levels:
            raise FsdiffError(
                f"encoder {encoder.name} gives {encoder.levels} feature levels but this DiffUp checkpoint needs "
                f"{cfg.prior_levels} (its priors have {cfg.prior_channels} channels = levels x "
                f"{cfg.prior_maps_per_level}); "
                "use an encoder with the same number of levels (every built-in and 'hf:' encoder has 3)."
            )
        self.encoder = encoder
        self.trained_encoder = trained_with
        if start not in ("prior", "noise"):
            raise FsdiffError(f"start must be 'prior' or 'noise', got {start!r}.")
        self.start = start
        self.adaptive = bool(cfg.adaptive_start if adaptive is None else adaptive)
        if self.adaptive and self.uqdd.dqm is None:
            raise FsdiffError("adaptive=True needs DQM, but this checkpoint was trained with use_dqm=False.")
        self.steps = int(cfg.ddim_steps if steps is None else steps)
        if self.steps < 1:
            raise FsdiffError(f"steps must be >= 1, got {steps!r}.")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise FsdiffError(f"seed must be an integer, got {seed!r}.")
        self.seed = int(seed)
        if not 0.0 < float(threshold) < 1.0:
            raise FsdiffError(f"threshold must lie strictly between 0 and 1, got {threshold!r}.")
        self.threshold = float(threshold)
        if isinstance(text_model, str):
            name = DEFAULT_CLIP if text_model == "auto" else text_model
            text_model = load_text_prior(name, device=self.device, download=False if text_model == "auto" else None,
                                         required=text_model != "auto")
        self.text = text_model
        self.cache = cache if cache is not None else FeatureCache()
        size = cfg.inference_input_size if input_size is None else input_size
        size = cfg.input_size if size is None else size
        if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or int(size) < 32:
            raise FsdiffError(f"input_size must be an integer of at least 32 pixels, got {size!r}.")
        self.input_size = int(size)
        gate = cfg.prior_gate if prior_gate is None else prior_gate
        if gate is False:
            gate = None
        if gate is not None and (isinstance(gate, bool) or not isinstance(gate, (int, float, np.floating))
                                 or not 0.0 <= float(gate) <= 1.0):
            raise FsdiffError(f"prior_gate must be a number in [0, 1] or False (no prior check), got {prior_gate!r}.")
        self.prior_gate = None if gate is None else float(gate)
        kgate = cfg.prior_gate_kshot if prior_gate_kshot is None else prior_gate_kshot
        if kgate is None:
            kgate = self.prior_gate
        if kgate is False:
            kgate = None
        if kgate is not None and (isinstance(kgate, bool) or not isinstance(kgate, (int, float, np.floating))
                                  or not 0.0 <= float(kgate) <= 1.0):
            raise FsdiffError(f"prior_gate_kshot must be a number in [0, 1] or False, got {prior_gate_kshot!r}.")
        self.prior_gate_kshot = None if kgate is None else float(kgate)
        only = cfg.prior_only if prior_only is None else prior_only
        kinds = ("mask", "box", "scribble", "points")
        if isinstance(only, str) or any(str(k) not in kinds for k in only):
            raise FsdiffError(f"prior_only must be a list of annotation types out of {', '.join(kinds)}, got {prior_only!r}.")
        self.prior_only = tuple(prior_type(str(k)) for k in only)
        # the training-free prior of the check: the prototype method on the same encoder, size and cache
        self.prior = PrototypeSegmenter(self.encoder, size=self.input_size, temperature=cfg.contrast_temperature,
                                        proto_weight=cfg.contrast_proto_weight, cache=self.cache)

    @property
    def cache(self) -> FeatureCache:
        """The feature cache, shared by the decoder's priors and the prior check."""
        return self._cache

    @cache.setter
    def cache(self, value: FeatureCache) -> None:
        self._cache = value
        if getattr(self, "prior", None) is not None:
            self.prior.cache = value  # one cache: replacing it must not leave the prior check on the old one

    @property
    def prior_size(self) -> int:
        """Side of the BAFT prior maps at the inference input size."""
        return self.input_size // int(self.config.prior_stride)

    @property
    def mask_size(self) -> int:
        """Side of the diffused mask at the inference input size."""
        return self.input_size // int(self.config.mask_stride)

    @property
    def encoder_name(self) -> str:
        """The frozen encoder's name (the checkpoint's, unless another was swapped in)."""
        return self.encoder.name

    # ------------------------------------------------------------------------------------------------
    def _features(self, images: Sequence[np.ndarray]) -> list[list[torch.Tensor]]:
        feats = self.cache.features(self.encoder, list(images), self.input_size)
        return [[t.to(self.device) for t in f] for f in feats]

    def episode_priors(self, episode: Episode) -> list[dict[str, Any]]:
        """Per query: BAFT ``priors`` (K, C, h, w), ``types`` (K names), ``query_extra`` (1, h, w), ``query_rgb``."""
        if not isinstance(episode, Episode):
            raise FsdiffError(f"predict expects an fsdiff Episode, got {type(episode).__name__}.")
        cfg = self.config
        size = self.prior_size
        spatial = [s for s in episode.shots if s.annotation.kind != "text"]
        for s in spatial:
            prior_type(s.annotation.kind)  # rejects unknown kinds with a clear error
        images = [s.image for s in spatial] + [q.image for q in episode.queries]
        feats = self._features(images)
        sup_feats, qry_feats = feats[: len(spatial)], feats[len(spatial):]
        regions = [support_regions(s.annotation, s.shape) for s in spatial]
        pkw = config_prior_kwargs(cfg)
        pool = self.kshot != "uapf" and len(spatial) > 1
        out = []
        with torch.inference_mode():
            for query, qf in zip(episode.queries, qry_feats):
                priors, types = [], []
                if not pool or self.kshot == "both":
                    for s, sf, reg in zip(spatial, sup_feats, regions):
                        priors.append(shot_prior(qf, sf, reg[0], size, background=reg[1], **pkw))
                        types.append(prior_type(s.annotation.kind))
                if pool:  # one prior pooled over all shots, typed as the finest annotation among them
                    sups = [(sf, reg[0], reg[1]) for sf, reg in zip(sup_feats, regions)]
                    priors.append(pooled_prior(qf, sups, size, **pkw))
                    types.append(cfg.finest_type([prior_type(s.annotation.kind) for s in spatial]))
                if self.text is not None:
                    tp = self.text.prior(query.image, episode.class_name, size).to(self.device)
                    priors.append(replicate_text(tp, cfg.prior_channels))
                    types.append("text")
                c = cfg.prior_channels
                stacked = torch.stack(priors) if priors else torch.zeros(0, c, size, size, device=self.device)
                out.append(dict(
                    priors=stacked, types=tuple(types), query_extra=query_extra(qf, size),
                    query_rgb=rgb_tensor(rgb_at(query.image, self.mask_size)).to(self.device),
                ))
        return out

    def prior_decisions(self, episode: Episode) -> list[tuple[np.ndarray, float | None, bool]] | None:
        """Per query: (prototype prior probability, prior check score or None, whether the decoder runs);
        None when the prior plays no part (no check, no ``prior_only`` kind, or no spatial shot).

        Spatial shots all of a ``prior_only`` type: the prior answers, unchecked. All masks with the check
        on (``prior_gate`` for one shot, ``prior_gate_kshot`` for several): the check decides. Anything else (a box among the shots): the decoder runs, since the check
        compares the back-prediction with the support's region, which is the object only for a mask (a prior
        that leaks over a box's background passes it: on the horse validation episodes with boxes it passed
        98 % of the priors and cost 8.3 mIoU against decoding).
        """
        spatial = [prior_type(s.annotation.kind) for s in episode.shots if s.annotation.kind != "text"]
        if not spatial:
            return None
        if set(spatial) <= set(self.prior_only):
            return [(p, None, False) for p in self.prior.predict(episode)]
        gate = self.prior_gate if len(spatial) == 1 else self.prior_gate_kshot
        if gate is None or set(spatial) != {"mask"}:
            return None
        probs = self.prior.predict(episode)
        if gate == 0.0:  # every score passes: the prior answers, no check needed
            return [(p, None, False) for p in probs]
        scores = [prior_check(self.prior, episode, i, p) for i, p in enumerate(probs)]
        return [(p, c, d) for p, c, d in zip(probs, scores, gate_decisions(scores, gate))]

    @torch.inference_mode()
    def predict_with_uncertainty(self, episode: Episode) -> list[DiffUpPrediction]:
        """Probability and uncertainty maps (float32 (H, W) in [0, 1]) for every query of ``episode``."""
        if not isinstance(episode, Episode):
            raise FsdiffError(f"predict expects an fsdiff Episode, got {type(episode).__name__}.")
        decided = self.prior_decisions(episode)
        decode = [d for _, _, d in decided] if decided else [True] * len(episode.queries)
        results: list[DiffUpPrediction | None] = [None] * len(episode.queries)
        if decided:
            types = tuple(prior_type(s.annotation.kind) for s in episode.shots if s.annotation.kind != "text")
            for i, (prob, score, dec) in enumerate(decided):
                if not dec:  # the prior is the answer; its uncertainty is 1 - |2p - 1|
                    p = np.clip(prob, 0.0, 1.0).astype(np.float32)
                    results[i] = DiffUpPrediction(p, (1.0 - np.abs(2.0 * p - 1.0)).astype(np.float32), 0, types,
                                                  check=score, decoded=False)
        todo = [i for i, dec in enumerate(decode) if dec]
        if todo:
            sub = episode if len(todo) == len(episode.queries) else dataclasses.replace(
                episode, queries=tuple(episode.queries[i] for i in todo))
            for i, pred in zip(todo, self._decode(sub)):
                pred.check = decided[i][1] if decided else None
                results[i] = pred
        return [r for r in results if r is not None]

    def _decode(self, episode: Episode) -> list[DiffUpPrediction]:
        """BAFT -> UAPF -> UQDD sampling for every query of ``episode`` (steps 3-5 of the module docstring)."""
        cfg = self.config
        results = []
        for query, item in zip(episode.queries, self.episode_priors(episode)):
            types = item["types"]
            h, w = query.shape
            if not types:  # no evidence: UAPF's honest output, p = 0.5, maximal uncertainty
                results.append(DiffUpPrediction(np.full((h, w), 0.5, np.float32), np.ones((h, w), np.float32),
                                                int(cfg.num_train_timesteps), ()))
                continue
            priors = item["priors"][None]
            ids = torch.tensor([[cfg.type_id(t) for t in types]], device=self.device)
            extra = item["query_extra"][None] if cfg.query_extra_channels else None
            kwargs: dict[str, Any] = {}
            if self.start == "noise":
                kwargs["start"] = "noise"
            elif self.adaptive:
                kwargs["adaptive"] = True
            else:
                kwargs["annotation_types"] = [list(types)]
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                fused = self.uapf(priors, ids, torch.ones_like(ids, dtype=torch.bool))
                sample = self.uqdd.sample(
                    fused.mu.float(), fused.var.float(), item["query_rgb"][None], extra, steps=self.steps,
                    eta=float(cfg.ddim_eta), generator=make_generator(self.seed),
                    size=(self.mask_size, self.mask_size), **kwargs,
                )
            prob = F.interpolate(sample.prob.float(), size=(h, w), mode="bilinear", align_corners=False)[0, 0]
            unc = F.interpolate(sample.uncertainty.float(), size=(h, w), mode="bilinear", align_corners=False)[0, 0]
            results.append(DiffUpPrediction(
                prob.clamp(0, 1).cpu().numpy().astype(np.float32), unc.clamp(0, 1).cpu().numpy().astype(np.float32),
                int(sample.t_start[0]), tuple(types),
            ))
        return results

    def predict(self, episode: Episode) -> list[np.ndarray]:
        """Foreground probability (float32 (H, W) in [0, 1]) for every query, at the query's resolution."""
        return [p.prob for p in self.predict_with_uncertainty(episode)]


def build_diffup(benchmark: Mapping[str, Any] | None = None, **kwargs: Any) -> DiffUpSegmenter:
    """The registry factory: ``DiffUpSegmenter(**kwargs)``; without ``checkpoint`` the shipped one.

    ``benchmark`` (``dataset``, ``fold``, ``convention``) picks the shipped checkpoint that has not seen
    the benchmark's test classes (:func:`fsdiff.methods.diffup.shipped.shipped_checkpoint`); None picks
    the all-classes model.
    """
    if kwargs.get("checkpoint") is None:
        from fsdiff.methods.diffup.shipped import shipped_checkpoint

        b = dict(benchmark or {})
        kwargs["checkpoint"] = shipped_checkpoint(b.get("dataset"), b.get("fold"), b.get("convention", "interleaved"))
    return DiffUpSegmenter(**kwargs)
