"""Validation during training, host-free (d2f_core/training/validation.py, the Trainer's on_validate hook):
determinism, the held-out loss against its closed form, the grid, straightness, the time cap, the split."""

import math
import time

import pytest
import torch

from d2f_core.flow.bridge import FlowBridge
from d2f_core.flow.schedule import DiscreteSchedule
from d2f_core.training.data import LatentBuckets
from d2f_core.training.trainer import TrainConfig, Trainer
from d2f_core.training.validation import (HeldOutGroup, ValidationError, ValidationOptions, Validator, loss_times,
                                          parse_steps, split_buckets, split_holdout, straightness)

BRIDGE = FlowBridge(DiscreteSchedule.stable_diffusion(), "eps")
X0_BRIDGE = FlowBridge(DiscreteSchedule.stable_diffusion(), "x0")


class TinyNet(torch.nn.Module):
    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = torch.nn.Conv2d(4, 16, 3, padding=1)
        self.time = torch.nn.Linear(1, 16)
        self.ctx = torch.nn.Linear(8, 16)
        self.out = torch.nn.Conv2d(16, 4, 3, padding=1)

    def forward(self, x, t, context):
        h = self.conv(x) + self.time(t[:, None] / 1000)[:, :, None, None] + self.ctx(context.mean(1))[:, :, None, None]
        return self.out(torch.nn.functional.silu(h))


def group(n=3, noise=False, empty=False, seed=1):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(n, 4, 8, 8, generator=g) * 0.5 + 0.3
    conds = {"context": torch.randn(n, 5, 8, generator=g)}
    return HeldOutGroup(latents, conds, torch.randn(n, 4, 8, 8, generator=g) if noise else None,
                        {"context": torch.zeros(5, 8)} if empty else None)


def options(**kw):
    base = dict(loss_times=4, grid_steps=(1, 2, 4, 8), images=2, max_seconds=0, batch_size=5, seed=3, cfg=1.0)
    base.update(kw)
    return ValidationOptions(**base)


def test_loss_times_are_cell_midpoints():
    t = loss_times(4, 0.1, 0.9)
    assert torch.allclose(t, torch.tensor([0.2, 0.4, 0.6, 0.8]))


def test_same_weights_give_the_identical_loss_twice_and_other_weights_another():
    net = TinyNet()
    v = Validator(net, BRIDGE, [group(), group(2, seed=5)], options())
    a, b = v.loss(), v.loss()
    assert a == b  # bit-identical: fixed times, fixed noise
    # a fresh validator with the same seed draws the same noise: the curve compares across runs too
    assert Validator(net, BRIDGE, [group(), group(2, seed=5)], options()).loss() == a
    # batching does not change the value beyond float round-off
    assert math.isclose(Validator(net, BRIDGE, [group(), group(2, seed=5)], options(batch_size=1)).loss(), a,
                        rel_tol=1e-6)
    with torch.no_grad():
        net.out.bias.add_(0.1)
    assert v.loss() != a


class Scale(torch.nn.Module):
    """out = a·x_in: x0-prediction, so x̂0 = a·x/D(σ)."""

    def __init__(self, a):
        super().__init__()
        self.a = a

    def forward(self, x, t, context):
        return self.a * x


@pytest.mark.parametrize("objective", ["diff2flow", "native"])
def test_loss_equals_the_closed_form_on_a_linear_net(objective):
    a = 0.7
    grp = group(3)
    v = Validator(Scale(a), X0_BRIDGE, [grp], options(loss_times=5, batch_size=4), objective=objective)
    got = v.loss()
    total = 0.0
    sig = [X0_BRIDGE.sigma_min + (X0_BRIDGE.sigma_max - X0_BRIDGE.sigma_min) * (k + 0.5) / 5 for k in range(5)]
    for k, s in enumerate(sig):
        for i in range(3):
            x0, eps = grp.latents[i].double(), v.loss_noise[0][k, i].double()
            x = (1 - s) * x0 + s * eps
            d = math.sqrt((1 - s) ** 2 + s ** 2)
            x0_hat = a * x / d
            if objective == "diff2flow":
                total += float((((x - x0_hat) / s - (eps - x0)) ** 2).mean())
            else:  # the x0 model's native target is x0
                total += float(((x0_hat - x0) ** 2).mean())
    expected = total / 15
    assert math.isclose(got, expected, rel_tol=1e-5), (got, expected)


