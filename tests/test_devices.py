"""Devices without float64 (Apple MPS, Intel XPU, DirectML): the pack never makes a float64 tensor while
sampling or training, and its float32 label is provably as good as the float64 one.

* The float32 label bound derived in ``DiscreteSchedule``'s docstring, proved by exhaustion over every
  float32 σ in [σ_min, σ_max] of the SD schedule (4.2·10⁷ values), on the CPU, and on CUDA when present.
* A dispatch-level guard (``float64_guard``) around full patched sampling through the real host
  (KSampler, SamplerCustomAdvanced; ε and v) and around training steps (Trainer, D2FTrain): any float64
  tensor made while a frame of ``d2f_core/`` or ``nodes/`` is on the stack fails, on any device. CI has
  only a CPU, so this is stricter than "no float64 off the CPU". Each guard is shown to have teeth.
"""

from __future__ import annotations

import sys

import pytest
import torch

from d2f_core.flow import schedule as schedule_module
from d2f_core.flow.bridge import FlowBridge
from d2f_core.training.couplings import noise_through_start
from d2f_core.training.data import LatentBuckets
from d2f_core.flow.losses import sample_sigmas
from d2f_core.training.scheduled_sampling import ScheduledSampling
from d2f_core.flow.schedule import DiscreteSchedule
from d2f_core.training.trainer import TrainConfig, Trainer
import comfy_host
from float64_guard import Float64Guard

SD = DiscreteSchedule.stable_diffusion()
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


# ---------------------------------------------------------------------------------------------
# the float32 label: derived bound, proved by exhaustion
# ---------------------------------------------------------------------------------------------
def _float32_bits(x: float) -> int:
    return int(torch.tensor([x], dtype=torch.float32).view(torch.int32))


def _half_ulp32(n: torch.Tensor) -> torch.Tensor:
    """½ ulp of float32 at |n|, in float64 (the resolution of a float32 label)."""
    a = n.float().abs()
    return (torch.nextafter(a, torch.full_like(a, float("inf"))) - a).double() / 2


@pytest.mark.parametrize("device", DEVICES)
def test_float32_label_within_derived_bound_for_every_float32_sigma(device, record_measure):
    """Every float32 σ between the float32 σ_min and σ_max of SD: |n₃₂ - n₆₄| ≤ ½ ulp(n) + rounding +
    segment term (the docstring's bound), where n₆₄ is the float64 label of the same float32 σ, computed
    through the other formula (ς = σ/(1-σ) in float64, n = i + W_i·log1p((ς - ς_i)/ς_i))."""
    bound = SD.flow_label_error_bound(log1p_ulps=1)
    assert bound["sterbenz"], "σ_{i+1} ≤ 2σ_i, needed for the exact subtraction"
    assert bound["total"] < 3.12e-5  # ½ ulp(512…1023) = 3.05e-5, plus 5.9e-7
    table = SD._cpu[torch.float32].flow_hi
    first, last = _float32_bits(float(table[0])), _float32_bits(float(table[-1]))
    worst = excess = 0.0
    chunk = 1 << 22
    for start in range(first, last + 1, chunk):
        sigma = torch.arange(start, min(start + chunk, last + 1), dtype=torch.int32).view(torch.float32)
        s64 = sigma.double()
        reference = SD.label(s64 / (1 - s64))
        label = SD.flow_label(sigma.to(device))
        assert label.dtype == torch.float32 and label.device.type == device
        err = (label.cpu().double() - reference).abs()
        worst = max(worst, float(err.max()))
        excess = max(excess, float((err - _half_ulp32(reference)).max()))
    count = last - first + 1
    assert count > 4e7
    record_measure(f"{device}: max |n32 - n64| over all {count} float32 σ", worst, f"≤ {bound['total']:.4g}")
    record_measure(f"{device}: max excess over ½ ulp(n)", excess,
                   f"≤ {bound['rounding'] + bound['segment']:.3g}")
    assert worst <= bound["total"]
    assert excess <= bound["rounding"] + bound["segment"]


