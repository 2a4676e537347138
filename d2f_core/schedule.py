"""Discrete VP noise schedules in ComfyUI's VE coordinates, in float64.

A discrete schedule is the table ``ς_n = sqrt((1 - ᾱ_n) / ᾱ_n)``, n = 0 … T-1, increasing in n.
Between table entries the host interpolates log-linearly:

    ς(t) = exp((1 - w)·log ς_⌊t⌋ + w·log ς_⌈t⌉),   w = t - ⌊t⌋

``DiscreteSchedule.label`` inverts exactly that map, so a noise level between two entries gets the
fractional label the network's sinusoidal time embedding expects, not the nearest integer.
"""

from __future__ import annotations

import math

import torch

ZSNR_TERMINAL_ALPHA_BAR = 4.8973451890853435e-08  # the host's value for ᾱ_{T-1} under zero terminal SNR


def make_betas(schedule: str = "linear", timesteps: int = 1000, linear_start: float = 0.00085,
               linear_end: float = 0.012, cosine_s: float = 8e-3) -> torch.Tensor:
    """β_n in float64 for the schedules legacy checkpoints use.

    ``linear`` is Stable Diffusion's "scaled linear": β_n = (√β_start + n/(T-1)·(√β_end - √β_start))².
    """
    if schedule == "linear":
        return torch.linspace(linear_start ** 0.5, linear_end ** 0.5, timesteps, dtype=torch.float64) ** 2
    if schedule == "sqrt_linear":
        return torch.linspace(linear_start, linear_end, timesteps, dtype=torch.float64)
    if schedule == "sqrt":
        return torch.linspace(linear_start, linear_end, timesteps, dtype=torch.float64) ** 0.5
    if schedule == "cosine":
        steps = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps + cosine_s
        alphas_bar = torch.cos(steps / (1 + cosine_s) * math.pi / 2) ** 2
        alphas_bar = alphas_bar / alphas_bar[0]
        return (1 - alphas_bar[1:] / alphas_bar[:-1]).clamp(0, 0.999)
    raise ValueError(f"unknown beta schedule '{schedule}' (known: linear, sqrt_linear, sqrt, cosine)")


def rescale_zero_terminal_snr(alphas_bar: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2023: shift and scale √ᾱ so that ᾱ_{T-1} = 0, keeping ᾱ_0.

    The terminal value is then pinned to the host's tiny positive constant so ς stays finite.
    """
    root = alphas_bar.sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * first / (first - last)
    alphas_bar = root ** 2
    alphas_bar[-1] = ZSNR_TERMINAL_ALPHA_BAR
    return alphas_bar


class DiscreteSchedule:
    """The VE sigma table of a discrete VP model, with its exact inverse.

    ``sigmas``: float64, shape (T,), increasing. ``zsnr``: whether the last entry is (numerically)
    zero terminal SNR, where ε-prediction is ill-posed.
    """

    def __init__(self, sigmas: torch.Tensor, zsnr: bool = False):
        sigmas = torch.as_tensor(sigmas).detach().to(torch.float64).cpu()
        if sigmas.ndim != 1 or len(sigmas) < 2:
            raise ValueError("a discrete schedule needs a 1-D table of at least two sigmas")
        if not bool((sigmas[1:] > sigmas[:-1]).all()) or not bool((sigmas > 0).all()):
            raise ValueError("a discrete schedule's sigmas must be positive and strictly increasing")
        self.sigmas = sigmas
        self.log_sigmas = sigmas.log()
        self.zsnr = bool(zsnr)
        self._on_device: dict = {}

    @classmethod
    def from_betas(cls, betas: torch.Tensor, zsnr: bool = False) -> "DiscreteSchedule":
        alphas_bar = torch.cumprod(1 - betas.to(torch.float64), dim=0)
        if zsnr:
            alphas_bar = rescale_zero_terminal_snr(alphas_bar)
        return cls(((1 - alphas_bar) / alphas_bar).sqrt(), zsnr=zsnr)

    @classmethod
    def stable_diffusion(cls, zsnr: bool = False) -> "DiscreteSchedule":
        """SD1.x / SD2.x / SDXL: scaled linear β from 0.00085 to 0.012, T = 1000."""
        return cls.from_betas(make_betas("linear", 1000, 0.00085, 0.012), zsnr=zsnr)

    def __len__(self) -> int:
        return len(self.sigmas)

    @property
    def alphas_bar(self) -> torch.Tensor:
        """ᾱ_n = 1 / (1 + ς_n²)."""
        return 1 / (1 + self.sigmas ** 2)

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def _log_table(self, device) -> torch.Tensor:
        return self._tables(device)[0]

    def _tables(self, device):
        """(log ς table, interior breakpoints, per-segment slope W_i, intercept C_i) on ``device``.

        Made once per device: a host→device copy per sampler step would be a host sync.
        """
        key = str(device)
        if key not in self._on_device:
            log = self.log_sigmas
            slope = 1.0 / (log[1:] - log[:-1])
            intercept = torch.arange(len(log) - 1, dtype=torch.float64) - log[:-1] * slope
            self._on_device[key] = tuple(t.to(device) for t in (log, log[1:-1].contiguous(), slope, intercept))
        return self._on_device[key]

    def label(self, ve_sigma: torch.Tensor) -> torch.Tensor:
        """Fractional table index n with ς(n) = ``ve_sigma``, inverting the log-linear interpolation.

        On segment i (log ς_i ≤ log ς ≤ log ς_{i+1}): n = i + (log ς - log ς_i)/(log ς_{i+1} - log ς_i),
        evaluated as C_i + W_i·log ς from per-segment tables. Clamped to [0, T-1] outside the table
        (the network never saw labels beyond it). float64 result.
        """
        ve_sigma = torch.as_tensor(ve_sigma)
        log, inner, slope, intercept = self._tables(ve_sigma.device)
        log_sigma = ve_sigma.to(torch.float64).log().clamp(log[0], log[-1])
        i = torch.searchsorted(inner, log_sigma.contiguous())
        return torch.addcmul(intercept[i], log_sigma, slope[i])

    def sigma(self, label: torch.Tensor) -> torch.Tensor:
        """ς(t) by log-linear interpolation of the table (the host's ``ModelSamplingDiscrete.sigma``)."""
        label = torch.as_tensor(label, dtype=torch.float64)
        table = self._log_table(label.device)
        t = label.clamp(0, len(table) - 1)
        lo = t.floor().long()
        hi = t.ceil().long()
        w = t - lo.to(torch.float64)
        return ((1 - w) * table[lo] + w * table[hi]).exp()
