"""DiffUp configuration: every choice as one dataclass field (DiffUp, arXiv 2407.16182,
Fig. 2; all values are fsdiff's reconstructions [R] unless the field's comment says otherwise).

Resolutions: the query is resized to ``input_size`` (default 384, not the usual FSS 473/512, so that CPU
training stays feasible); priors live at stride ``prior_stride`` = 8 (48×48) and the mask diffusion at
stride ``mask_stride`` = 4, i.e. 96×96 (1/4 of the input, 128×128 for a 512 input, which
``input_size=512`` restores). ``inference_input_size`` may differ from the training size: BAFT passes on
only scale-free cosines and the UNet is convolutional, so the priors and the mask simply follow the input.

``prior_gate`` turns on the prior check of :mod:`fsdiff.methods.diffup.gate`: a query whose training-free
prototype prior segments the supports back with an IoU of at least ``prior_gate`` is answered by that
prior, and the decoder runs only on the others (``prior_gate_kshot`` for K > 1 mask shots; 0 = the prior
always); ``prior_only`` names support types whose episodes the prior answers unchecked
(docs/bench/diffup_vs_prototype.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from fsdiff.errors import FsdiffError
from fsdiff.limits import MAX_SIDE, check_side

PRIOR_MAPS: tuple[str, ...] = ("proto", "pix", "contrast", "self")
"""BAFT maps a level can give: fg prototype cosine, fg pixel-max cosine (both min-max normalised per episode),
the fg-vs-bg contrast sigmoid((s_fg - s_bg) / T) (the prototype method's per-level probability) and its
self-support refinement (query prototypes from the confident cells of a first estimate, SSP-style)."""

ANNOTATION_TYPES: tuple[str, ...] = ("mask", "box", "scribble", "text")
"""Annotation types DiffUp knows, in the order of their type ids (UAPF's type embedding)."""

DEFAULT_START_FRACTIONS: dict[str, float] = {"mask": 0.3, "scribble": 0.5, "box": 0.6, "text": 0.8}
"""t*/T per annotation type ([R]; the order text < box < scribble < mask is an assumption)."""


@dataclass
class DiffUpConfig:
    """All DiffUp hyper-parameters with the reconstruction's defaults (see the module docstring)."""

    # --- resolutions -------------------------------------------------------------------------------
    input_size: int = 384  # query/support side fed to the encoders (§4.2: 473; 384 for CPU budgets)
    mask_stride: int = 4  # mask diffusion at input_size / 4 (§4.2: "1/4 resolution")
    prior_stride: int = 8  # BAFT priors at stride 8 (§4.2 "Backbone features")

    # --- BAFT priors (produced elsewhere; only their count matters here) ----------------------------
    prior_levels: int = 3  # feature levels (ResNet layer2/3/4; ViT 1/3, 2/3, last)
    prior_maps: tuple[str, ...] = ("proto", "pix", "contrast")  # per level, in this order (see PRIOR_MAPS)
    contrast_temperature: float = 0.1  # T of the fg-vs-bg contrast map sigmoid((s_fg - s_bg) / T)
    contrast_proto_weight: float = 0.5  # a in s = a * cos(f_q, p) + (1 - a) * pixel-max cos
    prior_matmul_dtype: str = "float32"  # pixel-max similarity matmul: float32 or bfloat16 (~3x faster on CPU)
    self_levels: tuple[int, ...] | None = None  # levels whose mean contrast is the self map's first estimate
    self_fg_threshold: float = 0.7  # query cells above this (first estimate) give the query fg prototype (SSP)
    self_bg_threshold: float = 0.6  # query cells below this give the query bg prototype (SSP)
    self_mix: float = 0.5  # support prototype weight against the query's own (SSP's 0.5)
    annotation_types: tuple[str, ...] = ANNOTATION_TYPES

    # --- UAPF --------------------------------------------------------------------------------------
    uapf_hidden_channels: int = 32  # width of the tiny shared per-shot CNN
    uapf_type_embed_dim: int = 8  # learned annotation-type embedding, broadcast over the map
    uapf_log_var_min: float = -6.0  # per-shot log-variance s_k is squashed into [min, max]
    uapf_log_var_max: float = 6.0
    uapf_empty_variance: float = 1000.0  # σ² when no shot and no text is present (μ = 0 logit, p = 0.5)
    uapf_detach_condition: bool = False  # False: UQDD's loss also trains UAPF through the condition
    uapf_anchor: bool = True  # μ_k = logit(mean of the shot's contrast maps) + CNN residual (zero at init)
    uapf_anchor_levels: tuple[int, ...] | None = None  # levels whose contrast maps form the anchor (None = all)
    uapf_anchor_map: str = "contrast"  # which per-level map the anchor averages: 'contrast' or 'self'

    # --- diffusion ---------------------------------------------------------------------------------
    num_train_timesteps: int = 1000  # T
    beta_schedule: str = "cosine"  # only the cosine (Nichol & Dhariwal) schedule is implemented
    prediction_type: str = "x0"  # x0-prediction (recommended for masks); the only one implemented

    # --- UQDD UNet ---------------------------------------------------------------------------------
    base_channels: int = 64  # §4.2: (64, 128, 256); use 32 on a CPU
    channel_mult: tuple[int, ...] = (1, 2, 4)  # 3 encoder blocks, mirrored by 3 decoder blocks
    layers_per_block: int = 2  # ResBlocks per encoder/decoder block
    mid_attention: bool = True  # self-attention in the middle block
    attention_head_dim: int = 32
    cond_channels: int = 32  # SCM condition-encoder width (all scales)
    query_channels: int = 16  # trainable RGB-query encoding channels (0 = no RGB input, priors only)
    query_extra_channels: int = 1  # backbone-agnostic extra query maps (e.g. a self-affinity summary)
    dqm_channels: int = 32  # DQM head width
    dqm_uses_condition: bool = True  # DQM sees the SCM condition stem as well as x_t and t
    use_scm: bool = True  # ablation switch: FiLM from the condition encoder
    use_dqm: bool = True  # ablation switch: error-map and IoU gates
    self_conditioning: bool = True  # Analog-Bits self-conditioning (x̂0_prev input channel)
    dropout: float = 0.0
    logvar_scale: float = 8.0  # log σ² enters the condition as clamp(log σ², ±scale) / scale
    residual_prior: bool = True  # x̂0 logit = UNet output + μ / 2 (output zero at init: the decoder starts at the prior)

    # --- prior as intermediate ---------------------------------------------------------------------
    start_fractions: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_START_FRACTIONS))
    adaptive_start: bool = False  # t* = T (1 − î0), î0 = DQM's IoU estimate on the prior
    adaptive_min_fraction: float = 0.2
    adaptive_max_fraction: float = 0.9
    adaptive_probe_fraction: float = 0.5  # DQM probes the prior at this t/T (with the start noise)

    # --- sampling ----------------------------------------------------------------------------------
    inference_input_size: int | None = None  # encoder input side at inference (None = input_size; BAFT is scale-free)
    prior_gate: float | None = None  # prior check threshold: return the prototype prior where it passes (None = off)
    prior_gate_kshot: float | None = None  # the same for mask episodes with K > 1 shots (None = prior_gate's)
    prior_only: tuple[str, ...] = ()  # annotation types whose episodes the prototype prior answers, no decoder
    ddim_steps: int = 10
    ddim_eta: float = 0.0
    threshold: float = 0.5
    uncertainty_weights: tuple[float, float, float] = (0.5, 0.25, 0.25)  # (DQM ê, UAPF σ², DDIM variance)

    # --- training ----------------------------------------------------------------------------------
    self_cond_prob: float = 0.5
    prior_start_prob: float = 0.3  # share of x_t built from the prior at the type-matched t*
    loss_bce: float = 1.0
    loss_dice: float = 1.0
    loss_err: float = 1.0
    loss_iou: float = 1.0
    loss_uapf: float = 0.5
    max_shots: int = 5  # K ~ U{0..max_shots}
    train_pooled_prob: float = 0.0  # K > 1: share of episodes with one pooled prior (as kshot='pooled') instead of K
    train_crop_prob: float = 0.0  # share of episodes whose query is a random zoom-in crop (features, GT, RGB)
    train_crop_min: float = 0.6  # smallest crop side, as a fraction of the query's side
    train_shot_types: tuple[str, ...] = ("mask", "box", "scribble")
    text_prob: float = 0.5  # text prior added with this probability, always when K = 0
    scribble_width: int = 5
    lr: float = 1e-4
    weight_decay: float = 1e-2
    epochs_pascal: int = 50
    epochs_coco: int = 20
    batch_size: int = 16

    def __post_init__(self) -> None:
        self.annotation_types = tuple(self.annotation_types)
        self.prior_maps = tuple(str(m) for m in self.prior_maps)
        self.prior_only = tuple(str(m) for m in self.prior_only)
        if self.uapf_anchor_levels is not None:
            self.uapf_anchor_levels = tuple(int(v) for v in self.uapf_anchor_levels)
        if self.self_levels is not None:
            self.self_levels = tuple(int(v) for v in self.self_levels)
        self.channel_mult = tuple(int(c) for c in self.channel_mult)
        self.train_shot_types = tuple(self.train_shot_types)
        self.uncertainty_weights = tuple(float(w) for w in self.uncertainty_weights)  # type: ignore[assignment]
        self.start_fractions = {str(k): float(v) for k, v in dict(self.start_fractions).items()}
        self.validate()

    def validate(self) -> None:
        """Raise an FsdiffError naming the first inconsistent field."""

        def bad(name: str, why: str) -> None:
            raise FsdiffError(f"DiffUpConfig.{name}: {why} (got {getattr(self, name)!r}).")

        check_side(self.input_size, "DiffUpConfig.input_size", MAX_SIDE, minimum=32)
        if self.inference_input_size is not None:
            check_side(self.inference_input_size, "DiffUpConfig.inference_input_size", MAX_SIDE, minimum=32)
        if self.prior_gate is not None and not 0.0 <= float(self.prior_gate) <= 1.0:
            bad("prior_gate", "must lie in [0, 1] (or None for no prior check)")
        if self.prior_gate_kshot is not None and not 0.0 <= float(self.prior_gate_kshot) <= 1.0:
            bad("prior_gate_kshot", "must lie in [0, 1] (or None for prior_gate's value)")
        if any(t not in ("mask", "box", "scribble") for t in self.prior_only):
            bad("prior_only", "need annotation types out of mask, box, scribble")
        for name in ("mask_stride", "prior_stride", "prior_levels", "base_channels",
                     "layers_per_block", "cond_channels", "dqm_channels",
                     "uapf_hidden_channels", "uapf_type_embed_dim", "attention_head_dim", "ddim_steps",
                     "num_train_timesteps"):
            if int(getattr(self, name)) < 1:
                bad(name, "must be a positive integer")
        if self.query_extra_channels < 0:
            bad("query_extra_channels", "must be >= 0")
        if self.query_channels < 0:
            bad("query_channels", "must be >= 0 (0 = no RGB query input)")
        if not self.prior_maps or len(set(self.prior_maps)) != len(self.prior_maps) or any(
                m not in PRIOR_MAPS for m in self.prior_maps):
            bad("prior_maps", f"need distinct names out of {PRIOR_MAPS}")
        if self.uapf_anchor_map not in ("contrast", "self"):
            bad("uapf_anchor_map", "use 'contrast' or 'self'")
        if self.uapf_anchor and self.uapf_anchor_map not in self.prior_maps:
            bad("uapf_anchor", f"the anchor averages the {self.uapf_anchor_map!r} maps, so prior_maps must include it")
        if self.self_levels is not None and (
                not self.self_levels or any(not 0 <= v < self.prior_levels for v in self.self_levels)):
            bad("self_levels", f"need level indices in 0..{self.prior_levels - 1} (or None for all)")
        if not 0.0 <= self.self_bg_threshold <= self.self_fg_threshold <= 1.0:
            bad("self_fg_threshold", "need 0 <= self_bg_threshold <= self_fg_threshold <= 1")
        if self.prior_matmul_dtype not in ("float32", "bfloat16"):
            bad("prior_matmul_dtype", "use 'float32' or 'bfloat16'")
        if self.uapf_anchor_levels is not None and (
                not self.uapf_anchor_levels or any(not 0 <= v < self.prior_levels for v in self.uapf_anchor_levels)):
            bad("uapf_anchor_levels", f"need level indices in 0..{self.prior_levels - 1} (or None for all)")
        if not self.contrast_temperature > 0:
            bad("contrast_temperature", "must be > 0")
        if not 0.0 <= self.contrast_proto_weight <= 1.0:
            bad("contrast_proto_weight", "must lie in [0, 1]")
        if len(self.channel_mult) != 3:
            bad("channel_mult", "DiffUp's UNet has exactly 3 encoder blocks, so give 3 multipliers")
        if self.beta_schedule != "cosine":
            bad("beta_schedule", "only 'cosine' is implemented")
        if self.prediction_type != "x0":
            bad("prediction_type", "only x0-prediction is implemented")
        if not self.uapf_log_var_min < self.uapf_log_var_max:
            bad("uapf_log_var_min", "must be below uapf_log_var_max")
        if self.uapf_empty_variance <= 0:
            bad("uapf_empty_variance", "must be positive")
        if len(set(self.annotation_types)) != len(self.annotation_types):
            bad("annotation_types", "names must be unique")
        for k, v in self.start_fractions.items():
            if k not in self.annotation_types:
                bad("start_fractions", f"type {k!r} is not one of {self.annotation_types}")
            if not 0.0 < v <= 1.0:
                bad("start_fractions", f"fraction for {k!r} must lie in (0, 1]")
        if not 0.0 < self.adaptive_min_fraction <= self.adaptive_max_fraction <= 1.0:
            bad("adaptive_min_fraction", "need 0 < adaptive_min_fraction <= adaptive_max_fraction <= 1")
        if not 0.0 < self.adaptive_probe_fraction <= 1.0:
            bad("adaptive_probe_fraction", "must lie in (0, 1]")
        for name in ("self_cond_prob", "prior_start_prob", "text_prob", "threshold", "self_mix", "train_pooled_prob",
                     "train_crop_prob"):
            if not 0.0 <= float(getattr(self, name)) <= 1.0:
                bad(name, "must lie in [0, 1]")
        if not 0.0 < float(self.train_crop_min) <= 1.0:
            bad("train_crop_min", "must lie in (0, 1]")
        if self.ddim_eta < 0:
            bad("ddim_eta", "must be >= 0")
        if len(self.uncertainty_weights) != 3 or min(self.uncertainty_weights) < 0 or sum(self.uncertainty_weights) <= 0:
            bad("uncertainty_weights", "need three non-negative weights with a positive sum")
        for t in self.train_shot_types:
            if t not in self.annotation_types or t == "text":
                bad("train_shot_types", f"{t!r} is not a spatial annotation type of {self.annotation_types}")
        if self.max_shots < 0:
            bad("max_shots", "must be >= 0")

    # --- derived -----------------------------------------------------------------------------------
    @property
    def mask_size(self) -> int:
        """Side of the diffused mask (input_size / mask_stride)."""
        return self.input_size // self.mask_stride

    @property
    def prior_size(self) -> int:
        """Side of the BAFT prior maps (input_size / prior_stride)."""
        return self.input_size // self.prior_stride

    @property
    def prior_maps_per_level(self) -> int:
        """Maps per feature level (``len(prior_maps)``)."""
        return len(self.prior_maps)

    @property
    def anchor_channels(self) -> list[int]:
        """Indices of the anchor maps in one shot's prior tensor (UAPF's anchor), empty without an anchor."""
        if not self.uapf_anchor:
            return []
        j = self.prior_maps.index(self.uapf_anchor_map)
        levels = range(self.prior_levels) if self.uapf_anchor_levels is None else sorted(set(self.uapf_anchor_levels))
        return [lvl * self.prior_maps_per_level + j for lvl in levels]

    @property
    def prior_channels(self) -> int:
        """Channels of one shot's prior tensor R_k (levels × maps per level)."""
        return self.prior_levels * self.prior_maps_per_level

    def type_id(self, name: str) -> int:
        """The integer id of an annotation type name."""
        try:
            return self.annotation_types.index(name)
        except ValueError:
            raise FsdiffError(
                f"DiffUp does not know the annotation type {name!r}; use one of {self.annotation_types}."
            ) from None

    def finest_type(self, names: Sequence[str]) -> str:
        """The annotation type among ``names`` with the earliest start (the one a pooled prior is typed by)."""
        return min(names, key=lambda k: self.start_fractions.get(k, 1.0))

    def uapf_kwargs(self) -> dict[str, Any]:
        """Constructor arguments of :class:`~fsdiff.methods.diffup.uapf.UAPF`."""
        return dict(
            prior_channels=self.prior_channels,
            hidden_channels=self.uapf_hidden_channels,
            num_types=len(self.annotation_types),
            type_embed_dim=self.uapf_type_embed_dim,
            log_var_min=self.uapf_log_var_min,
            log_var_max=self.uapf_log_var_max,
            empty_variance=self.uapf_empty_variance,
            anchor_channels=self.anchor_channels,
        )

    def uqdd_kwargs(self) -> dict[str, Any]:
        """Constructor arguments of :class:`~fsdiff.methods.diffup.uqdd.UQDD`."""
        return dict(
            base_channels=self.base_channels,
            channel_mult=tuple(self.channel_mult),
            layers_per_block=self.layers_per_block,
            mid_attention=self.mid_attention,
            attention_head_dim=self.attention_head_dim,
            cond_channels=self.cond_channels,
            query_channels=self.query_channels,
            query_extra_channels=self.query_extra_channels,
            dqm_channels=self.dqm_channels,
            dqm_uses_condition=self.dqm_uses_condition,
            use_scm=self.use_scm,
            use_dqm=self.use_dqm,
            self_conditioning=self.self_conditioning,
            dropout=self.dropout,
            logvar_scale=self.logvar_scale,
            residual_prior=self.residual_prior,
            num_train_timesteps=self.num_train_timesteps,
            annotation_types=tuple(self.annotation_types),
            start_fractions=dict(self.start_fractions),
            adaptive_min_fraction=self.adaptive_min_fraction,
            adaptive_max_fraction=self.adaptive_max_fraction,
            adaptive_probe_fraction=self.adaptive_probe_fraction,
            mask_stride=self.mask_stride,
            ddim_steps=self.ddim_steps,
            uncertainty_weights=tuple(self.uncertainty_weights),
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly dict of every field."""
        d = asdict(self)
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = list(v)
        return d
