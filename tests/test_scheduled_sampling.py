"""Scheduled sampling rollouts and Reflow couplings in the training loop."""

import random

import pytest
import torch

from d2f_core.flow.bridge import interpolate
from d2f_core.training.data import DatasetError, LatentBuckets
from d2f_core.training.scheduled_sampling import ScheduledSampling, rollout
from d2f_core.training.trainer import TrainConfig

from test_training import TinyNet, dataset, make_trainer


def _pair(seed=0, shape=(5, 4, 6, 6)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


def test_oracle_velocity_rollout_lands_exactly_on_the_pair_state():
    x0, noise = _pair()
    sigma = torch.tensor([0.05, 0.3, 0.5, 0.7, 0.9])
    calls = []

    def oracle(x, s):
        calls.append(s.clone())
        return noise - x0
    x = rollout(oracle, x0, noise, sigma, [0, 1, 3, 5, 2], spacing=0.04, sigma_max=0.93)
    assert torch.allclose(x, interpolate(x0, noise, sigma), atol=1e-6)
    assert len(calls) == 5  # the longest offset sets the number of model calls
    assert torch.all(calls[0] >= sigma) and torch.allclose(calls[0][0], sigma[0])


def test_rollout_starts_k_steps_earlier_clamped_to_sigma_max():
    x0, noise = _pair(1, (2, 1, 2, 2))
    sigma = torch.tensor([0.5, 0.9])
    seen = []
    rollout(lambda x, s: seen.append(s.clone()) or torch.zeros_like(x), x0, noise, sigma, [2, 2], 0.1, 0.93)
    assert torch.allclose(seen[0], torch.tensor([0.7, 0.93]))
    assert torch.allclose(seen[1], torch.tensor([0.6, 0.915]))


def test_rollout_carries_no_gradient():
    x0, noise = _pair(2)
    w = torch.ones((), requires_grad=True)
    x = rollout(lambda x, s: w * (noise - x0) * 0.9, x0, noise, torch.full((5,), 0.4), [1, 2, 3, 1, 2], 0.05, 0.93)
    assert not x.requires_grad and x.grad_fn is None


def test_model_own_drift_changes_the_training_state():
    x0, noise = _pair(3)
    sigma = torch.full((5,), 0.4)
    x = rollout(lambda x, s: torch.zeros_like(x), x0, noise, sigma, [2] * 5, 0.05, 0.93)
    start = interpolate(x0, noise, torch.full((5,), 0.5))
    assert torch.allclose(x, start)  # a model that predicts no motion stays where it started


@pytest.mark.parametrize("ss", [ScheduledSampling(probability=0.0, max_offset=4),
                                ScheduledSampling(probability=0.7, max_offset=0)])
def test_inactive_scheduled_sampling_leaves_training_bit_identical(ss):
    config = dict(steps=5, batch_size=3, learning_rate=1e-3, seed=11, sync_every=2)
    plain, other = TinyNet(), TinyNet()
    make_trainer(plain, TrainConfig(**config)).run()
    make_trainer(other, TrainConfig(**config, scheduled_sampling=ss)).run()
    for a, b in zip(plain.state_dict().values(), other.state_dict().values()):
        assert torch.equal(a, b)


def test_active_scheduled_sampling_changes_training_and_is_deterministic():
    config = dict(steps=4, batch_size=3, learning_rate=1e-3, seed=11, sync_every=2,
                  scheduled_sampling=ScheduledSampling(probability=1.0, max_offset=3, solver_steps=10))
    a, b, plain = TinyNet(), TinyNet(), TinyNet()
    make_trainer(a, TrainConfig(**config)).run()
    make_trainer(b, TrainConfig(**config)).run()
    make_trainer(plain, TrainConfig(**{**config, "scheduled_sampling": ScheduledSampling()})).run()
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert any(not torch.equal(x, y) for x, y in zip(a.state_dict().values(), plain.state_dict().values()))


def test_ramps_and_strategies():
    ss = ScheduledSampling(probability=0.8, ramp="linear", max_offset=4)
    assert ss.probability_at(0, 101) == 0 and ss.probability_at(100, 101) == pytest.approx(0.8)
    assert ScheduledSampling(probability=0.8, ramp="cosine").probability_at(50, 101) == pytest.approx(0.4)
    rng = random.Random(0)
    early = ScheduledSampling(probability=1.0, max_offset=4, strategy="early").draw_offsets(rng, 4000, 0, 1)
    late = ScheduledSampling(probability=1.0, max_offset=4, strategy="late").draw_offsets(rng, 4000, 0, 1)
    assert sum(early) / 4000 < 2.3 < 2.7 < sum(late) / 4000
    with pytest.raises(ValueError):
        ScheduledSampling(strategy="middle").validate()


def test_couplings_feed_their_own_noise():
    latents = torch.randn(4, 4, 8, 8)
    noise = torch.randn(4, 4, 8, 8)
    data = LatentBuckets([(latents, [{"context": torch.zeros(5, 8)}], noise)])
    x0, _, n = data.sample(0, 4, torch.Generator().manual_seed(0))
    order = [int((latents - x).abs().sum((1, 2, 3)).argmin()) for x in x0]
    assert torch.equal(n, noise[order])
    with pytest.raises(DatasetError, match="noise"):
        LatentBuckets([(latents, [{"context": torch.zeros(5, 8)}], noise[:2])])
    assert dataset().sample(0, 2, torch.Generator().manual_seed(0))[2] is None