def test_reflow_pairs_use_their_own_noise():
    grp = group(3, noise=True)
    v = Validator(Scale(0.7), X0_BRIDGE, [grp], options(loss_times=2))
    s = [X0_BRIDGE.sigma_min + (X0_BRIDGE.sigma_max - X0_BRIDGE.sigma_min) * (k + 0.5) / 2 for k in range(2)]
    total = 0.0
    for sk in s:
        for i in range(3):
            x0, eps = grp.latents[i].double(), grp.noise[i].double()
            x = (1 - sk) * x0 + sk * eps
            x0_hat = 0.7 * x / math.sqrt((1 - sk) ** 2 + sk ** 2)
            total += float((((x - x0_hat) / sk - (eps - x0)) ** 2).mean())
    assert math.isclose(v.loss(), total / 6, rel_tol=1e-5)


def test_grid_shape_and_step_counts():
    calls = []
    net = TinyNet()

    def counting(x, t, context):
        calls.append(x.shape[0])
        return net(x, t, context)
    v = Validator(counting, BRIDGE, [group(3, empty=True)], options(cfg=4.0, grid_steps=(1, 2, 4, 8), images=2))
    r = v.run(step=7)
    assert r.step == 7 and sorted(r.grid) == [1, 2, 4, 8] and r.skipped == []
    assert all(x.shape == (2, 4, 8, 8) for x in r.grid.values())
    loss_calls = math.ceil(3 * 4 / 5)
    # CFG: two network calls per Euler step (conditional, empty prompt), each for the 2 grid images
    assert len(calls) == loss_calls + 2 * (1 + 2 + 4 + 8)
    assert calls[loss_calls:] == [2] * (2 * 15)
    assert r.straightness is None  # not asked for (not a Reflow run)
    # no empty prompt (or cfg 1): one call per step
    calls.clear()
    Validator(counting, BRIDGE, [group(3)], options(cfg=4.0, grid_steps=(2,))).sample(2)
    assert len(calls) == 2
    # fixed seed: the grid is reproducible
    again = Validator(counting, BRIDGE, [group(3, empty=True)], options(cfg=4.0)).run(step=7)
    assert all(torch.equal(again.grid[k], r.grid[k]) for k in r.grid)


class ConstantVelocity(torch.nn.Module):
    """An ε-model whose flow velocity is the constant c (plus ``bend``·σ·x, which curves the paths)."""

    def __init__(self, bend=0.0):
        super().__init__()
        self.bend = bend

    def forward(self, x_in, t, context):
        s = BRIDGE.sigma_at(t.double()).float().reshape(-1, 1, 1, 1)
        x = x_in * torch.sqrt((1 - s) ** 2 + s ** 2)
        v = 0.5 + self.bend * s * x
        return x + (1 - s) * v  # ε-prediction: v̂ = (out - x)/(1 - σ)


def test_straightness_is_zero_for_a_straight_flow_and_positive_otherwise():
    straight = Validator(ConstantVelocity(), BRIDGE, [group(3)], options(images=3), straightness=True).run(1)
    assert straight.straightness is not None and straight.straightness < 1e-5, straight.straightness
    curved = Validator(ConstantVelocity(bend=3.0), BRIDGE, [group(3)], options(images=3), straightness=True).run(1)
    assert curved.straightness > 1e-2, curved.straightness
    a, b = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    assert math.isclose(straightness(a, b), float(((a - b).norm() / b.norm())), rel_tol=1e-6)


def test_straightness_needs_one_step_and_a_larger_count():
    r = Validator(TinyNet(), BRIDGE, [group(3)], options(grid_steps=(2, 4)), straightness=True).run(1)
    assert r.straightness is None


def test_time_cap_skips_the_remaining_columns():
    ticks = iter(range(1000))
    v = Validator(TinyNet(), BRIDGE, [group(3)], options(max_seconds=2.5), straightness=True,
                  clock=lambda: float(next(ticks)))
    r = v.run(step=4)
    # clock: 0 at the start, then 1 and 2 before the first two columns (< 2.5: sampled), 3 and 4 (skipped)
    assert sorted(r.grid) == [1, 2] and r.skipped == [4, 8]
    assert math.isfinite(r.loss)  # the loss always runs
    assert r.straightness is None  # its N-step column was skipped
    assert r.seconds == 5.0
    assert r.info()["skipped"] == [4, 8]


