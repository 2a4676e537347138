"""EMA of the trained weights (d2f_core/training/ema.py): the closed form, the Trainer hook, exact resume, the
storage dtype, swapping the EMA in and out, NaN recovery, and every refused input."""

import math

import pytest
import torch

from d2f_core.storage.state import read_state, save_state
from d2f_core.training.adapters import FullAdapters, LoraAdapters
from d2f_core.training.ema import EMA, EMAOptions, split_ema, warmup_decay, with_ema
from d2f_core.training.trainer import NonFiniteLossError, TrainConfig, Trainer

from test_training import BRIDGE, TinyNet, dataset


def sgd_on_constant_gradient(steps, lr, grad, ema, theta):
    """θ_{j+1} = θ_j − η·g (plain SGD, no momentum), the EMA updated after each step; returns the trajectory."""
    opt = torch.optim.SGD([theta], lr=lr, momentum=0.0)
    trajectory = [theta.detach().clone()]
    for k in range(steps):
        theta.grad = grad.clone()
        opt.step()
        ema.update(k)
        trajectory.append(theta.detach().clone())
    return trajectory


def closed_form(trajectory, betas):
    """θ_ema_K = (Π β_k)·θ_0 + Σ_j (1 − β_{j−1})·(Π_{k≥j} β_k)·θ_j, and the weights (which sum to 1)."""
    K = len(betas)
    weights = []
    for j in range(K + 1):
        tail = math.prod(betas[j:])
        weights.append(tail if j == 0 else (1 - betas[j - 1]) * tail)
    return sum(w * t for w, t in zip(weights, trajectory)), weights


# --- the equation ---------------------------------------------------------------------------------------
def test_constant_decay_matches_the_closed_form_on_a_known_gradient():
    """SGD on a constant gradient: θ_K = θ_0 − K·η·g and θ_ema_K = θ_0 − η·g·(K − β(1 − β^K)/(1 − β))."""
    beta, lr, K = 0.9, 0.05, 37
    theta = torch.nn.Parameter(torch.randn(6, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    theta0 = theta.detach().clone()
    g = torch.linspace(-1, 2, 6, dtype=torch.float64)
    ema = EMA({"theta": theta}, decay=beta, warmup=False, dtype=torch.float64)
    sgd_on_constant_gradient(K, lr, g, ema, theta)
    expected = theta0 - lr * g * (K - beta * (1 - beta ** K) / (1 - beta))
    torch.testing.assert_close(ema.named_tensors()["theta"], expected, rtol=0, atol=1e-13)
    # the lag behind the weights: η·g·β(1−β^K)/(1−β), about β/(1−β) = 9 steps' worth
    lag = ema.named_tensors()["theta"] - theta.detach()
    torch.testing.assert_close(lag, lr * g * beta * (1 - beta ** K) / (1 - beta), rtol=0, atol=1e-13)


def test_warmup_decay_matches_the_closed_form():
    beta, K = 0.99, 25
    theta = torch.nn.Parameter(torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1)))
    ema = EMA({"w": theta}, decay=beta, warmup=True, dtype=torch.float64)
    g = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    trajectory = sgd_on_constant_gradient(K, 0.1, g, ema, theta)
    betas = [min(beta, (1 + k) / (10 + k)) for k in range(K)]
    expected, weights = closed_form(trajectory, betas)
    assert math.isclose(sum(weights), 1.0, rel_tol=1e-12)
    torch.testing.assert_close(ema.named_tensors()["w"], expected, rtol=0, atol=1e-13)
    # the schedule's landmarks (docstring): 0.1 at the first update, 0.5 at k = 8, capped at β
    assert warmup_decay(beta, 0, True) == pytest.approx(0.1)
    assert warmup_decay(beta, 8, True) == pytest.approx(0.5)
    assert warmup_decay(0.999, 10_000, True) == 0.999 and warmup_decay(0.5, 0, False) == 0.5


