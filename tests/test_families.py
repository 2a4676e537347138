"""Every legacy ε/v family the host loads, patched and sampled through the real host (issue 13, parts 1 and 3).

For each family a state dict in the family's real key layout is written to disk and loaded back by the
host's own loader (``comfy.sd.load_checkpoint_guess_config``, the function ``CheckpointLoaderSimple``
calls, for checkpoint-layout files; the ``UNETLoader`` node for the DiTs, which ship as bare diffusion-model
files), so ``comfy.model_detection`` decides the family, and ``supported_models.*.model_type`` the
prediction, from the file alone: SD2-768-v from its weights (the host's test: std of
``output_blocks.11.1.transformer_blocks.0.norm1.bias`` above 0.09), SDXL v-pred with zero terminal SNR from
its ``v_pred``/``ztsnr`` keys. Nothing is overridden. Random fp32 weights.

Smallest configurations the detector still identifies (CPU memory, 2 cores; parameters of the file):

| family | host class | layout kept | shrunk to | params |
|---|---|---|---|---|
| SD2.x 512-ε / 768-v | SD20 | 4 levels × 2 res blocks, context 1024, linear transformers, ``output_blocks.11`` transformer (the v test's key) | every level 320 ch, 1 input + 1 output transformer | 76 M |
| SD2.1 unCLIP-L / -H | SD21UnclipL/H | as SD2, ``label_emb`` 1536 / 2048 | as SD2 | 80 / 81 M |
| LotusD | LotusD | as SD2, ``label_emb`` 4 (task embedding) | as SD2 | 78 M |
| SD ×4 upscaler | SD_X4Upscaler | 256 ch, 7 input channels, 4 levels (its ``disable_self_attentions`` has 4), class embedding 1000 | 1 res block per level, every level 256 ch, 1 transformer | 34 M |
| SDXL refiner | SDXLRefiner | 384 ch, context 1280, adm 2560, input transformer depths [0,0,4,4,4,4,0,0] | every level 384 ch, no output/middle transformers | 168 M |
| SSD-1B / Segmind Vega | SSD1B / Segmind_Vega | SDXL's with depths [0,0,2,2,4,4] / [0,0,1,1,2,2] | every level 320 ch, no output/middle transformers | 98 / 80 M |
| KOALA-700M / -1B | KOALA_700M / KOALA_1B | 1 res block per level, depths [0,2,5] / [0,2,6] | as above | 65 / 69 M |
| SDXL ε / v-pred / v-pred zsnr | SDXL (EPS / V_PREDICTION / +zsnr) | SDXL's detector keys (+ ``v_pred``, + ``ztsnr``) | as ``comfy_host.SDXL_UNET_CONFIG`` | 136 M |
| InstructPix2Pix SD1.5 / SDXL | SD15_/SDXL_instructpix2pix | 8 input channels | as ``comfy_host`` SD15 / SDXL configs | 26 / 136 M |
| PixArt-α / -Σ | PixArtAlpha / PixArtSigma | hidden 1152, 16 heads, patch 2 (fixed by the detector), α with size/AR embedders | 1 block of 28 | 38 M |
| HunyuanDiT 1.0 / 1.1–1.2 | HunyuanDiT / HunyuanDiT1 | hidden 1408 (1.1's detection needs extra_embedder width 3968 = 1024 + 6·256 + 1408) | 1 block of 40, MLP ratio 4 | 94 / 110 M |

PixArt's position embedding has base size round(c_res/64)·64/2 with c_res = (H + W)//2
(``pixartms.forward_orig``), zero below c_res 33: 8×72 latents here (c_res 40, 144 tokens). HunyuanDiT takes
77 CLIP and exactly 256 mT5 tokens (its padding table and pooler are sized so). HunyuanDiT 1.1 and 1.2 share
layout and schedule (one host class). Every other family samples 4×4 latents. The DiTs sample 3 txt2img /
2 img2img steps (CPU time), the UNets 4 / 3.

Equivalence (DESIGN §2): stock ``euler`` on the patched model over φ(ς_n) equals native ``euler`` (DDIM) over
ς_n on integer-label grids, in exact arithmetic. In float32 three things separate the two runs:

1. Time. The patched model gets σ̃_n = fl₃₂(φ(ς_n)), i.e. ς̃_n = ς_n·e^(±ρ_n), ρ_n = ½ulp(σ_n)/(σ_n(1-σ_n)),
   at its exact fractional label; the native one fl₃₂(ς_n) at the integer label n. Both are DDIM at slightly
   different times: ``DiscreteSchedule.fp32_grid_time_error`` gives the shift δ_n (labels) per grid entry,
   a-priori from the schedule: ≈1e-4 of a label at SD's ς_max 14.6, 5e-4 at PixArt's 157, 9e-4 at
   HunyuanDiT 1.1's 420, 2.4e-4 at SDXL-zsnr's 4519 (whose top segment spans a factor 2 in ς). The output
   moves by at most Σ_n g_n·δ_n to first order, g_n = its change per label of entry n, measured on the
   native model by moving the entry one table step (an integer grid again; moving the first entry off ς_max
   also switches the host's txt2img start from sqrt(1+ς²)·ε to ς·ε, which only makes g_0 larger).
2. The native side's first step. Native Euler works in VE coordinates, x_1 = x_0 + (ς_1 - ς_0)·(x_0 - x̂0)/ς_0
   with |x_0| ≈ ς_0·|ε| and |x_1| ≈ ς_1·|ε|: float32 loses a_1 ≤ u·(4|x_0| + 4|x̂0_0| + |x_1|) (u = 2⁻²⁴)
   there, a cancellation of relative size ≈ 8u·ς_0/ς_1 (≈1e-4 for zsnr's 4519 → 3.6). The flow side's state
   is O(1) at every σ and has no such loss. N_0 = a_1·P_1 / max|output|, P_1 = the output's change per unit
   of state at step 1, measured by continuing the native run from x_1 and from x_1 moved by 1e-4·max|x_1|.
3. Every other rounding: the SD-like fp32 floor, 1e-5 (DESIGN §2; measured ≈1e-6 on SD).

So, per run,

    |patched - native| / max|native|  ≤  B = 1e-5 + 2·Σ_n g_n·δ_n + 2·N_0

(factor 2 for first order and one-label/finite differences). For the SD-schedule families (ς_max ≤ 15) the
requirement is the plain 1e-5; B is computed for the others (×4 upscaler, PixArt, HunyuanDiT, SDXL zsnr),
and the measured values and B's terms are printed in the run summary.
"""

