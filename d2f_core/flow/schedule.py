"""Discrete VP noise schedules in ComfyUI's VE coordinates: tables in float64, calls in the caller's precision.

A discrete schedule is the table ``ς_n = sqrt((1 - ᾱ_n) / ᾱ_n)``, n = 0 … T-1, increasing in n.
Between table entries the host interpolates log-linearly:

    ς(t) = exp((1 - w)·log ς_⌊t⌋ + w·log ς_⌈t⌉),   w = t - ⌊t⌋

``DiscreteSchedule.label`` inverts exactly that map, so a noise level between two entries gets the
fractional label the network's sinusoidal time embedding expects, not the nearest integer;
``DiscreteSchedule.flow_label`` does the same from flow time σ = ς/(1+ς) (DESIGN §2).
"""

from __future__ import annotations

import hashlib
import math
from typing import NamedTuple

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



class _Tables(NamedTuple):
    """One precision's copy of a schedule's tables (all (T,) but ``slope``, which is per segment, (T-1,)).

    Breakpoints are split ``hi + lo``: ``hi`` is the entry rounded to this precision and ``lo`` the
    rest (0 in float64), so that ``(x - hi_i) - lo_i`` is the distance to the exact entry, to within
    one rounding of the result.
    """

    log: torch.Tensor        # log ς_n, for ς(t)
    ve_hi: torch.Tensor      # ς_n
    ve_lo: torch.Tensor
    flow_hi: torch.Tensor    # σ_n = ς_n / (1 + ς_n)
    flow_lo: torch.Tensor
    one_minus: torch.Tensor  # 1 - σ_n = 1 / (1 + ς_n), computed without cancellation
    slope: torch.Tensor      # W_i = 1 / (log ς_{i+1} - log ς_i)

    def to(self, device) -> "_Tables":
        return _Tables(*(t.to(device) for t in self))