def test_the_old_affine_float32_form_breaks_the_bound():
    """Why the label is evaluated as i + W_i·Δ: the affine C_i + W_i·log ς in float32 is off by ≈ 1e-4 near
    the top (rounding of log ς amplified by W_i); on a sample of the top binade it exceeds the bound."""
    t64 = SD._cpu[torch.float64]
    log = SD.log_sigmas
    slope = t64.slope
    intercept = (torch.arange(len(log) - 1, dtype=torch.float64) - log[:-1] * slope).float()
    sigma = torch.arange(_float32_bits(0.5), _float32_bits(float(t64.flow_hi[-1])), 97,
                         dtype=torch.int32).view(torch.float32)
    log_ve = (sigma / (1 - sigma)).log()
    i = torch.searchsorted(log[1:-1].float(), log_ve)
    affine = torch.addcmul(intercept[i], log_ve, slope.float()[i])
    reference = SD.flow_label(sigma.double())
    assert float((affine.double() - reference).abs().max()) > SD.flow_label_error_bound()["total"]
    assert float((SD.flow_label(sigma).double() - reference).abs().max()) <= SD.flow_label_error_bound()["total"]


def test_label_and_sigma_run_in_the_precision_of_their_argument():
    bridge = FlowBridge(SD, "eps")
    for dtype, expected in [(torch.float64, torch.float64), (torch.float32, torch.float32),
                            (torch.float16, torch.float32), (torch.bfloat16, torch.float32)]:
        sigma = torch.tensor([0.3, 0.9], dtype=dtype)
        bridge._last = (None, -1, None)
        assert bridge.label(sigma).dtype == expected, dtype
        assert bridge.sigma_at(torch.tensor([10.5], dtype=dtype)).dtype == expected, dtype
    assert SD.label(torch.tensor([1.0])).dtype == torch.float32
    assert SD.sigma(torch.tensor([3])).dtype == torch.float32  # integer labels: float32 math
    assert SD.sigma_scalar(500.5) == pytest.approx(float(SD.sigma(torch.tensor(500.5, dtype=torch.float64))), rel=1e-15)


def test_device_tables_are_float32_converted_before_the_move():
    """A non-CPU device (``meta`` stands in for MPS here) gets float32 tables only, made from the CPU's
    float32 copy, and a whole label evaluation there makes no float64 anywhere."""
    schedule = DiscreteSchedule.stable_diffusion()
    bridge = FlowBridge(schedule, "v_prediction")
    sigma = torch.full((4,), 0.5, device="meta")
    with Float64Guard() as guard:
        label = bridge.label(sigma)
        bridge.sigma_at(label)
        x = torch.zeros(4, 4, 8, 8, device="meta")
        bridge.denoised(sigma, bridge.model_input(sigma, x), x)
    assert label.dtype == torch.float32 and label.device.type == "meta"
    assert list(schedule._on_device) == [("meta", torch.float32)]
    assert all(t.dtype == torch.float32 and t.device.type == "meta" for t in schedule._on_device[("meta", torch.float32)])
    assert not guard.violations and guard.host_float64 == 0


# ---------------------------------------------------------------------------------------------
# the guard has teeth
# ---------------------------------------------------------------------------------------------
def test_guard_catches_a_float64_made_inside_a_pack_function(monkeypatch):
    """A deliberate ``torch.zeros(1, dtype=torch.float64)`` run from inside ``DiscreteSchedule.flow_label``
    (a pack frame on the stack) is caught; the same tensor made by the test alone is not the pack's."""
    def leaky(x):
        torch.zeros(1, dtype=torch.float64)
        return torch.float32

    sigma = torch.tensor([0.25, 0.75])
    with Float64Guard(strict=False) as guard:
        torch.zeros(1, dtype=torch.float64)  # the test's (host's) own float64: counted apart
    assert not guard.violations and guard.host_float64 == 1

    monkeypatch.setattr(schedule_module, "compute_dtype", leaky)
    with pytest.raises(AssertionError, match="float64 tensor"):
        with Float64Guard():
            SD.flow_label(sigma)
    with Float64Guard(strict=False) as guard:
        SD.flow_label(sigma)
    assert len(guard.violations) == 1 and "aten.zeros" in guard.violations[0][0]
    assert "schedule.py" in guard.violations[0][2] and "flow_label" in guard.violations[0][2]


def test_guard_catches_float64_label_math(monkeypatch):
    """The regression the guard exists for: label math promoted to float64 (as before this change)."""
    monkeypatch.setattr(schedule_module, "compute_dtype", lambda x: torch.float64)
    with Float64Guard(strict=False) as guard:
        FlowBridge(SD, "eps").label(torch.tensor([0.5]))
    assert guard.violations, "float64 label math went unseen"


