"""The flow patch inside the real ComfyUI host (v0.33), through the real node classes.

Every node is executed the way ComfyUI's executor does it (``Host.run``): V3 nodes through a validated
class clone, V1 nodes through their FUNCTION, under ``torch.inference_mode()``. Models are tiny
random UNets in the real key layouts, loaded by the real loaders (see ``comfy_host``).

Comparisons are ``max|a-b| / max|b|`` on the sampler outputs, which are in the host's latent space on
both sides (they go through the same ``process_out``). On integer-label grids (the model's own table:
``simple``, ``ddim_uniform``) stock ``euler`` on the patched model is DDIM on the original, so the two
must agree to fp32 round-off: DESIGN §2 gives ≤ 1e-5 for fp32, measured ≈ 1e-6 here. A test at the end
of the equivalence block shows the bound has teeth: a one-step label error gives ≈ 5e-3.
"""

from __future__ import annotations

import math
import os

import pytest

import comfy_host

_LOCATION = comfy_host.find_host()
if not _LOCATION:
    pytest.skip(f"no ComfyUI host: {_LOCATION.how}", allow_module_level=True)

torch = pytest.importorskip("torch")

EXACT = 1e-5  # fp32, DESIGN §2 ("fp32 ≤ 1e-5 relative"); measured ≈ 1e-6 on this host
CFG = 5.0
SEED = 7


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max|a-b| / max|b|."""
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max())


def conditioning(dim: int = 768, seed: int = 0, pooled: int | None = None):
    """Random positive / negative CONDITIONING ([[tensor, {...}]]), no text encoder needed."""
    gen = torch.Generator().manual_seed(seed)

    def one():
        extra = {"pooled_output": torch.randn(1, pooled, generator=gen)} if pooled else {}
        return [[torch.randn(1, 77, dim, generator=gen), extra]]

    return one(), one()


@pytest.fixture(scope="module")
def conds():
    return conditioning()


@pytest.fixture(scope="module")
def eps_model(sd15_model):
    return sd15_model


@pytest.fixture(scope="module")
def v_model(host, sd15_model):
    """The same UNet read as v-prediction through core ModelSamplingDiscrete (sampling v_prediction).
    (The SD2 detector's v-pred test needs SD2.x's full output-block layout, which a tiny UNet lacks.)"""
    return host.run1("ModelSamplingDiscrete", model=sd15_model, sampling="v_prediction", zsnr=False)


@pytest.fixture(scope="module")
def models(eps_model, v_model):
    return {"eps": eps_model, "v": v_model}


def patch(host, model, **kw):
    return host.run1("D2FFlowPatch", model=model, prediction=kw.get("prediction", "auto"),
                     label_offset=kw.get("label_offset", 0))


def empty_latent(host, size=8, batch=1):
    return host.run1("EmptyLatentImage", width=8 * size, height=8 * size, batch_size=batch)


def input_latent(size=8, seed=3):
    """A non-zero VAE-scale latent, as VAEEncode would give."""
    return {"samples": 4.0 * torch.randn(1, 4, size, size, generator=torch.Generator().manual_seed(seed))}


def ksample(host, model, conds, latent, sampler="euler", scheduler="simple", steps=4, denoise=1.0, cfg=CFG, seed=SEED):
    pos, neg = conds
    out = host.run1("KSampler", model=model, seed=seed, steps=steps, cfg=cfg, sampler_name=sampler,
                    scheduler=scheduler, positive=pos, negative=neg, latent_image=latent, denoise=denoise)
    return out["samples"]


def phi(ve_sigma):
    return ve_sigma / (1 + ve_sigma)


# ---------------------------------------------------------------------------------------------
# 1 + 3: txt2img, stock euler on the patched model == native euler (DDIM) on integer-label grids
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scheduler", ["simple", "ddim_uniform"])
@pytest.mark.parametrize("kind", ["eps", "v"])
def test_euler_on_patched_equals_native_ddim(host, models, conds, kind, scheduler, record_measure):
    native = models[kind]
    flow = patch(host, native)
    assert isinstance(flow.get_model_object("model_sampling"), host.comfy.model_sampling.CONST)

    # The scheduler reads the patched model's own table, φ of the native one: σ_i = φ(ς_i).
    steps = 4
    ve = host.run1("BasicScheduler", model=native, scheduler=scheduler, steps=steps, denoise=1.0).double()
    sig = host.run1("BasicScheduler", model=flow, scheduler=scheduler, steps=steps, denoise=1.0).double()
    assert sig.shape == ve.shape
    assert torch.allclose(sig, phi(ve), rtol=1e-6, atol=0), (sig, phi(ve))

    latent = empty_latent(host)
    a = ksample(host, flow, conds, latent, "euler", scheduler, steps)
    b = ksample(host, native, conds, latent, "euler", scheduler, steps)
    assert a.shape == b.shape == (1, 4, 8, 8)
    assert torch.isfinite(a).all()
    d = rel(a, b)
    record_measure(f"{kind} {scheduler} txt2img euler vs native", d, f"≤ {EXACT:g}")
    assert d <= EXACT, f"patched euler differs from native DDIM by {d:.3g} (max-relative)"


def test_equivalence_check_detects_label_errors(host, eps_model, conds, record_measure):
    """The comparison above has teeth: the same patch with the time label shifted by one step
    (label_offset=1, meant for official-Diff2Flow fine-tunes) is far outside the bound."""
    latent = empty_latent(host)
    native = ksample(host, eps_model, conds, latent)
    shifted = ksample(host, patch(host, eps_model, label_offset=1), conds, latent)
    d = rel(shifted, native)
    record_measure("label off by one vs native (must be large)", d, f"> {20 * EXACT:g}")
    assert d > 20 * EXACT, f"a one-step label error changes the output by only {d:.3g}: the tiny model is not time-sensitive"


def test_prediction_override(host, eps_model, v_model, conds):
    """prediction=v_prediction on a model loaded as ε (a misdetected 768-v checkpoint) is the same as auto on
    the model read as v."""
    latent = empty_latent(host, size=4)
    forced = ksample(host, patch(host, eps_model, prediction="v_prediction"), conds, latent, steps=3)
    auto = ksample(host, patch(host, v_model), conds, latent, steps=3)
    assert rel(forced, auto) <= 1e-6


# ---------------------------------------------------------------------------------------------
# 2: img2img (denoise 0.6, non-zero latent) and a KSamplerAdvanced split with leftover noise
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind,scheduler", [("eps", "simple"), ("eps", "ddim_uniform"), ("v", "simple")])
def test_img2img_equals_native(host, models, conds, kind, scheduler, record_measure):
    native = models[kind]
    latent = input_latent()
    a = ksample(host, patch(host, native), conds, latent, "euler", scheduler, steps=5, denoise=0.6)
    b = ksample(host, native, conds, latent, "euler", scheduler, steps=5, denoise=0.6)
    d = rel(a, b)
    record_measure(f"{kind} {scheduler} img2img denoise 0.6", d, f"≤ {EXACT:g}")
    assert d <= EXACT, f"img2img on the patched model differs from native by {d:.3g}"


def test_ksampler_advanced_split_equals_native(host, eps_model, conds, record_measure):
    """Two KSamplerAdvanced stages (leftover noise handed over as a LATENT) equal native at the hand-over
    and at the end: the patch's inverse_noise_scaling hands over VE-coordinate latents like native."""
    pos, neg = conds
    flow = patch(host, eps_model)

    def stage(model, latent, start, end, first):
        return host.run1("KSamplerAdvanced", model=model, add_noise="enable" if first else "disable", noise_seed=SEED,
                         steps=8, cfg=CFG, sampler_name="euler", scheduler="simple", positive=pos, negative=neg,
                         latent_image=latent, start_at_step=start, end_at_step=end,
                         return_with_leftover_noise="enable" if first else "disable")

    latent = empty_latent(host)
    mid_flow, mid_native = stage(flow, latent, 0, 3, True), stage(eps_model, latent, 0, 3, True)
    d_mid = rel(mid_flow["samples"], mid_native["samples"])
    end_flow, end_native = stage(flow, mid_flow, 3, 10000, False), stage(eps_model, mid_native, 3, 10000, False)
    d_end = rel(end_flow["samples"], end_native["samples"])
    record_measure("KSamplerAdvanced leftover-noise latent", d_mid, f"≤ {EXACT:g}")
    record_measure("KSamplerAdvanced final", d_end, f"≤ {EXACT:g}")
    assert d_mid <= EXACT and d_end <= EXACT, (d_mid, d_end)


