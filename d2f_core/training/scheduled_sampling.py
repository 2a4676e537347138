"""Scheduled sampling for flow training: train on the states the model's own sampler visits.

For a training pair (x0, ε) at flow time σ, with probability p the state is not the clean
interpolant but where the model's own Euler solver lands after starting k solver steps earlier:

    σ_src = min(σ + k·Δ, σ_max),   Δ = (σ_max - σ_min) / solver_steps,   x_src = (1-σ_src)·x0 + σ_src·ε
    x ← x + (σ_next - σ_cur)·v̂(x, σ_cur)   for k steps from σ_src down to σ      (no gradient)

and the target stays the pair's own ε - x0. This corrects exposure bias (the model learns to pull
its own drift back to the data); it does not straighten the paths, which is what Reflow does.
With a perfect model the rollout lands exactly on (1-σ)·x0 + σ·ε, so it changes nothing there.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch

from ..flow.bridge import interpolate

RAMPS = ("constant", "linear", "cosine")
STRATEGIES = ("uniform", "early", "late")


@dataclass
class ScheduledSampling:
    probability: float = 0.0   # peak probability that a sample is rolled out
    ramp: str = "constant"     # how p grows over training: constant, linear or cosine from 0
    max_offset: int = 0        # k_max, in solver steps
    strategy: str = "uniform"  # k ~ uniform on 1..k_max; early: small k likelier (∝ k_max+1-k); late: ∝ k
    solver_steps: int = 25     # the solver grid that defines one step Δ

    def validate(self):
        if not 0.0 <= self.probability <= 1.0:
            raise ValueError("scheduled sampling probability must be in [0, 1]")
        if self.ramp not in RAMPS:
            raise ValueError(f"scheduled sampling ramp must be one of {RAMPS}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"scheduled sampling offset strategy must be one of {STRATEGIES}")
        if self.max_offset < 0 or self.solver_steps < 1:
            raise ValueError("scheduled sampling needs max_offset ≥ 0 and solver_steps ≥ 1")

    @property
    def active(self) -> bool:
        return self.probability > 0 and self.max_offset > 0

    def probability_at(self, step: int, total: int) -> float:
        progress = min(1.0, step / max(1, total - 1))
        if self.ramp == "linear":
            return self.probability * progress
        if self.ramp == "cosine":
            return self.probability * 0.5 * (1 - math.cos(math.pi * progress))
        return self.probability

    def draw_offsets(self, rng: random.Random, batch: int, step: int, total: int) -> list[int]:
        """Per-sample offsets k (0: no rollout), drawn on the host so the rollout length is known
        without reading the GPU."""
        p = self.probability_at(step, total)
        ks = list(range(1, self.max_offset + 1))
        if self.strategy == "early":
            weights = [self.max_offset + 1 - k for k in ks]
        elif self.strategy == "late":
            weights = ks
        else:
            weights = [1] * len(ks)
        return [rng.choices(ks, weights=weights)[0] if rng.random() < p else 0 for _ in range(batch)]


def _euler(velocity, x, src, delta, k, j):
    """Step j of every sample's own grid; samples already at σ (j ≥ k_i) stand still."""
    taken = torch.minimum(torch.full_like(k, j), k)
    now = src - taken * delta
    dt = torch.where(k > j, -delta, torch.zeros_like(delta))
    return x + dt.reshape((-1,) + (1,) * (x.ndim - 1)) * velocity(x, now)


@torch.no_grad()
def rollout(velocity, x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor, offsets: list[int],
            spacing: float, sigma_max: float, steps: int | None = None) -> torch.Tensor:
    """The state at σ reached by k_i Euler steps of ``velocity(x, σ) -> v̂`` from σ_src,i (per sample).

    ``steps``: how many velocity calls to make (default max k_i; more leave every sample where it is, since
    samples past their k_i stand still exactly: x + 0·v̂). A sharded run passes the global batch's max so every
    rank makes the same number of forwards, each of which all-gathers weights with the others.

    ``offsets`` are on the host (the rollout length is then known without reading the GPU); samples
    with k = 0 keep the plain interpolant. Sample i takes k_i equal steps Δ_i = (σ_src,i - σ_i)/k_i.
    """
    k = torch.tensor(offsets, dtype=sigma.dtype)
    k = k.pin_memory().to(sigma.device, non_blocking=True) if sigma.is_cuda else k.to(sigma.device)
    src = torch.minimum(sigma + k * spacing, torch.full_like(sigma, sigma_max))
    delta = (src - sigma) / k.clamp(min=1)
    x = interpolate(x0, noise, src)
    for j in range(max(offsets, default=0) if steps is None else steps):
        x = _euler(velocity, x, src, delta, k, j)
    return x