from __future__ import annotations

import gc
import math
import os
from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest

import comfy_host

_LOCATION = comfy_host.find_host()
if not _LOCATION:
    pytest.skip(f"no ComfyUI host: {_LOCATION.how}", allow_module_level=True)

torch = pytest.importorskip("torch")

EXACT = 1e-5        # fp32, DESIGN §2
SD_LIKE = 15.0      # ς_max of SD's schedule is 14.6: at or below this the plain 1e-5 is required
CFG = 4.0
SEED = 7
I2I_DENOISE = 0.6   # img2img; steps per family (4 txt2img: labels 999, 749, 499, 249 on the simple scheduler)

# ---------------------------------------------------------------------------------------------
# family specs
# ---------------------------------------------------------------------------------------------
_U = comfy_host._UNET_COMMON
_SD2 = dict(_U, model_channels=320, channel_mult=[1, 1, 1, 1], num_res_blocks=[2, 2, 2, 2],
            transformer_depth=[1] + [0] * 7, transformer_depth_output=[1] + [0] * 11, transformer_depth_middle=0,
            context_dim=1024, num_heads=-1, num_head_channels=64, use_linear_in_transformer=True, adm_in_channels=None)
_XL = dict(comfy_host.SDXL_UNET_CONFIG)
_V_KEY = "output_blocks.11.1.transformer_blocks.0.norm1.bias"  # SD20.model_type: std > 0.09 → v-prediction


@dataclass
class Family:
    id: str
    host_class: str              # the model_config class the host's detector must pick
    config: dict                 # built with that class to get the real key layout (on the meta device)
    prediction: str              # what the patch must detect
    beta: tuple                  # (kind, linear_start, linear_end) the schedule must be rebuilt from
    context: tuple               # (tokens, dim) of the cross-attention conditioning
    pooled: int | None = None    # SDXL-style pooled output width
    zsnr: bool = False
    markers: tuple = ()          # top-level keys of the file (v_pred, ztsnr, edm_*)
    v_weights: bool = False      # SD2-style v detection from the weights
    dit: bool = False            # bare diffusion-model file through UNETLoader (else checkpoint layout)
    latent: tuple = (4, 4)        # UNets: the smallest latent all their levels take (4 → 2 → 1 → 1)
    steps: tuple = (4, 3)        # txt2img steps, img2img steps (denoise 0.6); fewer on the slow DiTs
    extras: dict = field(default_factory=dict)  # extra conditioning entries (concat images, masks, …)

    @property
    def input_space(self) -> str:
        return "ve" if self.host_class == "LotusD" else "vp"


