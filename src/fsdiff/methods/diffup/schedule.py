"""DiffUp's diffusion schedule and sampler maths (DiffUp, arXiv 2407.16182, Fig. 2 and 4, UQDD, "prior as intermediate" and
sampling).

All of it is fsdiff's reconstruction [R]: the paper's schedule, T and sampler could not be
read. Implemented here, as pure functions of tensors:

* the cosine ᾱ schedule of Nichol & Dhariwal (2021), ``ᾱ_t = f(t) / f(0)``,
  ``f(t) = cos²(((t/T) + s) / (1 + s) · π/2)``, s = 0.008, T = 1000, evaluated in closed form (so
  ``ᾱ_0 = 1`` and ``ᾱ_T = 0``; the paper's β ≤ 0.999 clip only touches the last steps, where an
  x₀-predicting model does not care);
* the forward process ``q(x_t | x_0) = N(√ᾱ_t x_0, (1 − ᾱ_t) I)`` (a standard DDPM forward; the
  figure's ``q(x_t | x_{t−1}, c)`` is read as "prior-initialised sampling");
* one DDIM step from t to s for an x₀-parameterised model (η = 0 by default, deterministic);
* the timestep sequence from t* down to 0 in N steps;
* the start from a prior, ``x_{t*} = √ᾱ_{t*} (2 μ_p − 1) + √(1 − ᾱ_{t*}) ε``, with ε drawn from an
  explicit ``torch.Generator``.

Timesteps are integers in [0, T] given as Python ints or (B,) tensors, so one batch may hold episodes
that start at different t*.
"""

from __future__ import annotations

import math

import torch

from fsdiff.errors import FsdiffError

DEFAULT_T = 1000
"""Number of diffusion steps T (the reconstruction's choice)."""
COSINE_S = 0.008
"""The offset s of the cosine schedule (Nichol & Dhariwal)."""


def _as_t(t: int | float | torch.Tensor, batch: int | None = None, device: torch.device | None = None) -> torch.Tensor:
    """Timesteps as a float64 tensor, broadcast to (batch,) when ``batch`` is given."""
    tt = torch.as_tensor(t, dtype=torch.float64, device=device)
    if batch is not None:
        if tt.ndim == 0:
            tt = tt.expand(batch)
        elif tt.shape != (batch,):
            raise FsdiffError(f"timesteps must be a scalar or a ({batch},) tensor, got shape {tuple(tt.shape)}.")
    return tt


def cosine_alpha_bar(t: int | float | torch.Tensor, num_timesteps: int = DEFAULT_T, s: float = COSINE_S) -> torch.Tensor:
    """ᾱ_t of the cosine schedule, closed form, as float64 (scalar or same shape as ``t``)."""
    if num_timesteps < 1:
        raise FsdiffError(f"num_timesteps must be >= 1, got {num_timesteps}.")
    tt = _as_t(t)
    if torch.any(tt < 0) or torch.any(tt > num_timesteps):
        raise FsdiffError(f"timesteps must lie in [0, {num_timesteps}], got {tt.min().item()}..{tt.max().item()}.")

    def f(x: torch.Tensor) -> torch.Tensor:
        return torch.cos((x / num_timesteps + s) / (1 + s) * (math.pi / 2)) ** 2

    return (f(tt) / f(torch.zeros((), dtype=torch.float64))).clamp(0.0, 1.0)


