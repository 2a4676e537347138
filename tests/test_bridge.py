"""The bridge's math, with no host: DESIGN §2's table and its consequences."""

import math

import pytest
import torch

from d2f_core.flow.bridge import FlowBridge, flow_sigma, interpolate, ve_sigma, vp_scale
from d2f_core.flow.guidance import rescale_cfg_denoised
from d2f_core.flow.samplers import flow_sigmas, sample_ddim, sample_euler_flow
from d2f_core.flow.schedule import DiscreteSchedule, make_betas

SD = DiscreteSchedule.stable_diffusion()
LABELS = [0, 1, 500, 998, 999]
FRACTIONAL = [0.5, 1.25, 499.75, 998.5]


def test_sd_flow_range_matches_design_anchor():
    bridge = FlowBridge(SD, "eps")
    assert bridge.sigma_max == pytest.approx(0.935958, abs=1e-6)
    assert bridge.sigma_min == pytest.approx(0.028341, abs=1e-6)


@pytest.mark.parametrize("n", LABELS + FRACTIONAL)
def test_label_inverts_schedule(n):
    bridge = FlowBridge(SD, "eps")
    sigma = bridge.sigma_at(torch.tensor(float(n), dtype=torch.float64))
    assert float(bridge.label(sigma)) == pytest.approx(n, abs=1e-9)


def test_label_at_table_entries_is_the_integer_index():
    bridge = FlowBridge(SD, "eps")
    labels = bridge.label(bridge.sigmas)
    assert torch.allclose(labels, torch.arange(1000, dtype=torch.float64), atol=1e-9, rtol=0)


def test_label_offset_shifts_labels_and_inverts():
    bridge = FlowBridge(SD, "eps", label_offset=1)
    assert float(bridge.label(bridge.sigmas[500])) == pytest.approx(501, abs=1e-9)
    # In the label's precision: float64 in, float64 math; a float32 label gets float32 math.
    assert float(bridge.sigma_at(torch.tensor(501.0, dtype=torch.float64))) == pytest.approx(float(bridge.sigmas[500]), rel=1e-12)
    assert float(bridge.sigma_at(torch.tensor(501.0))) == pytest.approx(float(bridge.sigmas[500]), rel=1e-6)


def test_label_clamps_outside_the_table_without_nan():
    bridge = FlowBridge(SD, "eps")
    labels = bridge.label(torch.tensor([0.0, 1e-6, 0.999999, 1.0], dtype=torch.float64))
    assert torch.isfinite(labels).all()
    assert labels.tolist() == pytest.approx([0.0, 0.0, 999.0, 999.0], abs=1e-9)


@pytest.mark.parametrize("prediction", ["eps", "v_prediction", "x0"])
@pytest.mark.parametrize("n", LABELS + FRACTIONAL)
def test_oracle_output_gives_exact_x0_and_velocity(prediction, n):
    bridge = FlowBridge(SD, prediction)
    g = torch.Generator().manual_seed(n.__hash__() % 1000)
    x0 = torch.randn(3, 4, 5, 5, generator=g, dtype=torch.float64)
    noise = torch.randn(3, 4, 5, 5, generator=g, dtype=torch.float64)
    sigma = bridge.sigma_at(torch.tensor(float(n), dtype=torch.float64))
    x = interpolate(x0, noise, sigma)
    out = bridge.native_target(noise, x0, sigma)
    assert torch.allclose(bridge.denoised(sigma, out, x), x0, atol=1e-11, rtol=0)
    assert torch.allclose(bridge.velocity(sigma, out, x), noise - x0, atol=1e-10, rtol=0)


@pytest.mark.parametrize("n", LABELS)
def test_model_input_is_the_vp_state(n):
    bridge = FlowBridge(SD, "eps")
    x0 = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    noise = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    alpha_bar = SD.alphas_bar[n]
    x_vp = alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * noise
    sigma = bridge.sigmas[n]
    assert torch.allclose(bridge.model_input(sigma, interpolate(x0, noise, sigma)), x_vp, atol=1e-12, rtol=0)


