"""Spatial Control Module (DiffSeg §4.4, Eq. (6) ``A_m = Diff(L_q | E_m, SCM(I_l))``, Fig. 4). The edge map
is the query's, as §4.4 and the abstract describe (§4.1 says the support's); [P] the paper, [R] fsdiff's choice.

Structure (sizes [R]):

* edge encoder: the HED map of the query (B, 1, S, S) in [0, 1] -> four 3x3 conv + ReLU layers, the last three
  with stride 2, channels 16 -> 32 -> 96 -> C_e (default 256): (B, C_e, S/8, S/8), the latent grid (resized to
  it when the MoVQ factor is not 8).
* for every controlled UNet level l (default the 32/16/8 levels of a 64x64 latent, i.e. l = 1, 2, 3):
    1. F_l = the last skip tensor (``res_samples`` entry) that ``unet.down_blocks[l]`` emits at level l's own
       resolution (its last resnet/attention output before downsampling);
    2. input adapter: Conv1x1(C_l -> C_f), then bilinear resize to the latent grid;
    3. concatenate with the edge features -> tokens (B, h*w, C_f + C_e);
    4. SHARED core [P: parameters shared across levels]: Linear -> x; x <- x + MLP(LayerNorm(x)); Linear;
    5. area-resize back to level l's resolution; output adapter Conv1x1(d -> C_l), ZERO-initialised
       (ControlNet style [R]), giving the residual r_l.
  The widths C_l are read from the UNet's ``config.block_out_channels`` (stored in this module's config, and
  checked against the UNet when attaching).

Where the residual is added (exactly): a forward hook on ``unet.down_blocks[l]`` (``register_forward_hook``;
no patched ``forward``) replaces the block's output ``(hidden_states, res_samples)`` by
``(hidden_states, res_samples')`` where every ``res_samples`` entry whose spatial size equals level l's resolution
gets ``+ r_l`` (the entry produced by the block's downsampler, if any, is left alone). Those are the skip
connections that ``UNet2DConditionModel.forward`` later pops and concatenates onto the up-path hidden states of the
same level (``up_blocks[n-1-l]``), i.e. the very tensors diffusers adds ControlNet's
``down_block_additional_residuals`` to. The down-path ``hidden_states`` that flow on to the next down block and the
mid block are NOT modified, so only up-path attention maps of controlled levels are steered (hence the prior uses
the up-block maps too). With the zero-initialised output adapters r_l == 0 exactly, so an untrained SCM leaves
every UNet output bit-identical.

The SCM runs in its own dtype (float32); UNet features are cast in and residuals cast back to the UNet dtype.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from fsdiff.errors import FsdiffError

KANDINSKY_BLOCK_OUT_CHANNELS = (384, 768, 1152, 1536)
"""block_out_channels of the public Kandinsky 2.2 decoder UNet (only a default; always read from the UNet)."""


def levels_for_resolutions(unet: Any, resolutions: Sequence[int]) -> tuple[int, ...]:
    """UNet level indices of grid sides given at the UNet's ``config.sample_size`` latent (64 -> 32 is level 1)."""
    ref = int(getattr(unet.config, "sample_size", 64) or 64)
    n = len(unet.config.block_out_channels)
    out = []
    for side in resolutions:
        ratio = ref / int(side)
        level = int(round(math.log2(ratio))) if ratio >= 1 else -1
        if level < 0 or 2**level * int(side) != ref or level >= n:
            have = [ref // 2**i for i in range(n)]
            raise FsdiffError(
                f"SCM: resolution {side} is not a level of this UNet (sample_size {ref}, {n} levels: sides {have})."
            )
        out.append(level)
    return tuple(sorted(set(out)))


class SpatialControlModule(ModelMixin, ConfigMixin):
    """DiffSeg's SCM: shared core + per-level 1x1 adapters, attached to a UNet with :meth:`control`."""

    config_name = "config.json"

    @register_to_config
    def __init__(
        self,
        block_out_channels: Sequence[int] = KANDINSKY_BLOCK_OUT_CHANNELS,
        levels: Sequence[int] = (1, 2, 3),
        edge_channels: Sequence[int] = (16, 32, 96, 256),
        feature_channels: int = 256,
        width: int = 256,
        mlp_ratio: int = 4,
        norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        chans = [int(c) for c in block_out_channels]
        lv = sorted({int(v) for v in levels})
        if not lv or min(lv) < 0 or max(lv) >= len(chans):
            raise FsdiffError(f"SCM: levels {list(levels)} must be indices into block_out_channels {chans}.")
        edge = [int(c) for c in edge_channels]
        if len(edge) != 4:
            raise FsdiffError(f"SCM: edge_channels needs four widths, got {edge}.")
        layers: list[nn.Module] = []
        cin = 1
        for i, cout in enumerate(edge):
            layers += [nn.Conv2d(cin, cout, 3, stride=1 if i == 0 else 2, padding=1), nn.ReLU()]
            cin = cout
        self.edge_encoder = nn.Sequential(*layers)
        self.in_adapters = nn.ModuleDict({str(i): nn.Conv2d(chans[i], feature_channels, 1) for i in lv})
        self.proj_in = nn.Linear(feature_channels + edge[-1], width)
        self.norm = nn.LayerNorm(width, eps=norm_eps)
        self.mlp = nn.Sequential(nn.Linear(width, mlp_ratio * width), nn.GELU(), nn.Linear(mlp_ratio * width, width))
        self.proj_out = nn.Linear(width, width)
        self.out_adapters = nn.ModuleDict({str(i): nn.Conv2d(width, chans[i], 1) for i in lv})
        for conv in self.out_adapters.values():
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)

    # -- pieces -----------------------------------------------------------------------------------------------

    @property
    def levels(self) -> tuple[int, ...]:
        """Controlled UNet level indices."""
        return tuple(sorted(int(k) for k in self.in_adapters))

    @property
    def param_dtype(self) -> torch.dtype:
        """dtype of the parameters."""
        return self.proj_in.weight.dtype

    def encode_edges(self, edges: torch.Tensor, latent_size: Sequence[int] | None = None) -> torch.Tensor:
        """HED map (B, 1, S, S) in [0, 1] -> edge features (B, C_e, h, w) (resized to ``latent_size`` if given)."""
        if edges.ndim != 4 or edges.shape[1] != 1:
            raise FsdiffError(f"SCM: the edge map must be (B, 1, H, W), got {tuple(edges.shape)}.")
        feat = self.edge_encoder(edges.to(device=self.proj_in.weight.device, dtype=self.param_dtype))
        if latent_size is not None and tuple(feat.shape[-2:]) != tuple(latent_size):
            feat = F.interpolate(feat, size=tuple(latent_size), mode="bilinear", align_corners=False)
        return feat

    def level_residual(self, level: int, feature: torch.Tensor, edge_features: torch.Tensor) -> torch.Tensor:
        """Residual r_l (B, C_l, h_l, w_l) for level ``level`` from its down feature F_l and the edge features."""
        key = str(int(level))
        if key not in self.in_adapters:
            raise FsdiffError(f"SCM: level {level} is not controlled (levels {self.levels}).")
        b, _, hl, wl = feature.shape
        if edge_features.shape[0] != b:
            raise FsdiffError(f"SCM: edge features batch {edge_features.shape[0]} != UNet batch {b}.")
        h, w = edge_features.shape[-2:]
        x = self.in_adapters[key](feature.to(self.param_dtype))
        if (hl, wl) != (h, w):
            x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
        tokens = torch.cat([x, edge_features], dim=1).flatten(2).transpose(1, 2)  # (B, h*w, C_f + C_e)
        t = self.proj_in(tokens)
        t = t + self.mlp(self.norm(t))
        t = self.proj_out(t)
        y = t.transpose(1, 2).reshape(b, -1, h, w)
        if (hl, wl) != (h, w):
            y = F.interpolate(y, size=(hl, wl), mode="area" if hl <= h and wl <= w else "bilinear")
        return self.out_adapters[key](y)

    def forward(self, edges: torch.Tensor, features: Mapping[int, torch.Tensor],
                latent_size: Sequence[int] | None = None) -> dict[int, torch.Tensor]:
        """Residuals {level: r_l} for down features {level: F_l} and an edge map (B, 1, S, S)."""
        ef = self.encode_edges(edges, latent_size)
        return {int(lv): self.level_residual(int(lv), f, ef) for lv, f in features.items()}

    # -- attaching to a UNet ----------------------------------------------------------------------------------

    def check_unet(self, unet: Any) -> None:
        """Raise an FsdiffError unless this SCM was built for ``unet``'s block widths."""
        want = [int(c) for c in self.config.block_out_channels]
        have = [int(c) for c in unet.config.block_out_channels]
        if want != have:
            raise FsdiffError(
                f"SCM: built for a UNet with block_out_channels {want}, but this UNet has {have}; the checkpoint "
                "was trained with another Kandinsky decoder. Use the matching decoder or retrain."
            )

    @contextmanager
    def control(self, unet: Any, edges: torch.Tensor, latent_size: Sequence[int]) -> Iterator["SpatialControlModule"]:
        """Within the block, ``unet`` calls get the SCM residuals of ``edges`` (see the module docstring)."""
        self.check_unet(unet)
        edge_features = self.encode_edges(edges, latent_size)
        handles = []
        try:
            for level in self.levels:
                block = unet.down_blocks[level]
                handles.append(block.register_forward_hook(self._make_hook(level, edge_features), with_kwargs=True))
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def _make_hook(self, level: int, edge_features: torch.Tensor) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            sample, res = output
            size = tuple(hidden.shape[-2:])
            at_level = [i for i, s in enumerate(res) if tuple(s.shape[-2:]) == size]
            if not at_level:
                return None
            feature = res[at_level[-1]]
            ef = edge_features
            if ef.shape[0] != feature.shape[0]:
                if feature.shape[0] % ef.shape[0]:
                    raise FsdiffError(f"SCM: UNet batch {feature.shape[0]} vs edge batch {ef.shape[0]}.")
                ef = ef.repeat_interleave(feature.shape[0] // ef.shape[0], dim=0)
            r = self.level_residual(level, feature, ef)
            new_res = tuple(s + r.to(s.dtype) if i in at_level else s for i, s in enumerate(res))
            return sample, new_res

        return hook


def init_scm(seed: int, **config: object) -> SpatialControlModule:
    """An SCM whose initial weights depend only on ``seed`` (the global RNG is left untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return SpatialControlModule(**config)


__all__ = ["KANDINSKY_BLOCK_OUT_CHANNELS", "SpatialControlModule", "init_scm", "levels_for_resolutions"]
