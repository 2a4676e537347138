"""Training objectives and flow-time sampling (DESIGN §2).

Diff2Flow: draw σ, x = (1-σ)·x0 + σ·ε, convert the network's output to a flow velocity v̂ and regress
the straight-path target ε - x0:

    L_d2f = ‖v̂ - (ε - x0)‖²

For an ε-model this is ‖ε̂ - ε‖² / (1-σ)², for a v-model ‖v̂_VP - v_VP‖² / D²: a reweighting of the
native loss, which regresses ε or v_VP directly with weight 1.
"""

from __future__ import annotations

import torch

from .bridge import FlowBridge, interpolate

TIME_SAMPLINGS = ("uniform", "logit_normal")


def sample_sigmas(n: int, sigma_min: float, sigma_max: float, mode: str = "uniform", shift: float = 1.0,
                  logit_mean: float = 0.0, logit_std: float = 1.0, generator=None, device=None) -> torch.Tensor:
    """Flow times in [σ_min, σ_max] (the span the network was trained on), float32 on ``device``.

    u ~ U(0,1) or sigmoid(N(mean, std)); shifted u' = s·u/(1+(s-1)·u); σ = σ_min + (σ_max - σ_min)·u'.

    Drawn and mapped in float32 on the device (Apple MPS has no float64; a float64 draw there cannot be
    made). The statistics are those of the float64 draw rounded to float32, which the old code returned:
    torch's float32 uniform is exact on a 2⁻²⁴ grid of [0, 1), so the draw is off by < 2⁻²⁴ from a
    continuous U(0,1) and the affine map adds < 2 ulp(σ), i.e. σ's distribution differs from the ideal
    one by less than the float32 spacing of σ itself. The normal draw for logit-normal times is float32
    Box-Muller, relative error ~1e-7, far below any effect on training.
    """
    if mode == "uniform":
        u = torch.rand(n, generator=generator, device=device, dtype=torch.float32)
    elif mode == "logit_normal":
        u = torch.sigmoid(logit_mean + logit_std * torch.randn(n, generator=generator, device=device,
                                                                dtype=torch.float32))
    else:
        raise ValueError(f"time sampling must be one of {TIME_SAMPLINGS}, got '{mode}'")
    if shift != 1.0:
        u = shift * u / (1 + (shift - 1) * u)
    return sigma_min + (sigma_max - sigma_min) * u


def per_sample_mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean squared error per batch row, accumulated in float32 or better (bf16 outputs lose too much)."""
    dtype = torch.promote_types(torch.promote_types(a.dtype, b.dtype), torch.float32)
    return (a.to(dtype) - b.to(dtype)).pow(2).flatten(1).mean(1)


def diff2flow_loss(bridge: FlowBridge, out: torch.Tensor, x: torch.Tensor, x0: torch.Tensor,
                   noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Per-sample ‖v̂(out, x, σ) - (ε - x0)‖² (mean over elements)."""
    return per_sample_mse(bridge.velocity(sigma, out, x), noise - x0)


def native_loss(bridge: FlowBridge, out: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor,
                sigma: torch.Tensor) -> torch.Tensor:
    """Per-sample MSE to the network's own target (ε, v_VP or x0)."""
    return per_sample_mse(out, bridge.native_target(noise, x0, sigma))


def training_loss(bridge: FlowBridge, net, x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor,
                  objective: str = "diff2flow", **net_kwargs) -> torch.Tensor:
    """One Diff2Flow (or native) loss evaluation: ``net(x_VP, label, **net_kwargs) -> output``."""
    x = interpolate(x0, noise, sigma)
    out = net(bridge.model_input(sigma, x), bridge.label(sigma).float(), **net_kwargs)
    if objective == "diff2flow":
        return diff2flow_loss(bridge, out, x, x0, noise, sigma)
    if objective == "native":
        return native_loss(bridge, out, x0, noise, sigma)
    raise ValueError(f"objective must be 'diff2flow' or 'native', got '{objective}'")