def test_coordinate_change_is_an_involution_pair():
    s = torch.linspace(0.01, 20, 50, dtype=torch.float64)
    assert torch.allclose(ve_sigma(flow_sigma(s)), s, rtol=1e-13)
    assert torch.allclose(vp_scale(flow_sigma(s)), (1 + s ** 2).sqrt() / (1 + s), rtol=1e-13)


@pytest.mark.parametrize("prediction", ["eps", "v_prediction"])
def test_cfg_commutes_with_the_bridge(prediction):
    bridge = FlowBridge(SD, prediction)
    sigma = torch.tensor([0.3, 0.8], dtype=torch.float64)
    x = torch.randn(2, 4, 4, 4, dtype=torch.float64)
    cond, uncond = torch.randn_like(x), torch.randn_like(x)
    w = 7.5
    guided = uncond + w * (cond - uncond)
    for convert in (bridge.denoised, bridge.velocity):
        c, u = convert(sigma, cond, x), convert(sigma, uncond, x)
        assert torch.allclose(convert(sigma, guided, x), u + w * (c - u), atol=1e-10)


def test_eps_with_zero_terminal_snr_is_refused():
    with pytest.raises(ValueError, match="zero-terminal-SNR"):
        FlowBridge(DiscreteSchedule.stable_diffusion(zsnr=True), "eps")


def test_v_with_zero_terminal_snr_is_finite_at_its_top():
    bridge = FlowBridge(DiscreteSchedule.stable_diffusion(zsnr=True), "v_prediction")
    sigma = bridge.sigmas[-1]
    assert sigma > 0.9997
    x0, noise = torch.randn(1, 4, 4, 4, dtype=torch.float64), torch.randn(1, 4, 4, 4, dtype=torch.float64)
    x = interpolate(x0, noise, sigma)
    out = bridge.native_target(noise, x0, sigma)
    assert torch.allclose(bridge.denoised(sigma, out, x), x0, atol=1e-8)


def test_unknown_prediction_type_is_refused():
    with pytest.raises(ValueError, match="prediction"):
        FlowBridge(SD, "flow")


def gaussian_eps_model(mean, std):
    """Exact E[ε | x_VP] for data x0 ~ N(mean, std²), as a function of ᾱ."""
    def eps(x_vp, alpha_bar):
        a, s2 = alpha_bar ** 0.5, (1 - alpha_bar)
        return s2 ** 0.5 * (x_vp - a * mean) / (alpha_bar * std ** 2 + s2)
    return eps


@pytest.mark.parametrize("steps", [1, 2, 5, 20, 50])
def test_ddim_equals_flow_euler_step_for_step(steps):
    """DDIM on the VP model over labels n_i ≡ Euler on the bridged model over φ(ς_{n_i}), fp64."""
    mean, std = 0.3, 0.7
    eps_model = gaussian_eps_model(mean, std)
    bridge = FlowBridge(SD, "eps")

    def network(x_in, label):  # the ε-network sees VP inputs and (fractional) labels
        alpha_bar = 1 / (1 + SD.sigma(label) ** 2)
        return eps_model(x_in, alpha_bar.reshape(-1, 1, 1, 1))

    def flow_denoiser(x, sigma):
        return bridge.denoised(sigma, network(bridge.model_input(sigma, x), bridge.label(sigma)), x)

    labels = torch.linspace(999, 0, steps).round().long()
    alphas_bar = torch.cat([SD.alphas_bar[labels], torch.ones(1, dtype=torch.float64)])
    sigmas = torch.cat([bridge.sigmas[labels], torch.zeros(1, dtype=torch.float64)])
    noise = torch.randn(4, 4, 6, 6, generator=torch.Generator().manual_seed(steps), dtype=torch.float64)

    x_vp = sample_ddim(eps_model, noise.clone(), alphas_bar)
    x_flow_start = vp_scale(sigmas[0]) * noise  # x_VP = x/D at the start: the same state
    trajectory = []
    x_flow = sample_euler_flow(flow_denoiser, x_flow_start, sigmas,
                               callback=lambda d: trajectory.append((d["i"], d["x"])))
    assert torch.allclose(x_flow, x_vp, atol=1e-12, rtol=0)
    for i, x in trajectory:  # every intermediate state, read back in VP coordinates
        ddim_i = sample_ddim(eps_model, noise.clone(), alphas_bar[: i + 1])
        assert torch.allclose(x / vp_scale(sigmas[i]), ddim_i, atol=1e-12, rtol=0)