# ---------------------------------------------------------------------------------------------
# training on the CPU under the guard
# ---------------------------------------------------------------------------------------------
class TinyNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(4, 8, 3, padding=1)
        self.time = torch.nn.Linear(1, 8)
        self.ctx = torch.nn.Linear(8, 8)
        self.out = torch.nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x, t, context):
        h = self.conv(x) + self.time(t[:, None] / 1000)[:, :, None, None] + self.ctx(context.mean(1))[:, :, None, None]
        return self.out(torch.nn.functional.silu(h))


@pytest.mark.parametrize("prediction,time_sampling,objective", [
    ("eps", "uniform", "diff2flow"), ("v_prediction", "logit_normal", "native")])
def test_trainer_steps_make_no_float64(prediction, time_sampling, objective):
    """Trainer steps with every σ-dependent path on: drawn times (uniform, logit-normal, shifted), scheduled-
    sampling rollouts, caption dropout, Reflow's line noise ε' from stored couplings."""
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(4, 4, 8, 8, generator=g)
    conds = [{"context": torch.randn(5, 8, generator=g)} for _ in range(4)]
    bridge = FlowBridge(DiscreteSchedule.stable_diffusion(), prediction)
    net = TinyNet()
    config = TrainConfig(steps=3, batch_size=2, learning_rate=1e-3, seed=3, sync_every=3, objective=objective,
                         time_sampling=time_sampling, time_shift=2.0, caption_dropout=0.5,
                         scheduled_sampling=ScheduledSampling(probability=1.0, max_offset=2, solver_steps=10, ramp="constant"))
    with Float64Guard() as guard:
        noise = noise_through_start(torch.randn(4, 4, 8, 8, generator=g), latents, bridge.sigma_max)
        data = LatentBuckets([(latents, conds, noise)], empty_cond={"context": torch.zeros(5, 8)})
        result = Trainer(net, bridge, list(net.parameters()), data, config).run()
        sample_sigmas(8, bridge.sigma_min, bridge.sigma_max, "logit_normal", shift=3.0)
    assert result.step == 3 and all(torch.isfinite(torch.tensor(result.losses)))
    assert not guard.violations


def test_training_guard_has_teeth(monkeypatch):
    """The old flow-time draw (float64 uniform on the device, then float32) inside a Trainer step: caught."""
    from d2f_core.training import trainer as training

    def float64_draw(n, lo, hi, mode="uniform", shift=1.0, generator=None, device=None, **_):
        return (lo + (hi - lo) * torch.rand(n, generator=generator, device=device, dtype=torch.float64)).float()

    monkeypatch.setattr(training, "sample_sigmas", float64_draw)
    g = torch.Generator().manual_seed(1)
    data = LatentBuckets([(torch.randn(2, 4, 8, 8, generator=g), [{"context": torch.randn(5, 8, generator=g)}] * 2)])
    net, bridge = TinyNet(), FlowBridge(SD, "eps")
    with Float64Guard(strict=False) as guard:
        Trainer(net, bridge, list(net.parameters()), data, TrainConfig(steps=1, batch_size=2)).run()
    assert guard.violations and "aten.rand" in guard.violations[0][0]


# ---------------------------------------------------------------------------------------------
# through the real host
# ---------------------------------------------------------------------------------------------
CFG = 4.0


def _conds(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, 77, 768, generator=gen), {}]], [[torch.randn(1, 77, 768, generator=gen), {}]]


@pytest.fixture(scope="module")
def host_models(host, sd15_model):
    v = host.run1("ModelSamplingDiscrete", model=sd15_model, sampling="v_prediction", zsnr=False)
    return {"eps": sd15_model, "v": v}


def _sample_everything(host, flow, conds):
    """A full patched sampling through KSampler (stock samplers and schedulers, including ``normal``, which
    calls model_sampling.timestep/sigma, and a cond with a timestep range, which calls percent_to_sigma) and
    through SamplerCustomAdvanced with the pack's scheduler and sampler."""
    pos, neg = conds
    latent = host.run1("EmptyLatentImage", width=64, height=64, batch_size=1)
    ranged = host.run1("ConditioningSetTimestepRange", conditioning=pos, start=0.0, end=0.6)
    outs = []
    for sampler, scheduler, positive in [("euler", "simple", pos), ("dpmpp_2m", "normal", ranged),
                                         ("euler_ancestral", "karras", pos)]:
        outs.append(host.run1("KSampler", model=flow, seed=7, steps=3, cfg=CFG, sampler_name=sampler,
                              scheduler=scheduler, positive=positive, negative=neg, latent_image=latent,
                              denoise=1.0)["samples"])
    sigmas = host.run1("D2FFlowScheduler", model=flow, steps=3, shift=2.0, denoise=1.0)
    guider = host.run1("CFGGuider", model=flow, positive=pos, negative=neg, cfg=CFG)
    noise = host.run1("RandomNoise", noise_seed=7)
    for sampler in (host.run1("D2FEulerFlowSampler"), host.run1("KSamplerSelect", sampler_name="euler")):
        out, _ = host.run("SamplerCustomAdvanced", noise=noise, guider=guider, sampler=sampler, sigmas=sigmas,
                          latent_image=latent)
        outs.append(out["samples"])
    return outs


