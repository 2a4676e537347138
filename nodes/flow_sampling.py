"""The flow view of a legacy model's ``model_sampling``: a ``comfy.model_sampling.CONST`` subclass.

Every method is the checkpoint's own discrete VP sampling seen through the bridge
(``d2f_core.flow.bridge``); subclassing CONST makes the host's samplers take their flow paths
(``euler_ancestral`` → RF variant, half-log-SNR in flow form, first-sigma offsets).

Families (ComfyUI v0.33 ``comfy/supported_models.py``). Everything the host loads with a
``ModelSamplingDiscrete`` schedule maps exactly, whatever its β: SD1.x, SD2.x (ε, and 768-v as the host
detects it), SD2.1 unCLIP, SDXL and its refiner, SSD-1B, Segmind Vega, KOALA, SDXL v-pred with zero
terminal SNR, InstructPix2Pix, the ×4 upscaler (scaled-linear 1e-4 → 0.02), LotusD (x0 from the unscaled
VE input, the host's ``IMG_TO_IMG``), PixArt-α/Σ (``sqrt_linear``, ε) and HunyuanDiT (v, its own
``linear_end``). The schedule is always the host's own: the model sampling's β settings when they
reproduce its σ table, else that table. Continuous (EDM), distilled (LCM) and flow schedules are refused,
by family name.
"""

from __future__ import annotations

import comfy.model_sampling as ms
import torch

from ..d2f_core.flow.bridge import FlowBridge, flow_sigma
from ..d2f_core.flow.schedule import DiscreteSchedule, make_betas

PREDICTION_BY_DENOISER = {
    ms.EPS.calculate_denoised: "eps",
    ms.V_PREDICTION.calculate_denoised: "v_prediction",
    ms.X0.calculate_denoised: "x0",
}


# The host's model_config class names (comfy/supported_models.py) in the words users know them by.
FAMILY_NAMES = {
    "SD15": "SD1.x", "SD20": "SD2.x", "SD21UnclipL": "SD2.1 unCLIP-L", "SD21UnclipH": "SD2.1 unCLIP-H",
    "SDXL": "SDXL", "SDXLRefiner": "SDXL refiner", "SSD1B": "SSD-1B", "Segmind_Vega": "Segmind Vega",
    "KOALA_700M": "KOALA-700M", "KOALA_1B": "KOALA-1B", "SD15_instructpix2pix": "InstructPix2Pix (SD1.5)",
    "SDXL_instructpix2pix": "InstructPix2Pix (SDXL)", "SD_X4Upscaler": "SD ×4 upscaler", "LotusD": "LotusD",
    "PixArtAlpha": "PixArt-α", "PixArtSigma": "PixArt-Σ", "HunyuanDiT": "HunyuanDiT 1.0",
    "HunyuanDiT1": "HunyuanDiT 1.1/1.2", "Stable_Zero123": "Stable Zero123", "SVD_img2vid": "Stable Video Diffusion",
    "Stable_Cascade_C": "Stable Cascade (stage C)", "Stable_Cascade_B": "Stable Cascade (stage B)", "SD3": "SD3",
    "Flux": "Flux", "AuraFlow": "AuraFlow",
}


