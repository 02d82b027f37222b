"""Attention capture from a diffusers UNet and the DiffSeg attention prior (DiffSeg, Shi et al., ACM MM 2024,
§4.2, Eq. (11); where the paper leaves a choice open, the choice below is fsdiff's and says so).

Capture goes through diffusers *attention processors* (no patched ``forward``), installed only on the chosen
``Attention`` modules; every other layer keeps its own (SDPA) processor. Two processors compute the attention
probabilities explicitly and reproduce the default processors' outputs (to float rounding):

* :class:`AddedKVCaptureProcessor` for Kandinsky 2.2's ``AttnAddedKVProcessor(2_0)`` layers
  (``SimpleCrossAttn*`` blocks). They have ONE softmax over the concatenated keys
  ``[N_tok image-embedding tokens (add_k_proj/add_v_proj), HW spatial tokens (to_k/to_v)]``. Per layer, with P
  averaged over heads: the cross part is ``P[..., :N_tok]`` summed over the tokens (a length-HW vector); the self
  part is ``P[..., N_tok:]`` with every row renormalised to sum 1 (an HW x HW matrix). The paper does not say
  how the self part of this joint softmax is read; renormalising the rows is fsdiff's choice, so that a self
  map is a proper affinity whatever mass the image tokens took.
* :class:`CaptureAttnProcessor` for standard ``AttnProcessor`` / ``AttnProcessor2_0`` layers (Stable Diffusion):
  a self-attention layer (``attn1``) gives an HW x HW self map; a cross-attention layer (``attn2``) gives a
  cross map = P summed over the chosen text tokens (``cross_tokens``; with all tokens it is identically 1).

Fusion (DiffSeg §4.2 "Kandinsky diffusion contains attention maps of 3 different scales ... interpolated to
the same size for fusion", Eq. (11)): ``M_self`` and ``M_cross`` are each the mean over every captured layer
(and UNet call) of the map resized to the common size (default 32x32), and

    M_a = minmax( M_self · vec(M_cross) )          (Eq. 11; min-max per sample)

Note the product of the means is NOT the mean of per-layer products; Eq. (11) is kept exactly.

Resizing a map from an (h, w) grid to the common (H, W) grid, per axis: bilinear (align_corners=False) when
enlarging, area averaging when shrinking, as the matrix R (H x h). A cross map (values) is resized as
``R_h · C · R_wᵀ``. A self map, seen as (h, w, h, w), is resized on both spatial pairs: the query pair with R
(values) and the key pair with the mass-preserving ``K = R / colsum(R)`` (each source pixel's weight spread over
the targets sums to 1), so every resized row still sums to exactly 1 and layers of every resolution weigh the
same in the mean. Both resizes are linear.

Memory is bounded: no collection of HW x HW maps is ever held. What is accumulated, exactly: per captured grid
size (h, w) (i.e. per resolution level), the running SUM over layers and calls of the self maps at the native
size (one (B, hw, hw) buffer per level: 1024² floats = 4 MB per sample for the 32x32 level of a 64x64
latent; 256² and 64² for the 16 and 8 levels) and of the cross vectors (B, hw), plus the counts. Since the
resize is linear, resizing the per-level sums at read-out and dividing by the total count gives exactly the
mean over layers of the resized maps. The sums are float32; read-out (resize, mean, product, min-max) runs
in float64 and holds one (B, HW, HW) map at the common size (8 MB per sample at 32x32), because the min-max of
Eq. (11) divides by the product's dynamic range, which can be small, and would amplify float32 rounding.
Nothing is detached (``detach=False``): DiffSeg trains its SCM through these maps.

Bookkeeping: a forward pre-hook / post-hook pair on the UNet (not a patched forward) reads the latent size (to
know the grid of 3-D token sequences), applies the optional ``timesteps`` filter, and limits recording to the
UNet's own forward pass, so the recomputation of non-reentrant gradient checkpointing (diffusers' default)
does not record twice.
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from fsdiff.errors import FsdiffError

DEFAULT_RESOLUTIONS = (8, 16, 32)
"""Attention grid sides captured by default: the 3 scales of DiffSeg §4.2 (8, 16, 32) for a 64x64 latent."""
DEFAULT_COMMON_SIZE = 32
"""Common fusion size of the maps: the paper does not give it; 32 is fsdiff's choice (a self map at 64 would
hold 4096 x 4096 entries per sample). M_a is upsampled to 64 by the caller if wanted."""

Grid = tuple[int, int]
Recorder = Callable[["AttentionLayer", torch.Tensor, int, Grid, int | None], None]


# --------------------------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AttentionLayer:
    """One diffusers ``Attention`` module of a UNet.

    ``kind``: ``"added_kv"`` (joint image-token + spatial softmax, Kandinsky), ``"self"`` or ``"cross"``
    (standard attention). ``factor``: how many times the latent is downsampled at this layer (1, 2, 4, ...),
    from its position in the UNet (None when the name does not say).
    """

    name: str
    kind: str
    factor: int | None

    def grid(self, latent: Grid) -> Grid | None:
        """The (h, w) token grid of this layer for a latent of size ``latent`` (diffusers downsamples by ceil)."""
        if self.factor is None:
            return None
        return (math.ceil(latent[0] / self.factor), math.ceil(latent[1] / self.factor))


_BLOCK = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.")


def attention_layers(unet: nn.Module) -> list[AttentionLayer]:
    """Every diffusers ``Attention`` module of ``unet`` (or ControlNet), in module order, with kind and level."""
    from diffusers.models.attention_processor import Attention

    n_down = len(getattr(unet, "down_blocks", []))
    n_up = len(getattr(unet, "up_blocks", []))
    out = []
    for name, module in unet.named_modules():
        if not isinstance(module, Attention):
            continue
        if module.added_kv_proj_dim is not None:
            kind = "added_kv"
        else:
            kind = "cross" if module.is_cross_attention else "self"
        factor = None
        m = _BLOCK.match(name)
        if m and m.group(1) == "down_blocks":
            factor = 2 ** int(m.group(2))
        elif m and m.group(1) == "up_blocks" and n_up:
            factor = 2 ** (n_up - 1 - int(m.group(2)))
        elif name.startswith("mid_block.") and n_down:
            factor = 2 ** (n_down - 1)
        out.append(AttentionLayer(name=name, kind=kind, factor=factor))
    return out


# --------------------------------------------------------------------------------------------------------------
# Processors
# --------------------------------------------------------------------------------------------------------------


class AddedKVCaptureProcessor:
    """``AttnAddedKVProcessor`` with explicit probabilities: ONE softmax over [image tokens, spatial tokens].

    Reproduces diffusers' ``AttnAddedKVProcessor`` / ``AttnAddedKVProcessor2_0`` output and hands the
    probabilities ``P`` (B*heads, HW, N_tok + HW) to ``recorder(layer, P, batch, (h, w), N_tok)``.
    """

    def __init__(self, layer: AttentionLayer, recorder: Recorder) -> None:
        self.layer = layer
        self.recorder = recorder

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        residual = hidden_states
        height, width = hidden_states.shape[2], hidden_states.shape[3]
        hidden_states = hidden_states.view(hidden_states.shape[0], hidden_states.shape[1], -1).transpose(1, 2)
        batch_size, sequence_length, _ = hidden_states.shape
        attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.head_to_batch_dim(attn.to_q(hidden_states))
        enc_key = attn.head_to_batch_dim(attn.add_k_proj(encoder_hidden_states))
        enc_value = attn.head_to_batch_dim(attn.add_v_proj(encoder_hidden_states))
        n_tok = enc_key.shape[1]
        if not attn.only_cross_attention:
            key = torch.cat([enc_key, attn.head_to_batch_dim(attn.to_k(hidden_states))], dim=1)
            value = torch.cat([enc_value, attn.head_to_batch_dim(attn.to_v(hidden_states))], dim=1)
        else:
            key, value = enc_key, enc_value

        probs = attn.get_attention_scores(query, key, attention_mask)
        self.recorder(self.layer, probs, batch_size, (height, width), n_tok)
        hidden_states = attn.batch_to_head_dim(torch.bmm(probs, value))
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        hidden_states = hidden_states.transpose(-1, -2).reshape(residual.shape)
        return hidden_states + residual


class CaptureAttnProcessor:
    """``AttnProcessor`` / ``AttnProcessor2_0`` with explicit probabilities (self- or cross-attention).

    Reproduces the default processors' output and hands ``P`` (B*heads, L_q, L_k) to
    ``recorder(layer, P, batch, grid, None)``; ``grid`` is (h, w) for 4-D inputs and (L_q, 0) for token
    sequences (the recorder infers the grid from the latent size).
    """

    def __init__(self, layer: AttentionLayer, recorder: Recorder) -> None:
        self.layer = layer
        self.recorder = recorder

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
            grid: Grid = (height, width)
        else:
            grid = (hidden_states.shape[1], 0)
        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        if attn.norm_q is not None or attn.norm_k is not None:  # as AttnProcessor2_0: per-head q/k norms
            head_dim = key.shape[-1] // attn.heads
            q4 = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
            k4 = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
            if attn.norm_q is not None:
                q4 = attn.norm_q(q4)
            if attn.norm_k is not None:
                k4 = attn.norm_k(k4)
            query = q4.reshape(batch_size * attn.heads, -1, head_dim)
            key = k4.reshape(batch_size * attn.heads, -1, head_dim)
        else:
            query = attn.head_to_batch_dim(query)
            key = attn.head_to_batch_dim(key)
        value = attn.head_to_batch_dim(value)

        probs = attn.get_attention_scores(query, key, attention_mask)
        self.recorder(self.layer, probs, batch_size, grid, None)
        hidden_states = attn.batch_to_head_dim(torch.bmm(probs, value))
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


# --------------------------------------------------------------------------------------------------------------
# Resizing maps between grids
# --------------------------------------------------------------------------------------------------------------


def resize_matrix(n_in: int, n_out: int, device: torch.device | None = None,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """1-D resize operator R (n_out, n_in): bilinear (align_corners=False) when enlarging, area when shrinking."""
    eye = torch.eye(n_in, device=device, dtype=dtype).unsqueeze(1)  # (n_in, 1, n_in): one basis signal per row
    if n_out >= n_in:
        out = F.interpolate(eye, size=n_out, mode="linear", align_corners=False)
    else:
        out = F.interpolate(eye, size=n_out, mode="area")
    return out[:, 0, :].transpose(0, 1).contiguous()


def _mass_matrix(r: torch.Tensor) -> torch.Tensor:
    """Column-normalised R: every source index spreads a total weight of exactly 1 over the targets."""
    return r / r.sum(dim=0, keepdim=True).clamp_min(torch.finfo(r.dtype).tiny)


def resize_cross_map(cross: torch.Tensor, grid: Grid, size: Grid) -> torch.Tensor:
    """Resize cross maps (B, h*w) on grid (h, w) to (B, H*W) on grid ``size`` (values interpolated)."""
    (h, w), (hh, ww) = grid, size
    if (h, w) == (hh, ww):
        return cross
    rh = resize_matrix(h, hh, cross.device, cross.dtype)
    rw = resize_matrix(w, ww, cross.device, cross.dtype)
    out = torch.einsum("Hh,bhw,Ww->bHW", rh, cross.reshape(-1, h, w), rw)
    return out.reshape(cross.shape[0], hh * ww)


def resize_self_map(self_map: torch.Tensor, grid: Grid, size: Grid) -> torch.Tensor:
    """Resize self maps (B, hw, hw) seen as (h, w, h, w) to (B, HW, HW): queries interpolated, keys mass-preserving."""
    (h, w), (hh, ww) = grid, size
    if (h, w) == (hh, ww):
        return self_map
    b = self_map.shape[0]
    rh = resize_matrix(h, hh, self_map.device, self_map.dtype)
    rw = resize_matrix(w, ww, self_map.device, self_map.dtype)
    kh, kw = _mass_matrix(rh), _mass_matrix(rw)
    x = self_map.reshape(b, h, w, h * w)
    x = torch.einsum("Hh,bhwk->bHwk", rh, x)
    x = torch.einsum("Ww,bHwk->bHWk", rw, x).reshape(b, hh * ww, h, w)
    x = torch.einsum("Kh,bqhw->bqKw", kh, x)
    x = torch.einsum("Lw,bqKw->bqKL", kw, x)
    return x.reshape(b, hh * ww, hh * ww)


def minmax(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Min-max normalise each sample of (B, ...) to [0, 1] (a constant map becomes 0)."""
    flat = x.reshape(x.shape[0], -1)
    lo = flat.min(dim=1, keepdim=True).values
    hi = flat.max(dim=1, keepdim=True).values
    return ((flat - lo) / (hi - lo).clamp_min(eps)).reshape(x.shape)


