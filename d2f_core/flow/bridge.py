"""The Diff2Flow bridge: a discrete VP model (ε, v or x0 output) read as a flow-matching model.

Coordinates (DESIGN §2). With ς the model's VE sigma and σ flow time:

    σ = φ(ς) = ς / (1 + ς),        ς = σ / (1 - σ)
    x = x_VE / (1 + ς) = (1 - σ)·x_VE
    x_VP = x_VE / sqrt(1 + ς²) = x / D,      D = sqrt((1 - σ)² + σ²)

so x = (1 - σ)·x0 + σ·ε and the VP state the network was trained on is x / D with
a = (1 - σ)/D, s = σ/D (a² + s² = 1). A few models take the VE state itself, unscaled (the host's
``IMG_TO_IMG`` parameterisation, LotusD): their input is x_VE = x / (1 - σ) (``input_space="ve"``).
The input space and the output parameterisation are independent: the host's ε/v/x0 formulas read the
network output against x_VE, whatever the network was fed. From a network output at flow time σ:

    ε-model:  x̂0 = (x - σ·ε̂) / (1 - σ)                 v̂ = (ε̂ - x) / (1 - σ)
    v-model:  x̂0 = ((1 - σ)·x - σ·D·v̂_VP) / D²          v̂ = ((2σ - 1)·x + D·v̂_VP) / D²
    x0-model: x̂0 = out                                  v̂ = (x - x̂0) / σ

where v̂ is the flow velocity dx/dσ = ε - x0 the flow sampler integrates. All coefficients are
computed in σ's precision, float32 or better, whatever dtype the network ran in: float32 for the host's
float32 σ, float64 only for a caller's float64 σ (no float64 is ever made on a device by the bridge).
"""

from __future__ import annotations

import torch

from .schedule import DiscreteSchedule

PREDICTION_TYPES = ("eps", "v_prediction", "x0")
INPUT_SPACES = ("vp", "ve")  # what the network is fed: x_VP = x/D (SD and nearly all), or x_VE = x/(1-σ) (LotusD)


def flow_sigma(ve_sigma):
    """φ(ς) = ς / (1 + ς)."""
    return ve_sigma / (1 + ve_sigma)


def ve_sigma(sigma):
    """φ⁻¹(σ) = σ / (1 - σ)."""
    return sigma / (1 - sigma)