class FlowBridgeSampling(ms.CONST, torch.nn.Module):
    """model_sampling of a Diff2Flow-bridged model: flow time σ = ς/(1+ς) over the base schedule."""

    def __init__(self, base: torch.nn.Module, bridge: FlowBridge, family: str = "", schedule_source: str = ""):
        torch.nn.Module.__init__(self)
        self.base = base
        self.bridge = bridge
        self.prediction = bridge.prediction
        self.family = family  # e.g. "PixArt-Σ": for read-outs and messages
        self.schedule_source = schedule_source  # where the float64 schedule came from (β settings or the table)
        # float32 like the host's own ModelSamplingDiscrete buffers (schedulers read ``sigmas``; the module
        # moves with the model, so a float64 buffer would be float64 on the device). Rounded from float64.
        self.register_buffer("sigmas", bridge.sigmas.float())
        self.register_buffer("log_sigmas", bridge.sigmas.log().float())

    @property
    def sigma_min(self):
        return self.sigmas[0]

    @property
    def sigma_max(self):
        return self.sigmas[-1]

    def timestep(self, sigma):  # computed in σ's precision (float32 from the host): no float64 on the device
        return self.bridge.label(sigma).to(torch.float32)

    def sigma(self, timestep):
        return self.bridge.sigma_at(timestep).to(torch.float32)

    def percent_to_sigma(self, percent):
        if percent <= 0.0:
            return 1.0
        if percent >= 1.0:
            return 0.0
        schedule = self.bridge.schedule
        # Host-side (cond timestep ranges, at the start of sampling): Python doubles, no tensor made.
        return flow_sigma(schedule.sigma_scalar((1.0 - percent) * (len(schedule) - 1)))

    def calculate_input(self, sigma, noise):
        return self.bridge.model_input(sigma, noise)

    def calculate_denoised(self, sigma, model_output, model_input):
        return self.bridge.denoised(sigma, model_output, model_input)

    def noise_scaling(self, sigma, noise, latent_image, max_denoise=False):
        return self.bridge.start_state(sigma, noise, latent_image, max_denoise)

    def inverse_noise_scaling(self, sigma, latent):
        return latent / (1.0 - ms.reshape_sigma(sigma, latent.ndim))


def family_of(model_patcher) -> str:
    """The host's name for what it loaded (``model_config`` class), in words: "SDXL", "PixArt-Σ", …"""
    config = getattr(getattr(model_patcher, "model", None), "model_config", None)
    name = type(config).__name__ if config is not None else "unknown model"
    return FAMILY_NAMES.get(name, name)


def _sampling_kind(base) -> str:
    """The host builds model_sampling as ``class ModelSampling(schedule, parameterisation)``: name both."""
    bases = [b.__name__ for b in type(base).__bases__ if b is not torch.nn.Module]
    return "/".join(bases) or type(base).__name__


def detect_parameterisation(base, family: str) -> tuple[str, str]:
    """(prediction, input space) of the base model_sampling, or a ValueError naming the family.

    Exact only for the host's own formulas with σ_data = 1: input ``EPS.calculate_input`` (x_VP) or
    ``IMG_TO_IMG.calculate_input`` (x_VE unscaled), output ε/v/x0, noise scaling ``EPS.noise_scaling``
    (x_VE = x0 + ς·ε) and no inverse scaling: what ``FlowBridge`` inverts in closed form."""
    kind = type(base)
    inputs = {ms.EPS.calculate_input: "vp", ms.IMG_TO_IMG.calculate_input: "ve"}
    space = inputs.get(getattr(kind, "calculate_input", None))
    prediction = PREDICTION_BY_DENOISER.get(getattr(kind, "calculate_denoised", None))
    scaling_ok = (getattr(kind, "noise_scaling", None) is ms.EPS.noise_scaling
                  and getattr(kind, "inverse_noise_scaling", None) is ms.EPS.inverse_noise_scaling)
    if space is None or prediction is None or not scaling_ok or float(getattr(base, "sigma_data", 1.0)) != 1.0:
        raise ValueError(f"D2FFlowPatch cannot map {family}'s parameterisation ({_sampling_kind(base)}): it bridges "
                         "ε-, v- and x0-prediction on a discrete VP schedule with the host's standard input and noise "
                         "scaling (SD1.x/2.x/XL and their derivatives, PixArt, HunyuanDiT, LotusD).")
    return prediction, space


def detect_prediction(base) -> str:
    """eps / v_prediction / x0 from the base model_sampling's mixin, or a ValueError."""
    return detect_parameterisation(base, type(base).__name__)[0]