# ---------------------------------------------------------------------------------------------
# 4: D2FFlowScheduler + D2FEulerFlowSampler through SamplerCustomAdvanced
# ---------------------------------------------------------------------------------------------
def test_flow_scheduler_and_euler_flow_sampler(host, eps_model, conds, record_measure):
    pos, neg = conds
    flow = patch(host, eps_model)
    sigma_max = float(flow.get_model_object("model_sampling").sigma_max)
    assert sigma_max == pytest.approx(0.935958, abs=2e-6)  # SD1.5's φ(ς_999), DESIGN §2

    sig = host.run1("D2FFlowScheduler", model=flow, steps=4, shift=1.0, denoise=1.0)
    assert sig.shape == (5,)
    assert float(sig[0]) == pytest.approx(sigma_max, rel=1e-6)
    assert float(sig[-1]) == 0.0
    assert torch.allclose(sig.double(), torch.linspace(sigma_max, 0.0, 5, dtype=torch.float64), atol=1e-6)
    shifted = host.run1("D2FFlowScheduler", model=flow, steps=4, shift=3.0, denoise=1.0)
    assert float(shifted[0]) == pytest.approx(sigma_max, rel=1e-6) and float(shifted[-1]) == 0.0
    assert bool((shifted[1:-1] > sig[1:-1]).all()), "shift > 1 must spend the steps at higher noise"
    assert bool((sig[1:] < sig[:-1]).all()) and bool((shifted[1:] < shifted[:-1]).all())

    noise = host.run1("RandomNoise", noise_seed=SEED)
    guider = host.run1("CFGGuider", model=flow, positive=pos, negative=neg, cfg=CFG)
    latent = empty_latent(host)

    def custom(sampler, sigmas, lat):
        return host.run("SamplerCustomAdvanced", noise=noise, guider=guider, sampler=sampler, sigmas=sigmas,
                        latent_image=lat)

    ours, ours_x0 = custom(host.run1("D2FEulerFlowSampler"), sig, latent)
    stock, stock_x0 = custom(host.run1("KSamplerSelect", sampler_name="euler"), sig, latent)
    assert torch.isfinite(ours["samples"]).all() and ours["samples"].shape == (1, 4, 8, 8)
    d = rel(ours["samples"], stock["samples"])
    record_measure("D2FEulerFlowSampler vs stock euler (same σ)", d, "≤ 1e-6")
    assert d <= 1e-6
    assert rel(ours_x0["samples"], stock_x0["samples"]) <= 1e-6

    # img2img through the same path: denoise < 1 keeps the tail of the grid, below σ_max.
    tail = host.run1("D2FFlowScheduler", model=flow, steps=3, shift=1.0, denoise=0.5)
    assert tail.shape == (4,) and float(tail[0]) < sigma_max
    out, _ = custom(host.run1("D2FEulerFlowSampler"), tail, input_latent())
    assert torch.isfinite(out["samples"]).all()


