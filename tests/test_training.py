"""The host-free training loop: objective, resume, NaN and interrupt handling, schedules."""

import math

import pytest
import torch

from d2f_core.flow.bridge import FlowBridge
from d2f_core.training.data import DatasetError, LatentBuckets
from d2f_core.flow.schedule import DiscreteSchedule
from d2f_core.storage.state import load_state, save_state
from d2f_core.training.trainer import NonFiniteLossError, TrainConfig, Trainer, learning_rate_at

BRIDGE = FlowBridge(DiscreteSchedule.stable_diffusion(), "eps")


class TinyNet(torch.nn.Module):
    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = torch.nn.Conv2d(4, 16, 3, padding=1)
        self.time = torch.nn.Linear(1, 16)
        self.ctx = torch.nn.Linear(8, 16)
        self.out = torch.nn.Conv2d(16, 4, 3, padding=1)
        self.poison = False

    def forward(self, x, t, context):
        h = self.conv(x) + self.time(t[:, None] / 1000)[:, :, None, None] + self.ctx(context.mean(1))[:, :, None, None]
        out = self.out(torch.nn.functional.silu(h))
        return out * float("nan") if self.poison else out


def dataset(n=6, empty=False):
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(n, 4, 8, 8, generator=g) * 0.5 + 0.3
    conds = [{"context": torch.randn(5, 8, generator=g)} for _ in range(n)]
    return LatentBuckets([(latents, conds)], empty_cond={"context": torch.zeros(5, 8)} if empty else None)


def make_trainer(net, config, data=None):
    params = list(net.parameters())

    def snapshot():
        return {k: v.detach().clone() for k, v in net.state_dict().items()}
    return Trainer(net, BRIDGE, params, data or dataset(), config, snapshot=snapshot,
                   restore=lambda s: net.load_state_dict(s))


def test_training_lowers_the_loss():
    net = TinyNet()
    config = TrainConfig(steps=60, batch_size=4, learning_rate=3e-3, seed=3, sync_every=5)
    before = make_trainer(net, config).step(0).item()
    result = make_trainer(net, config).run()
    assert result.status == "done" and result.step == 60 and len(result.losses) == 60
    assert sum(result.losses[-10:]) / 10 < 0.8 * before


def test_batch_loss_is_the_loss_the_step_trains_on():
    """batch_loss(k) evaluates step k's own draws (images, σ, ε, caption dropout): before the step it is the loss
    step(k) reports, and after a small SGD step on it, lower (the step went downhill on what it computed)."""
    net = TinyNet()
    config = TrainConfig(steps=4, batch_size=3, learning_rate=1e-3, optimizer="sgd", seed=5, caption_dropout=0.5)
    trainer = make_trainer(net, config, dataset(empty=True))
    for step in range(3):
        before = trainer.batch_loss(step)
        reported = float(trainer.step(step))
        after = trainer.batch_loss(step)
        assert before == pytest.approx(reported, rel=1e-6), step
        assert after < before, (step, before, after)
    assert trainer.batch_loss(3) != pytest.approx(trainer.batch_loss(2), rel=1e-3)  # another step, other draws


def test_resume_continues_exactly(tmp_path):
    config = TrainConfig(steps=8, batch_size=2, learning_rate=1e-3, seed=5, grad_accumulation=2, sync_every=3)
    straight = TinyNet()
    make_trainer(straight, config).run()

    resumed = TinyNet()
    first = make_trainer(resumed, TrainConfig(**{**config.__dict__, "steps": 8}))
    first.run(should_stop=lambda: True)  # stops after step 1, like the stop button
    path = save_state(str(tmp_path / "s.state.safetensors"), dict(resumed.state_dict()), first.optimizer, 1)

    again = TinyNet(seed=99)  # different init: everything must come from the file
    second = make_trainer(again, config)
    weights, step, _ = load_state(path, second.optimizer)
    again.load_state_dict(weights)
    result = second.run(start_step=step)
    assert result.step == 8
    for (k, a), b in zip(straight.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), k


def test_interrupt_keeps_what_was_trained():
    net = TinyNet()
    checks = iter(range(100))
    result = make_trainer(net, TrainConfig(steps=50, sync_every=10)).run(should_stop=lambda: next(checks) >= 3)
    assert result.status == "interrupted"
    assert result.step == len(result.losses) == 4


