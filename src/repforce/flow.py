"""Flow matching: the time convention, the training loss and the ODE samplers.

The convention lives here and nowhere else (docs/DESIGN.md, "Flow matching in pixels"):

    z_t    = t * x + (1 - t) * e          x clean data, e ~ N(0, I), t in [0, 1], t = 1 is data
    v      = x - e                        the target velocity, dz_t/dt
    v_pred = (x_pred - z_t) / max(1 - t, t_eps)   the network predicts x (x-prediction)
    L_FM   = mean || v_pred - v ||^2

Train-time t is logit-normal: t = sigmoid(n), n ~ N(mean=-0.8, std=0.8), so most
samples sit at high noise. Sampling integrates dz/dt = v(z, t) from t = 0 (noise)
to t = 1 (data) with Euler or Heun on a grid warped by the timestep shift

    t' = s * t / (1 + (s - 1) * t)

With t = 1 - sigma this is SD3's shift sigma' = a sigma / (1 + (a - 1) sigma) with
a = 1 / s: s < 1 spends more steps near noise (what larger images want), s = 1 is
the uniform grid. `resolution_shift` picks s from the image's size.

Guidance: `cfg(u, c, w) = u + w * (c - u)`. A velocity function may apply it itself
or return the pair (c, u); the samplers then combine the pair with weight w inside
the guidance interval [lo, hi] of t and use c alone outside it (JiT).
"""

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

T_EPS = 0.05  # floor of 1 - t in x -> v, keeps v finite near t = 1
T_MEAN = -0.8  # logit-normal location of train-time t
T_STD = 0.8  # logit-normal scale of train-time t
# resolution-dependent shift, diffusers' line through two (image tokens, log SD3 shift) points; tokens are
# 16 x 16 px cells (the scale patch), so an image gets the same shift whatever the model's patch or latent
SHIFT_BASE_TOKENS = 4  # 32 x 32 px, the small worlds: SD3 shift 1, as they were trained and measured
SHIFT_MAX_TOKENS = 4096  # 1024 x 1024 px: SD3 shift 3.0, what SD3 samples 1024^2 with
SHIFT_MAX_MU = math.log(3.0)  # log of the SD3 shift at SHIFT_MAX_TOKENS


