"""Diff2Flow and native objectives (DESIGN §2) and flow-time sampling."""

import pytest
import torch

from d2f_core.flow.bridge import FlowBridge, interpolate, vp_scale
from d2f_core.flow.losses import diff2flow_loss, native_loss, sample_sigmas, training_loss
from d2f_core.flow.schedule import DiscreteSchedule

SD = DiscreteSchedule.stable_diffusion()


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(6, 4, 4, 4, generator=g, dtype=torch.float64)
    noise = torch.randn(6, 4, 4, 4, generator=g, dtype=torch.float64)
    sigma = torch.linspace(0.03, 0.93, 6, dtype=torch.float64)
    out = torch.randn(6, 4, 4, 4, generator=g, dtype=torch.float64)
    return x0, noise, sigma, out


def test_diff2flow_loss_is_reweighted_eps_loss():
    bridge = FlowBridge(SD, "eps")
    x0, noise, sigma, out = _batch()
    x = interpolate(x0, noise, sigma)
    d2f = diff2flow_loss(bridge, out, x, x0, noise, sigma)
    native = native_loss(bridge, out, x0, noise, sigma)
    assert torch.allclose(d2f, native / (1 - sigma) ** 2, rtol=1e-6)


def test_diff2flow_loss_is_reweighted_v_loss():
    bridge = FlowBridge(SD, "v_prediction")
    x0, noise, sigma, out = _batch(1)
    x = interpolate(x0, noise, sigma)
    d2f = diff2flow_loss(bridge, out, x, x0, noise, sigma)
    native = native_loss(bridge, out, x0, noise, sigma)
    assert torch.allclose(d2f, native / vp_scale(sigma) ** 2, rtol=1e-6)


def test_loss_formula_on_explicit_velocity():
    bridge = FlowBridge(SD, "eps")
    x0, noise, sigma, out = _batch(2)
    x = interpolate(x0, noise, sigma)
    x0_hat = bridge.denoised(sigma, out, x)
    v_hat = (x - x0_hat) / sigma.reshape(-1, 1, 1, 1)
    expected = (v_hat - (noise - x0)).pow(2).flatten(1).mean(1)
    assert torch.allclose(diff2flow_loss(bridge, out, x, x0, noise, sigma), expected, rtol=1e-6)


def test_training_loss_zero_for_oracle_network():
    bridge = FlowBridge(SD, "v_prediction")
    x0, noise, sigma, _ = _batch(3)

    def oracle(x_in, label):
        s = bridge.sigma_at(label.double())
        return bridge.native_target(noise, x0, s)

    for objective in ("diff2flow", "native"):
        loss = training_loss(bridge, oracle, x0, noise, sigma, objective=objective)
        assert float(loss.max()) < 1e-12


def test_sample_sigmas_in_range_and_shifted():
    g = torch.Generator().manual_seed(0)
    s = sample_sigmas(4000, 0.03, 0.93, "uniform", generator=g)
    assert float(s.min()) >= 0.03 and float(s.max()) <= 0.93
    assert float(s.mean()) == pytest.approx(0.48, abs=0.02)
    shifted = sample_sigmas(4000, 0.03, 0.93, "uniform", shift=3.0, generator=torch.Generator().manual_seed(0))
    assert float(shifted.mean()) > float(s.mean()) + 0.1
    ln = sample_sigmas(4000, 0.03, 0.93, "logit_normal", generator=torch.Generator().manual_seed(0))
    assert float(ln.std()) < float(s.std())
    with pytest.raises(ValueError):
        sample_sigmas(3, 0.0, 1.0, "beta")
