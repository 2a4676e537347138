"""Samplers in the k-diffusion calling convention: ``model(x, sigma_batch, **extra_args) -> x̂0``.

One short function per sampler, math first. Flow coordinates: x = (1-σ)·x0 + σ·ε.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def sample_euler_flow(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """Euler on the flow ODE dx/dσ = v̂ = (x - x̂0)/σ:

        x_{i+1} = x_i + (σ_{i+1} - σ_i)·(x_i - x̂0_i)/σ_i

    Step for step the host's ``euler`` on a flow model. On a Diff2Flow-bridged ε/v model it equals
    DDIM (η = 0) on the original over ς_i = σ_i/(1-σ_i): both are x_{i+1} = x̂0 + (t_{i+1}/t_i)(x_i - x̂0)
    in their own coordinates, and the coordinate change is linear in x for fixed σ.
    """
    extra_args = {} if extra_args is None else extra_args
    ones = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * ones, **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        x = x + (sigmas[i + 1] - sigmas[i]) * (x - denoised) / sigmas[i]
    return x


@torch.no_grad()
def sample_ddim(eps_model, x, alphas_bar):
    """Deterministic DDIM (η = 0) in VP coordinates, x_VP = sqrt(ᾱ)·x0 + sqrt(1-ᾱ)·ε.

    ``eps_model(x_vp, alpha_bar) -> ε̂``; ``alphas_bar`` decreasing in noise along the trajectory,
    i.e. increasing: ᾱ_{start} < … < ᾱ_{end} (use 1 for the final, clean step).

        x̂0 = (x - sqrt(1-ᾱ_i)·ε̂) / sqrt(ᾱ_i)
        x_{i+1} = sqrt(ᾱ_{i+1})·x̂0 + sqrt(1-ᾱ_{i+1})·ε̂
    """
    for i in range(len(alphas_bar) - 1):
        a, a_next = alphas_bar[i], alphas_bar[i + 1]
        eps = eps_model(x, a)
        x0 = (x - (1 - a) ** 0.5 * eps) / a ** 0.5
        x = a_next ** 0.5 * x0 + (1 - a_next) ** 0.5 * eps
    return x


def flow_sigmas(steps: int, sigma_max: float, shift: float = 1.0, denoise: float = 1.0,
                dtype=torch.float32) -> torch.Tensor:
    """Flow sampling times from σ_max down to 0, uniform in t and warped by the SD3 time shift

        σ(t) = s·t / (1 + (s - 1)·t),   t from t_max = σ⁻¹(σ_max) down to 0,

    so shift 1 is uniform in flow time and shift > 1 spends more steps at high noise.
    ``denoise`` < 1 keeps the last ``steps`` of a ``steps/denoise`` schedule (img2img), like the host.
    """
    if steps < 1:
        raise ValueError("steps must be at least 1")
    if not 0.0 < denoise <= 1.0:
        raise ValueError("denoise must be in (0, 1]")
    if shift <= 0:
        raise ValueError("shift must be positive")
    total = steps if denoise >= 1.0 else int(steps / denoise)
    t_max = sigma_max / (shift - (shift - 1) * sigma_max)
    # Host-side numbers in Python doubles (exact ends: t_max·total/total and 0), then one tensor in
    # ``dtype``: no float64 tensor is made unless float64 is asked for.
    t = [t_max * (total - j) / total for j in range(total - steps, total + 1)]
    return torch.tensor([shift * v / (1 + (shift - 1) * v) for v in t], dtype=dtype)