def test_trainer_updates_the_ema_after_every_optimizer_step():
    """On a real (tiny) Diff2Flow run through Trainer.run: the EMA after K steps is the closed form over the
    weights the optimizer produced, step by step."""
    net = TinyNet()
    named = dict(net.named_parameters())
    ema = EMA(named, decay=0.8, warmup=True, dtype=torch.float64)
    trajectory = [{k: v.detach().double().clone() for k, v in named.items()}]

    def progress(step, losses, rate):
        trajectory.append({k: v.detach().double().clone() for k, v in named.items()})
    config = TrainConfig(steps=12, batch_size=2, learning_rate=3e-3, sync_every=1, seed=4)
    Trainer(net, BRIDGE, list(net.parameters()), dataset(), config, ema=ema).run(on_progress=progress)
    assert len(trajectory) == 13
    betas = [min(0.8, (1 + k) / (10 + k)) for k in range(12)]
    for name in named:
        expected, _ = closed_form([t[name] for t in trajectory], betas)
        torch.testing.assert_close(ema.named_tensors()[name], expected, rtol=0, atol=1e-12)
    moved = max(float((trajectory[-1][k] - trajectory[0][k]).abs().max()) for k in named)
    assert moved > 1e-3  # the weights did move: the comparison is not of constants


# --- resume -----------------------------------------------------------------------------------------------
def ema_run(net, config, start=0, state=None, **run):
    named = dict(net.named_parameters())
    ema = EMA(named, decay=0.9, warmup=True, dtype=torch.float32, start_step=start)
    trainer = Trainer(net, BRIDGE, list(net.parameters()), dataset(), config, ema=ema)
    if state is not None:
        loaded = read_state(state, trainer.optimizer)
        net.load_state_dict(loaded.weights)
        if loaded.ema is not None:
            ema.load(loaded.ema, loaded.ema_info)
    return trainer, ema, trainer.run(start_step=start, **run)


def test_resume_of_the_ema_is_exact(tmp_path):
    config = TrainConfig(steps=9, batch_size=2, learning_rate=2e-3, seed=5, sync_every=2)
    straight = TinyNet()
    _, ema_straight, _ = ema_run(straight, config)

    first = TinyNet()
    trainer, ema, result = ema_run(first, config, should_stop=lambda: True)  # stops after the first step
    step = result.step
    assert 0 < step < 9
    path = save_state(str(tmp_path / "state.safetensors"), dict(first.state_dict()), trainer.optimizer, step,
                      ema=ema.state_tensors(), ema_info=ema.info())

    again = TinyNet(seed=99)  # another init: everything must come from the file
    _, ema_again, result = ema_run(again, config, start=step, state=path)
    assert result.step == 9
    for k, v in ema_straight.named_tensors().items():
        assert torch.equal(ema_again.named_tensors()[k], v), k
    for k, v in straight.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k
    assert ema_again.start_step == 0  # the saved EMA's start, not the resume step: the warm-up continued

    # teeth: the same resume without the saved EMA (a fresh EMA of the resumed weights) ends elsewhere
    fresh = TinyNet(seed=98)
    trainer = Trainer(fresh, BRIDGE, list(fresh.parameters()), dataset(), config)
    fresh.load_state_dict(read_state(path, trainer.optimizer).weights)
    trainer.ema = ema_fresh = EMA(dict(fresh.named_parameters()), decay=0.9, start_step=step)
    trainer.run(start_step=step)
    gap = max(float((ema_fresh.named_tensors()[k] - v).abs().max()) for k, v in ema_straight.named_tensors().items())
    assert gap > 1e-4


def test_state_without_ema_reads_back_none(tmp_path):
    net = TinyNet()
    path = save_state(str(tmp_path / "s.safetensors"), dict(net.state_dict()), None, 3)
    state = read_state(path)
    assert state.ema is None and state.ema_info is None and state.step == 3