# ---------------------------------------------------------------------------------------------
# 5: every stock sampler, and every stock scheduler, runs on the patched model
# ---------------------------------------------------------------------------------------------
def pytest_generate_tests(metafunc):
    # Parametrize over the host's own lists: every name this ComfyUI version offers. Reading them needs
    # the booted host (comfy.samplers must not be imported before args.cpu is set), so boot it here.
    if "stock_sampler" in metafunc.fixturenames or "stock_scheduler" in metafunc.fixturenames:
        comfy_host.session_host()
        import comfy.samplers

        if "stock_sampler" in metafunc.fixturenames:  # KSAMPLER_NAMES + ddim, uni_pc, uni_pc_bh2
            metafunc.parametrize("stock_sampler", list(comfy.samplers.SAMPLER_NAMES))
        if "stock_scheduler" in metafunc.fixturenames:
            metafunc.parametrize("stock_scheduler", list(comfy.samplers.SCHEDULER_NAMES))


@pytest.fixture(scope="module")
def eps_flow(host, eps_model):
    return patch(host, eps_model)


@pytest.mark.parametrize("scheduler", ["simple", "karras"])
def test_every_stock_sampler_runs(host, eps_flow, conds, stock_sampler, scheduler):
    out = ksample(host, eps_flow, conds, empty_latent(host, size=4), stock_sampler, scheduler, steps=3, cfg=2.0)
    assert out.shape == (1, 4, 4, 4)
    assert torch.isfinite(out).all(), f"{stock_sampler}/{scheduler} produced non-finite values"