def _unclip(dim: int) -> dict:
    # unCLIP's noise augmentor (its own squaredcos schedule) embeds a CLIP-vision embedding: exercised, so the
    # patch is seen to read the diffusion schedule, not the augmentor's.
    gen = torch.Generator().manual_seed(21)
    vision = SimpleNamespace(image_embeds=torch.randn(1, dim, generator=gen))
    return {"unclip_conditioning": [{"clip_vision_output": vision, "strength": 1.0, "noise_augmentation": 0.1}]}


_SD = ("linear", 0.00085, 0.012)
FAMILIES = [
    Family("sd2_512_eps", "SD20", _SD2, "eps", _SD, (77, 1024)),
    Family("sd2_768_v", "SD20", _SD2, "v_prediction", _SD, (77, 1024), v_weights=True),
    Family("sd21_unclip_l", "SD21UnclipL", dict(_SD2, adm_in_channels=1536, num_classes="sequential"),
           "v_prediction", _SD, (77, 1024), v_weights=True, extras=_unclip(768)),
    Family("sd21_unclip_h", "SD21UnclipH", dict(_SD2, adm_in_channels=2048, num_classes="sequential"),
           "v_prediction", _SD, (77, 1024), v_weights=True, extras=_unclip(1024)),
    Family("lotus_d", "LotusD", dict(_SD2, adm_in_channels=4, num_classes="sequential"), "x0", _SD, (77, 1024)),
    Family("sd_x4_upscaler", "SD_X4Upscaler",
           dict(_U, model_channels=256, in_channels=7, channel_mult=[1, 1, 1, 1], num_res_blocks=[1, 1, 1, 1],
                transformer_depth=[1, 0, 0, 0], transformer_depth_output=[0] * 8, transformer_depth_middle=0,
                context_dim=1024, use_linear_in_transformer=True, adm_in_channels=None),
           "v_prediction", ("linear", 0.0001, 0.02), (77, 1024),
           extras={"concat_image": torch.rand(1, 3, 4, 4, generator=torch.Generator().manual_seed(22)),
                   "noise_augmentation": 0.2}),
    Family("sdxl_refiner", "SDXLRefiner",
           dict(_U, model_channels=384, channel_mult=[1, 1, 1, 1], num_res_blocks=[2, 2, 2, 2],
                transformer_depth=[0, 0, 4, 4, 4, 4, 0, 0], transformer_depth_output=[0] * 12, transformer_depth_middle=0,
                context_dim=1280, num_heads=-1, num_head_channels=64, use_linear_in_transformer=True,
                adm_in_channels=2560, num_classes="sequential"),
           "eps", _SD, (77, 1280), pooled=1280),
    Family("ssd_1b", "SSD1B", dict(_XL, transformer_depth=[0, 0, 2, 2, 4, 4]), "eps", _SD, (77, 2048), pooled=1280),
    Family("segmind_vega", "Segmind_Vega", dict(_XL, transformer_depth=[0, 0, 1, 1, 2, 2]), "eps", _SD, (77, 2048),
           pooled=1280),
    Family("koala_700m", "KOALA_700M", dict(_XL, num_res_blocks=[1, 1, 1], transformer_depth=[0, 2, 5],
                                            transformer_depth_output=[0] * 6), "eps", _SD, (77, 2048), pooled=1280),
    Family("koala_1b", "KOALA_1B", dict(_XL, num_res_blocks=[1, 1, 1], transformer_depth=[0, 2, 6],
                                        transformer_depth_output=[0] * 6), "eps", _SD, (77, 2048), pooled=1280),
    Family("sdxl_eps", "SDXL", _XL, "eps", _SD, (77, 2048), pooled=1280),
    Family("sdxl_vpred", "SDXL", _XL, "v_prediction", _SD, (77, 2048), pooled=1280, markers=("v_pred",)),
    Family("sdxl_vpred_zsnr", "SDXL", _XL, "v_prediction", _SD, (77, 2048), pooled=1280, zsnr=True,
           markers=("v_pred", "ztsnr")),
    Family("sd15_ip2p", "SD15_instructpix2pix", dict(comfy_host.SD15_UNET_CONFIG, in_channels=8), "eps", _SD, (77, 768),
           extras={"concat_latent_image": torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(23))}),
    Family("sdxl_ip2p", "SDXL_instructpix2pix", dict(_XL, in_channels=8), "eps", _SD, (77, 2048), pooled=1280,
           extras={"concat_latent_image": torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(24))}),
    Family("pixart_alpha", "PixArtAlpha",
           {"image_model": "pixart_alpha", "num_heads": 16, "patch_size": 2, "hidden_size": 1152, "in_channels": 4,
            "depth": 1, "micro_condition": True, "model_max_length": 120},
           "eps", ("sqrt_linear", 0.0001, 0.02), (16, 4096), dit=True, latent=(8, 72),
           steps=(3, 2)),
    Family("pixart_sigma", "PixArtSigma",
           {"image_model": "pixart_sigma", "num_heads": 16, "patch_size": 2, "hidden_size": 1152, "in_channels": 4,
            "depth": 1, "micro_condition": False, "model_max_length": 300},
           "eps", ("sqrt_linear", 0.0001, 0.02), (16, 4096), dit=True, latent=(8, 72),
           steps=(3, 2)),
    Family("hunyuan_dit_1_0", "HunyuanDiT", {"image_model": "hydit", "depth": 1, "hidden_size": 1408},
           "v_prediction", ("linear", 0.00085, 0.018), (77, 1024), dit=True, steps=(3, 2)),
    Family("hunyuan_dit_1_1", "HunyuanDiT1",
           {"image_model": "hydit1", "depth": 1, "hidden_size": 1408, "size_cond": True, "use_style_cond": True},
           "v_prediction", ("linear", 0.00085, 0.03), (77, 1024), dit=True, steps=(3, 2)),
]
BY_ID = {f.id: f for f in FAMILIES}

