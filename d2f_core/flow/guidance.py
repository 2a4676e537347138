"""Classifier-free guidance helpers in flow coordinates.

Plain CFG commutes with the bridge: x̂0 and v̂ are affine in the network output with coefficients
that sum to one, so guiding outputs, denoised estimates or velocities gives the same result.

RescaleCFG (Lin et al. 2023) does not commute: it rescales the guided *v_VP* prediction to the
standard deviation of the conditional one. ``rescale_cfg_denoised`` does exactly that in flow
coordinates, so a bridged model guided with it matches the host's RescaleCFG on the native model.
With a = (1-σ)/D, s = σ/D and ε̂ = (x - (1-σ)·x̂0)/σ:

    v_VP = a·ε̂ - s·x̂0,         x̂0 = ((1-σ)·x - σ·D·v_VP) / D²
"""

from __future__ import annotations

import torch

from .bridge import _as_batch, vp_scale


def vp_velocity_from_denoised(sigma, x0: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """v_VP = a·ε̂ - s·x̂0 at flow state x, time σ."""
    s = _as_batch(sigma, x)
    d = vp_scale(s)
    eps = (x - (1 - s) * x0) / s
    return ((1 - s) * eps - s * x0) / d


def denoised_from_vp_velocity(sigma, v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    s = _as_batch(sigma, x)
    d = vp_scale(s)
    return ((1 - s) * x - s * d * v) / d ** 2


def rescale_cfg_denoised(sigma, x: torch.Tensor, cond_x0: torch.Tensor, uncond_x0: torch.Tensor,
                         cond_scale: float, multiplier: float) -> torch.Tensor:
    """Guided x̂0 with RescaleCFG computed on v_VP (the host's formula), in flow coordinates.

        v_cfg = v_u + w·(v_c - v_u),   v_r = v_cfg·std(v_c)/std(v_cfg),   v = m·v_r + (1-m)·v_cfg
    """
    v_c = vp_velocity_from_denoised(sigma, cond_x0, x)
    v_u = vp_velocity_from_denoised(sigma, uncond_x0, x)
    v_cfg = v_u + cond_scale * (v_c - v_u)
    dims = tuple(range(1, x.ndim))
    v_rescaled = v_cfg * (v_c.std(dim=dims, keepdim=True) / v_cfg.std(dim=dims, keepdim=True))
    return denoised_from_vp_velocity(sigma, multiplier * v_rescaled + (1 - multiplier) * v_cfg, x)