def attention_prior(self_map: torch.Tensor, cross_map: torch.Tensor) -> torch.Tensor:
    """DiffSeg Eq. (11): minmax(M_self · vec(M_cross)); (B, N, N) and (B, 1, H, W) -> (B, 1, H, W)."""
    b, _, hh, ww = cross_map.shape
    prod = torch.bmm(self_map, cross_map.reshape(b, hh * ww, 1)).reshape(b, 1, hh, ww)
    return minmax(prod)


# --------------------------------------------------------------------------------------------------------------
# The capture
# --------------------------------------------------------------------------------------------------------------


def _as_grid(size: int | Sequence[int], what: str) -> Grid:
    if isinstance(size, int) and not isinstance(size, bool):
        grid = (size, size)
    elif isinstance(size, Sequence) and len(size) == 2 and all(isinstance(v, int) for v in size):
        grid = (int(size[0]), int(size[1]))
    else:
        raise FsdiffError(f"{what} must be an int or a pair (H, W) of ints, got {size!r}.")
    if min(grid) < 1:
        raise FsdiffError(f"{what} must be positive, got {size!r}.")
    return grid


class AttentionCapture:
    """Capture Kandinsky / SD attention during UNet calls and fuse it into DiffSeg's prior M_a (Eq. 11).

    Usage::

        with AttentionCapture(unet, resolutions=(8, 16, 32), common_size=32) as cap:
            unet(latents, t, encoder_hidden_states=None, added_cond_kwargs={"image_embeds": emb})
        prior = cap.prior()            # (B, 1, 32, 32) in [0, 1]
        cross, selfm = cap.cross_map(), cap.self_map()

    Args:
        unet: a diffusers ``UNet2DConditionModel`` (Kandinsky 2.2 decoder or Stable Diffusion).
        resolutions: attention grid sides (max(h, w)) to capture, for a latent of ``latent_size``; None = every
            attention layer. Default (8, 16, 32): every attention layer at those sides (the paper only says
            "3 scales"; taking every layer at them is fsdiff's choice).
        common_size: side (or (H, W)) of the fused maps (default 32).
        latent_size: latent side (or (H, W)) the ``resolutions`` refer to; default ``unet.config.sample_size``
            (64 for the Kandinsky 2.2 decoder, i.e. 512-pixel images).
        layers: explicit ``Attention`` module names (``unet.attn_processors`` keys, with or without the
            ``.processor`` suffix) instead of ``resolutions``.
        cfg_half: None (no classifier-free guidance batch), ``"cond"`` (keep the second half of the batch, the
            conditional one in diffusers' [uncond, cond] order) or ``"uncond"`` (the first half).
        cross_tokens: indices of the conditioning tokens summed into the cross map (None = all). For SD pass the
            prompt's word positions: the sum over all text tokens of a pure cross-attention is identically 1.
        timesteps: record only UNet calls whose timestep is in this collection (None = every call).
        detach: detach the recorded maps (inference only; the default keeps gradients flowing).
    """

    def __init__(
        self,
        unet: nn.Module,
        resolutions: Sequence[int] | None = DEFAULT_RESOLUTIONS,
        common_size: int | Sequence[int] = DEFAULT_COMMON_SIZE,
        *,
        latent_size: int | Sequence[int] | None = None,
        layers: Sequence[str] | None = None,
        cfg_half: str | None = None,
        cross_tokens: Sequence[int] | None = None,
        timesteps: Collection[int] | None = None,
        detach: bool = False,
    ) -> None:
        if cfg_half not in (None, "cond", "uncond"):
            raise FsdiffError(f"cfg_half must be None, 'cond' or 'uncond', got {cfg_half!r}.")
        self.unet = unet
        self.common = _as_grid(common_size, "common_size")
        if latent_size is None:
            latent_size = getattr(getattr(unet, "config", None), "sample_size", None) or 64
        self.latent = _as_grid(latent_size, "latent_size")
        self.cfg_half = cfg_half
        self.cross_tokens = None if cross_tokens is None else [int(i) for i in cross_tokens]
        self.timesteps = None if timesteps is None else {round(float(t)) for t in timesteps}
        self.detach = detach
        self.layers = self._select(attention_layers(unet), resolutions, layers)
        self._by_name = dict(unet.named_modules())
        self._originals: dict[str, Any] = {}
        self._hooks: list[Any] = []
        self._in_call = False
        self._call_latent: Grid | None = None
        self.layer_calls: dict[str, int] = {}
        self.reset()

    # -- selection --------------------------------------------------------------------------------------------

    def _select(self, found: list[AttentionLayer], resolutions: Sequence[int] | None,
                names: Sequence[str] | None) -> list[AttentionLayer]:
        if not found:
            raise FsdiffError(f"{type(self.unet).__name__} has no diffusers Attention layers to capture.")
        if names is not None:
            wanted = [n[: -len(".processor")] if n.endswith(".processor") else n for n in names]
            by_name = {layer.name: layer for layer in found}
            missing = [n for n in wanted if n not in by_name]
            if missing:
                raise FsdiffError(
                    f"layers: {missing[:4]} are not Attention layers of this UNet; valid names look like "
                    f"{[layer.name for layer in found[:3]]} (see fsdiff.diffusion.attention_layers(unet))."
                )
            return [by_name[n] for n in wanted]
        if resolutions is None:
            return list(found)
        res = {int(r) for r in resolutions}
        chosen = [layer for layer in found if (g := layer.grid(self.latent)) is not None and max(g) in res]
        if not chosen:
            have = sorted({max(g) for layer in found if (g := layer.grid(self.latent)) is not None})
            raise FsdiffError(
                f"resolutions {sorted(res)}: no attention layer of this UNet runs at those grid sides for a "
                f"{self.latent[0]}x{self.latent[1]} latent; available sides: {have}. Pass other resolutions or "
                "latent_size."
            )
        return chosen

    @property
    def installed(self) -> bool:
        """Whether the capture processors are currently installed."""
        return bool(self._originals)

    # -- install / remove -------------------------------------------------------------------------------------

    def __enter__(self) -> "AttentionCapture":
        self.install()
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def install(self) -> "AttentionCapture":
        """Install the capture processors on the chosen layers (others untouched) and the UNet hooks."""
        if self.installed:
            return self
        for layer in self.layers:
            module = self._by_name[layer.name]
            self._originals[layer.name] = module.processor
            proc_cls = AddedKVCaptureProcessor if layer.kind == "added_kv" else CaptureAttnProcessor
            module.set_processor(proc_cls(layer, self._record))
        self._hooks = [
            self.unet.register_forward_pre_hook(self._pre_hook, with_kwargs=True),
            self.unet.register_forward_hook(self._post_hook, always_call=True),
        ]
        return self

    def remove(self) -> None:
        """Restore the original processors and remove the hooks (the accumulated maps are kept)."""
        for name, proc in self._originals.items():
            self._by_name[name].set_processor(proc)
        self._originals = {}
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        self._in_call = False

    def reset(self) -> None:
        """Forget everything accumulated so far."""
        self._self_sum: dict[Grid, torch.Tensor] = {}
        self._self_n: dict[Grid, int] = {}
        self._cross_sum: dict[Grid, torch.Tensor] = {}
        self._cross_n: dict[Grid, int] = {}
        self._batch: int | None = None
        self.layer_calls = {}

    # -- hooks ------------------------------------------------------------------------------------------------

    def _pre_hook(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        sample = kwargs.get("sample", args[0] if args else None)
        timestep = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        self._call_latent = tuple(sample.shape[-2:]) if isinstance(sample, torch.Tensor) else None
        active = True
        if self.timesteps is not None and timestep is not None:
            values = torch.as_tensor(timestep).detach().flatten().tolist()
            active = all(round(float(v)) in self.timesteps for v in values)
        self._in_call = active

    def _post_hook(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        self._in_call = False

    # -- recording --------------------------------------------------------------------------------------------

    def _grid_of(self, layer: AttentionLayer, grid: Grid) -> Grid:
        if grid[1] > 0:
            return grid
        length = grid[0]
        latent = self._call_latent or self.latent
        g = layer.grid(latent)
        if g is not None and g[0] * g[1] == length:
            return g
        for k in range(0, 8):  # any power-of-two level of the latent
            f = 2**k
            g = (math.ceil(latent[0] / f), math.ceil(latent[1] / f))
            if g[0] * g[1] == length:
                return g
        side = math.isqrt(length)
        if side * side == length:
            return (side, side)
        raise FsdiffError(f"{layer.name}: cannot tell the grid of {length} tokens for a {latent} latent.")

    def _halve(self, x: torch.Tensor, batch: int) -> torch.Tensor:
        if self.cfg_half is None:
            return x
        if batch % 2:
            raise FsdiffError(
                f"cfg_half={self.cfg_half!r} needs an even UNet batch ([uncond, cond]); got batch {batch}."
            )
        half = batch // 2
        return x[half:] if self.cfg_half == "cond" else x[:half]

    def _record(self, layer: AttentionLayer, probs: torch.Tensor, batch: int, grid: Grid, n_tok: int | None) -> None:
        """Reduce one layer's probabilities (B*heads, HW, keys) to cross/self maps and add them to the sums."""
        if not self._in_call:
            return
        grid = self._grid_of(layer, grid)
        heads = probs.shape[0] // batch
        p = probs.reshape(batch, heads, probs.shape[1], probs.shape[2])
        p = self._halve(p, batch)
        if self.detach:
            p = p.detach()
        p = p.mean(dim=1, dtype=torch.float32)  # (b, HW, keys), averaged over heads, in float32
        cross = selfm = None
        if layer.kind == "added_kv":
            assert n_tok is not None
            cross = self._token_sum(p[..., :n_tok], layer)
            if p.shape[-1] > n_tok:
                selfm = p[..., n_tok:]
                selfm = selfm / selfm.sum(dim=-1, keepdim=True).clamp_min(1e-12)
        elif layer.kind == "cross":
            cross = self._token_sum(p, layer)
        else:
            selfm = p
        b = p.shape[0]
        if self._batch is None:
            self._batch = b
        elif self._batch != b:
            raise FsdiffError(
                f"attention capture: batch changed from {self._batch} to {b} between UNet calls; call reset() "
                "before running a different batch."
            )
        if cross is not None:
            self._cross_sum[grid] = self._cross_sum[grid] + cross if grid in self._cross_sum else cross
            self._cross_n[grid] = self._cross_n.get(grid, 0) + 1
        if selfm is not None:
            self._self_sum[grid] = self._self_sum[grid] + selfm if grid in self._self_sum else selfm
            self._self_n[grid] = self._self_n.get(grid, 0) + 1
        self.layer_calls[layer.name] = self.layer_calls.get(layer.name, 0) + 1

    def _token_sum(self, p: torch.Tensor, layer: AttentionLayer) -> torch.Tensor:
        if self.cross_tokens is None:
            return p.sum(dim=-1)
        bad = [i for i in self.cross_tokens if not -p.shape[-1] <= i < p.shape[-1]]
        if bad:
            raise FsdiffError(f"cross_tokens {bad} out of range for {layer.name}, which has {p.shape[-1]} tokens.")
        return p[..., self.cross_tokens].sum(dim=-1)

    # -- read-out ---------------------------------------------------------------------------------------------

    @property
    def levels(self) -> dict[Grid, tuple[int, int]]:
        """Captured grids -> (number of self maps, number of cross maps) accumulated."""
        grids = set(self._self_n) | set(self._cross_n)
        return {g: (self._self_n.get(g, 0), self._cross_n.get(g, 0)) for g in sorted(grids)}

    @property
    def accumulated_bytes(self) -> int:
        """Bytes held by the running sums (bounded: one buffer per captured level, whatever the number of calls)."""
        bufs = list(self._self_sum.values()) + list(self._cross_sum.values())
        return sum(t.numel() * t.element_size() for t in bufs)

    def _pick(self, counts: dict[Grid, int], resolutions: Sequence[int] | None, what: str) -> list[Grid]:
        grids = [g for g in counts if resolutions is None or max(g) in {int(r) for r in resolutions}]
        if not grids:
            raise FsdiffError(
                f"no {what} attention maps were captured"
                + (f" at resolutions {list(resolutions)}" if resolutions is not None else "")
                + f" (captured levels: {self.levels}; layers: {[layer.name for layer in self.layers][:6]}...). "
                "Run the UNet inside the `with AttentionCapture(...)` block, and check resolutions/timesteps."
            )
        return grids

    def _mean_cross64(self, resolutions: Sequence[int] | None) -> torch.Tensor:
        grids = self._pick(self._cross_n, resolutions, "cross")
        acc = sum(resize_cross_map(self._cross_sum[g].double(), g, self.common) for g in grids)
        return (acc / sum(self._cross_n[g] for g in grids)).reshape(-1, 1, *self.common)

    def _mean_self64(self, resolutions: Sequence[int] | None) -> torch.Tensor:
        grids = self._pick(self._self_n, resolutions, "self")
        acc = sum(resize_self_map(self._self_sum[g].double(), g, self.common) for g in grids)
        return acc / sum(self._self_n[g] for g in grids)

    def cross_map(self, resolutions: Sequence[int] | None = None) -> torch.Tensor:
        """M_cross: mean over captured layers of the cross maps at the common size, (B, 1, H, W), float32."""
        return self._mean_cross64(resolutions).float()

    def self_map(self, resolutions: Sequence[int] | None = None) -> torch.Tensor:
        """M_self: mean over captured layers of the self maps at the common size, (B, H*W, H*W), rows sum to 1."""
        return self._mean_self64(resolutions).float()

    def prior(self, resolutions: Sequence[int] | None = None, size: int | Sequence[int] | None = None) -> torch.Tensor:
        """M_a = minmax(M_self · vec(M_cross)) (Eq. 11): (B, 1, H, W) in [0, 1], optionally resized to ``size``."""
        out = attention_prior(self._mean_self64(resolutions), self._mean_cross64(resolutions)).float()
        if size is not None:  # upsample, then min-max again so the map spans exactly [0, 1] at the new size
            out = minmax(F.interpolate(out, size=_as_grid(size, "size"), mode="bilinear", align_corners=False))
        return out