FAMILY_WORDS = {  # what the refusals must say (nodes/flow_sampling.FAMILY_NAMES)
    "SD20": "SD2.x", "SD21UnclipL": "SD2.1 unCLIP-L", "SD21UnclipH": "SD2.1 unCLIP-H", "LotusD": "LotusD",
    "SD_X4Upscaler": "SD ×4 upscaler", "SDXLRefiner": "SDXL refiner", "SSD1B": "SSD-1B", "Segmind_Vega": "Segmind Vega",
    "KOALA_700M": "KOALA-700M", "KOALA_1B": "KOALA-1B", "SDXL": "SDXL", "SD15_instructpix2pix": "InstructPix2Pix (SD1.5)",
    "SDXL_instructpix2pix": "InstructPix2Pix (SDXL)", "PixArtAlpha": "PixArt-α", "PixArtSigma": "PixArt-Σ",
    "HunyuanDiT": "HunyuanDiT 1.0", "HunyuanDiT1": "HunyuanDiT 1.1/1.2",
}


# ---------------------------------------------------------------------------------------------
# files in the real layouts
# ---------------------------------------------------------------------------------------------
def layout_state_dict(host_class: str, config: dict, seed: int, unet: bool, dtype=None) -> dict:
    """Random weights for the key layout the host's ``host_class`` builds from ``config``. UNets get the time
    embedding scaled up and the input convolution down (``comfy_host.TIME_EMBED_SCALE``), so labels matter."""
    import comfy.supported_models

    model = getattr(comfy.supported_models, host_class)(dict(config)).get_model({}, device="meta")
    shapes = {k: tuple(v.shape) for k, v in model.diffusion_model.state_dict().items()}
    del model
    scale = {"time_embed.": comfy_host.TIME_EMBED_SCALE, "input_blocks.0.0.": comfy_host.INPUT_CONV_SCALE} if unet else {}
    return comfy_host._random_like_layout(shapes, seed, dtype or torch.float32, scale)


