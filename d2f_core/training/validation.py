"""Validation during training (issue 12 part 2): a deterministic held-out loss, a fixed-seed sample grid
and, for Reflow, a straightness figure. Pure torch; the host adapter is ``nodes/validation_node.py``.

Notation as in DESIGN §2: flow coordinates x_σ = (1-σ)·x0 + σ·ε, σ ∈ [σ_min, σ_max] the trainable range,
``bridge`` converts the network output to x̂0 / v̂.

**Held-out loss.** A fixed grid of K flow times at the midpoints of K equal cells of the trainable range

    σ_k = σ_min + (σ_max - σ_min)·(k + ½)/K,     k = 0 … K-1,

and one fixed noise ε_{i,k} ~ N(0, I) per held-out item i and time k, drawn once from ``seed`` (a Reflow
pair's own noise ε_i instead, for every k: its target is the pair's straight line). Then

    L_val = 1/(N·K) · Σ_i Σ_k ℓ(net(x_{σ_k}(x0_i, ε_{i,k}), σ_k, c_i), x0_i, ε_{i,k}, σ_k)

with ℓ the run's objective (``diff2flow``: ‖v̂ - (ε - x0)‖², ``native``: the ε / v MSE), each ℓ a mean over
elements. Nothing in it is random between evaluations, so two points of the curve differ only by the weights
(the midpoint rule is also the quadrature of the uniform-time training loss E_σ[ℓ] with error O(1/K²)).

**Sample grid.** For each step count n of ``grid_steps`` and each of the first ``images`` held-out items, flow
Euler (``sample_euler_flow``) over ``flow_sigmas(n, σ_max)`` from the host's txt2img start
x_{σ_max} = D(σ_max)·ε_i (``bridge.start_state(..., max_denoise=True)``), ε_i fixed by ``seed``, with
classifier-free guidance on x̂0

    x̂0 = x̂0(∅) + w·(x̂0(c) - x̂0(∅))

when the empty prompt is given and w ≠ 1 (the maps are affine, so guiding x̂0 is guiding v̂).

**Straightness** (Reflow): on the same noise, with n_max the largest step count,

    S = sqrt( Σ_i ‖x̂_i(1 step) - x̂_i(n_max steps)‖² / Σ_i ‖x̂_i(n_max steps)‖² )

i.e. the RMS distance of the 1-step from the many-step result, relative to the latter's RMS size. A perfectly
straight flow (constant velocity along every path) has S = 0: one Euler step lands where many do.

**Time cap.** The loss is always evaluated (the curve must not have holes). Grid columns (one step count for
all images) follow in increasing step count; once ``max_seconds`` have passed, the remaining columns are
skipped and reported in ``ValidationResult.skipped``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..flow.bridge import FlowBridge, interpolate
from ..flow.losses import diff2flow_loss, native_loss
from ..flow.samplers import flow_sigmas, sample_euler_flow


class ValidationError(ValueError):
    """Validation settings or held-out data that cannot be used."""


# --- settings -----------------------------------------------------------------------------------------
def parse_steps(text: str) -> tuple[int, ...]:
    """``"1,2,4,25"`` → (1, 2, 4, 25): sorted, unique, each ≥ 1."""
    try:
        values = sorted({int(v) for v in str(text).replace(";", ",").split(",") if v.strip()})
    except ValueError:
        raise ValidationError(f"grid_steps must be step counts separated by commas, e.g. '1,2,4,25'; got '{text}'") from None
    if not values or values[0] < 1:
        raise ValidationError(f"grid_steps needs at least one step count, each at least 1; got '{text}'")
    return tuple(values)


@dataclass
class ValidationOptions:
    """What a user sets (the D2FValidation node's settings, without its held-out data)."""

    every_n_steps: int = 100
    holdout_fraction: float = 0.1
    loss_times: int = 8
    grid_steps: tuple[int, ...] = (1, 2, 4, 25)
    cfg: float = 5.0
    seed: int = 0
    images: int = 2
    max_seconds: float = 60.0
    batch_size: int = 8

    def validate(self) -> "ValidationOptions":
        if self.every_n_steps < 1:
            raise ValidationError("every_n_steps must be at least 1")
        if not 0.0 < self.holdout_fraction < 1.0:
            raise ValidationError(f"holdout_fraction must be in (0, 1), got {self.holdout_fraction}")
        if self.loss_times < 1:
            raise ValidationError("loss_times must be at least 1")
        if self.images < 0 or self.batch_size < 1:
            raise ValidationError("images must be ≥ 0 and batch_size ≥ 1")
        if self.max_seconds < 0:
            raise ValidationError("max_seconds must be ≥ 0 (0: no cap)")
        self.grid_steps = parse_steps(",".join(map(str, self.grid_steps)))
        return self


# --- held-out data ------------------------------------------------------------------------------------
@dataclass
class HeldOutGroup:
    """Held-out items of one resolution: latents (N, C, H, W) in the model's working scale, conditioning with a
    leading N, Reflow noise (N, C, H, W) or None, the empty prompt (no batch dim) or None."""

    latents: torch.Tensor
    conds: dict[str, torch.Tensor]
    noise: torch.Tensor | None = None
    empty: dict[str, torch.Tensor] | None = None

    def __len__(self) -> int:
        return self.latents.shape[0]


def split_holdout(sizes: list[int], fraction: float, seed: int) -> list[tuple[list[int], list[int]]]:
    """Deterministic train/held-out split of buckets of ``sizes`` items: one permutation of all items from
    ``seed``; the first h = max(1, round(fraction·total)) of it are held out. Per bucket: (train indices,
    held-out indices), each sorted. Every bucket keeps at least its share of training items: the split is
    refused when it would leave nothing to train on."""
    total = sum(sizes)
    if total < 2:
        raise ValidationError(f"a held-out split needs at least 2 training items, got {total}: connect held-out "
                              "latents and positive to D2FValidation instead")
    held = min(total - 1, max(1, round(fraction * total)))
    order = torch.randperm(total, generator=torch.Generator().manual_seed(int(seed)))[:held].tolist()
    chosen = set(order)
    out, offset = [], 0
    for n in sizes:
        items = range(offset, offset + n)
        out.append(([i - offset for i in items if i not in chosen], [i - offset for i in items if i in chosen]))
        offset += n
    return out


def split_buckets(buckets: list[tuple], fraction: float, seed: int) -> tuple[list[tuple], list[tuple]]:
    """Training buckets ``[(latents, cond list[, noise])]`` → (the training buckets without the held-out items,
    the held-out items as buckets of the same form). Buckets left empty are dropped."""
    train, held = [], []
    for bucket, (keep, out) in zip(buckets, split_holdout([b[0].shape[0] for b in buckets], fraction, seed)):
        latents, conds, *rest = bucket
        noise = rest[0] if rest else None
        for idx, target in ((keep, train), (out, held)):
            if not idx:
                continue
            index = torch.tensor(idx, dtype=torch.long)
            # one caption for all images stays one caption
            c = conds if len(conds) == 1 else [conds[i] for i in idx]
            part = (latents[index], c) + ((noise[index],) if noise is not None else ())
            target.append(part)
    return train, held


# --- results ------------------------------------------------------------------------------------------
@dataclass
class ValidationResult:
    step: int
    loss: float
    straightness: float | None = None
    seconds: float = 0.0
    grid: dict[int, torch.Tensor] = field(default_factory=dict)  # step count → x̂0 (images, C, H, W), working scale
    skipped: list[int] = field(default_factory=list)              # step counts not sampled (time cap)

    def info(self) -> dict:
        return {"step": self.step, "loss": self.loss, "straightness": self.straightness,
                "seconds": self.seconds, "grid_steps": sorted(self.grid), "skipped": list(self.skipped)}


def loss_times(k: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """σ_k = σ_min + (σ_max - σ_min)·(k + ½)/K, float32."""
    return torch.tensor([sigma_min + (sigma_max - sigma_min) * (j + 0.5) / k for j in range(k)], dtype=torch.float32)


def straightness(one_step: torch.Tensor, many_steps: torch.Tensor) -> float:
    """S = sqrt(Σ‖a - b‖² / Σ‖b‖²) over the whole set (see the module docstring)."""
    a, b = one_step.double(), many_steps.double()
    return float(((a - b).pow(2).sum() / b.pow(2).sum().clamp_min(1e-30)).sqrt())


class Validator:
    """Validation of one run: ``net(x_in, label, **cond) -> output`` as the trainer calls it (the weights being
    trained, attached), ``bridge`` the run's bridge, ``groups`` the held-out set. Deterministic: noise and
    times are fixed at construction, on the device."""

    def __init__(self, net: Callable, bridge: FlowBridge, groups: list[HeldOutGroup], options: ValidationOptions,
                 objective: str = "diff2flow", compute_dtype: torch.dtype = torch.float32, device=None,
                 straightness: bool = False, clock: Callable[[], float] = time.perf_counter):
        if not groups or not any(len(g) for g in groups):
            raise ValidationError("the held-out set is empty")
        if objective not in ("diff2flow", "native"):
            raise ValidationError(f"objective must be 'diff2flow' or 'native', got '{objective}'")
        self.net, self.bridge, self.options = net, bridge, options.validate()
        self.groups = [g for g in groups if len(g)]
        self.objective, self.compute_dtype, self.clock = objective, compute_dtype, clock
        self.device = torch.device(device) if device is not None else self.groups[0].latents.device
        self.want_straightness = straightness
        self.times = loss_times(options.loss_times, bridge.sigma_min, bridge.sigma_max).to(self.device)
        g = torch.Generator(device="cpu").manual_seed(int(options.seed))
        # Drawn on the CPU once: the same numbers on every device, never redrawn.
        self.loss_noise = [None if grp.noise is not None else
                           torch.randn((options.loss_times,) + tuple(grp.latents.shape), generator=g).to(self.device)
                           for grp in self.groups]
        first = self.groups[0]
        n = min(options.images, len(first))
        self.grid_noise = torch.randn((n,) + tuple(first.latents.shape[1:]), generator=g).to(self.device)

    # --- the network ----------------------------------------------------------------------------------
    def _output(self, sigma: torch.Tensor, x: torch.Tensor, cond: dict) -> torch.Tensor:
        x_in = self.bridge.model_input(sigma, x).to(self.compute_dtype)
        cond = {k: v.to(self.compute_dtype) for k, v in cond.items()}
        return self.net(x_in, self.bridge.label(sigma).float(), **cond).float()

    # --- held-out loss --------------------------------------------------------------------------------
    @torch.no_grad()
    def loss(self) -> float:
        """L_val (module docstring), in batches of ``options.batch_size`` (item, time) pairs."""
        total, count = 0.0, 0
        bs = self.options.batch_size
        for grp, fixed in zip(self.groups, self.loss_noise):
            n, k = len(grp), self.times.shape[0]
            x0_all = grp.latents.to(self.device, torch.float32)
            # (time, item) pairs flattened time-major: pair p is time p // n, item p % n
            for start in range(0, n * k, bs):
                p = torch.arange(start, min(start + bs, n * k), device=self.device)
                t_idx, i_idx = p // n, p % n
                x0 = x0_all[i_idx]
                noise = grp.noise.to(self.device, torch.float32)[i_idx] if fixed is None else fixed[t_idx, i_idx]
                sigma = self.times[t_idx]
                cond = {key: v.to(self.device)[i_idx] for key, v in grp.conds.items()}
                x = interpolate(x0, noise, sigma)
                out = self._output(sigma, x, cond)
                if self.objective == "diff2flow":
                    per = diff2flow_loss(self.bridge, out, x, x0, noise, sigma)
                else:
                    per = native_loss(self.bridge, out, x0, noise, sigma)
                total += float(per.double().sum())
                count += p.numel()
        return total / count

    # --- sample grid ----------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, steps: int) -> torch.Tensor:
        """x̂0 of the grid's images after ``steps`` flow-Euler steps (fixed noise, CFG when the empty prompt is
        given and cfg ≠ 1)."""
        grp = self.groups[0]
        n = self.grid_noise.shape[0]
        cond = {k: v.to(self.device)[:n] for k, v in grp.conds.items()}
        w = float(self.options.cfg)
        uncond = None
        if grp.empty is not None and w != 1.0:
            uncond = {k: v.to(self.device)[None].expand((n,) + tuple(v.shape)) for k, v in grp.empty.items()}

        def denoise(x, sigma):
            x0 = self.bridge.denoised(sigma, self._output(sigma, x, cond), x)
            if uncond is not None:
                x0_u = self.bridge.denoised(sigma, self._output(sigma, x, uncond), x)
                x0 = x0_u + w * (x0 - x0_u)
            return x0

        sigmas = flow_sigmas(steps, self.bridge.sigma_max).to(self.device)
        noise = self.grid_noise
        x = self.bridge.start_state(sigmas[:1], noise, torch.zeros_like(noise), True)
        return sample_euler_flow(denoise, x, sigmas)

    def run(self, step: int) -> ValidationResult:
        """Loss, then grid columns in increasing step count until ``max_seconds`` are spent."""
        t0 = self.clock()
        result = ValidationResult(step=step, loss=self.loss())
        cap = float(self.options.max_seconds)
        if self.grid_noise.shape[0] > 0:
            for steps in self.options.grid_steps:
                if cap > 0 and self.clock() - t0 >= cap:
                    result.skipped.append(steps)
                    continue
                result.grid[steps] = self.sample(steps)
                if self.device.type == "cuda":  # the cap and the reported time count finished GPU work
                    torch.cuda.synchronize(self.device)
        steps = self.options.grid_steps
        if self.want_straightness and len(steps) > 1 and steps[0] == 1 and 1 in result.grid and steps[-1] in result.grid:
            result.straightness = straightness(result.grid[1], result.grid[steps[-1]])
        result.seconds = self.clock() - t0
        return result
