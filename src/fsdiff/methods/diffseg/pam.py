"""Perceptual Attention Module (DiffSeg §4.3, Eq. (8) and Eq. (12), Fig. 3; [P] the paper, [R] fsdiff's choice).

``L_pre = PAM(M_a, L_s, L_q)`` at latent resolution (4096 tokens for a 64x64 latent):

* tokenise: q = L_q -> (B, N, C), s = L_s -> (B, N_s, C), a = M_a -> (B, N, 1); each is embedded to width d
  by its own Linear (``embed_query``/``embed_support``/``embed_prior``). ``embed_query(q)`` is the "Lin(q)" of
  the fusion below (the paper averages L_q directly; it must be projected to width d first [R]).
* Att1 (semantic, Eq. 12): ``L1 = softmax(Q Kᵀ/√d_h) V`` with Q = Lin_q(LN(e_q)), K = Lin_k(LN(e_s)),
  V = Lin_v(LN(e_s)) (multi-head, then an output Linear).
* Att2 (spatial prior): the same with K, V from the prior tokens e_a (separate Linears), giving L2.
* fusion: ``L3 = mean(e_q, L1, L2)`` (over the enabled terms).
* self-attention (Att3): ``L3 <- L3 + SA(LN(L3))`` with Q = K = V from L3 (residual) [P].
* head: reshape to (B, d, h, w) -> Conv3x3(d->d) -> ReLU -> Conv1x1(d->C) -> L_pre; the last layer is linear
  by default (MoVQ latents can be negative; ``final_activation='tanh'`` is the alternative) [R].

Pre-norm LayerNorm before every attention; attention is ``F.scaled_dot_product_attention`` (flash / memory
efficient kernels on GPU). Defaults: d = 256, 8 heads [R].

Positions [R, not in the paper]: the tokens of the prior M_a carry one scalar each, so without positional
information Att2 could only attend by *value* and the output at a query position could not know the prior at
that position. A fixed 2-D sin-cos positional encoding is therefore added to the embedded query and prior
tokens (``positional_encoding=True``). Support tokens get none: where the object sits in the support is
irrelevant to the query. ``positional_encoding=False`` gives the literal paper formulation.

Ablation switches (Table 5): ``use_semantic_attention`` (Att1), ``use_prior_attention`` (Att2),
``use_self_attention`` (Att3); with Att1 and Att2 both off, L3 = e_q.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from fsdiff.errors import FsdiffError


def sincos_2d(height: int, width: int, dim: int, device: torch.device | None = None,
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Fixed 2-D sin-cos positional encoding (H*W, dim): half the channels for y, half for x (MAE style)."""
    if dim % 4:
        raise FsdiffError(f"PAM: the positional encoding needs a width divisible by 4, got {dim}.")
    quarter = dim // 4
    omega = 1.0 / (10000.0 ** (torch.arange(quarter, device=device, dtype=torch.float64) / quarter))
    ys = torch.arange(height, device=device, dtype=torch.float64)
    xs = torch.arange(width, device=device, dtype=torch.float64)
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    out_y = gy.reshape(-1, 1) * omega.reshape(1, -1)
    out_x = gx.reshape(-1, 1) * omega.reshape(1, -1)
    emb = torch.cat([out_y.sin(), out_y.cos(), out_x.sin(), out_x.cos()], dim=1)
    return emb.to(dtype)


