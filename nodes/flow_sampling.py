"""The flow view of a legacy model's ``model_sampling``: a ``comfy.model_sampling.CONST`` subclass.

Every method is the checkpoint's own discrete VP sampling seen through the bridge
(``d2f_core.flow.bridge``); subclassing CONST makes the host's samplers take their flow paths
(``euler_ancestral`` → RF variant, half-log-SNR in flow form, first-sigma offsets).
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


class FlowBridgeSampling(ms.CONST, torch.nn.Module):
    """model_sampling of a Diff2Flow-bridged model: flow time σ = ς/(1+ς) over the base schedule."""

    def __init__(self, base: torch.nn.Module, bridge: FlowBridge):
        torch.nn.Module.__init__(self)
        self.base = base
        self.bridge = bridge
        self.prediction = bridge.prediction
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


def detect_prediction(base) -> str:
    """eps / v_prediction / x0 from the base model_sampling's mixin, or a ValueError."""
    fn = getattr(type(base), "calculate_denoised", None)
    if fn in PREDICTION_BY_DENOISER and type(base).calculate_input is ms.EPS.calculate_input:
        return PREDICTION_BY_DENOISER[fn]
    raise ValueError(f"D2FFlowPatch cannot map this model's parameterisation ({type(base).__name__}): "
                     "it bridges ε-, v- and x0-prediction models on a discrete VP schedule (SD1.x, SD2.x, SDXL).")


def schedule_of(base, sampling_settings: dict | None) -> DiscreteSchedule:
    """The base schedule in float64: rebuilt from the model's β settings when they reproduce its
    table, else the table itself (a custom ``set_sigmas``) promoted to float64."""
    table = base.sigmas.detach().double().cpu()
    zsnr = bool(getattr(base, "zsnr", False))
    settings = sampling_settings or {}
    try:
        rebuilt = DiscreteSchedule.from_betas(make_betas(
            settings.get("beta_schedule", "linear"), len(table),
            settings.get("linear_start", getattr(base, "linear_start", 0.00085)),
            settings.get("linear_end", getattr(base, "linear_end", 0.012))), zsnr=zsnr)
        if torch.allclose(rebuilt.sigmas, table, rtol=1e-5, atol=0):
            return rebuilt
    except ValueError:
        pass
    return DiscreteSchedule(table, zsnr=zsnr)


def flow_model_sampling(model_patcher, prediction: str = "auto", label_offset: float = 0.0) -> FlowBridgeSampling:
    """Build F for a ModelPatcher, refusing what the bridge cannot represent exactly."""
    base = model_patcher.get_model_object("model_sampling")
    if isinstance(base, FlowBridgeSampling):
        raise ValueError("This model is already flow-patched by D2FFlowPatch; apply the patch once.")
    if isinstance(base, ms.CONST):
        raise ValueError(f"This model is already a flow-matching model ({type(base).__name__}, e.g. SD3/Flux): "
                         "sample it directly, D2FFlowPatch is for ε/v-prediction checkpoints.")
    if not isinstance(base, ms.ModelSamplingDiscrete) or type(base).timestep is not ms.ModelSamplingDiscrete.timestep:
        raise ValueError(f"D2FFlowPatch cannot map {type(base).__name__}: it needs a discrete VP schedule with "
                         "the standard timestep labels (SD1.x, SD2.x, SDXL; not EDM, continuous or distilled/LCM schedules).")
    detected = detect_prediction(base)
    chosen = detected if prediction == "auto" else prediction
    config = getattr(getattr(model_patcher, "model", None), "model_config", None)
    schedule = schedule_of(base, getattr(config, "sampling_settings", None))
    return FlowBridgeSampling(base, FlowBridge(schedule, chosen, label_offset))