def native_rescale_cfg(x_ve, ve_sig, cond_x0, uncond_x0, cond_scale, multiplier):
    """The host's RescaleCFG, on a native VE model (its formula, restated)."""
    s = ve_sig
    x = x_ve / (s * s + 1.0)
    cond = (x - cond_x0) * (s ** 2 + 1.0) ** 0.5 / s
    uncond = (x - uncond_x0) * (s ** 2 + 1.0) ** 0.5 / s
    x_cfg = uncond + cond_scale * (cond - uncond)
    ro_pos = torch.std(cond, dim=(1, 2, 3), keepdim=True)
    ro_cfg = torch.std(x_cfg, dim=(1, 2, 3), keepdim=True)
    x_final = multiplier * x_cfg * (ro_pos / ro_cfg) + (1.0 - multiplier) * x_cfg
    return x - x_final * s / (s * s + 1.0) ** 0.5


@pytest.mark.parametrize("n", [10, 400, 990])
def test_flow_rescale_cfg_matches_native_rescale_cfg(n):
    ve = SD.sigmas[n]
    sigma = flow_sigma(ve)
    x_ve = torch.randn(2, 4, 5, 5, dtype=torch.float64) * (1 + ve)
    cond_x0, uncond_x0 = torch.randn_like(x_ve), torch.randn_like(x_ve)
    expected = native_rescale_cfg(x_ve, ve, cond_x0, uncond_x0, 6.0, 0.7)
    got = rescale_cfg_denoised(sigma, (1 - sigma) * x_ve, cond_x0, uncond_x0, 6.0, 0.7)
    assert torch.allclose(got, expected, atol=1e-10)


def test_flow_sigmas_uniform_from_sigma_max():
    s = flow_sigmas(4, 0.9, shift=1.0, dtype=torch.float64)
    assert torch.allclose(s, torch.tensor([0.9, 0.675, 0.45, 0.225, 0.0], dtype=torch.float64))


def test_flow_sigmas_shift_keeps_ends_and_moves_mass_to_high_noise():
    plain = flow_sigmas(10, 0.93, shift=1.0, dtype=torch.float64)
    shifted = flow_sigmas(10, 0.93, shift=3.0, dtype=torch.float64)
    assert shifted[0] == pytest.approx(0.93, abs=1e-12) and shifted[-1] == 0
    assert bool((shifted[1:-1] > plain[1:-1]).all())


def test_flow_sigmas_denoise_keeps_the_tail():
    full = flow_sigmas(20, 0.9, denoise=1.0)
    part = flow_sigmas(10, 0.9, denoise=0.5)
    assert torch.allclose(part, full[-11:])
    assert len(flow_sigmas(7, 0.9, denoise=0.3)) == 8


def test_schedule_from_custom_table_and_validation():
    sched = DiscreteSchedule(torch.tensor([0.1, 0.5, 2.0]))
    assert float(sched.label(torch.tensor(0.5))) == pytest.approx(1.0)
    assert float(sched.label(torch.tensor(math.sqrt(0.1 * 0.5)))) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        DiscreteSchedule(torch.tensor([0.5, 0.1]))