def _as_batch(sigma: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """σ as float32+ broadcastable against ``like`` (one value, or one per batch row)."""
    sigma = torch.as_tensor(sigma, device=like.device)
    if sigma.dtype not in (torch.float32, torch.float64):
        sigma = sigma.float()
    if sigma.numel() == 1:
        return sigma.reshape(())
    return sigma.reshape(sigma.shape[:1] + (1,) * (like.ndim - 1))


def vp_scale(sigma):
    """D(σ) = sqrt((1 - σ)² + σ²) = (1 - σ)·sqrt(1 + ς²)."""
    return ((1 - sigma) ** 2 + sigma ** 2).sqrt()


def _version_of(t: torch.Tensor) -> int | None:
    return None if t.is_inference() else t._version


class _PerSigma:
    """What depends on σ alone, flat (B,): σ, 1 - σ, D(σ), and the label once asked for."""

    __slots__ = ("sigma", "one_minus", "d", "label")

    def __init__(self, sigma: torch.Tensor):
        self.sigma = sigma
        self.one_minus = 1 - sigma
        self.d = torch.hypot(self.one_minus, sigma)
        self.label = None

    @staticmethod
    def view(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        t = t.to(like.device)
        return t.reshape(()) if t.numel() == 1 else t.reshape(t.shape[:1] + (1,) * (like.ndim - 1))


class FlowBridge:
    """A discrete VP model's parameterisation seen from flow coordinates.

    ``label_offset``: 0 for checkpoints trained the standard way (index n ↔ ᾱ_n). Use 1 for
    checkpoints fine-tuned with the official Diff2Flow code, which feeds label k for ᾱ_{k-1}.

    ``input_space``: "vp" (the network sees x_VP = x/D, as every ε/v checkpoint does) or "ve" (it sees
    x_VE = x/(1-σ) unscaled: the host's ``IMG_TO_IMG``, i.e. LotusD's x0-from-latent parameterisation).

    The σ-only quantities of the last σ tensor seen are kept: a host model call hands the same σ to
    ``model_input``, ``label`` and ``denoised``, and recomputing them costs more host time than the
    arithmetic on the latents at small batch.
    """

    def __init__(self, schedule: DiscreteSchedule, prediction: str = "eps", label_offset: float = 0.0,
                 input_space: str = "vp"):
        if prediction not in PREDICTION_TYPES:
            raise ValueError(f"prediction must be one of {PREDICTION_TYPES}, got '{prediction}'")
        if input_space not in INPUT_SPACES:
            raise ValueError(f"input_space must be one of {INPUT_SPACES}, got '{input_space}'")
        if prediction == "eps" and schedule.zsnr:
            raise ValueError(
                "ε-prediction on a zero-terminal-SNR schedule is ill-posed: at the last step the model "
                "would have to predict x0 from pure noise through ε, x̂0 = (x - σ·ε̂)/(1 - σ) with 1 - σ ≈ 0. "
                "Use a v-prediction checkpoint with zsnr, or turn zsnr off.")
        self.schedule = schedule
        self.prediction = prediction
        self.input_space = input_space
        self.label_offset = float(label_offset)
        self.sigmas = flow_sigma(schedule.sigmas)  # float64 on the CPU, increasing
        # Read as host numbers at every training step: Python floats, so no tensor (view) is made then.
        self._range = (float(self.sigmas[0]), float(self.sigmas[-1]))
        self._last = (None, -1, None)

    def __getstate__(self):  # the cache holds a live tensor: never copy or pickle it
        state = dict(self.__dict__)
        state["_last"] = (None, -1, None)
        return state

    @property
    def sigma_min(self) -> float:
        return self._range[0]

    @property
    def sigma_max(self) -> float:
        return self._range[1]

    def _per_sigma(self, sigma) -> _PerSigma:
        """σ-only quantities, reused while the same σ tensor comes back unchanged.

        A tensor's version counter proves it unchanged. Tensors made under ``torch.inference_mode()``
        (every host node runs there) have none: for those, identity alone is the key. The cache keeps
        the tensor alive, so its memory cannot be reused by another σ; only an in-place write to the
        very tensor between two calls could go unseen, and the host's model call builds a fresh σ
        tensor for every evaluation and never writes to it.
        """
        last, version, entry = self._last
        if last is sigma and version == _version_of(sigma):
            return entry
        flat = torch.as_tensor(sigma)
        if flat.dtype not in (torch.float32, torch.float64):
            flat = flat.float()
        entry = _PerSigma(flat.reshape(-1))
        if isinstance(sigma, torch.Tensor):
            self._last = (sigma, _version_of(sigma), entry)
        return entry

    # --- time -----------------------------------------------------------------------------------
    def label(self, sigma: torch.Tensor) -> torch.Tensor:
        """Network time label n(σ) = n_schedule(σ/(1-σ)) + offset, fractional, shaped like σ.

        In σ's precision (float32 from the host; float64 only for a float64 σ), on σ's device: no float64
        is made on a device that lacks it. The float32 label is within ½ ulp + 6e-7 of the float64 one on
        SD (``DiscreteSchedule`` derives the bound, tests/test_devices.py proves it by exhaustion)."""
        entry = self._per_sigma(sigma)
        if entry.label is None:
            n = self.schedule.flow_label(entry.sigma)
            entry.label = n + self.label_offset if self.label_offset else n
        return entry.label.reshape(torch.as_tensor(sigma).shape)

    def sigma_at(self, label: torch.Tensor) -> torch.Tensor:
        """Inverse of ``label``: σ = φ(ς(n - offset)), in the label's precision (float64, else float32)."""
        return flow_sigma(self.schedule.sigma(torch.as_tensor(label) - self.label_offset))

    # --- states ---------------------------------------------------------------------------------
    def model_input(self, sigma, x: torch.Tensor) -> torch.Tensor:
        """The state the network was trained on: x_VP = x / D(σ), or for ``input_space="ve"`` the
        unscaled x_VE = x / (1 - σ) (exactly the host's native input at ς = σ/(1-σ) either way)."""
        entry = self._per_sigma(sigma)
        scale = entry.d if self.input_space == "vp" else entry.one_minus
        return (x / _PerSigma.view(scale, x)).to(x.dtype)

    def start_state(self, sigma, noise: torch.Tensor, x0: torch.Tensor, max_denoise: bool = False) -> torch.Tensor:
        """The sampler's first state at σ: (1-σ)·x0 + σ·ε, or with ``max_denoise`` the host's
        native start x_VE = x0 + sqrt(1+ς²)·ε mapped to flow coordinates, (1-σ)·x0 + D·ε, so that
        txt2img starts exactly where native sampling does."""
        entry = self._per_sigma(sigma)
        scale = _PerSigma.view(entry.d if max_denoise else entry.sigma, noise)
        return (scale * noise + _PerSigma.view(entry.one_minus, noise) * x0).to(noise.dtype)

    def denoised(self, sigma, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """x̂0 from the network output ``out`` at flow state ``x``, time σ."""
        if self.prediction == "x0":
            return out.to(torch.promote_types(x.dtype, torch.float32))
        entry = self._per_sigma(sigma)
        s = _PerSigma.view(entry.sigma, x)
        out = out.to(torch.promote_types(out.dtype, s.dtype))
        if self.prediction == "eps":
            x0 = torch.addcmul(x, s, out, value=-1) / _PerSigma.view(entry.one_minus, x)
        else:
            d = _PerSigma.view(entry.d, x)
            x0 = (_PerSigma.view(entry.one_minus, x) * x - s * d * out) / d ** 2
        return x0.to(torch.promote_types(x.dtype, torch.float32))

    def velocity(self, sigma, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Flow velocity v̂ = dx/dσ = ε̂ - x̂0, in closed forms that stay finite as σ → 0."""
        entry = self._per_sigma(sigma)
        s = _PerSigma.view(entry.sigma, x)
        out = out.to(torch.promote_types(out.dtype, s.dtype))
        if self.prediction == "eps":
            v = (out - x) / _PerSigma.view(entry.one_minus, x)
        elif self.prediction == "v_prediction":
            d = _PerSigma.view(entry.d, x)
            v = ((2 * s - 1) * x + d * out) / d ** 2
        else:
            v = (x - out) / s
        return v.to(torch.promote_types(x.dtype, torch.float32))

    def native_target(self, noise: torch.Tensor, x0: torch.Tensor, sigma) -> torch.Tensor:
        """What the network natively regresses at this state: ε, v_VP = a·ε - s·x0, or x0."""
        if self.prediction == "eps":
            return noise
        if self.prediction == "x0":
            return x0
        s = _as_batch(sigma, x0)
        d = vp_scale(s)
        return ((1 - s) * noise - s * x0) / d


def interpolate(x0: torch.Tensor, noise: torch.Tensor, sigma) -> torch.Tensor:
    """The flow path x_σ = (1 - σ)·x0 + σ·ε."""
    s = _as_batch(sigma, x0)
    return (1 - s) * x0 + s * noise