# --- dtype ------------------------------------------------------------------------------------------------
def test_storage_dtype_is_honoured():
    w = torch.nn.Parameter(torch.randn(64, generator=torch.Generator().manual_seed(3)))
    options = EMAOptions(decay=0.5, warmup=False, dtype="training")
    ema = EMA.from_options({"w": w}, options, training_dtype=torch.bfloat16)
    assert ema.named_tensors()["w"].dtype == torch.bfloat16 and ema.info()["dtype"] == "bfloat16"
    assert EMA.from_options({"w": w}, EMAOptions(dtype="fp32"), torch.bfloat16).named_tensors()["w"].dtype == torch.float32
    assert EMA({"w": w}, dtype=None).named_tensors()["w"].dtype == torch.float32  # None: the tensor's own

    # each update: float32 math on the float32 weights, rounded once to bf16 (θ itself is not rounded first)
    reference = w.detach().bfloat16()
    for k in range(6):
        with torch.no_grad():
            w.add_(0.37)
        ema.update(k)
        reference = torch.lerp(reference.float(), w.detach(), 0.5).bfloat16()
        assert torch.equal(ema.named_tensors()["w"], reference), k


def test_bf16_storage_freezes_a_slow_ema_as_documented():
    """The docstring's caveat, measured: at β = 0.999 a bf16 EMA of slowly moving weights does not move at
    all, while the float32 EMA does."""
    w = torch.nn.Parameter(torch.ones(8))
    bf16 = EMA({"w": w}, decay=0.999, warmup=False, dtype=torch.bfloat16)
    fp32 = EMA({"w": w}, decay=0.999, warmup=False, dtype=torch.float32)
    for k in range(50):
        with torch.no_grad():
            w.add_(0.01)
        bf16.update(k)
        fp32.update(k)
    assert torch.equal(bf16.named_tensors()["w"], torch.ones(8, dtype=torch.bfloat16))
    assert float(fp32.named_tensors()["w"][0]) > 1.01


# --- using the EMA ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["same-dtype-swap", "other-dtype-backup"])
def test_applied_swaps_the_ema_in_and_restores_the_training_weights(dtype):
    net = TinyNet()
    ema = EMA(dict(net.named_parameters()), decay=0.5, warmup=False, dtype=dtype)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    ema.update(0)
    training = {k: v.detach().clone() for k, v in net.named_parameters()}
    averaged = {k: v.clone() for k, v in ema.named_tensors().items()}
    ids = {k: (id(p), p.data_ptr()) for k, p in net.named_parameters()}
    with ema.applied():
        for k, p in net.named_parameters():
            assert torch.equal(p.detach(), averaged[k].to(p.dtype)), k
            assert (id(p), p.data_ptr()) == ids[k]  # same Parameter, same storage: optimizers and graphs stay valid
    for k, p in net.named_parameters():
        assert torch.equal(p.detach(), training[k]), k
        assert torch.equal(ema.named_tensors()[k], averaged[k]), k


def test_applied_restores_on_an_exception_and_refuses_misuse():
    net = TinyNet()
    ema = EMA(dict(net.named_parameters()), decay=0.5)
    with torch.no_grad():
        net.out.weight.add_(1.0)
    ema.update(0)
    before = {k: v.detach().clone() for k, v in net.named_parameters()}
    with pytest.raises(KeyError):
        with ema.applied():
            raise KeyError("a preview failed")
    for k, p in net.named_parameters():
        assert torch.equal(p.detach(), before[k]), k
    assert not ema.is_applied
    with ema.applied():
        with pytest.raises(RuntimeError, match="inside EMA.applied"):
            ema.update(1)
        with pytest.raises(RuntimeError, match="already active"):
            with ema.applied():
                pass
    for k, p in net.named_parameters():
        assert torch.equal(p.detach(), before[k]), k