@pytest.mark.parametrize("sampler", ["euler", "euler_ancestral", "dpmpp_2m", "dpmpp_2m_sde", "uni_pc"])
def test_every_stock_scheduler_runs(host, eps_flow, conds, stock_scheduler, sampler):
    sig = host.run1("BasicScheduler", model=eps_flow, scheduler=stock_scheduler, steps=3, denoise=1.0)
    assert float(sig[0]) <= float(eps_flow.get_model_object("model_sampling").sigma_max) + 1e-6
    assert float(sig[-1]) == 0.0 and bool((sig[1:] <= sig[:-1]).all())
    out = ksample(host, eps_flow, conds, empty_latent(host, size=4), sampler, stock_scheduler, steps=3, cfg=2.0)
    assert torch.isfinite(out).all(), f"{sampler}/{stock_scheduler} produced non-finite values"


# ---------------------------------------------------------------------------------------------
# 6: the host takes its flow (RF) paths on the patched model
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sampler,rf_function", [
    ("euler_ancestral", "sample_euler_ancestral_RF"),
    ("dpm_2_ancestral", "sample_dpm_2_ancestral_RF"),
    ("dpmpp_2s_ancestral", "sample_dpmpp_2s_ancestral_RF"),
])
def test_ancestral_samplers_take_rf_path(host, eps_model, eps_flow, conds, monkeypatch, sampler, rf_function):
    import comfy.k_diffusion.sampling as kds

    real = getattr(kds, rf_function)
    calls = []

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(kds, rf_function, spy)
    out = ksample(host, eps_flow, conds, empty_latent(host, size=4), sampler, "simple", steps=3, cfg=2.0)
    assert calls, f"{sampler} on the patched model did not call {rf_function}"
    assert torch.isfinite(out).all()
    calls.clear()
    ksample(host, eps_model, conds, empty_latent(host, size=4), sampler, "simple", steps=3, cfg=2.0)
    assert not calls, f"{sampler} on the native model must not take the RF path"


# ---------------------------------------------------------------------------------------------
# 7: RescaleCFG
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["eps", "v"])
def test_d2f_rescale_cfg_matches_native_rescale_cfg(host, models, conds, kind, record_measure):
    native_model = models[kind]
    latent = empty_latent(host)
    native = ksample(host, host.run1("RescaleCFG", model=native_model, multiplier=0.7), conds, latent)
    plain = ksample(host, native_model, conds, latent)
    effect = rel(native, plain)
    record_measure(f"{kind}: RescaleCFG vs plain CFG, native (the effect compared)", effect, f"> {100 * EXACT:g}")
    assert effect > 100 * EXACT, "RescaleCFG barely acts here; the comparison below would prove nothing"

    flow = patch(host, native_model)
    ours = ksample(host, host.run1("D2FRescaleCFG", model=flow, multiplier=0.7), conds, latent)
    d = rel(ours, native)
    record_measure(f"{kind}: D2FRescaleCFG(patched) vs RescaleCFG(native)", d, f"≤ {EXACT:g}")
    assert d <= EXACT, f"D2FRescaleCFG differs from stock RescaleCFG on the native model by {d:.3g}"

    # Why the node exists: stock RescaleCFG sees a CONST model and rescales x̂0 instead of v_VP.
    # The gap is second order in the cond/uncond difference: large on the v model (≈1.6e-2 measured),
    # small on the ε model with this random UNet (≈1.2e-5), so it is asserted for v only.
    stock = ksample(host, host.run1("RescaleCFG", model=flow, multiplier=0.7), conds, latent)
    d_stock = rel(stock, native)
    record_measure(f"{kind}: stock RescaleCFG(patched) vs RescaleCFG(native)", d_stock,
                   f"> {100 * EXACT:g}" if kind == "v" else "(reported only)")
    if kind == "v":
        assert d_stock > 100 * EXACT, f"stock RescaleCFG on the patched v model unexpectedly matches native ({d_stock:.3g})"