def test_split_is_deterministic_disjoint_and_complete():
    sizes = [5, 3, 4]
    a = split_holdout(sizes, 0.25, seed=9)
    assert a == split_holdout(sizes, 0.25, seed=9)
    assert a != split_holdout(sizes, 0.25, seed=10)
    assert sum(len(h) for _, h in a) == 3  # round(0.25·12)
    for n, (train, held) in zip(sizes, a):
        assert not set(train) & set(held) and sorted(train + held) == list(range(n))


def test_split_buckets_removes_the_held_out_items_from_training():
    g = torch.Generator().manual_seed(0)
    lat = torch.randn(6, 4, 8, 8, generator=g)
    noise = torch.randn(6, 4, 8, 8, generator=g)
    conds = [{"context": torch.full((5, 8), float(i))} for i in range(6)]
    train, held = split_buckets([(lat, conds, noise)], 0.34, seed=1)
    assert sum(b[0].shape[0] for b in train) == 4 and sum(b[0].shape[0] for b in held) == 2
    ids = lambda bs: sorted(int(c["context"][0, 0]) for b in bs for c in b[1])  # noqa: E731
    assert sorted(ids(train) + ids(held)) == list(range(6)) and not set(ids(train)) & set(ids(held))
    for b in train + held:  # latents, captions and noise stay together
        for x, c, e in zip(b[0], b[1], b[2]):
            i = int(c["context"][0, 0])
            assert torch.equal(x, lat[i]) and torch.equal(e, noise[i])
    # one caption for all images stays one caption
    train, held = split_buckets([(lat, conds[:1])], 0.5, seed=1)
    assert len(train[0][1]) == 1 and len(held[0][1]) == 1
    LatentBuckets(train), LatentBuckets(held)  # usable as buckets


def test_split_refuses_to_leave_nothing_to_train():
    with pytest.raises(ValidationError, match="at least 2"):
        split_holdout([1], 0.5, seed=0)
    assert split_holdout([2], 0.9, seed=0)[0][0]  # at most total - 1 held out


def test_bad_settings_are_refused():
    with pytest.raises(ValidationError, match="comma"):
        parse_steps("1,two")
    with pytest.raises(ValidationError, match="at least 1"):
        parse_steps("0,4")
    assert parse_steps("25, 1,4,2,4") == (1, 2, 4, 25)
    with pytest.raises(ValidationError):
        ValidationOptions(every_n_steps=0).validate()
    with pytest.raises(ValidationError, match="empty"):
        Validator(TinyNet(), BRIDGE, [], options())


# --- the trainer's hook ---------------------------------------------------------------------------
def _data():
    g = torch.Generator().manual_seed(1)
    return LatentBuckets([(torch.randn(4, 4, 8, 8, generator=g), [{"context": torch.randn(5, 8, generator=g)}] * 4)])


def test_trainer_validates_every_n_and_at_the_end_and_leaves_its_time_out_of_samples_per_second():
    net = TinyNet()
    config = TrainConfig(steps=5, batch_size=2, learning_rate=1e-3, sync_every=1)
    trainer = Trainer(net, BRIDGE, list(net.parameters()), _data(), config,
                      snapshot=lambda: {k: v.clone() for k, v in net.state_dict().items()},
                      restore=net.load_state_dict)
    seen, rates = [], []

    def validate(step):
        seen.append(step)
        time.sleep(0.3)

    result = trainer.run(on_validate=validate, validate_every=2, on_progress=lambda s, l, r: rates.append((s, r)))
    assert seen == [2, 4, 5]
    assert result.validation_seconds >= 0.9
    assert result.samples_per_second == pytest.approx(result.samples / (result.seconds - result.validation_seconds))
    # the rate reported after two validations is that of training alone: far above samples / wall time
    step, rate = rates[-1]
    assert rate > 2 * result.samples / result.seconds


def test_trainer_without_validation_is_unchanged():
    net = TinyNet()
    config = TrainConfig(steps=3, batch_size=2, learning_rate=1e-3, sync_every=1)
    result = Trainer(net, BRIDGE, list(net.parameters()), _data(), config).run(validate_every=1)  # no callback
    assert result.validation_seconds == 0.0 and result.step == 3