def test_ema_made_under_inference_mode_updates_outside_it():
    """Nodes run under torch.inference_mode(); the training loop runs outside it. EMA tensors made in a node must
    not be inference tensors (those refuse in-place updates outside inference mode)."""
    w = torch.nn.Parameter(torch.zeros(3))
    with torch.inference_mode():
        ema = EMA({"w": w}, decay=0.5, warmup=False)
    with torch.no_grad():
        w.add_(2.0)
    ema.update(0)
    assert torch.equal(ema.named_tensors()["w"], torch.ones(3))
    with torch.inference_mode():
        with ema.applied():  # previews and exports happen in the node, under inference mode
            assert torch.equal(w.detach(), torch.ones(3))
    assert torch.equal(w.detach(), torch.full((3,), 2.0)) and not w.is_inference()


def test_lora_and_full_adapters_export_their_ema():
    root = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.SiLU(), torch.nn.Linear(8, 4)).requires_grad_(False)
    for adapters in (LoraAdapters(root, rank=2, seed=0), FullAdapters(root)):
        named = adapters.named_trainables()
        ema = EMA(named, decay=0.75, warmup=False)
        with torch.no_grad():
            for p in named.values():
                p.add_(0.5)
        ema.update(0)
        training_export = adapters.export()
        with ema.applied():
            ema_export = adapters.export()
        expected = {k: 0.25 * v.detach() + 0.75 * (v.detach() - 0.5) for k, v in named.items()}  # β·θ_0 + (1-β)·θ_1
        with ema.applied():
            for k, p in named.items():
                torch.testing.assert_close(p.detach(), expected[k], rtol=0, atol=1e-6)
        assert any(not torch.equal(ema_export[k], training_export[k]) for k in ema_export if not k.endswith(".alpha"))
        torch.testing.assert_close(adapters.export(), training_export, rtol=0, atol=0)


# --- NaN recovery -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("tracked", [True, False], ids=["snapshot-with-ema", "teeth-without"])
def test_nan_restore_resets_the_ema_too(tracked):
    """An EMA updated after the last good step has averaged in the weights that led to the NaN: the recovery
    snapshot must hold it (with_ema), or the EMA keeps NaN."""
    net = TinyNet()
    named = dict(net.named_parameters())
    ema = EMA(named, decay=0.5, warmup=False)
    live = with_ema(named, ema) if tracked else named

    def snapshot():
        return {k: v.detach().clone() for k, v in live.items()}

    def restore(state):
        weights, emas = split_ema(state)
        net.load_state_dict(weights, strict=False)
        if emas:
            ema.load_state_tensors(emas)
    trainer = Trainer(net, BRIDGE, list(net.parameters()), dataset(),
                      TrainConfig(steps=20, sync_every=2, learning_rate=1e-3), snapshot=snapshot, restore=restore, ema=ema)
    seen = {}

    def progress(step, losses, rate):
        seen[step] = {k: v.clone() for k, v in ema.named_tensors().items()}
        if step == 4:
            net.poison = True  # the loss of step 5 is NaN
    with pytest.raises(NonFiniteLossError, match="step 5"):
        trainer.run(on_progress=progress)
    finite = all(torch.isfinite(v).all() for v in ema.named_tensors().values())
    if tracked:
        assert finite
        for k, v in ema.named_tensors().items():
            assert torch.equal(v, seen[2][k]), k
    else:
        assert not finite


# --- refused inputs ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("decay", [1.0, -0.1, float("nan"), 1.5])
def test_bad_decay_is_refused(decay):
    with pytest.raises(ValueError, match="decay"):
        EMA({"w": torch.zeros(2)}, decay=decay)


def test_bad_inputs_are_refused():
    w = torch.nn.Parameter(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="dtype"):
        EMAOptions(dtype="fp16").validate()
    with pytest.raises(ValueError, match="no tensors"):
        EMA({})
    ema = EMA({"w": w}, start_step=5)
    with pytest.raises(ValueError, match="before the step it started"):
        ema.update(4)
    with pytest.raises(ValueError, match="missing"):
        ema.load_state_tensors({"v": torch.zeros(2, 3)})
    with pytest.raises(ValueError, match="shape"):
        ema.load_state_tensors({"w": torch.zeros(3, 2)})
    with pytest.raises(ValueError, match="may not start"):
        with_ema({"ema.w": w}, ema)