# ---------------------------------------------------------------------------------------------
# 8: refusals, with messages that say what to do
# ---------------------------------------------------------------------------------------------
REFUSALS = {
    "patched twice": (None, "already flow-patched"),
    "SD3 flow (ModelSamplingSD3)": (("ModelSamplingSD3", {"shift": 3.0}), "already a flow-matching model"),
    "Flux flow (ModelSamplingFlux)": (("ModelSamplingFlux", {"max_shift": 1.15, "base_shift": 0.5, "width": 512,
                                                             "height": 512}), "already a flow-matching model"),
    "eps + zsnr": (("ModelSamplingDiscrete", {"sampling": "eps", "zsnr": True}), "zero-terminal-SNR"),
    "LCM": (("ModelSamplingDiscrete", {"sampling": "lcm", "zsnr": False}), "cannot map"),
    # (img_to_img, LotusD's parameterisation, maps exactly: tests/test_families.py samples it)
    "img_to_img_flow": (("ModelSamplingDiscrete", {"sampling": "img_to_img_flow", "zsnr": False}),
                        "already a flow-matching model"),
    "EDM": (("ModelSamplingContinuousEDM", {"sampling": "edm", "sigma_max": 120.0, "sigma_min": 0.002}), "cannot map"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_patch_refuses(host, eps_model, case):
    node, message = REFUSALS[case]
    if node is None:
        model = patch(host, eps_model)
    else:
        model = host.run1(node[0], model=eps_model, **node[1])
    with pytest.raises(ValueError, match=message):
        patch(host, model)


def test_v_zsnr_is_accepted(host, eps_model, conds):
    """The counterpart of the ε+zsnr refusal: v-prediction with zero terminal SNR is well-posed."""
    vz = host.run1("ModelSamplingDiscrete", model=eps_model, sampling="v_prediction", zsnr=True)
    flow = patch(host, vz)
    assert float(flow.get_model_object("model_sampling").sigma_max) < 1.0
    out = ksample(host, flow, conds, empty_latent(host, size=4), steps=3)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("node_id,inputs", [
    ("D2FFlowScheduler", {"steps": 4, "shift": 1.0, "denoise": 1.0}),
    ("D2FRescaleCFG", {"multiplier": 0.7}),
])
def test_flow_nodes_refuse_unpatched_models(host, eps_model, node_id, inputs):
    with pytest.raises(ValueError, match="D2FFlowPatch"):
        host.run(node_id, model=eps_model, **inputs)


# ---------------------------------------------------------------------------------------------
# 9: non-destructive
# ---------------------------------------------------------------------------------------------
def test_patch_is_non_destructive(host, eps_model, sd15_unet_name, conds):
    import safetensors.torch

    base_sampling = eps_model.get_model_object("model_sampling")
    base_sigmas = base_sampling.sigmas.clone()
    base_type = type(base_sampling)
    object_patches = dict(eps_model.object_patches)

    flow = patch(host, eps_model)
    assert flow is not eps_model
    assert eps_model.get_model_object("model_sampling") is base_sampling
    assert flow.get_model_object("model_sampling") is not base_sampling

    latent = empty_latent(host, size=4)
    ksample(host, flow, conds, latent, steps=2)
    assert eps_model.get_model_object("model_sampling") is base_sampling  # also while the clone is loaded
    ksample(host, host.run1("D2FRescaleCFG", model=flow, multiplier=0.7), conds, latent, steps=2)
    ksample(host, eps_model, conds, latent, steps=2)
    host.mm.unload_all_models()

    assert eps_model.get_model_object("model_sampling") is base_sampling
    assert eps_model.model.model_sampling is base_sampling, "the shared module kept the patch's model_sampling"
    assert type(base_sampling) is base_type and torch.equal(base_sampling.sigmas, base_sigmas)
    assert dict(eps_model.object_patches) == object_patches

    on_disk = safetensors.torch.load_file(os.path.join(host.unet_dir, sd15_unet_name))
    live = eps_model.model.diffusion_model.state_dict()
    assert set(live) == set(on_disk)
    changed = [k for k in on_disk if not torch.equal(live[k].cpu(), on_disk[k])]
    assert not changed, f"weights changed after sampling the patched model: {changed[:5]}"


# ---------------------------------------------------------------------------------------------
# 10: labels and the oracle conversion through the real model_sampling methods
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [0, 1, 500, 500.5, 998, 999])
@pytest.mark.parametrize("kind", ["eps", "v"])
def test_labels_and_oracle_conversion(host, models, kind, n):
    native = models[kind]
    base = native.get_model_object("model_sampling")
    flow_ms = patch(host, native).get_model_object("model_sampling")

    ve = base.sigma(torch.tensor([float(n)])).double()  # ς(n), the host's own interpolation
    sigma = phi(ve).float()  # what a sampler hands the model: fp32 flow time
    label = flow_ms.timestep(sigma)
    assert abs(float(label) - n) <= 1e-3, f"label at φ(ς_{n}) is {float(label)}"
    assert float(flow_ms.sigma(label)) == pytest.approx(float(sigma), rel=1e-5)

    gen = torch.Generator().manual_seed(11)
    x0 = torch.randn(1, 4, 8, 8, generator=gen)
    eps = torch.randn(1, 4, 8, 8, generator=gen)
    s = float(sigma)
    x = flow_ms.noise_scaling(sigma, eps, x0, max_denoise=False)
    assert torch.allclose(x, (1 - s) * x0 + s * eps, atol=1e-6)

    # The UNet sees exactly the VP state it saw natively at ς: base.calculate_input(ς, x0 + ς·ε).
    vp_in = flow_ms.calculate_input(sigma, x)
    native_in = base.calculate_input(ve.float(), x0 + ve.float() * eps)
    assert rel(vp_in, native_in) <= 1e-5

    a = 1 / math.sqrt(1 + float(ve) ** 2)  # VP: x_VP = a·x0 + s_vp·ε
    s_vp = float(ve) * a
    oracle = eps if kind == "eps" else a * eps - s_vp * x0
    x0_hat = flow_ms.calculate_denoised(sigma, oracle, x)
    assert rel(x0_hat, x0) <= 1e-5, f"x̂0 from the true {kind} is off by {rel(x0_hat, x0):.3g}"
    velocity = (x - x0_hat) / s
    assert rel(velocity, eps - x0) <= 1e-4
    # Back to the host's VE coordinates for a leftover-noise LATENT: x_VE = x0 + ς·ε.
    assert rel(flow_ms.inverse_noise_scaling(sigma, x), x0 + ve.float() * eps) <= 1e-5


# ---------------------------------------------------------------------------------------------
# full-checkpoint and SDXL smoke tests
# ---------------------------------------------------------------------------------------------
def test_full_checkpoint_through_checkpoint_loader(host, caplog):
    """A full SD1.5 file (tiny UNet + real-layout CLIP-L and VAE) through CheckpointLoaderSimple, CLIPTextEncode,
    the patch, KSampler and VAEDecode."""
    import logging

    unet = comfy_host.tiny_unet_state_dict(comfy_host.SD15_UNET_CONFIG, "SD15", seed=0)
    name = "d2f_test_tiny_sd15_full.safetensors"
    comfy_host.write_sd15_checkpoint(os.path.join(host.checkpoint_dir, name), unet)
    with caplog.at_level(logging.INFO):
        model, clip, vae = host.run("CheckpointLoaderSimple", ckpt_name=name)
    incomplete = [r.getMessage()[:200] for r in caplog.records
                  if any(t in r.getMessage() for t in ("clip missing", "Missing VAE keys", "left over keys"))]
    assert not incomplete, f"the checkpoint's layout is not what the loader expects: {incomplete}"
    assert type(model.model.model_config).__name__ == "SD15"
    assert clip is not None and vae is not None

    pos = host.run1("CLIPTextEncode", clip=clip, text="a photo of a cat")
    neg = host.run1("CLIPTextEncode", clip=clip, text="")
    assert pos[0][0].shape == (1, 77, 768) and torch.isfinite(pos[0][0]).all()

    flow = patch(host, model)
    latent = ksample(host, flow, (pos, neg), empty_latent(host), steps=2)
    assert torch.isfinite(latent).all()
    image = host.run1("VAEDecode", vae=vae, samples={"samples": latent})
    assert image.shape == (1, 64, 64, 3) and torch.isfinite(image).all()
    del model, clip, vae, flow
    host.mm.unload_all_models()
    os.remove(os.path.join(host.checkpoint_dir, name))  # 0.5 GB


def test_sdxl_smoke(host, sdxl_unet_name):
    model = host.run1("UNETLoader", unet_name=sdxl_unet_name, weight_dtype="default")
    assert type(model.model.model_config).__name__ == "SDXL"
    flow = patch(host, model)
    ms = flow.get_model_object("model_sampling")
    assert isinstance(ms, host.comfy.model_sampling.CONST)
    assert float(ms.sigma_max) == pytest.approx(0.935958, abs=2e-6)
    conds = conditioning(dim=2048, seed=5, pooled=1280)
    out = ksample(host, flow, conds, empty_latent(host, size=8), steps=2, cfg=3.0)
    assert out.shape == (1, 4, 8, 8) and torch.isfinite(out).all()
    del model, flow
    host.mm.unload_all_models()
