"""Data-parallel training (DESIGN §7) with real collectives: gloo process groups on the CPU, rendezvous through a
FileStore in the test's temporary directory (nothing leaves the machine; gloo itself on loopback).

The contract under test: with the same seed, N ranks × batch b train the weights (and report the losses) that
one process with batch N·b does, up to the rounding of the reduction order; world size 1 is the plain path.
"""

import copy
import os
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from d2f_core.training.adapters import LoraAdapters
from d2f_core.training.distributed import DistributedContext
from d2f_core.training.trainer import NonFiniteLossError, TrainConfig, Trainer
from d2f_core.training.scheduled_sampling import ScheduledSampling

from test_training import BRIDGE, TinyNet, dataset

PER_RANK = 2
STEPS = 4
# name: (trained tensors, TrainConfig fields). Caption dropout and scheduled sampling draw per sample too, so
# they must be sharded like the indices, σ and noise; "small" has a dataset smaller than the global batch
# (indices drawn with replacement).
CASES = {
    "lora-acc1": ("lora", dict(grad_accumulation=1)),
    "lora-acc2": ("lora", dict(grad_accumulation=2, caption_dropout=0.4)),
    "full-acc1": ("full", dict(grad_accumulation=1)),
    "full-acc2": ("full", dict(grad_accumulation=2, caption_dropout=0.4, scheduled_sampling=ScheduledSampling(
        probability=0.7, max_offset=3, solver_steps=10))),
    "lora-small": ("lora", dict(grad_accumulation=2, data_size=3)),
}


RESUMED = ("lora-acc2", "full-acc2")  # saved at step 2 by N ranks, resumed by one process


def build(case: str, batch_size: int, ctx: DistributedContext | None = None, steps: int = STEPS):
    """The net, its trainer and the trained tensors of ``case``, identical in every process."""
    mode, fields = CASES[case]
    fields = dict(fields)
    data = dataset(n=fields.pop("data_size", 6), empty=True)
    config = TrainConfig(steps=steps, batch_size=batch_size, learning_rate=3e-3, seed=11, sync_every=2,
                         **fields)
    net = call = TinyNet()
    if mode == "lora":
        net.requires_grad_(False)
        call = LoraAdapters(net, rank=4, seed=0)  # the trainer holds it: its hooks live as long as it does
        call.attach()
        params = call.parameters()
    else:
        params = list(net.parameters())
    snapshot = lambda: [p.detach().clone() for p in params]  # noqa: E731

    def restore(state):
        with torch.no_grad():
            for p, s in zip(params, state):
                p.copy_(s)
    trainer = Trainer(call, BRIDGE, params, data, config, snapshot=snapshot, restore=restore, dist=ctx)
    return net, trainer, params


class PoisonedTrainer(Trainer):
    """Makes rank 1's loss of step 3 (1-based) NaN; the other ranks compute finite losses."""

    def step(self, step):
        self.net.poison = self.dist.rank == 1 and step == 2
        return super().step(step)


class StopRequest(Exception):
    """A stop request raised from inside the network, as the host's per-layer stop check raises it."""


class StoppedTrainer(Trainer):
    """Rank 1's network raises StopRequest once, after its forward pass of step 2 (1-based)."""

    raised = False

    def step(self, step):
        if self.dist.rank == 1 and step == 1 and not self.raised:
            self.raised = True
            forward = self.net.forward  # the module DDP calls: patched on the instance, for one call

            def forward_then_stop(*args, **kwargs):
                del self.net.forward
                forward(*args, **kwargs)
                raise StopRequest
            self.net.forward = forward_then_stop
        return super().step(step)