def write_family_file(host, family: Family, seed: int = 0, markers: dict | None = None, name: str | None = None) -> str:
    """The family's file on disk, as its users have it: checkpoint layout (``model.diffusion_model.*`` and the
    top-level marker keys, ``markers`` replacing the family's own) for the UNets, a bare diffusion-model file
    for the DiTs. Returns its path."""
    sd = layout_state_dict(family.host_class, family.config, seed, unet=not family.dit)
    if family.v_weights:  # what makes a trained SD2 768-v file v for the host: this norm's bias spread
        gen = torch.Generator().manual_seed(seed + 100)
        bias = torch.randn(sd[_V_KEY].shape, generator=gen)
        sd[_V_KEY] = 0.15 * (bias - bias.mean()) / bias.std(unbiased=False)
    elif _V_KEY in sd:
        assert float(sd[_V_KEY].std(unbiased=False)) < 0.09  # random init stays below the host's v threshold
    markers = {k: torch.tensor([]) for k in family.markers} if markers is None else markers
    if family.dit:
        sd.update(markers)
        path = os.path.join(host.unet_dir, name or f"d2f_family_{family.id}.safetensors")
    else:
        sd = {"model.diffusion_model." + k: v for k, v in sd.items()}
        sd.update(markers)
        path = os.path.join(host.checkpoint_dir, name or f"d2f_family_{family.id}.safetensors")
    comfy_host.save_safetensors(sd, path)
    return path


def load_family_file(host, family: Family, path: str):
    """The host's own load path: ``load_checkpoint_guess_config`` (what CheckpointLoaderSimple calls, here
    without CLIP/VAE, which these files lack) or the UNETLoader node."""
    import comfy.sd

    if family.dit:
        return host.run1("UNETLoader", unet_name=os.path.basename(path), weight_dtype="default")
    model, _, _, _ = comfy.sd.load_checkpoint_guess_config(path, output_vae=False, output_clip=False)
    return model


# ---------------------------------------------------------------------------------------------
# conditioning and sampling
# ---------------------------------------------------------------------------------------------
def conditioning(family: Family, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    tokens, dim = family.context

    def one():
        extra = dict(family.extras)
        if family.pooled:
            extra["pooled_output"] = torch.randn(1, family.pooled, generator=gen)
        if family.host_class.startswith("HunyuanDiT"):  # CLIP (77×1024) + mT5 (256×2048) and their masks
            extra.update(attention_mask=torch.ones(1, 77), attention_mask_mt5xl=torch.ones(1, 256),
                         conditioning_mt5xl=torch.randn(1, 256, 2048, generator=gen))
        return [[torch.randn(1, tokens, dim, generator=gen), extra]]

    return one(), one()


def rel(a, b) -> float:
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max())


def phi(ve):
    return ve / (1 + ve)


@dataclass
class Loaded:
    family: Family
    model: object
    flow: object
    conds: tuple
    path: str


def ksample(host, model, loaded: Loaded, latent, steps, denoise):
    pos, neg = loaded.conds
    return host.run1("KSampler", model=model, seed=SEED, steps=steps, cfg=CFG, sampler_name="euler", scheduler="simple",
                     positive=pos, negative=neg, latent_image=latent, denoise=denoise)["samples"]


def custom_native(host, loaded: Loaded, sigmas, latent, noise=None):
    """Native euler through SamplerCustomAdvanced on an explicit grid (same noise, guider and start as KSampler).
    Returns (output, last x̂0), both as LATENTs' samples."""
    pos, neg = loaded.conds
    noise = noise or host.run1("RandomNoise", noise_seed=SEED)
    guider = host.run1("CFGGuider", model=loaded.model, positive=pos, negative=neg, cfg=CFG)
    sampler = host.run1("KSamplerSelect", sampler_name="euler")
    out, x0 = host.run("SamplerCustomAdvanced", noise=noise, guider=guider, sampler=sampler, sigmas=sigmas,
                       latent_image=latent)
    return out["samples"], x0["samples"]


