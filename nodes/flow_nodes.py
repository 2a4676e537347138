"""Flow patch, flow scheduler, flow Euler sampler and flow-space RescaleCFG nodes (V3)."""

from __future__ import annotations

import comfy.samplers
import torch
from comfy_api.latest import io

from ..d2f_core.flow.guidance import rescale_cfg_denoised
from ..d2f_core.flow.samplers import flow_sigmas, sample_euler_flow
from .flow_sampling import FlowBridgeSampling, flow_model_sampling

CATEGORY = "Diff2Flow"


def _flow_sampling_of(model) -> FlowBridgeSampling:
    sampling = model.get_model_object("model_sampling")
    if not isinstance(sampling, FlowBridgeSampling):
        raise ValueError("This node needs a model patched by D2FFlowPatch (put it right after the checkpoint loader).")
    return sampling


def _patch_readout(sampling: FlowBridgeSampling, requested: str, label_offset: int) -> dict:
    """What the web extension shows on the node after it ran: prediction type and σ range."""
    s_max, s_min = float(sampling.sigma_max), float(sampling.sigma_min)
    return {"family": sampling.family, "prediction": sampling.prediction, "requested": requested,
            "zsnr": bool(sampling.bridge.schedule.zsnr), "input": sampling.bridge.input_space,
            "schedule": sampling.schedule_source, "label_offset": int(label_offset),
            "sigma_max": s_max, "sigma_min": s_min, "steps": int(sampling.sigmas.shape[0]),
            "base_sigma_max": s_max / (1.0 - s_max), "base_sigma_min": s_min / (1.0 - s_min)}


class D2FFlowPatch(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="D2FFlowPatch",
            display_name="Diff2Flow Patch (ε/v → flow)",
            category=CATEGORY,
            description=(
                "Turns an ε- or v-prediction checkpoint into a flow-matching model, x = (1-σ)·x0 + σ·ε: SD1.x, "
                "SD2.x (512-ε, 768-v), SD2.1 unCLIP, SDXL (ε, v, v+zsnr) and its refiner, SSD-1B, Segmind Vega, "
                "KOALA, InstructPix2Pix, the ×4 upscaler, LotusD, PixArt-α/Σ and HunyuanDiT, each on its own "
                "schedule as the host loaded it. Exact: on an un-finetuned model, Euler on the patched model equals "
                "DDIM on the original. Works with every stock sampler and scheduler. Non-destructive (patches a clone)."),
            inputs=[
                io.Model.Input("model", tooltip="A legacy ε- or v-prediction model, straight from its loader (and LoRAs)."),
                io.Combo.Input("prediction", options=["auto", "eps", "v_prediction"], default="auto",
                               tooltip="What the network predicts. auto reads it from the loaded model (the host detects "
                                       "SD2 768-v from its weights and v-pred/zsnr SDXL from its v_pred/ztsnr keys); set "
                                       "v_prediction only for a file the host detects wrongly (e.g. a v-pred SDXL without the key)."),
                io.Int.Input("label_offset", default=0, min=0, max=1, advanced=True,
                             tooltip="0 for normal checkpoints. 1 only for checkpoints fine-tuned with the official "
                                     "Diff2Flow code, which labels step k with the noise level of k-1."),
            ],
            outputs=[io.Model.Output(tooltip="The same weights, sampled as a flow model (σ from φ(ς_max), 0.936 on SD, to 0).")],
            has_intermediate_output=True,  # its read-out (prediction, σ range) is resent when the node is cached
        )

    @classmethod
    def execute(cls, model, prediction="auto", label_offset=0) -> io.NodeOutput:
        sampling = flow_model_sampling(model, prediction, label_offset)
        patched = model.clone()
        patched.add_object_patch("model_sampling", sampling)
        return io.NodeOutput(patched, ui={"d2f_flow_patch": [_patch_readout(sampling, prediction, label_offset)]})


class D2FFlowScheduler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="D2FFlowScheduler",
            display_name="Diff2Flow Scheduler",
            category=CATEGORY,
            description="Flow sampling times from the model's σ_max down to 0, uniform in flow time (shift 1) "
                        "or warped toward high noise with the SD3 time shift σ = s·t/(1+(s-1)·t).",
            inputs=[
                io.Model.Input("model", tooltip="A model patched by D2FFlowPatch."),
                io.Int.Input("steps", default=20, min=1, max=10000, tooltip="Number of solver steps."),
                io.Float.Input("shift", default=1.0, min=0.01, max=100.0, step=0.01,
                               tooltip="Time shift s. 1 = uniform in flow time; >1 spends more steps at high noise (SD3 uses 3)."),
                io.Float.Input("denoise", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Fraction of the schedule to run; below 1 for img2img (keeps the last steps)."),
            ],
            outputs=[io.Sigmas.Output()],
        )

    @classmethod
    def execute(cls, model, steps, shift=1.0, denoise=1.0) -> io.NodeOutput:
        if denoise <= 0.0:
            return io.NodeOutput(torch.FloatTensor([]))
        sigma_max = float(_flow_sampling_of(model).sigma_max)
        return io.NodeOutput(flow_sigmas(steps, sigma_max, shift, denoise))


class D2FEulerFlowSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="D2FEulerFlowSampler",
            display_name="Diff2Flow Euler Flow Sampler",
            category=CATEGORY,
            description="Euler on the flow ODE, x ← x + (σ_next - σ)·(x - x̂0)/σ. Identical to the stock euler "
                        "sampler on a patched model, and so to DDIM on the original checkpoint.",
            inputs=[],
            outputs=[io.Sampler.Output()],
        )

    @classmethod
    def execute(cls) -> io.NodeOutput:
        return io.NodeOutput(comfy.samplers.KSAMPLER(sample_euler_flow))


class D2FRescaleCFG(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="D2FRescaleCFG",
            display_name="Diff2Flow RescaleCFG",
            category=CATEGORY,
            description="RescaleCFG for flow-patched models: rescales the guided v-prediction exactly as the "
                        "stock RescaleCFG does on the original model. (Stock RescaleCFG on a patched model "
                        "rescales x0 instead, a different guidance.)",
            inputs=[
                io.Model.Input("model", tooltip="A model patched by D2FFlowPatch."),
                io.Float.Input("multiplier", default=0.7, min=0.0, max=1.0, step=0.01,
                               tooltip="Blend between rescaled (1) and plain (0) CFG."),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, multiplier=0.7) -> io.NodeOutput:
        _flow_sampling_of(model)

        def rescale_cfg(args):
            x = args["input"]
            x0 = rescale_cfg_denoised(args["sigma"], x, args["cond_denoised"], args["uncond_denoised"],
                                      args["cond_scale"], multiplier)
            return x - x0

        patched = model.clone()
        patched.set_model_sampler_cfg_function(rescale_cfg)
        return io.NodeOutput(patched)


FLOW_NODES = [D2FFlowPatch, D2FFlowScheduler, D2FEulerFlowSampler, D2FRescaleCFG]
