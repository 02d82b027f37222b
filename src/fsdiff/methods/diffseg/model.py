"""The DiffSeg network (DiffSeg, Shi et al., ACM MM 2024, §4.1, Eq. (3)-(10), Fig. 2): frozen Kandinsky 2.2
parts (UNet, MoVQ, CLIP image encoder) plus the trainable PAM (pam.py) and SCM (scm.py). Steps the paper does
not specify are marked [R] (fsdiff's reconstruction).

Pipeline for a batch (S = ``input_size``, h = w = S / MoVQ scale factor; 64 for the default 512):

1. masked support ``I_s ⊙ M_s`` (background zeroed, i.e. black, also for CLIP [R]), k shots:
   ``E_m = CLIP_img(·)`` through the prior's ``image_processor`` -> (B, k, D) and ``L_s = MoVQ.enc(·)`` ->
   (B, k, C, h, w); both averaged over k (Eq. 3, 4; §4.1 "fused in an average manner").
2. ``L_q = MoVQ.enc(I_q)`` (Eq. 5). Images enter the MoVQ in [-1, 1]; latents are the pre-quantisation
   ``VQModel.encode(x).latents`` and decoding uses ``decode(·, force_not_quantize=True)``, as the diffusers
   Kandinsky 2.2 pipelines do.
3. ``L_q`` is noised to ``timestep`` (default 100 [R]: the paper gives no timestep) with ONE fixed noise draw
   (``noise_seed``; shape (1, C, h, w), shared by every sample, so a prediction never depends on the batch it is
   in) by the decoder's scheduler ``add_noise``; the frozen UNet runs once with
   ``added_cond_kwargs={"image_embeds": E_m}`` and no classifier-free guidance, inside
   :class:`~fsdiff.diffusion.attention.AttentionCapture` (gradients kept) and the SCM hooks (Eq. 6). The UNet's own
   output is not used: with ``unet_early_exit`` the pass stops after the last block holding a captured attention
   layer.
4. ``M_a = capture.prior(size=prior_size)``: Eq. (11) at the common size (32), upsampled bilinearly to the
   latent grid and min-max normalised (Eq. 7; §4.2).
5. ``L_pre = PAM(M_a, L_s, L_q)`` (Eq. 8); ``I_pre = MoVQ.dec(L_pre)`` (Eq. 9).
6. Read-out [R] (the GT is encoded as a 3-channel image in [-1, 1]): ``mask = mean_c(I_pre) > 0``. Soft map
   for the Segmenter protocol: ``prob = clamp((mean_c(I_pre) + 1) / 2, 0, 1)`` (``prob_readout='linear'``, so
   ``prob > 0.5`` is exactly that mask) or ``sigmoid(k · mean_c(I_pre))``.

Loss (Eq. 10; α, β from §4.1): ``α·MSE(M_a, Y_q↓) + β·MSE(L_pre, MoVQ.enc(2·Y_q − 1 as 3 channels))`` with
α = 2, β = 1; ``Y_q↓`` is the GT area-resized to M_a's grid (ignore pixels, label 255, are left out of the
first term; they count as background in the second).

A training batch is a dict of tensors (see :data:`BATCH_KEYS` and :func:`make_training_batch`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fsdiff.diffusion.attention import AttentionCapture
from fsdiff.diffusion.loading import KandinskyParts, MissingModelError, load_kandinsky
from fsdiff.episode import Episode
from fsdiff.checkpoint import load_module, read_checkpoint, write_checkpoint
from fsdiff.errors import FsdiffError
from fsdiff.io import IGNORE
from fsdiff.methods.diffseg.config import DiffSegConfig
from fsdiff.methods.diffseg.pam import PerceptualAttentionModule, init_pam
from fsdiff.methods.diffseg.scm import SpatialControlModule, init_scm, levels_for_resolutions

PAM_DIR = "pam"
"""Subfolder of a checkpoint holding the PAM (config.json + diffusion_pytorch_model.safetensors)."""
SCM_DIR = "scm"
"""Subfolder of a checkpoint holding the SCM (config.json + diffusion_pytorch_model.safetensors)."""
TRAIN_HINT = ("train one with `fsdiff train diffseg --out DIR ...` (or fsdiff.api.train('diffseg', source, DIR)) and "
              "pass DIR/final")

BATCH_KEYS = {
    "query_image": "(B, 3, S, S) float32 RGB in [0, 1] (required)",
    "support_images": "(B, K, 3, S, S) float32 RGB in [0, 1] (required)",
    "support_masks": "(B, K, 1, S, S) float32 in {0, 1}, 1 = class (required; ignore pixels count as 0)",
    "query_mask": "(B, 1, S, S) float32 in {0, 1} (required by loss())",
    "query_valid": "(B, 1, S, S) float32 in {0, 1}, 0 where the GT is 255 (optional; default all 1)",
    "query_edges": "(B, 1, S, S) float32 HED probabilities of the query in [0, 1] (optional; computed if absent)",
}
"""What a DiffSeg batch holds. The support rows may also have batch 1 (shared by every query row)."""


class _EarlyExit(Exception):
    """Raised by a hook to stop the UNet once every captured attention layer has run."""


@dataclass
class DiffSegOutput:
    """What :meth:`DiffSegModel.forward` returns (fields are None when not computed)."""

    prior: torch.Tensor  # M_a (B, 1, h, w) in [0, 1], float32
    latent: torch.Tensor | None = None  # L_pre (B, C, h, w)
    image: torch.Tensor | None = None  # I_pre (B, 3, S, S), about [-1, 1]
    prob: torch.Tensor | None = None  # soft read-out (B, 1, S, S) in [0, 1]

    @property
    def mask(self) -> torch.Tensor:
        """The paper's binary read-out: mean over the channels of I_pre > 0 (B, 1, S, S) bool."""
        if self.image is None:
            raise FsdiffError("DiffSeg: the mask needs the decoded image; call forward(..., decode=True).")
        return self.image.mean(dim=1, keepdim=True) > 0