def _train_all(ctx: DistributedContext) -> dict:
    """Every case, and the NaN case, on this rank of ``ctx``."""
    results = {}
    for case in CASES:
        _, trainer, params = build(case, PER_RANK, ctx)
        result = trainer.run()
        results[case] = ([p.detach().clone() for p in params], result.losses, result.samples)
    _, trainer, params = build("full-acc1", PER_RANK, ctx)
    trainer.__class__ = PoisonedTrainer
    try:
        trainer.run()
        results["nan"] = None
    except NonFiniteLossError as e:
        results["nan"] = (e.step, e.last_good_step, all(bool(torch.isfinite(p).all()) for p in params))
    _, trainer, params = build("full-acc1", PER_RANK, ctx)
    trainer.__class__ = StoppedTrainer
    result = trainer.run(stop_exceptions=(StopRequest,))
    results["stop"] = (result.status, result.step, [p.detach().clone() for p in params])
    # What a save of step 2 holds (rank 0 saves: weights and optimizer state), for resuming on another world size
    for case in RESUMED:
        _, trainer, params = build(case, PER_RANK, ctx)
        saved = {}
        trainer.run(on_save=lambda step: saved.setdefault(step, ([p.detach().clone() for p in params],
                                                                  copy.deepcopy(trainer.optimizer.state_dict()))),
                    save_every=2)
        results[f"saved-{case}"] = saved.get(2)
    return results


def _worker(rank: int, world: int, store: str, out: str):
    """The world-``world`` cases on all ranks, then the world-2 cases on ranks 0 and 1 in a subgroup (a process
    start costs more than all the training here)."""
    torch.set_num_threads(1)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", store=dist.FileStore(store, world), rank=rank, world_size=world,
                            timeout=timedelta(seconds=30))
    try:
        ctx = DistributedContext.from_environment()
        assert (ctx.rank, ctx.world_size, ctx.backend) == (rank, world, "gloo")
        results = {world: _train_all(ctx)}
        pair = dist.new_group([0, 1])  # every rank takes part in creating it
        if rank < 2:
            results[2] = _train_all(DistributedContext(rank, 2, backend="gloo", group=pair))
        torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def spawn(world: int, tmp, timeout: float = 90.0) -> list[dict]:
    """Runs ``_worker`` on ``world`` gloo ranks; every rank must finish within ``timeout`` seconds (no hang)."""
    ctx = mp.spawn(_worker, args=(world, str(tmp / "store"), str(tmp)), nprocs=world, join=False)
    deadline = time.monotonic() + timeout
    try:
        while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                pytest.fail(f"{world} ranks did not finish within {timeout} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    return [torch.load(tmp / f"rank{r}.pt") for r in range(world)]


@pytest.fixture(scope="module")
def spawned(tmp_path_factory):
    return spawn(3, tmp_path_factory.mktemp("dist"))


@pytest.fixture(params=[2, 3], ids=lambda n: f"{n}ranks")
def ranks(request, spawned):
    """(N, per-rank results) of the runs with N ranks."""
    world = request.param
    return world, [per_rank[world] for per_rank in spawned[:world]]


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))


@pytest.mark.parametrize("case", list(CASES))
def test_n_ranks_train_what_one_process_with_n_times_the_batch_does(ranks, case):
    world, results = ranks
    torch.manual_seed(0)
    _, trainer, params = build(case, PER_RANK * world)
    single = trainer.run()
    worst = 0.0
    for rank, per_rank in enumerate(results):
        weights, losses, samples = per_rank[case]
        assert samples == single.samples  # the global batch is counted on every rank
        for p, q in zip(weights, params):
            worst = max(worst, relative_difference(p, q.detach()))
        # every rank reports the global mean, the loss the single process reports
        assert losses == pytest.approx(single.losses, rel=1e-5, abs=0)
    assert all(torch.equal(a, b) for a, b in zip(results[0][case][0], results[-1][case][0]))  # ranks agree
    print(f"{case} {world} ranks: max relative difference to 1 process {worst:.2e}")
    assert worst <= 1e-5
    # not trivially equal: training moved the weights
    _, _, fresh = build(case, PER_RANK * world)
    assert any(relative_difference(p, q.detach()) > 1e-3 for p, q in zip(params, fresh))


def test_nan_on_one_rank_stops_every_rank(ranks):
    world, results = ranks
    for rank, per_rank in enumerate(results):
        assert per_rank["nan"] is not None, f"rank {rank} did not raise"
        step, last_good, finite = per_rank["nan"]
        assert (step, last_good, finite) == (3, 0, True), rank