def _coef(alpha_bar: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(√ᾱ, √(1−ᾱ)) broadcast against ``like`` (B, ...) in its dtype and device."""
    shape = (-1,) + (1,) * (like.ndim - 1) if alpha_bar.ndim else ()
    a = alpha_bar.to(like.device)
    sa = a.sqrt().to(like.dtype).reshape(shape)
    s1 = (1 - a).clamp_min(0).sqrt().to(like.dtype).reshape(shape)
    return sa, s1


def randn_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Standard normal noise shaped like ``x`` from an explicit generator (drawn on the CPU)."""
    return torch.randn(x.shape, generator=generator, dtype=torch.float32).to(device=x.device, dtype=x.dtype)


def q_sample(
    x0: torch.Tensor,
    t: int | torch.Tensor,
    noise: torch.Tensor | None = None,
    *,
    generator: torch.Generator | None = None,
    num_timesteps: int = DEFAULT_T,
) -> torch.Tensor:
    """Draw x_t ~ q(x_t | x_0) = √ᾱ_t x_0 + √(1−ᾱ_t) ε for (B, ...) x_0 and scalar or (B,) t."""
    if noise is None:
        noise = randn_like(x0, generator)
    ab = cosine_alpha_bar(_as_t(t, x0.shape[0]), num_timesteps)
    sa, s1 = _coef(ab, x0)
    return sa * x0 + s1 * noise


def predict_eps(x_t: torch.Tensor, x0_hat: torch.Tensor, t: int | torch.Tensor, num_timesteps: int = DEFAULT_T) -> torch.Tensor:
    """The noise implied by x_t and an x̂_0 prediction: ε̂ = (x_t − √ᾱ_t x̂_0) / √(1−ᾱ_t)."""
    ab = cosine_alpha_bar(_as_t(t, x_t.shape[0]), num_timesteps)
    sa, s1 = _coef(ab, x_t)
    return (x_t - sa * x0_hat) / s1.clamp_min(1e-8)


def ddim_step(
    x_t: torch.Tensor,
    x0_hat: torch.Tensor,
    t: int | torch.Tensor,
    s: int | torch.Tensor,
    *,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    num_timesteps: int = DEFAULT_T,
) -> torch.Tensor:
    """One DDIM step t -> s (s < t) for an x_0-predicting model; η = 0 is deterministic, s = 0 gives x̂_0."""
    b = x_t.shape[0]
    tt, ss = _as_t(t, b), _as_t(s, b)
    if torch.any(ss > tt):
        raise FsdiffError("a DDIM step must go backwards in time (s <= t).")
    ab_t = cosine_alpha_bar(tt, num_timesteps)
    ab_s = cosine_alpha_bar(ss, num_timesteps)
    eps = predict_eps(x_t, x0_hat, tt, num_timesteps)
    # σ_{t->s} of Song et al. (2021), eq. 16, generalised to a stride; 0 when η = 0.
    sigma = eta * ((1 - ab_s) / (1 - ab_t).clamp_min(1e-12) * (1 - ab_t / ab_s.clamp_min(1e-12))).clamp_min(0).sqrt()
    sigma = torch.where(ss >= tt, torch.zeros_like(sigma), sigma)
    sa_s, _ = _coef(ab_s, x_t)
    dir_coef = (1 - ab_s - sigma**2).clamp_min(0).sqrt().to(x_t.dtype).reshape((-1,) + (1,) * (x_t.ndim - 1))
    out = sa_s * x0_hat + dir_coef * eps
    if eta > 0:
        out = out + sigma.to(x_t.dtype).reshape(dir_coef.shape) * randn_like(x_t, generator)
    # s == t (possible when t* < N) must leave x_t unchanged up to rounding: enforce it exactly.
    same = (ss == tt).reshape(dir_coef.shape)
    return torch.where(same, x_t, out)


def timestep_sequence(t_start: int | torch.Tensor, steps: int, num_timesteps: int = DEFAULT_T) -> torch.Tensor:
    """Integer timesteps t* = τ_0 > τ_1 > ... > τ_N = 0 as a (steps+1,) or (steps+1, B) long tensor."""
    if steps < 1:
        raise FsdiffError(f"the number of sampling steps must be >= 1, got {steps}.")
    ts = torch.as_tensor(t_start, dtype=torch.float64)
    if torch.any(ts < 1) or torch.any(ts > num_timesteps):
        raise FsdiffError(f"the start timestep must lie in [1, {num_timesteps}], got {t_start}.")
    frac = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    seq = frac.reshape((-1,) + (1,) * ts.ndim) * ts
    return seq.round().long()


def prior_start(
    prior_prob: torch.Tensor,
    t_star: int | torch.Tensor,
    noise: torch.Tensor | None = None,
    *,
    generator: torch.Generator | None = None,
    num_timesteps: int = DEFAULT_T,
) -> torch.Tensor:
    """Start from a prior: x_{t*} = √ᾱ_{t*} (2 μ_p − 1) + √(1−ᾱ_{t*}) ε, μ_p a probability map."""
    return q_sample(2 * prior_prob - 1, t_star, noise, generator=generator, num_timesteps=num_timesteps)


def make_generator(seed: int | torch.Generator | None) -> torch.Generator:
    """A CPU ``torch.Generator`` from a seed (a generator passes through; None means seed 0)."""
    if isinstance(seed, torch.Generator):
        return seed
    g = torch.Generator()
    g.manual_seed(0 if seed is None else int(seed))
    return g