def test_per_sigma_cache_sees_in_place_changes_and_inference_tensors():
    bridge = FlowBridge(SD, "eps")
    sigma = bridge.sigmas[[100, 200]].clone()
    first = bridge.label(sigma).clone()
    sigma.copy_(bridge.sigmas[[300, 400]])  # same tensor, new values: the version counter moves
    assert torch.allclose(bridge.label(sigma), torch.tensor([300.0, 400.0], dtype=torch.float64), atol=1e-9)
    assert torch.allclose(first, torch.tensor([100.0, 200.0], dtype=torch.float64), atol=1e-9)
    with torch.inference_mode():  # how the host calls: no version counter, identity is the key
        s = bridge.sigmas[[500]].clone()
        x = torch.ones(1, 4, 2, 2, dtype=torch.float64)
        assert float(bridge.label(s)) == pytest.approx(500, abs=1e-9)
        assert torch.allclose(bridge.model_input(s, x), x / vp_scale(s).reshape(-1, 1, 1, 1))
        t = bridge.sigmas[[600]].clone()
        assert float(bridge.label(t)) == pytest.approx(600, abs=1e-9)


# ---------------------------------------------------------------------------------------------
# issue 13: the VE input space (LotusD) and the float32 time resolution of other families' schedules
# ---------------------------------------------------------------------------------------------
def test_ve_input_space_feeds_the_unscaled_ve_state():
    """input_space="ve" (the host's IMG_TO_IMG): the network sees x_VE = x/(1-σ) = x0 + ς·ε, not x/D; the output
    formulas do not depend on what the network was fed."""
    vp, ve = FlowBridge(SD, "x0"), FlowBridge(SD, "x0", input_space="ve")
    g = torch.Generator().manual_seed(5)
    x0, noise = torch.randn(2, 4, 3, 3, generator=g, dtype=torch.float64), torch.randn(2, 4, 3, 3, generator=g, dtype=torch.float64)
    sigma = ve.sigma_at(torch.tensor(640.25, dtype=torch.float64))
    s = float(sigma)
    x = interpolate(x0, noise, sigma)
    assert torch.allclose(ve.model_input(sigma, x), x0 + s / (1 - s) * noise, atol=1e-12)
    assert torch.allclose(vp.model_input(sigma, x), x / vp_scale(sigma), atol=1e-12)
    assert torch.allclose(ve.denoised(sigma, x0, x), vp.denoised(sigma, x0, x))
    assert torch.allclose(ve.velocity(sigma, x0, x), noise - x0, atol=1e-10)
    with pytest.raises(ValueError, match="input_space"):
        FlowBridge(SD, "x0", input_space="raw")


SCHEDULES = {  # the β of the families the host loads on a discrete schedule
    "sd": ("linear", 0.00085, 0.012, False), "sd_zsnr": ("linear", 0.00085, 0.012, True),
    "x4_upscaler": ("linear", 0.0001, 0.02, False), "pixart": ("sqrt_linear", 0.0001, 0.02, False),
    "hunyuan_dit_1_0": ("linear", 0.00085, 0.018, False), "hunyuan_dit_1_1": ("linear", 0.00085, 0.03, False),
}


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_fp32_grid_time_error_bounds_the_label_of_every_rounded_entry(name):
    """δ_n (``DiscreteSchedule.fp32_grid_time_error``) bounds, for every table entry, how far the float32 label of
    fl₃₂(σ_n) (what a sampler hands the patched model) lands from n: the a-priori figure the family tests use."""
    kind, start, end, zsnr = SCHEDULES[name]
    schedule = DiscreteSchedule.from_betas(make_betas(kind, 1000, start, end), zsnr=zsnr)
    bridge = FlowBridge(schedule, "v_prediction")
    rounded = bridge.sigmas.float()
    n = torch.arange(1000, dtype=torch.float64)
    error = (bridge.label(rounded).double() - n).abs()
    delta = schedule.fp32_grid_time_error(n)
    assert bool((error <= delta).all()), float((error - delta).max())
    # Large at the top of schedules whose ς_max is large (DESIGN §7), where fp32 resolves 1 - σ coarsely.
    top = {"sd": 2e-4, "sd_zsnr": 3e-4, "x4_upscaler": 2e-4, "pixart": 6e-4, "hunyuan_dit_1_0": 3e-4, "hunyuan_dit_1_1": 1e-3}
    assert float(delta[-1]) <= top[name] and float(error.max()) <= top[name]