def test_a_stop_raised_inside_one_ranks_network_stops_every_rank_on_the_same_weights(ranks):
    """Rank 1 redoes the step the stop cut off (the others wait for it in the gradient all-reduce); every rank
    stops at the next read-out (sync_every 2) with the weights one process trains in those 2 steps."""
    world, results = ranks
    _, single, params = build("full-acc1", PER_RANK * world, steps=2)
    single.run()
    for rank, per_rank in enumerate(results):
        status, step, weights = per_rank["stop"]
        assert (status, step) == ("interrupted", 2), rank
        assert all(torch.equal(a, b) for a, b in zip(weights, results[0]["stop"][2])), rank
        assert max(relative_difference(p, q.detach()) for p, q in zip(weights, params)) <= 1e-5, rank


@pytest.mark.parametrize("case", ["lora-acc2", "full-acc2"])
def test_world_size_one_is_the_plain_path_bit_for_bit(case):
    _, plain, params = build(case, 4)
    plain_losses = plain.run().losses
    _, single, params1 = build(case, 4, DistributedContext.single())
    assert single.run().losses == plain_losses
    assert all(torch.equal(a, b) for a, b in zip(params, params1))


def test_context_checks():
    assert DistributedContext.from_environment() == DistributedContext.single()  # no group, no torchrun
    ctx = DistributedContext(rank=2, world_size=3)
    assert not ctx.is_main and ctx.rows(4) == slice(8, 12)
    assert ctx.shard(lambda n: list(range(n)), 2) == [4, 5]
    with pytest.raises(ValueError):
        DistributedContext(rank=3, world_size=3)
    net = torch.nn.Linear(2, 2)
    assert ctx.single().wrap(net, list(net.parameters())) is net  # world size 1: no DDP, no collective


@pytest.mark.parametrize("case", ["lora-acc2", "full-acc2"])
def test_a_group_of_one_rank_runs_ddp_and_trains_the_plain_weights_bit_for_bit(case, tmp_path):
    """A process group of one rank (what ``torchrun --nproc-per-node 1`` or bench_scale's ddp-1 row makes): the
    trained net is DDP-wrapped (hooks, one-rank all-reduce), and the weights are the plain path's exactly."""
    from torch.nn.parallel import DistributedDataParallel
    _, plain, params = build(case, 4)
    plain_losses = plain.run().losses
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        ctx = DistributedContext.from_environment()
        assert (ctx.world_size, ctx.backend) == (1, "gloo")
        _, ddp, params1 = build(case, 4, ctx)
        assert isinstance(ddp.train_net, DistributedDataParallel)
        assert ddp.run().losses == plain_losses
    finally:
        dist.destroy_process_group()
    assert all(torch.equal(a, b) for a, b in zip(params, params1))


@pytest.mark.parametrize("case", RESUMED)
def test_a_run_saved_on_n_ranks_resumes_on_one_process(ranks, case):
    """The state rank 0 saves at step 2 of an N-rank run (weights, optimizer state: the same on every rank), loaded
    by one process with the global batch, continues to the weights of that process's straight 4-step run: each
    step's draws depend on the step and the global batch, not on the world size."""
    world, results = ranks
    assert all(per_rank[f"saved-{case}"] is None for per_rank in results[1:]), "only rank 0 saves"
    weights, optimizer_state = results[0][f"saved-{case}"]
    _, straight, straight_params = build(case, PER_RANK * world)
    straight.run()
    _, resumed, params = build(case, PER_RANK * world)
    with torch.no_grad():
        for p, w in zip(params, weights):
            p.copy_(w)
    resumed.optimizer.load_state_dict(optimizer_state)
    result = resumed.run(start_step=2)
    assert result.step == STEPS
    worst = max(relative_difference(p, q.detach()) for p, q in zip(params, straight_params))
    print(f"{case}: saved on {world} ranks at step 2, resumed on 1 process: {worst:.2e}")
    assert worst <= 1e-5
    # not trivially equal: the resumed steps moved the weights
    assert max(relative_difference(p, w) for p, w in zip(params, weights)) > 1e-4