# --------------------------------------------------------------------------------------------------------------
# Episodes -> tensors
# --------------------------------------------------------------------------------------------------------------


def image_to_tensor(image: np.ndarray, size: int) -> torch.Tensor:
    """RGB uint8 (H, W, 3) -> (3, size, size) float32 in [0, 1] (area when shrinking, bilinear when enlarging)."""
    h, w = image.shape[:2]
    interp = cv2.INTER_AREA if size < h or size < w else cv2.INTER_LINEAR
    out = cv2.resize(image, (size, size), interpolation=interp) if (h, w) != (size, size) else image
    return torch.from_numpy(np.ascontiguousarray(out)).permute(2, 0, 1).float() / 255.0


def mask_to_tensor(mask: np.ndarray, size: int) -> torch.Tensor:
    """Binary / {0,1} mask (H, W) -> (1, size, size) float32 (nearest neighbour)."""
    m = np.ascontiguousarray(mask.astype(np.uint8))
    if m.shape != (size, size):
        m = cv2.resize(m, (size, size), interpolation=cv2.INTER_NEAREST)
    return torch.from_numpy(m).float().unsqueeze(0)


def support_tensors(episode: Episode, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """An episode's shots -> images (1, K, 3, S, S) and foreground masks (1, K, 1, S, S)."""
    shots = [s for s in episode.shots if s.annotation.kind != "text"]
    if not shots:
        raise FsdiffError(
            f"episode {episode.episode_id or '(unnamed)'}: DiffSeg needs at least one annotated support shot "
            f"(mask, box, scribble or points); got annotation kinds {episode.annotation_kinds() or '(none)'}."
        )
    images = torch.stack([image_to_tensor(s.image, size) for s in shots])
    masks = torch.stack([mask_to_tensor(s.annotation.regions(s.shape)[0], size) for s in shots])
    return images.unsqueeze(0), masks.unsqueeze(0)


def make_training_batch(episodes: Sequence[Episode], input_size: int) -> dict[str, torch.Tensor]:
    """Episodes (with query ground truth) -> a DiffSeg training batch: one row per query (see BATCH_KEYS)."""
    rows: dict[str, list[torch.Tensor]] = {k: [] for k in ("query_image", "support_images", "support_masks",
                                                           "query_mask", "query_valid")}
    k_seen: int | None = None
    for ep in episodes:
        s_img, s_mask = support_tensors(ep, input_size)
        if k_seen is not None and s_img.shape[1] != k_seen:
            raise FsdiffError(f"DiffSeg batch: every episode needs the same number of shots ({k_seen} vs "
                              f"{s_img.shape[1]} in episode {ep.episode_id or '(unnamed)'}).")
        k_seen = s_img.shape[1]
        for q in ep.queries:
            if q.gt is None:
                raise FsdiffError(f"DiffSeg batch: query {q.image_id or '(unnamed)'} has no ground truth to train on.")
            rows["query_image"].append(image_to_tensor(q.image, input_size))
            rows["support_images"].append(s_img[0])
            rows["support_masks"].append(s_mask[0])
            rows["query_mask"].append(mask_to_tensor(q.gt == 1, input_size))
            rows["query_valid"].append(mask_to_tensor(q.gt != IGNORE, input_size))
    if not rows["query_image"]:
        raise FsdiffError("DiffSeg batch: no episodes given.")
    return {k: torch.stack(v) for k, v in rows.items()}


# --------------------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------------------


class DiffSegModel(nn.Module):
    """Frozen Kandinsky 2.2 parts + trainable PAM and SCM (only ``pam`` and ``scm`` are submodules)."""

    def __init__(
        self,
        parts: KandinskyParts,
        config: DiffSegConfig | None = None,
        *,
        pam: PerceptualAttentionModule | None = None,
        scm: SpatialControlModule | None = None,
        edge_detector: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        super().__init__()
        self.config = config or DiffSegConfig()
        self.parts = parts  # not an nn.Module: the frozen parts stay out of state_dict/parameters/train()
        cfg = self.config
        self.scale = int(parts.movq_scale_factor)
        if cfg.input_size % self.scale:
            raise FsdiffError(
                f"DiffSeg: input_size {cfg.input_size} must be a multiple of the MoVQ scale factor {self.scale} "
                f"(e.g. {cfg.input_size // self.scale * self.scale or self.scale})."
            )
        mcfg = parts.movq.config
        self.latent_channels = int(getattr(mcfg, "vq_embed_dim", None) or mcfg.latent_channels)
        if int(parts.unet.config.in_channels) != self.latent_channels:
            raise FsdiffError(
                f"DiffSeg: the MoVQ makes {self.latent_channels}-channel latents but the UNet takes "
                f"{parts.unet.config.in_channels}; use the text-to-image Kandinsky 2.2 decoder."
            )
        levels = levels_for_resolutions(parts.unet, cfg.scm_resolutions)
        self.pam = pam if pam is not None else init_pam(
            cfg.seed, latent_channels=self.latent_channels, prior_channels=1, width=cfg.pam_width,
            num_heads=cfg.pam_heads, use_semantic_attention=cfg.pam_semantic_attention,
            use_prior_attention=cfg.pam_prior_attention, use_self_attention=cfg.pam_self_attention,
            positional_encoding=cfg.pam_positional_encoding, final_activation=cfg.final_activation,
        )
        if scm is None and cfg.use_scm:
            scm = init_scm(
                cfg.seed + 1, block_out_channels=tuple(parts.unet.config.block_out_channels), levels=levels,
                edge_channels=cfg.scm_edge_channels, feature_channels=cfg.scm_feature_channels,
                width=cfg.scm_width, mlp_ratio=cfg.scm_mlp_ratio,
            )
        self.scm = scm if cfg.use_scm else None
        self._check_trainable(self.pam, self.scm)
        self.pam = _to_fp32(self.pam, parts.device)
        if self.scm is not None:
            self.scm = _to_fp32(self.scm, parts.device)
        self._edge_detector = edge_detector
        self._stop_block = self._last_captured_block()  # a module path (str), so no UNet block is registered here
        if cfg.gradient_checkpointing and hasattr(parts.unet, "enable_gradient_checkpointing"):
            parts.unet.enable_gradient_checkpointing()  # only active while gradients are enabled

    # -- helpers ----------------------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        """Device of every part."""
        return self.parts.device

    @property
    def dtype(self) -> torch.dtype:
        """dtype of the frozen parts (PAM and SCM are float32)."""
        return self.parts.dtype

    def latent_size(self, image_size: Sequence[int]) -> tuple[int, int]:
        """Latent grid (h, w) of an image of size (H, W)."""
        return (int(image_size[0]) // self.scale, int(image_size[1]) // self.scale)

    def _check_trainable(self, pam: PerceptualAttentionModule, scm: SpatialControlModule | None) -> None:
        if int(pam.config.latent_channels) != self.latent_channels:
            raise FsdiffError(
                f"DiffSeg: the PAM works on {pam.config.latent_channels}-channel latents but this MoVQ makes "
                f"{self.latent_channels}; the checkpoint belongs to another Kandinsky decoder."
            )
        if scm is not None:
            scm.check_unet(self.parts.unet)

    def _last_captured_block(self) -> str | None:
        """Path of the UNet block (in execution order) holding the last attention layer M_a reads (early exit)."""
        names = {layer.name for layer in self._capture().layers}
        n_down = len(self.parts.unet.down_blocks)
        best, best_rank = None, -1
        for name in names:
            bits = name.split(".")
            if bits[0] == "down_blocks":
                rank, block = int(bits[1]), f"down_blocks.{bits[1]}"
            elif bits[0] == "mid_block":
                rank, block = n_down, "mid_block"
            elif bits[0] == "up_blocks":
                rank, block = n_down + 1 + int(bits[1]), f"up_blocks.{bits[1]}"
            else:
                return None
            if rank > best_rank:
                best, best_rank = block, rank
        return best

    def _capture(self) -> AttentionCapture:
        cfg = self.config
        return AttentionCapture(
            self.parts.unet, resolutions=cfg.attention_resolutions, common_size=cfg.attention_common_size,
            latent_size=int(getattr(self.parts.unet.config, "sample_size", 64) or 64),
        )

    def _check_images(self, x: torch.Tensor, what: str, channels: int, ndim: int) -> None:
        if not isinstance(x, torch.Tensor) or x.ndim != ndim or x.shape[-3] != channels:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            want = "(B, 3, S, S)" if ndim == 4 else "(B, K, {}, S, S)".format(channels)
            raise FsdiffError(f"DiffSeg batch: {what} must be {want}, got {shape}.")
        h, w = x.shape[-2:]
        if h % self.scale or w % self.scale:
            raise FsdiffError(
                f"DiffSeg batch: {what} is {h}x{w}; sides must be multiples of the MoVQ scale factor {self.scale} "
                f"(resize to input_size={self.config.input_size})."
            )

    # -- frozen encoders --------------------------------------------------------------------------------------

    @torch.no_grad()
    def movq_encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images (N, 3, S, S) in [-1, 1] -> MoVQ latents (N, C, h, w), float32 (pre-quantisation)."""
        x = images.to(device=self.device, dtype=self.dtype)
        return self.parts.movq.encode(x).latents.float()

    def movq_decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (N, C, h, w) -> images (N, 3, S, S) in about [-1, 1], float32 (no quantisation)."""
        out = self.parts.movq.decode(latents.to(self.dtype), force_not_quantize=True).sample
        return out.float()

    @torch.no_grad()
    def clip_embed(self, images: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor:
        """Masked images (N, 3, S, S) in [0, 1] -> CLIP image embeddings (N, D) via the prior's image_processor."""
        x = images.float().cpu()
        if masks is not None and self.config.clip_background == "clip_mean":
            mean = torch.tensor(self.parts.image_processor.image_mean, dtype=x.dtype).view(1, 3, 1, 1)
            m = masks.float().cpu()
            x = x * m + (1 - m) * mean
        pixels = self.parts.image_processor(images=list(x.clamp(0, 1)), do_rescale=False,
                                            return_tensors="pt")["pixel_values"]
        out = self.parts.image_encoder(pixel_values=pixels.to(device=self.device, dtype=self.dtype))
        return out.image_embeds.float()

    @torch.no_grad()
    def encode_support(self, support_images: torch.Tensor,
                       support_masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, K, 3, S, S) images and (B, K, 1, S, S) masks -> E_m (B, D) and L_s (B, C, h, w), means over K."""
        self._check_images(support_images, "support_images", 3, 5)
        if support_masks.ndim == 4:
            support_masks = support_masks.unsqueeze(2)
        if support_masks.shape[:2] != support_images.shape[:2] or support_masks.shape[2] != 1 or \
                support_masks.shape[-2:] != support_images.shape[-2:]:
            raise FsdiffError(
                f"DiffSeg batch: support_masks {tuple(support_masks.shape)} do not match support_images "
                f"{tuple(support_images.shape)}; expected (B, K, 1, S, S)."
            )
        b, k = support_images.shape[:2]
        if k < 1:
            raise FsdiffError("DiffSeg batch: at least one support shot is needed.")
        embs, lats = [], []
        for i in range(k):  # one shot index at a time: a shot's encoding never depends on K
            img = support_images[:, i].to(self.device).float()
            mask = (support_masks[:, i].to(self.device).float() > 0.5).float()
            masked = img * mask  # I_s ⊙ M_s: background zeroed (black)
            embs.append(self.clip_embed(masked, mask))
            lats.append(self.movq_encode(masked * 2 - 1))
        return torch.stack(embs).mean(dim=0), torch.stack(lats).mean(dim=0)

    def detect_edges(self, query_image: torch.Tensor) -> torch.Tensor:
        """HED edge probabilities (B, 1, S, S) of query images (B, 3, S, S) in [0, 1]."""
        if self._edge_detector is None:
            from fsdiff.features.hed import HEDDetector

            factory = {"offline": HEDDetector.from_offline, "controlnet10": HEDDetector.from_controlnet10,
                       "annotators": HEDDetector.from_annotators}[self.config.hed_weights]
            self._edge_detector = factory(device=self.device).probabilities
        with torch.no_grad():
            return self._edge_detector(query_image.to(self.device).float() * 255.0).float()

    # -- the pipeline -----------------------------------------------------------------------------------------

    def fixed_noise(self, latent_shape: Sequence[int]) -> torch.Tensor:
        """The fixed noise (1, C, h, w) drawn from ``noise_seed`` (on CPU, so it is identical on every device)."""
        gen = torch.Generator(device="cpu").manual_seed(int(self.config.noise_seed))
        return torch.randn((1, *latent_shape[-3:]), generator=gen).to(self.device)

    def attention_prior(self, query_latent: torch.Tensor, image_embeds: torch.Tensor,
                        query_edges: torch.Tensor | None = None) -> torch.Tensor:
        """M_a (B, 1, h', w') in [0, 1] from L_q, E_m and the query edges (Eq. 6, 7, 11); gradients reach the SCM."""
        cfg = self.config
        unet, sched = self.parts.unet, self.parts.scheduler
        b = query_latent.shape[0]
        h, w = query_latent.shape[-2:]
        t = int(cfg.timestep)
        noise = self.fixed_noise(query_latent.shape).expand_as(query_latent)
        timesteps = torch.full((b,), t, dtype=torch.long, device=self.device)
        noisy = sched.add_noise(query_latent.float(), noise.float(), timesteps)
        if self.scm is not None:
            if query_edges is None:
                raise FsdiffError("DiffSeg: the SCM needs the query's HED edge map (query_edges).")
            control = self.scm.control(unet, query_edges.to(self.device), (h, w))
        else:
            control = nullcontext()
        stop = None
        if cfg.unet_early_exit and self._stop_block is not None:
            def _raise(*_args: Any) -> None:
                raise _EarlyExit

            stop = unet.get_submodule(self._stop_block).register_forward_hook(_raise)
        capture = self._capture()
        try:
            with capture, control:
                unet(sample=noisy.to(self.dtype), timestep=timesteps, encoder_hidden_states=None,
                     added_cond_kwargs={"image_embeds": image_embeds.to(self.device, self.dtype)})
        except _EarlyExit:
            pass
        finally:
            if stop is not None:
                stop.remove()
        size = cfg.prior_size or (h, w)
        return capture.prior(size=size)

    def run(self, query_image: torch.Tensor, image_embeds: torch.Tensor, support_latent: torch.Tensor,
            query_edges: torch.Tensor | None = None, *, decode: bool = True, pam: bool = True) -> DiffSegOutput:
        """The pipeline from encoded supports: query (B, 3, S, S) in [0, 1] -> :class:`DiffSegOutput`."""
        self._check_images(query_image, "query_image", 3, 4)
        b = query_image.shape[0]
        if image_embeds.shape[0] not in (1, b) or support_latent.shape[0] != image_embeds.shape[0]:
            raise FsdiffError(
                f"DiffSeg batch: {image_embeds.shape[0]} support rows for {b} queries; give one per query or one."
            )
        if image_embeds.shape[0] == 1 and b > 1:
            image_embeds = image_embeds.expand(b, -1)
            support_latent = support_latent.expand(b, -1, -1, -1)
        query_latent = self.movq_encode(query_image.to(self.device).float() * 2 - 1)
        if support_latent.shape[-2:] != query_latent.shape[-2:]:
            raise FsdiffError(
                f"DiffSeg batch: support images ({support_latent.shape[-2] * self.scale} px) and query images "
                f"({query_image.shape[-2]} px) must have the same size; resize both to input_size."
            )
        if self.scm is not None and query_edges is None:
            query_edges = self.detect_edges(query_image)
        if query_edges is not None and (query_edges.ndim != 4 or query_edges.shape[0] != b
                                        or query_edges.shape[1] != 1):
            raise FsdiffError(f"DiffSeg batch: query_edges must be (B={b}, 1, S, S), got {tuple(query_edges.shape)}.")
        prior = self.attention_prior(query_latent, image_embeds, query_edges)
        out = DiffSegOutput(prior=prior)
        if not pam:
            return out
        if prior.shape[-2:] != query_latent.shape[-2:]:
            prior_in = F.interpolate(prior, size=query_latent.shape[-2:], mode="bilinear", align_corners=False)
        else:
            prior_in = prior
        out.latent = self.pam(prior_in, support_latent.to(self.device), query_latent)
        if decode:
            out.image = self.movq_decode(out.latent)
            out.prob = self.readout(out.image)
        return out

    def readout(self, image: torch.Tensor) -> torch.Tensor:
        """Soft read-out (B, 1, S, S) in [0, 1] of I_pre: clamp((mean+1)/2) or sigmoid(k·mean) (see config)."""
        mean = image.float().mean(dim=1, keepdim=True)
        if self.config.prob_readout == "sigmoid":
            return torch.sigmoid(self.config.prob_sigmoid_scale * mean)
        return ((mean + 1.0) / 2.0).clamp(0.0, 1.0)

    def forward(self, batch: dict[str, torch.Tensor], *, decode: bool = True, pam: bool = True) -> DiffSegOutput:
        """The full pipeline on a batch (keys: BATCH_KEYS) -> :class:`DiffSegOutput`."""
        for key in ("query_image", "support_images", "support_masks"):
            if key not in batch:
                raise FsdiffError(f"DiffSeg batch: missing {key!r}; a batch holds {', '.join(BATCH_KEYS)}.")
        q = batch["query_image"]
        self._check_images(q, "query_image", 3, 4)
        if batch["support_images"].shape[-2:] != q.shape[-2:]:
            raise FsdiffError(
                f"DiffSeg batch: support images are {tuple(batch['support_images'].shape[-2:])} but the query is "
                f"{tuple(q.shape[-2:])}; resize both to input_size."
            )
        emb, lat = self.encode_support(batch["support_images"], batch["support_masks"])
        return self.run(q, emb, lat, batch.get("query_edges"), decode=decode, pam=pam)

    def loss(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Eq. (10): {'loss': α·MSE(M_a, Y_q) + β·MSE(L_pre, MoVQ.enc(Y_q)), 'loss_prior', 'loss_latent'}."""
        if "query_mask" not in batch:
            raise FsdiffError("DiffSeg loss: the batch has no 'query_mask' (the query ground truth).")
        y = batch["query_mask"].to(self.device).float()
        if y.ndim == 3:
            y = y.unsqueeze(1)
        q = batch["query_image"]
        if y.shape != (q.shape[0], 1, *q.shape[-2:]):
            raise FsdiffError(
                f"DiffSeg loss: query_mask {tuple(y.shape)} must be (B, 1, S, S) matching query_image {tuple(q.shape)}."
            )
        valid = batch.get("query_valid")
        valid = torch.ones_like(y) if valid is None else valid.to(self.device).float().reshape(y.shape)
        out = self.forward(batch, decode=False)
        prior = out.prior
        grid = prior.shape[-2:]
        yv = F.interpolate(y * valid, size=grid, mode="area")
        vv = F.interpolate(valid, size=grid, mode="area")
        target_prior = yv / vv.clamp_min(1e-6)
        loss_prior = (vv * (prior - target_prior) ** 2).sum() / vv.sum().clamp_min(1e-6)
        target_latent = self.movq_encode((y * valid).expand(-1, 3, -1, -1) * 2 - 1)
        loss_latent = F.mse_loss(out.latent, target_latent)
        total = self.config.alpha * loss_prior + self.config.beta * loss_latent
        return {"loss": total, "loss_prior": loss_prior.detach(), "loss_latent": loss_latent.detach()}

    # -- checkpoints ------------------------------------------------------------------------------------------

    def save_trainable(self, directory: str | os.PathLike[str], provenance: dict[str, Any] | None = None) -> Path:
        """Write PAM (``pam/``) and SCM (``scm/``) and the config in fsdiff's checkpoint layout (fsdiff.checkpoint)."""
        modules = {PAM_DIR: self.pam} if self.scm is None else {PAM_DIR: self.pam, SCM_DIR: self.scm}
        return write_checkpoint(directory, "diffseg", modules, self.config.checkpoint_dict(), provenance=provenance)

    def load_trainable(self, directory: str | os.PathLike[str]) -> None:
        """Load PAM and SCM saved by :meth:`save_trainable`, checking they fit the UNet."""
        info = read_checkpoint(directory, "diffseg", hint=TRAIN_HINT)
        pam = load_module(info, PAM_DIR, PerceptualAttentionModule)
        scm = None
        if self.config.use_scm:
            if SCM_DIR not in info.modules:
                raise FsdiffError(
                    f"DiffSeg checkpoint {info.directory}: no {SCM_DIR}/ module but use_scm is on; pass use_scm=False "
                    "for a checkpoint trained without the SCM."
                )
            scm = load_module(info, SCM_DIR, SpatialControlModule)
        self._check_trainable(pam, scm)
        self.pam = _to_fp32(pam, self.device)
        self.scm = _to_fp32(scm, self.device) if scm is not None else None
        self.train(self.training)


def _to_fp32(module: nn.Module, device: torch.device) -> Any:
    """Move a trainable module to ``device`` in float32 (dtype only touched when it differs)."""
    if any(p.dtype != torch.float32 for p in module.parameters()):
        module = nn.Module.to(module, dtype=torch.float32)
    return module.to(device)


def load_parts(config: DiffSegConfig) -> KandinskyParts:
    """Load the frozen Kandinsky 2.2 parts named by ``config`` (MissingModelError says what to download)."""
    try:
        return load_kandinsky(config.prior_model, config.decoder_model, device=config.device, dtype=config.dtype)
    except MissingModelError as exc:
        raise MissingModelError(f"DiffSeg needs the Kandinsky 2.2 prior and decoder.\n{exc}") from exc


def load_diffseg_model(
    config: DiffSegConfig | None = None,
    *,
    checkpoint: str | os.PathLike[str] | None = None,
    parts: KandinskyParts | None = None,
    edge_detector: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> DiffSegModel:
    """Build a :class:`DiffSegModel` (loading Kandinsky unless ``parts`` is given) and optionally its checkpoint."""
    config = config or DiffSegConfig()
    if parts is None:
        parts = load_parts(config)
    model = DiffSegModel(parts, config, edge_detector=edge_detector)
    if checkpoint is not None:
        model.load_trainable(checkpoint)
    return model.eval()


__all__ = [
    "BATCH_KEYS",
    "PAM_DIR",
    "SCM_DIR",
    "DiffSegModel",
    "DiffSegOutput",
    "image_to_tensor",
    "load_diffseg_model",
    "load_parts",
    "make_training_batch",
    "mask_to_tensor",
    "support_tensors",
]