@pytest.mark.parametrize("kind", ["eps", "v"])
def test_patched_sampling_through_the_host_makes_no_float64(host, host_models, kind, record_measure):
    flow = host.run1("D2FFlowPatch", model=host_models[kind], prediction="auto", label_offset=0)  # tables: float64 CPU, once
    sampling = flow.get_model_object("model_sampling")
    assert sampling.sigmas.dtype == sampling.log_sigmas.dtype == torch.float32  # like the host's own buffers
    conds = _conds()
    with Float64Guard(host.pack_module_path, host_dirs=(host.path,)) as guard:
        outs = _sample_everything(host, flow, conds)
        host.run1("D2FRescaleCFG", model=flow, multiplier=0.7)
    assert all(torch.isfinite(o).all() for o in outs)
    record_measure(f"{kind}: float64 tensors made by the host itself while sampling (CPU, allowed)",
                   guard.host_float64, "(reported only)")
    host.mm.unload_all_models()


def test_host_sampling_guard_has_teeth(host, host_models, monkeypatch):
    """The same sampling with the host-loaded engine's label math forced back to float64: caught."""
    flow = host.run1("D2FFlowPatch", model=host_models["eps"], prediction="auto", label_offset=0)
    loaded = sys.modules[type(flow.get_model_object("model_sampling").bridge.schedule).__module__]
    assert loaded is not schedule_module or host.pack_module_path  # the host's own import of the pack
    monkeypatch.setattr(loaded, "compute_dtype", lambda x: torch.float64)
    with Float64Guard(host.pack_module_path, host_dirs=(host.path,), strict=False) as guard:
        _sample_everything(host, flow, _conds())
    assert guard.violations, "float64 label math in the host-loaded pack went unseen"
    host.mm.unload_all_models()


def _d2f_train(host, model, **overrides):
    """D2FTrain as the executor runs it (is_input_list: every input a list), small CPU settings."""
    schema = host.node_class("D2FTrain").GET_SCHEMA()
    opts = {i.id: i.default for i in schema.inputs if not i.optional and getattr(i, "default", None) is not None}
    opts.update(mode="lora", steps=2, batch_size=2, learning_rate=1e-3, rank=4, alpha=0.0, lora_targets="attention",
                gradient_checkpointing=False, training_dtype="fp32", cuda_graphs=False, seed=0, save_every=0,
                preview_every=2, run_name="d2f_devices_guard")
    opts.update(overrides)
    gen = torch.Generator().manual_seed(4)
    latents = [{"samples": 4.0 * torch.randn(1, 4, 8, 8, generator=gen)} for _ in range(2)]
    positive = [[[torch.randn(1, 77, 768, generator=gen), {}]] for _ in range(2)]
    inputs = {k: [v] for k, v in comfy_host.d2f_train_inputs(host, opts).items()}
    inputs.update(model=[model], latents=latents, positive=positive)
    return host.run("D2FTrain", **inputs)


@pytest.mark.parametrize("kind,extra", [
    ("eps", dict(time_sampling="uniform", ss_probability=1.0, ss_ramp="constant", ss_max_offset=2)),
    ("v", dict(time_sampling="logit_normal", time_shift=2.0, loss="native")),
])
def test_d2f_train_steps_make_no_float64(host, host_models, kind, extra):
    """D2FTrain (LoRA, fp32, CPU) with a preview sample at the end, under the guard."""
    from comfy_api.latest import io  # noqa: F401  (the host is booted: its API is importable)

    with Float64Guard(host.pack_module_path, host_dirs=(host.path,), allow_table_building=True) as guard:
        out = _d2f_train(host, host_models[kind], **extra)
    assert out[0] is not None and not guard.violations
    assert guard.table_float64 > 0  # the node set up its schedule (float64 on the CPU, by design), then trained
    host.mm.unload_all_models()