def _bcast(t: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    """t of shape (B,) (or scalar) viewed as (B, 1, ..., 1) against `like`."""
    t = torch.as_tensor(t, dtype=like.dtype, device=like.device)
    return t.reshape(t.shape + (1,) * (like.dim() - t.dim()))


def interpolate(x: torch.Tensor, e: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """z_t = t * x + (1 - t) * e; t has the leading dims of x (or is a scalar)."""
    t = _bcast(t, x)
    return t * x + (1 - t) * e


def x_to_v(x_pred: torch.Tensor, z: torch.Tensor, t: torch.Tensor, t_eps: float = T_EPS) -> torch.Tensor:
    """v_pred = (x_pred - z_t) / max(1 - t, t_eps)."""
    return (x_pred - z) / (1 - _bcast(t, z)).clamp(min=t_eps)


def v_to_x(v: torch.Tensor, z: torch.Tensor, t: torch.Tensor, t_eps: float = T_EPS) -> torch.Tensor:
    """Inverse of x_to_v: x = z_t + max(1 - t, t_eps) * v."""
    return z + (1 - _bcast(t, z)).clamp(min=t_eps) * v


def sample_t(n: int, mean: float = T_MEAN, std: float = T_STD, device=None, generator=None) -> torch.Tensor:
    """n train-time t from the logit-normal distribution, shape (n,), fp32."""
    return torch.sigmoid(mean + std * torch.randn(n, device=device, generator=generator))


def fm_loss(x_pred: torch.Tensor, x: torch.Tensor, e: torch.Tensor, t: torch.Tensor,
            t_eps: float = T_EPS) -> torch.Tensor:
    """Mean squared velocity error of an x-prediction, in fp32.

    x_pred, x, e: (..., C) with t broadcastable from the leading dims, e.g. tokens
    (n, P) with t (n,). The mean runs over every element, i.e. over the tokens that
    carry the loss, each token's own mean weighted equally.
    """
    x_pred, x, e = x_pred.float(), x.float(), e.float()
    z = interpolate(x, e, t.float())
    return F.mse_loss(x_to_v(x_pred, z, t.float(), t_eps), x - e)


def fm_loss_capped(x_pred: torch.Tensor, x: torch.Tensor, t: torch.Tensor, floor: float) -> torch.Tensor:
    """The velocity loss with its weight capped: || x_pred - x ||^2 / max(1 - t, floor)^2, in fp32.

    For t < 1 - floor this is exactly || v_pred - v ||^2 (v_pred - v = (x_pred - x) / (1 - t)); above,
    the weight 1 / (1 - t)^2 stops growing at 1 / floor^2, as Min-SNR weighting (Hang et al. 2023)
    caps the near-clean end that otherwise dominates the gradient with easy denoising."""
    x_pred, x = x_pred.float(), x.float()
    w = 1 / (1 - _bcast(t.float(), x)).clamp(min=floor) ** 2
    return (w * (x_pred - x) ** 2).mean()


def shift_t(t: torch.Tensor, s: float) -> torch.Tensor:
    """Timestep shift t' = s t / (1 + (s - 1) t); fixes 0 and 1."""
    return s * t / (1 + (s - 1) * t)


def resolution_shift(height: int, width: int | None = None) -> float:
    """This file's shift s for an image of height x width pixels (square if width is None).

    SD3 (Esser et al. 2024, sec. 5.3.2) shifts toward noise as the image grows; Flux and
    diffusers (`calculate_shift`, `use_dynamic_shifting`) make log of SD3's shift a linear
    in the image's token count n, between a base and a max:

        n  = height * width / 16^2                                     (16 px cells)
        mu = SHIFT_MAX_MU * (n - SHIFT_BASE_TOKENS) / (SHIFT_MAX_TOKENS - SHIFT_BASE_TOKENS)
        a  = exp(mu)       SD3's shift on sigma = 1 - t
        s  = 1 / a         ours (t = 1 is data; s < 1: more steps near noise)

    with n held in [SHIFT_BASE_TOKENS, SHIFT_MAX_TOKENS]: a = 1 at 32 px and below (the
    small worlds keep the uniform grid), 1.07 at 256 px (SD3 samples its 256^2 base with 1,
    Flux with 1.65), 1.31 at 512 px, 3.0 at 1024 px and above (SD3's 3.0, Flux's 3.16;
    diffusers extends the line instead, which would give a = 81 at 2048 px here).
    """
    n = height * (height if width is None else width) / 16 ** 2
    n = min(max(n, SHIFT_BASE_TOKENS), SHIFT_MAX_TOKENS)
    mu = SHIFT_MAX_MU * (n - SHIFT_BASE_TOKENS) / (SHIFT_MAX_TOKENS - SHIFT_BASE_TOKENS)
    return math.exp(-mu)


def time_grid(steps: int, shift: float = 1.0, device=None) -> torch.Tensor:
    """steps + 1 times from 0 (noise) to 1 (data), warped by the shift."""
    return shift_t(torch.linspace(0.0, 1.0, steps + 1, device=device), shift)


def cfg(u: torch.Tensor, c: torch.Tensor, w: float) -> torch.Tensor:
    """Classifier-free guidance: u + w (c - u); w = 1 is the conditional alone."""
    return u + w * (c - u)


VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor | tuple[torch.Tensor, torch.Tensor]]


def _velocity(v_fn: VelocityFn, z: torch.Tensor, t: torch.Tensor, w: float,
              interval: tuple[float, float]) -> torch.Tensor:
    """Call v_fn at a scalar time (passed as a (B,) tensor); combine a (c, u) pair with guidance."""
    out = v_fn(z, t.expand(z.shape[0]))
    if isinstance(out, torch.Tensor):
        return out
    c, u = out
    lo, hi = interval
    return cfg(u, c, w) if lo <= float(t) <= hi else c


@torch.no_grad()
def euler(v_fn: VelocityFn, z: torch.Tensor, steps: int = 25, shift: float = 1.0,
          w: float = 1.0, interval: tuple[float, float] = (0.0, 1.0)) -> torch.Tensor:
    """Integrate dz/dt = v_fn(z, t) from t = 0 to 1 with `steps` Euler steps.

    z: the starting noise (B, ...). v_fn gets z and t of shape (B,) and returns v,
    or the pair (v_cond, v_uncond) to be guided with weight w inside `interval`.
    """
    ts = time_grid(steps, shift, z.device)
    for i in range(steps):
        z = z + (ts[i + 1] - ts[i]) * _velocity(v_fn, z, ts[i], w, interval)
    return z


@torch.no_grad()
def heun(v_fn: VelocityFn, z: torch.Tensor, steps: int = 25, shift: float = 1.0,
         w: float = 1.0, interval: tuple[float, float] = (0.0, 1.0)) -> torch.Tensor:
    """Heun (trapezoid predictor-corrector) over the same grid as euler().

    The last step is plain Euler, as in JiT: it would otherwise evaluate the network
    at t = 1, where x-prediction velocity only exists through the t_eps floor.
    """
    ts = time_grid(steps, shift, z.device)
    for i in range(steps):
        dt = ts[i + 1] - ts[i]
        v0 = _velocity(v_fn, z, ts[i], w, interval)
        if i == steps - 1:
            z = z + dt * v0
        else:
            v1 = _velocity(v_fn, z + dt * v0, ts[i + 1], w, interval)
            z = z + dt * 0.5 * (v0 + v1)
    return z