class MultiHeadAttention(nn.Module):
    """Pre-norm multi-head attention: out = Lin_o(SDPA(Lin_q(LN(x)), Lin_k(LN(c)), Lin_v(LN(c))))."""

    def __init__(self, width: int, heads: int, cross: bool, eps: float = 1e-5) -> None:
        super().__init__()
        self.heads = heads
        self.norm_q = nn.LayerNorm(width, eps=eps)
        self.norm_kv = nn.LayerNorm(width, eps=eps) if cross else None
        self.to_q = nn.Linear(width, width)
        self.to_k = nn.Linear(width, width)
        self.to_v = nn.Linear(width, width)
        self.to_out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """(B, N, d) queries and (B, M, d) context (None = self-attention) -> (B, N, d)."""
        xq = self.norm_q(x)
        if context is None:
            xc = xq
        else:
            xc = self.norm_kv(context) if self.norm_kv is not None else context
        b, n, d = xq.shape
        m = xc.shape[1]
        h = self.heads
        q = self.to_q(xq).view(b, n, h, d // h).transpose(1, 2)
        k = self.to_k(xc).view(b, m, h, d // h).transpose(1, 2)
        v = self.to_v(xc).view(b, m, h, d // h).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(1, 2).reshape(b, n, d))


class PerceptualAttentionModule(ModelMixin, ConfigMixin):
    """DiffSeg's PAM: ``forward(prior, support_latent, query_latent) -> L_pre`` (see the module docstring)."""

    config_name = "config.json"

    @register_to_config
    def __init__(
        self,
        latent_channels: int = 4,
        prior_channels: int = 1,
        width: int = 256,
        num_heads: int = 8,
        use_semantic_attention: bool = True,
        use_prior_attention: bool = True,
        use_self_attention: bool = True,
        positional_encoding: bool = True,
        final_activation: str = "linear",
        norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        if width % num_heads:
            raise FsdiffError(f"PAM: width {width} must be divisible by num_heads {num_heads}.")
        if positional_encoding and width % 4:
            raise FsdiffError(f"PAM: width {width} must be divisible by 4 for the positional encoding.")
        if final_activation not in ("linear", "tanh"):
            raise FsdiffError(f"PAM: final_activation must be 'linear' or 'tanh', got {final_activation!r}.")
        self.embed_query = nn.Linear(latent_channels, width)
        self.embed_support = nn.Linear(latent_channels, width) if use_semantic_attention else None
        self.embed_prior = nn.Linear(prior_channels, width) if use_prior_attention else None
        self.semantic_attention = (
            MultiHeadAttention(width, num_heads, cross=True, eps=norm_eps) if use_semantic_attention else None
        )
        self.prior_attention = (
            MultiHeadAttention(width, num_heads, cross=True, eps=norm_eps) if use_prior_attention else None
        )
        self.self_attention = (
            MultiHeadAttention(width, num_heads, cross=False, eps=norm_eps) if use_self_attention else None
        )
        self.head = nn.Sequential(
            nn.Conv2d(width, width, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, latent_channels, 1),
        )

    @staticmethod
    def _tokens(x: torch.Tensor) -> torch.Tensor:
        return x.flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, H*W, C)

    def forward(self, prior: torch.Tensor, support_latent: torch.Tensor, query_latent: torch.Tensor) -> torch.Tensor:
        """M_a (B, 1, h, w), L_s (B, C, h', w'), L_q (B, C, h, w) -> L_pre (B, C, h, w) (Eq. 8)."""
        cfg = self.config
        if query_latent.ndim != 4 or query_latent.shape[1] != cfg.latent_channels:
            raise FsdiffError(
                f"PAM: query latent must be (B, {cfg.latent_channels}, h, w), got {tuple(query_latent.shape)}."
            )
        b, _, h, w = query_latent.shape
        if prior.shape != (b, cfg.prior_channels, h, w):
            raise FsdiffError(
                f"PAM: the prior M_a {tuple(prior.shape)} must be (B, {cfg.prior_channels}, h, w) on the query "
                f"latent grid {(b, cfg.prior_channels, h, w)}."
            )
        if support_latent.ndim != 4 or support_latent.shape[:2] != (b, cfg.latent_channels):
            raise FsdiffError(
                f"PAM: support latent must be (B={b}, {cfg.latent_channels}, h, w), got {tuple(support_latent.shape)}."
            )
        dtype = self.embed_query.weight.dtype
        pos = sincos_2d(h, w, cfg.width, query_latent.device, dtype) if cfg.positional_encoding else None

        e_q = self.embed_query(self._tokens(query_latent.to(dtype)))
        if pos is not None:
            e_q = e_q + pos
        terms = [e_q]
        if self.semantic_attention is not None:
            e_s = self.embed_support(self._tokens(support_latent.to(dtype)))
            terms.append(self.semantic_attention(e_q, e_s))  # L1
        if self.prior_attention is not None:
            e_a = self.embed_prior(self._tokens(prior.to(dtype)))
            if pos is not None:
                e_a = e_a + pos
            terms.append(self.prior_attention(e_q, e_a))  # L2
        l3 = torch.stack(terms, dim=0).mean(dim=0)
        if self.self_attention is not None:
            l3 = l3 + self.self_attention(l3)
        out = self.head(l3.transpose(1, 2).reshape(b, cfg.width, h, w))
        if cfg.final_activation == "tanh":
            out = torch.tanh(out)
        return out


def init_pam(seed: int, **config: object) -> PerceptualAttentionModule:
    """A PAM whose initial weights depend only on ``seed`` (the global RNG is left untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return PerceptualAttentionModule(**config)


__all__ = ["MultiHeadAttention", "PerceptualAttentionModule", "init_pam", "sincos_2d"]