def schedule_of(base, sampling_settings: dict | None) -> DiscreteSchedule:
    """The base schedule in float64, as the host built it: rebuilt from the model sampling's own β settings
    (``linear_start``/``linear_end``/``num_timesteps``/``zsnr`` as the host stored them on it, the β kind from the
    model's ``sampling_settings``: ``linear`` = scaled linear, ``sqrt_linear`` = PixArt's plain linear β) when
    that reproduces its σ table, else the table itself (a custom ``set_sigmas``) promoted to float64.
    ``schedule.source`` says which."""
    table = base.sigmas.detach().double().cpu()
    zsnr = bool(getattr(base, "zsnr", False))
    settings = sampling_settings or {}
    kind = settings.get("beta_schedule", "linear")  # the host's default in ModelSamplingDiscrete.__init__
    start = float(getattr(base, "linear_start", settings.get("linear_start", 0.00085)))
    end = float(getattr(base, "linear_end", settings.get("linear_end", 0.012)))
    steps = int(getattr(base, "num_timesteps", len(table)))
    try:
        if steps == len(table):
            rebuilt = DiscreteSchedule.from_betas(make_betas(kind, steps, start, end), zsnr=zsnr)
            if torch.allclose(rebuilt.sigmas, table, rtol=1e-5, atol=0):
                rebuilt.source = f"{kind} β {start:g} → {end:g}, T {steps}" + (", zero terminal SNR" if zsnr else "")
                return rebuilt
    except ValueError:
        pass
    schedule = DiscreteSchedule(table, zsnr=zsnr)
    schedule.source = f"the model's σ table (T {len(table)})" + (", zero terminal SNR" if zsnr else "")
    return schedule


def flow_model_sampling(model_patcher, prediction: str = "auto", label_offset: float = 0.0) -> FlowBridgeSampling:
    """Build F for a ModelPatcher, refusing what the bridge cannot represent exactly (by family name)."""
    base = model_patcher.get_model_object("model_sampling")
    family = family_of(model_patcher)
    if isinstance(base, FlowBridgeSampling):
        raise ValueError(f"This {family} model is already flow-patched by D2FFlowPatch; apply the patch once.")
    if isinstance(base, ms.CONST):
        raise ValueError(f"This {family} model is already a flow-matching model ({_sampling_kind(base)}, like SD3/Flux): "
                         "sample it directly, D2FFlowPatch is for ε/v-prediction checkpoints.")
    if not isinstance(base, ms.ModelSamplingDiscrete) or type(base).timestep is not ms.ModelSamplingDiscrete.timestep \
            or type(base).sigma is not ms.ModelSamplingDiscrete.sigma:
        raise ValueError(f"D2FFlowPatch cannot map {family} with {_sampling_kind(base)}: it needs a discrete VP schedule "
                         "with the standard timestep labels (not EDM/continuous schedules such as Playground v2.5 or "
                         "CosXL, nor distilled/LCM ones).")
    detected, space = detect_parameterisation(base, family)
    chosen = detected if prediction == "auto" else prediction
    if chosen == "eps" and bool(getattr(base, "zsnr", False)):
        raise ValueError(f"{family} with ε-prediction on a zero-terminal-SNR schedule is ill-posed: at the last step the "
                         "model would have to predict x0 from pure noise through ε, x̂0 = (x - σ·ε̂)/(1 - σ) with 1 - σ ≈ 0. "
                         "Use a v-prediction checkpoint with zsnr, or turn zsnr off.")
    config = getattr(getattr(model_patcher, "model", None), "model_config", None)
    try:
        schedule = schedule_of(base, getattr(config, "sampling_settings", None))
    except ValueError as err:  # e.g. zsnr rescaling of a schedule it was not made for leaves a non-monotone table
        raise ValueError(f"D2FFlowPatch cannot map {family} on this schedule ({_sampling_kind(base)}): {err}. "
                         "The bridge needs ς_n strictly increasing, as the host's own schedules are.") from None
    return FlowBridgeSampling(base, FlowBridge(schedule, chosen, label_offset, input_space=space), family, schedule.source)