def first_step_floor(host, loaded: Loaded, sigmas, latent, ref) -> dict:
    """N_0: what the native side's own float32 loses in its first Euler step (module docstring), relative to
    max|output|. a_1 ≤ u·(4|x_0| + 4|x̂0_0| + |x_1|) elementwise (x_1 = x_0 + Δ·(x_0 - x̂0_0)/ς_0, four roundings
    in the update, one in the sum), in the model's VE coordinates, times P_1 = the output's change per unit of
    state at step 1, measured by continuing from x_1 and from x_1 + η·max|x_1|·(±1) (η 1e-4)."""
    fmt = loaded.model.model.latent_format
    base = loaded.model.get_model_object("model_sampling")
    x1, x0_hat = custom_native(host, loaded, sigmas[:2], latent)
    noise = host.run1("RandomNoise", noise_seed=SEED).generate_noise(latent)
    s0, top = float(sigmas[0]), float(base.sigma_max)
    max_denoise = math.isclose(top, s0, rel_tol=1e-5) or s0 > top  # the host's KSAMPLER.max_denoise
    x0_state = base.noise_scaling(sigmas[0].reshape(1), noise.float(), fmt.process_in(latent["samples"].clone()),
                                  max_denoise)
    a1 = float((4 * x0_state.abs() + 4 * fmt.process_in(x0_hat.clone()).abs() + fmt.process_in(x1.clone()).abs()).max())

    pos, neg = loaded.conds
    guider = host.run1("CFGGuider", model=loaded.model, positive=pos, negative=neg, cfg=CFG)
    sampler = host.run1("KSamplerSelect", sampler_name="euler")

    def continue_from(state):
        return host.run("SamplerCustomAdvanced", noise=host.run1("DisableNoise"), guider=guider, sampler=sampler,
                        sigmas=sigmas[1:], latent_image={"samples": state})[0]["samples"]

    sign = torch.randint(0, 2, x1.shape, generator=torch.Generator().manual_seed(31)).float() * 2 - 1
    moved = x1 + 1e-4 * x1.abs().max() * sign
    clean = continue_from(x1)
    step = float((fmt.process_in(moved.clone()) - fmt.process_in(x1.clone())).abs().max())
    p1 = float((continue_from(moved) - clean).abs().max()) / step
    return {"n0": 2.0 ** -24 * a1 * p1 / float(ref.abs().max()), "p1": p1, "a1": a1, "handover": rel(clean, ref)}


def fp32_bound(host, loaded: Loaded, latent, steps, denoise, native) -> dict:
    """B = 1e-5 + 2·Σ_n g_n·δ_n + 2·N_0 for the grid KSampler uses (module docstring): δ_n a-priori from the
    schedule, g_n measured by moving grid entry n one table step on the native model, N_0 the native side's
    first-step rounding (``first_step_floor``)."""
    base = loaded.model.get_model_object("model_sampling")
    schedule = loaded.flow.get_model_object("model_sampling").bridge.schedule
    sigmas = host.run1("BasicScheduler", model=loaded.model, scheduler="simple", steps=steps, denoise=denoise)
    labels = [int(base.timestep(s.reshape(1))) for s in sigmas[:-1]]
    assert all(abs(float(base.sigmas[n]) - float(s)) <= 1e-6 * float(s) for n, s in zip(labels, sigmas)), \
        "not an integer-label grid"
    delta = schedule.fp32_grid_time_error(labels).tolist()
    ref, _ = custom_native(host, loaded, sigmas, latent)
    assert rel(ref, native) <= 1e-7, "the reference is not KSampler's native run"
    g = []
    for i, n in enumerate(labels):
        moved = sigmas.clone()
        moved[i] = base.sigmas[n - 1 if n > 0 else n + 1]
        g.append(rel(custom_native(host, loaded, moved, latent)[0], ref))
    floor = first_step_floor(host, loaded, sigmas, latent, ref)
    time_term = 2 * sum(gi * di for gi, di in zip(g, delta))
    return {"bound": EXACT + time_term + 2 * floor["n0"], "time_term": time_term, "labels": labels, "delta": delta,
            "g": g, **floor}


# ---------------------------------------------------------------------------------------------
# one loaded family at a time (pytest groups the tests by this module-scoped parameter)
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=[f.id for f in FAMILIES])
def loaded(request, host):
    family = BY_ID[request.param]
    path = write_family_file(host, family)
    model = load_family_file(host, family, path)
    flow = host.run1("D2FFlowPatch", model=model, prediction="auto", label_offset=0)
    yield Loaded(family, model, flow, conditioning(family), path)
    del model, flow
    host.mm.unload_all_models()
    os.remove(path)
    gc.collect()