def _split(exact: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    hi = exact.to(dtype)
    return hi, (exact - hi.to(torch.float64)).to(dtype)


def _build_tables(sigmas: torch.Tensor, log: torch.Tensor) -> dict:
    """The float64 tables and their float32 conversion, both on the CPU (computed in float64)."""
    flow = sigmas / (1 + sigmas)
    one_minus = 1 / (1 + sigmas)
    slope = 1 / (log[1:] - log[:-1])
    tables = {}
    for dtype in (torch.float64, torch.float32):
        ve_hi, ve_lo = _split(sigmas, dtype)
        flow_hi, flow_lo = _split(flow, dtype)
        tables[dtype] = _Tables(log.to(dtype), ve_hi, ve_lo, flow_hi, flow_lo, one_minus.to(dtype), slope.to(dtype))
    return tables


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The precision a per-call computation on ``x`` runs in: float64 for a float64 tensor (only a caller's
    own float64 can ask for it), float32 for everything else (float32, and half types promoted)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


class DiscreteSchedule:
    """The VE sigma table of a discrete VP model, with its exact inverse.

    ``sigmas``: float64 on the CPU, shape (T,), increasing. ``zsnr``: whether the last entry is
    (numerically) zero terminal SNR, where ε-prediction is ill-posed.

    Precision and devices. The tables are built once, in float64 on the CPU (exact), and kept on the CPU
    in float64 and in float32. A call computes in the precision of its argument (``compute_dtype``):
    float64 for a float64 tensor (unit tests, host-side checks), float32 otherwise (the host hands σ in
    float32, always). A device gets its own copy of one precision's tables, converted on the CPU before
    the copy: no float64 tensor is ever made on a device unless the caller's argument was float64 there,
    which a device without float64 (Apple MPS) cannot hand over.

    Label accuracy in float32 (``flow_label``; proved by exhaustion over every float32 σ of the SD
    schedule in tests/test_devices.py). Notation: u = 2⁻²⁴ (float32 unit roundoff), fl(·) one float32
    rounding, |fl(a∘b) - a∘b| ≤ u·|a∘b|. On segment i (σ_i ≤ σ ≤ σ_{i+1}) the label is

        n = i + W_i·Δ,   Δ = log ς - log ς_i = log1p(d/σ_i) - log1p(-d/(1-σ_i)),   d = σ - σ_i,

    using log ς = log σ - log(1-σ). This replaces the affine form C_i + W_i·log ς, C_i = i - W_i·log ς_i,
    whose float32 error is dominated by rounding log ς itself (|log ς| up to 3.6, one ulp 2.4e-7) and ς =
    σ/(1-σ) (2u relative), amplified by W_i (up to 305 on SD): ≈ 1e-4 measured. Term by term for float32 σ
    against the float64 label of the same σ:

    1. d = fl((σ - hi_i) - lo_i): σ - hi_i is exact (Sterbenz: hi_i ≤ σ ≤ hi_{i+1} ≤ 2·hi_i, as σ_{i+1}/σ_i
       ≤ 1.40 on SD), so d = d*(1 + δ₁); hi_i + lo_i equals σ_i to u²·σ_i.
    2. q₁ = fl(d/hi_i), q₂ = fl(d/fl(1-σ_i)): one rounding of the quotient and one of the divisor each,
       so q = q*(1 + θ), |θ| ≤ 3u.
    3. log1p(q) with q = q*(1+θ) moves by q*θ/(1+q*), i.e. by κ·θ relative, κ = q/((1+q)·log1p(q)) (κ ≤ 1
       for q ≥ 0; ≤ 1.006 for -q₂ on SD); log1p itself adds ≤ k ulp = 2k·u relative (k = 1 for the CPU's
       SLEEF log1pf_u10 and CUDA's log1pf).
    4. Δ = fl(log1p(q₁) - log1p(-q₂)): both terms have the sign of d, so the difference adds magnitudes:
       no cancellation, one more rounding u. Relative error of Δ ≤ (3κ + 2k + 1)·u.
    5. f = fl(fl(W_i)·Δ): two more roundings. |f - f*| ≤ (3κ + 2k + 3)·u·|f*|, |f*| ≤ 1.
    6. n = fl(i + f) (addcmul; fused or not, the bound holds): ≤ ½ ulp(n), i.e. ≤ 2^(⌊log₂ n⌋ - 24),
       2⁻¹⁵ = 3.05e-5 for 512 ≤ n < 1024. This is the resolution of a float32 label, unavoidable.
    7. Segment choice: i is found among the float32 breakpoints hi_j, so a σ between hi_j and σ_j is
       evaluated on the neighbouring segment's affine piece (in log ς), extended by at most
       |lo_j|/(σ_j(1-σ_j)) in log ς; the pieces meet at the breakpoint, so the error is at most
       E_seg = max_j |lo_j|/(σ_j(1-σ_j))·|W_j - W_{j-1}| (1.07e-7 on SD, from its steepest slope change
       at the bottom).

    Total: |n₃₂ - n₆₄| ≤ ½ ulp(n) + (3κ + 2k + 3)·u + E_seg (first order in u). On the SD schedule, k = 1:
    ≤ ½ ulp(n) + 5.8e-7 ≤ 3.11e-5 over [σ_min, σ_max]; measured 3.068e-5, at most 1.98e-7 above ½ ulp(n)
    (``flow_label_error_bound`` computes the bound for any schedule). Against the label spacing of 1
    between table entries this is 3·10⁻⁵ of a step (the host's own integer labels are off by up to ½ a
    step), and near σ_max, where the labels are largest, it is 5× below the label gap between neighbouring
    float32 σ values (1.6e-4 there: fp32's σ resolution, not the label math, limits the label, DESIGN §7).
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
        self.source = ""  # how the table was obtained, in words, for read-outs (set by whoever built it)
        self._log_list = self.log_sigmas.tolist()  # host-side scalar math (``sigma_scalar``) makes no tensor
        # Identifies the exact table (files record it): hashed here, where the float64 table is made, once.
        self.table_sha256 = hashlib.sha256(sigmas.numpy().tobytes()).hexdigest()
        self._range = (float(sigmas[0]), float(sigmas[-1]))
        self._cpu = _build_tables(sigmas, self.log_sigmas)
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
        return self._range[0]

    @property
    def sigma_max(self) -> float:
        return self._range[1]

    def _tables(self, device, dtype: torch.dtype) -> _Tables:
        """The tables in ``dtype`` on ``device``: the CPU copy itself, or a copy made once per (device, dtype)
        from the CPU copy already in ``dtype`` (a host→device copy per sampler step would be a host sync,
        and converting after the move would make float64 on the device)."""
        device = torch.device(device)
        if device.type == "cpu":
            return self._cpu[dtype]
        key = (str(device), dtype)
        if key not in self._on_device:
            self._on_device[key] = self._cpu[dtype].to(device)
        return self._on_device[key]

    def _segment_label(self, x: torch.Tensor, hi: torch.Tensor, lo: torch.Tensor, slope: torch.Tensor, delta) -> torch.Tensor:
        """n = i + W_i·Δ(x, i) on the segment i of the breakpoints hi (+ lo) holding x, clamped to [0, T-1].

        ``x`` is clamped to [hi_0, hi_{T-1}] first (the network never saw labels beyond the table); with
        ``right=True`` every x has hi_i ≤ x, so x - hi_i is exact (see the class docstring). No host sync:
        searchsorted and gathers only."""
        x = x.clamp(hi[0], hi[-1])
        i = torch.searchsorted(hi[1:-1], x.contiguous(), right=True)
        d = (x - hi[i]) - lo[i]
        return torch.addcmul(i.to(x.dtype), delta(d, i), slope[i]).clamp(0, len(hi) - 1)

    def label(self, ve_sigma: torch.Tensor) -> torch.Tensor:
        """Fractional table index n with ς(n) = ``ve_sigma``, inverting the log-linear interpolation:

            n = i + W_i·log(ς/ς_i) = i + W_i·log1p((ς - ς_i)/ς_i)     on segment i (ς_i ≤ ς ≤ ς_{i+1})

        In the precision of ``ve_sigma`` (float64, else float32), on its device; clamped to [0, T-1].
        """
        ve_sigma = torch.as_tensor(ve_sigma)
        dtype = compute_dtype(ve_sigma)
        t = self._tables(ve_sigma.device, dtype)
        return self._segment_label(ve_sigma.to(dtype), t.ve_hi, t.ve_lo, t.slope,
                                   lambda d, i: torch.log1p(d / t.ve_hi[i]))

    def flow_label(self, sigma: torch.Tensor) -> torch.Tensor:
        """The label of flow time σ (ς = σ/(1-σ)) without forming ς, the form whose float32 error is bounded
        in the class docstring:

            n = i + W_i·(log1p(d/σ_i) - log1p(-d/(1-σ_i))),   d = σ - σ_i,   σ_i = ς_i/(1+ς_i)

        In the precision of ``sigma`` (float64, else float32), on its device; clamped to [0, T-1].
        """
        sigma = torch.as_tensor(sigma)
        dtype = compute_dtype(sigma)
        t = self._tables(sigma.device, dtype)

        def delta(d, i):  # log ς - log ς_i = log(σ/σ_i) - log((1-σ)/(1-σ_i)); both terms carry d's sign
            return torch.log1p(d / t.flow_hi[i]) - torch.log1p(-d / t.one_minus[i])
        return self._segment_label(sigma.to(dtype), t.flow_hi, t.flow_lo, t.slope, delta)

    def sigma(self, label: torch.Tensor) -> torch.Tensor:
        """ς(t) by log-linear interpolation of the table (the host's ``ModelSamplingDiscrete.sigma``), in the
        precision of ``label`` (float64, else float32), on its device."""
        label = torch.as_tensor(label)
        dtype = compute_dtype(label)
        table = self._tables(label.device, dtype).log
        t = label.to(dtype).clamp(0, len(table) - 1)
        lo = t.floor().long()
        hi = t.ceil().long()
        w = t - lo.to(dtype)
        return ((1 - w) * table[lo] + w * table[hi]).exp()

    def sigma_scalar(self, label: float) -> float:
        """ς(t) for one host-side number, in Python floats (double precision, no tensor made)."""
        t = min(max(float(label), 0.0), len(self._log_list) - 1.0)
        lo, hi = math.floor(t), math.ceil(t)
        w = t - lo
        return math.exp((1 - w) * self._log_list[lo] + w * self._log_list[hi])

    def fp32_grid_time_error(self, labels, log1p_ulps: float = 1.0) -> torch.Tensor:
        """How far, in labels, float32 moves an integer-label grid entry between native and flow sampling.

        The patched model is handed σ̃_n = fl₃₂(σ_n), σ_n = ς_n/(1+ς_n) (its own float32 table), the native
        model fl₃₂(ς_n) with the exact integer label n. Stock Euler on the patched model is DDIM over
        ς̃_n = σ̃_n/(1-σ̃_n) at the fractional label n(σ̃_n) (DESIGN §2), so both runs are DDIM at slightly
        different times of the same schedule. Per entry, to first order:

            |σ̃_n - σ_n| ≤ ½ulp(σ_n)
            |log ς̃_n - log ς_n| ≤ ρ_n = ½ulp(σ_n) / (σ_n·(1 - σ_n))         (d log ς / dσ = 1/(σ(1-σ)))
            |log fl₃₂(ς_n) - log ς_n| ≤ u = 2⁻²⁴                              (the native side's own rounding)
            δ_n = W*_n·(ρ_n + u) + L                                          labels, both sides together

        with W*_n = max(W_{n-1}, W_n) the label-per-log-ς slope of the segments meeting at n and L the
        float32 label-arithmetic bound (``flow_label_error_bound()["total"]``). ρ_n grows like ς_n near the
        top: δ ≈ 8e-5 of a label at SD's σ_max (ς 14.6), 5e-4 at PixArt's (ς 157), 8e-4 at HunyuanDiT 1.1's
        (ς 420), where 1-σ is 6e-3 and 2e-3 and float32 resolves σ only that coarsely (DESIGN §7). A sampled
        output moves by at most Σ_n g_n·δ_n, g_n its change per label of entry n (model-dependent, measured by
        moving the entry one table step). Returns δ_n (float64, CPU) for the given integer labels.
        """
        n = torch.as_tensor(labels, dtype=torch.float64).round().long().clamp(0, len(self) - 1)
        t = self._cpu[torch.float64]
        sig, om, w = t.flow_hi, t.one_minus, t.slope
        w_left = torch.cat([w[:1], w])    # W_{n-1} (W_0 at n = 0)
        w_right = torch.cat([w, w[-1:]])  # W_n (W_{T-2} at n = T-1)
        w_star = torch.maximum(w_left, w_right)[n]
        half_ulp = torch.exp2(torch.floor(torch.log2(sig[n])) - 24)
        rho = half_ulp / (sig[n] * om[n])
        return w_star * (rho + 2.0 ** -24) + self.flow_label_error_bound(log1p_ulps)["total"]

    def flow_label_error_bound(self, log1p_ulps: float = 1.0) -> dict:
        """The a-priori bound of the class docstring for float32 ``flow_label`` against float64, as
        ``{"half_ulp_max", "rounding", "segment", "total", "kappa"}``: |n₃₂ - n₆₄| ≤ ½ ulp(n) + rounding +
        segment ≤ total, for σ in [σ_min, σ_max], when consecutive σ_i are within a factor 2 (Sterbenz;
        ``sterbenz`` says whether they are)."""
        u = 2.0 ** -24
        t = self._cpu[torch.float64]
        sig, om, w = t.flow_hi, t.one_minus, t.slope
        gap = sig[1:] - sig[:-1]

        def kappa(q):  # q/((1+q)·log1p(q)), the relative sensitivity of log1p at q (→ 1 as q → 0)
            return (q / ((1 + q) * torch.log1p(q))).max().item()
        k = max(kappa(gap / sig[:-1]), kappa(-gap / om[:-1]))
        lo = (sig - sig.float().double()).abs()
        j = torch.arange(1, len(sig) - 1)
        segment = (lo[j] / (sig[j] * om[j]) * (w[j] - w[j - 1]).abs()).max().item() if len(j) else 0.0
        m = 3 * k + 2 * log1p_ulps + 3
        rounding = m * u / (1 - m * u)
        half_ulp_max = 2.0 ** (math.floor(math.log2(len(sig) - 1)) - 24) if len(sig) > 2 else 2.0 ** -24
        return {"half_ulp_max": half_ulp_max, "rounding": rounding, "segment": segment, "kappa": k,
                "total": half_ulp_max + rounding + segment,
                "sterbenz": bool((sig[1:] <= 2 * sig[:-1]).all())}