def test_nan_loss_stops_with_step_and_restores_last_good_state():
    """Weights after step n are proven good only by the finite loss of step n+1, which uses them."""
    net = TinyNet()
    trainer = make_trainer(net, TrainConfig(steps=20, sync_every=2, learning_rate=1e-3))
    seen = {}

    def progress(step, losses, rate):
        seen[step] = {k: v.clone() for k, v in net.state_dict().items()}
        if step == 4:
            net.poison = True  # the loss of step 5 is NaN: the weights after step 4 are unproven
    with pytest.raises(NonFiniteLossError, match="step 5") as info:
        trainer.run(on_progress=progress)
    assert info.value.step == 5 and info.value.last_good_step == 2
    net.poison = False
    for k, v in net.state_dict().items():
        assert torch.equal(v, seen[2][k]), k
    assert all(torch.isfinite(v).all() for v in net.state_dict().values())


@pytest.mark.parametrize("slots", [2, 1])
def test_host_snapshots_serve_the_trainer_with_two_slots(slots):
    """Full fine-tunes keep their recovery snapshots in host memory, in a ring of preallocated buffers.
    Two slots restore exactly the last good weights; one slot (teeth) would hand back the unproven ones."""
    from d2f_core.training.snapshots import HostSnapshots
    net = TinyNet()
    ring = HostSnapshots(dict(net.named_parameters()), slots=slots)
    trainer = Trainer(net, BRIDGE, list(net.parameters()), dataset(), TrainConfig(steps=20, sync_every=2, learning_rate=1e-3),
                      snapshot=ring.take, restore=lambda s: net.load_state_dict(s, strict=False))
    seen = {}

    def progress(step, losses, rate):
        seen[step] = {k: v.detach().clone() for k, v in net.named_parameters()}
        if step == 4:
            net.poison = True
    with pytest.raises(NonFiniteLossError, match="step 5"):
        trainer.run(on_progress=progress)
    restored = {k: v.detach() for k, v in net.named_parameters()}
    same_as_good = all(torch.equal(v, seen[2][k]) for k, v in restored.items())
    assert same_as_good == (slots == 2)
    assert ring.nbytes == slots * sum(p.numel() * 4 for p in net.parameters())


def test_learning_rate_warmup_and_cosine():
    c = TrainConfig(steps=110, learning_rate=1.0, warmup_steps=10, lr_schedule="cosine")
    assert learning_rate_at(c, 0) == pytest.approx(0.1)
    assert learning_rate_at(c, 9) == pytest.approx(1.0)
    assert learning_rate_at(c, 60) == pytest.approx(0.5)
    assert learning_rate_at(c, 110) == pytest.approx(0.0, abs=1e-12)
    assert learning_rate_at(TrainConfig(learning_rate=0.3), 1000) == 0.3


def test_caption_dropout_swaps_in_the_empty_prompt():
    seen = []

    class Spy(TinyNet):
        def forward(self, x, t, context):
            seen.append(context.abs().sum(dim=(1, 2)))
            return super().forward(x, t, context)
    net = Spy()
    make_trainer(net, TrainConfig(steps=20, batch_size=4, caption_dropout=0.5), dataset(empty=True)).run()
    zeros = sum(int((s == 0).sum()) for s in seen)
    assert 15 < zeros < 65  # about half of 80 samples


def test_objectives_differ_by_the_diff2flow_weight():
    net = TinyNet()
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    data = dataset()
    x0, cond, _ = data.sample(0, 4, torch.Generator().manual_seed(0))
    d2f = make_trainer(net, TrainConfig(objective="diff2flow")).loss(x0, cond, g1)
    nat = make_trainer(net, TrainConfig(objective="native")).loss(x0, cond, g2)
    assert float(d2f.detach()) > float(nat.detach())  # weights 1/(1-σ)² ≥ 1 for ε-models


def test_bad_datasets_are_refused_clearly():
    with pytest.raises(DatasetError, match="empty"):
        LatentBuckets([])
    with pytest.raises(DatasetError, match="captions"):
        LatentBuckets([(torch.zeros(3, 4, 8, 8), [{"context": torch.zeros(5, 8)}] * 2)])
    with pytest.raises(DatasetError, match="channels"):
        LatentBuckets([(torch.zeros(2, 16, 8, 8), [{"context": torch.zeros(5, 8)}])], channels=4)
    with pytest.raises(ValueError, match="objective"):
        TrainConfig(objective="x0").validate()