def test_host_detects_the_family_and_the_patch_reads_it(host, loaded):
    """The host's detector names the family from the file; the patch reads prediction, zsnr and the schedule
    from what the host loaded: its β settings rebuild exactly the host's own σ table."""
    fam, model = loaded.family, loaded.model
    assert type(model.model.model_config).__name__ == fam.host_class
    base = model.get_model_object("model_sampling")
    assert bool(base.zsnr) == fam.zsnr
    _, ui = host.run_output_node("D2FFlowPatch", model=model, prediction="auto", label_offset=0)
    info = ui["d2f_flow_patch"][0]
    assert info["family"] == FAMILY_WORDS[fam.host_class]
    assert info["prediction"] == fam.prediction and info["zsnr"] == fam.zsnr and info["input"] == fam.input_space
    kind, start, end = fam.beta
    assert info["schedule"].startswith(f"{kind} β {start:g} → {end:g}, T 1000"), info["schedule"]

    flow_ms = loaded.flow.get_model_object("model_sampling")
    assert isinstance(flow_ms, host.comfy.model_sampling.CONST)
    table = base.sigmas.double()
    assert torch.allclose(flow_ms.bridge.schedule.sigmas, table, rtol=1e-6, atol=0)  # the host's table, in float64
    assert torch.allclose(flow_ms.sigmas.double(), phi(table), rtol=1e-6, atol=0)
    assert float(flow_ms.sigma_max) < 1.0


def test_txt2img_euler_on_patched_equals_native_ddim(host, loaded, record_measure):
    fam = loaded.family
    latent = {"samples": torch.zeros(1, 4, *fam.latent)}
    steps = fam.steps[0]
    a = ksample(host, loaded.flow, loaded, latent, steps, 1.0)
    b = ksample(host, loaded.model, loaded, latent, steps, 1.0)
    assert a.shape == b.shape == (1, 4) + fam.latent and torch.isfinite(a).all()
    _assert_within_bound(host, loaded, latent, steps, 1.0, a, b, "txt2img", record_measure)


def test_img2img_equals_native(host, loaded, record_measure):
    fam = loaded.family
    latent = {"samples": 4.0 * torch.randn((1, 4) + fam.latent, generator=torch.Generator().manual_seed(3))}
    steps = fam.steps[1]
    a = ksample(host, loaded.flow, loaded, latent, steps, I2I_DENOISE)
    b = ksample(host, loaded.model, loaded, latent, steps, I2I_DENOISE)
    assert torch.isfinite(a).all()
    _assert_within_bound(host, loaded, latent, steps, I2I_DENOISE, a, b, "img2img denoise 0.6", record_measure)


def _assert_within_bound(host, loaded, latent, steps, denoise, patched, native, what, record_measure):
    d = rel(patched, native)
    sigma_max = float(loaded.model.get_model_object("model_sampling").sigma_max)
    if sigma_max <= SD_LIKE:
        record_measure(f"{what}, ς_max {sigma_max:.4g}", d, f"≤ {EXACT:g}")
        assert d <= EXACT, f"{loaded.family.id}: patched euler differs from native DDIM by {d:.3g}"
        return
    b = fp32_bound(host, loaded, latent, steps, denoise, native)
    record_measure(f"{what}, ς_max {sigma_max:.4g} (δ ≤ {max(b['delta']):.2g} label, 2Σgδ {b['time_term']:.2g}, "
                   f"2N_0 {2 * b['n0']:.2g})", d, f"≤ B = {b['bound']:.3g}")
    assert d <= b["bound"], f"{loaded.family.id}: patched differs from native by {d:.3g} > fp32 bound {b}"


def test_refusals_name_the_family(host, loaded):
    """What cannot be mapped exactly is refused, and the message says which model it is."""
    fam, words = loaded.family, FAMILY_WORDS[loaded.family.host_class]
    cases = [(loaded.flow, "already flow-patched"),
             (host.run1("ModelSamplingDiscrete", model=loaded.model, sampling="lcm", zsnr=False), "cannot map")]
    if fam.prediction == "eps":
        cases.append((host.run1("ModelSamplingDiscrete", model=loaded.model, sampling="eps", zsnr=True), "zero-terminal-SNR"))
    for model, message in cases:
        with pytest.raises(ValueError, match=message) as err:
            host.run1("D2FFlowPatch", model=model, prediction="auto", label_offset=0)
        assert words in str(err.value), str(err.value)

    # v + zsnr forced onto the family's β by the core node: mapped where the host's rescaled table is a schedule
    # (strictly increasing ς: SD's β), refused by name where the rescaling breaks it (PixArt's, HunyuanDiT 1.1's).
    vz = host.run1("ModelSamplingDiscrete", model=loaded.model, sampling="v_prediction", zsnr=True)
    table = vz.get_model_object("model_sampling").sigmas
    if bool((table[1:] > table[:-1]).all()):
        flow = host.run1("D2FFlowPatch", model=vz, prediction="auto", label_offset=0)
        assert flow.get_model_object("model_sampling").bridge.schedule.zsnr
    else:
        with pytest.raises(ValueError, match="cannot map") as err:
            host.run1("D2FFlowPatch", model=vz, prediction="auto", label_offset=0)
        assert words in str(err.value) and "strictly increasing" in str(err.value), str(err.value)


# ---------------------------------------------------------------------------------------------
# LotusD as its users run it, and the SDXL variants that cannot be mapped
# ---------------------------------------------------------------------------------------------
def test_lotus_single_step_workflow(host):
    """LotusD's own workflow: no noise, one step from the first sigma set to 999 (SetFirstSigma), the image
    latent as input. Patched, the first sigma is φ(999) = 0.999 and the result is the same x̂0."""
    fam = BY_ID["lotus_d"]
    path = write_family_file(host, fam, seed=5, name="d2f_family_lotus_workflow.safetensors")
    try:
        model = load_family_file(host, fam, path)
        flow = host.run1("D2FFlowPatch", model=model, prediction="auto", label_offset=0)
        cond = host.run1("LotusConditioning") if "LotusConditioning" in host.nodes.NODE_CLASS_MAPPINGS else conditioning(fam)[0]
        image = {"samples": torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(9))}

        def run(m, first):
            sig = host.run1("BasicScheduler", model=m, scheduler="simple", steps=1, denoise=1.0)
            sig = host.run1("SetFirstSigma", sigmas=sig, sigma=first)
            guider = host.run1("BasicGuider", model=m, conditioning=cond)
            return host.run("SamplerCustomAdvanced", noise=host.run1("DisableNoise"), guider=guider,
                            sampler=host.run1("KSamplerSelect", sampler_name="euler"), sigmas=sig, latent_image=image)[0]["samples"]

        a, b = run(flow, 999.0 / 1000.0), run(model, 999.0)
        assert torch.isfinite(a).all() and rel(a, b) <= EXACT, rel(a, b)

        # Training from noise is not LotusD's task: D2FTrain/D2FReflowPairs refuse it before any work (issue 13 part 2).
        import sys
        bridge_sampling_of = sys.modules[host.node_class("D2FTrain").__module__].bridge_sampling_of
        for m in (model, flow):
            with pytest.raises(ValueError, match="LotusD"):
                bridge_sampling_of(m)
    finally:
        host.mm.unload_all_models()
        os.remove(path)


_EDM = {"edm_mean": torch.zeros(1, 4, 1, 1), "edm_std": torch.ones(1, 4, 1, 1)}  # Playground v2.5's keys
_V_EDM = {"edm_vpred.sigma_max": torch.tensor(120.0), "edm_vpred.sigma_min": torch.tensor(0.002)}  # CosXL's


@pytest.mark.parametrize("variant,base_id,markers,words", [
    ("playground_v2_5_edm", "sdxl_vpred_zsnr", _EDM, "SDXL"),
    ("cosxl_v_edm", "sdxl_vpred_zsnr", _V_EDM, "SDXL"),
    ("cosxl_edit_v_edm", "sdxl_ip2p", _V_EDM, "InstructPix2Pix (SDXL)"),
])
def test_continuous_sdxl_variants_are_refused_by_name(host, variant, base_id, markers, words):
    """SDXL files the host loads on a continuous EDM schedule (Playground v2.5, CosXL, CosXL edit: detected by
    the host from their edm_* keys) have no discrete table to bridge: refused, naming the family."""
    fam = BY_ID[base_id]
    path = write_family_file(host, fam, seed=3, markers=markers, name=f"d2f_family_{variant}.safetensors")
    try:
        model = load_family_file(host, fam, path)
        assert type(model.model.model_config).__name__ == fam.host_class
        assert not isinstance(model.get_model_object("model_sampling"), host.comfy.model_sampling.ModelSamplingDiscrete)
        with pytest.raises(ValueError, match="cannot map") as err:
            host.run1("D2FFlowPatch", model=model, prediction="auto", label_offset=0)
        assert words in str(err.value) and "EDM" in str(err.value), str(err.value)
    finally:
        host.mm.unload_all_models()
        os.remove(path)
