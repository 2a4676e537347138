"""The Diff2Flow fine-tuning loop (DESIGN §2), independent of any host.

One optimizer step draws, per micro-batch of ``batch_size``:

    σ ~ p(σ) on [σ_min, σ_max],  ε ~ N(0, I),  x = (1-σ)·x0 + σ·ε
    out = net(x / D(σ), n(σ), cond)            (the network's own VP input and fractional label)
    L = ‖v̂(out, x, σ) - (ε - x0)‖²            (``objective="diff2flow"``; "native" regresses ε / v_VP)

Every random draw of step k comes from generators seeded by (seed, k): a run resumed at step k from
a saved state continues exactly as the uninterrupted run would. The host is read only every
``sync_every`` steps (loss read-out, non-finite check), never inside a step.

Data-parallel (``dist`` of world size N, DESIGN §7): ``batch_size`` is per rank; every random draw is made
for the global micro-batch of N·batch_size and each rank keeps its rows (see
:mod:`~d2f_core.training.distributed`), so N ranks × b train the weights 1 rank × N·b would.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..flow.bridge import FlowBridge, interpolate
from .data import LatentBuckets
from .distributed import DistributedContext
from .ema import EMA
from .loss_watch import LossWatch, NonFiniteLossError
from ..flow.losses import diff2flow_loss, native_loss, sample_sigmas
from .scheduled_sampling import ScheduledSampling, rollout

OBJECTIVES = ("diff2flow", "native")
LR_SCHEDULES = ("constant", "cosine")
OPTIMIZERS = ("adamw", "adam", "sgd")


class ShardedStepAborted(RuntimeError):
    """A stop exception cut a sharded (FSDP) step off on this rank: the run cannot continue in step."""


@dataclass
class TrainConfig:
    steps: int = 500
    batch_size: int = 1
    grad_accumulation: int = 1
    learning_rate: float = 1e-4
    warmup_steps: int = 0
    lr_schedule: str = "constant"
    optimizer: str = "adamw"
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    objective: str = "diff2flow"
    time_sampling: str = "uniform"
    time_shift: float = 1.0
    caption_dropout: float = 0.0
    seed: int = 0
    sync_every: int = 10
    scheduled_sampling: ScheduledSampling = field(default_factory=ScheduledSampling)

    def validate(self):
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr schedule must be one of {LR_SCHEDULES}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}")
        if self.steps < 1 or self.batch_size < 1 or self.grad_accumulation < 1:
            raise ValueError("steps, batch size and gradient accumulation must be at least 1")
        if not 0.0 <= self.caption_dropout <= 1.0:
            raise ValueError("caption dropout is a probability in [0, 1]")
        self.scheduled_sampling.validate()


def learning_rate_at(config: TrainConfig, step: int) -> float:
    """Linear warm-up over ``warmup_steps``, then constant or cosine decay to 0 at ``steps``."""
    lr = config.learning_rate
    if config.warmup_steps > 0 and step < config.warmup_steps:
        return lr * (step + 1) / config.warmup_steps
    if config.lr_schedule == "cosine":
        span = max(1, config.steps - config.warmup_steps)
        progress = min(1.0, (step - config.warmup_steps) / span)
        return lr * 0.5 * (1 + math.cos(math.pi * progress))
    return lr


def make_optimizer(config: TrainConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    fused = all(p.is_cuda for p in params) and config.optimizer in ("adamw", "adam")
    kwargs = {"fused": True} if fused else {"foreach": True}
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay, **kwargs)
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.learning_rate, **kwargs)
    return torch.optim.SGD(params, lr=config.learning_rate, momentum=0.9, weight_decay=config.weight_decay,
                           foreach=True)


@dataclass
class TrainResult:
    step: int                      # optimizer steps done in total (including a resumed run's)
    losses: list[float] = field(default_factory=list)   # one per optimizer step of this run
    status: str = "done"           # done | interrupted
    seconds: float = 0.0           # wall time of the run, validation included
    samples: int = 0
    validation_seconds: float = 0.0  # time spent in ``on_validate``: not training, excluded from the throughput

    @property
    def samples_per_second(self) -> float:
        training = self.seconds - self.validation_seconds
        return self.samples / training if training > 0 else 0.0


class Trainer:
    """Runs ``config.steps`` optimizer steps of Diff2Flow (or native) training.

    ``net(x_in, label, **cond) -> output`` is the network with its trainable adaptation applied, fed in
    ``compute_dtype`` (the dtype of its weights); the loss is always taken in float32 or better;
    ``params`` the tensors to train; ``snapshot()``/``restore(state)`` give the last good state back
    after a non-finite loss. At most two snapshots are referenced at a time, and ``snapshot()`` is called
    only after the older of them was released (so :class:`~d2f_core.training.snapshots.HostSnapshots` with two slots
    may serve it). Caption dropout swaps a sample's conditioning for the data's empty prompt
    with probability ``caption_dropout``.

    ``dist``: this process's rank in a data-parallel group (None: one process). ``config.batch_size`` is then
    per rank, the global batch of a step ``batch_size · world_size · grad_accumulation``. The ranks must start
    from the same weights and optimizer state; they stay identical because every rank applies the same
    averaged gradient. Only rank 0 calls ``on_progress`` / ``on_save`` / ``on_preview`` / ``on_validate``.

    ``sharded``: the FSDP-sharded root (:meth:`FullAdapters.shard <d2f_core.training.adapters.FullAdapters.shard>`)
    when ``params`` are its DTensor shards: gradients are then reduce-scattered by FSDP instead of DDP's all-reduce,
    and ``on_save`` / ``on_preview`` are called on every rank (they gather whole tensors; rank 0 alone writes).
    A stop exception raised inside the network cannot be redone under FSDP (the rank would re-enter the all-gathers
    the others are past): it ends the run with :class:`ShardedStepAborted` on that rank, which the other ranks see as
    a failed collective; hosts defer such stops to ``should_stop`` in sharded runs (D2FTrain does in every
    distributed run).

    ``ema``: an :class:`~d2f_core.training.ema.EMA` of ``params``, updated after each optimizer step; include its
    tensors in ``snapshot``/``restore`` (:func:`~d2f_core.training.ema.with_ema`) so a NaN restore resets it too.
    """

    def __init__(self, net: Callable, bridge: FlowBridge, params: list[torch.nn.Parameter], data: LatentBuckets,
                 config: TrainConfig, device=None, compute_dtype: torch.dtype = torch.float32,
                 snapshot: Callable[[], dict] | None = None, restore: Callable[[dict], None] | None = None,
                 dist: DistributedContext | None = None, ema: EMA | None = None, sharded: torch.nn.Module | None = None):
        config.validate()
        self.ema = ema  # updated after every optimizer step (training/ema.py); None: no EMA
        self.dist = dist if dist is not None else DistributedContext.single(device)
        self.net, self.bridge, self.params, self.data, self.config = net, bridge, params, data, config
        # The forward whose backward trains: under DDP its gradients are averaged over ranks during the backward
        # of a step's last micro-batch. Rollouts (no gradients) call ``net`` itself.
        self.train_net = self.dist.wrap(net, params, sharded)
        # Sharded (FSDP): a forward all-gathers weights and an export gathers whole tensors, both collectives, so
        # on_save and on_preview run on every rank (rank 0 alone writes and shows); else on rank 0 only.
        self.sharded = sharded is not None
        self.device = torch.device(device) if device is not None else data.latents[0].device
        self.compute_dtype = compute_dtype
        self.snapshot, self.restore = snapshot, restore
        self.optimizer = make_optimizer(config, params)
        # Gradients live in persistent buffers, zeroed in place after each step, never set to None: a backward
        # that hands out the same storage at every call (a CUDA-graph replay returns its static gradient
        # buffers) is then added into them. Were .grad None, autograd would adopt that storage as .grad, and
        # the next micro-batch's replay would overwrite the gradient accumulated so far.
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        self.sigma_range = (bridge.sigma_min, bridge.sigma_max)

    # --- one step ---------------------------------------------------------------------------------
    def _generator(self, step: int, micro: int) -> torch.Generator:
        g = torch.Generator(device=self.device)
        g.manual_seed((self.config.seed * 1_000_003 + step * 1_009 + micro) % (2 ** 63))
        return g

    def _drop_captions(self, bucket: int, cond: dict, generator: torch.Generator) -> dict:
        """Replace each sample's conditioning by the empty prompt's with probability p (classifier-free
        guidance needs the model to keep its unconditional branch)."""
        if self.data.empty is None or self.config.caption_dropout <= 0:
            return cond
        batch = next(iter(cond.values())).shape[0]
        drop = self.dist.shard(lambda n: torch.rand(n, generator=generator, device=self.device), batch) \
            < self.config.caption_dropout
        empty = self.data.empty[bucket]
        return {k: torch.where(drop.reshape((batch,) + (1,) * (v.ndim - 1)), empty[k], v) for k, v in cond.items()}

    def _net_output(self, sigma: torch.Tensor, x: torch.Tensor, cond: dict, net: Callable | None = None) -> torch.Tensor:
        x_in = self.bridge.model_input(sigma, x).to(self.compute_dtype)
        return (net or self.net)(x_in, self.bridge.label(sigma).float(), **cond)

    def loss(self, x0: torch.Tensor, cond: dict, generator: torch.Generator, noise: torch.Tensor | None = None,
             offsets: list[int] | None = None, rollout_steps: int | None = None) -> torch.Tensor:
        """Mean Diff2Flow (or native) loss of one micro-batch; differentiable.

        ``noise``: the pairs' own noise (Reflow couplings), else drawn. ``offsets``: scheduled-sampling
        rollout lengths per sample (0: the clean interpolant). With ``dist``, ``x0`` is this rank's rows of
        the global micro-batch, and σ and the noise are those rows of the global draws.
        """
        c = self.config
        b = x0.shape[0]
        sigma = self.dist.shard(lambda n: sample_sigmas(n, *self.sigma_range, mode=c.time_sampling, shift=c.time_shift,
                                                        generator=generator, device=self.device), b)
        if noise is None:
            noise = self.dist.shard(lambda n: torch.randn((n,) + x0.shape[1:], generator=generator,
                                                          device=self.device, dtype=x0.dtype), b)
        cond = {k: v.to(self.compute_dtype) for k, v in cond.items()}
        if rollout_steps if rollout_steps is not None else offsets and any(offsets):
            ss = c.scheduled_sampling
            spacing = (self.sigma_range[1] - self.sigma_range[0]) / ss.solver_steps

            def velocity(x, s):
                return self.bridge.velocity(s, self._net_output(s, x, cond).float(), x)
            x = rollout(velocity, x0, noise, sigma, offsets, spacing, self.sigma_range[1], rollout_steps)
        else:
            x = interpolate(x0, noise, sigma)
        out = self._net_output(sigma, x, cond, self.train_net)
        if c.objective == "diff2flow":
            return diff2flow_loss(self.bridge, out, x, x0, noise, sigma).mean()
        return native_loss(self.bridge, out, x0, noise, sigma).mean()

    def _micro_batch(self, step: int, micro: int, bucket_rng: random.Random):
        """(generator, x0, cond, noise) of micro-batch ``micro`` of step ``step``: the generator is then where
        :meth:`loss` draws σ (and ε) from. ``bucket_rng`` is the step's (its micro-batches draw buckets in turn)."""
        c = self.config
        g = self._generator(step, micro)
        bucket = self.data.choose_bucket(bucket_rng)
        x0, cond, noise = self.data.take(bucket, self.dist.shard(lambda n: self.data.indices(bucket, n, g),
                                                                 c.batch_size))
        return g, x0, self._drop_captions(bucket, cond, g), noise

    def batch_loss(self, step: int) -> float:
        """The loss of step ``step``'s first micro-batch (its images, σ, ε, caption dropout) at the current weights,
        without gradients: evaluated before and after that step, it shows whether the step went downhill on the
        loss it computed (this rank's rows; scheduled-sampling rollouts left out)."""
        g, x0, cond, noise = self._micro_batch(step, 0, random.Random(self.config.seed * 7_919 + step))
        train_net, self.train_net = self.train_net, self.net  # eager: no DDP hooks, graph replay or compile here
        try:
            with torch.no_grad():
                return float(self.loss(x0, cond, g, noise))
        finally:
            self.train_net = train_net

    def step(self, step: int) -> torch.Tensor:
        """Optimizer step ``step`` (0-based); returns this rank's loss as a device tensor (no host sync, no
        collective for the loss: :meth:`run` averages the pending losses over ranks at read-out)."""
        c = self.config
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate_at(c, step)
        bucket_rng = random.Random(c.seed * 7_919 + step)
        total = torch.zeros((), device=self.device)
        for micro in range(c.grad_accumulation):
            g, x0, cond, noise = self._micro_batch(step, micro, bucket_rng)
            offsets = rollout_steps = None
            if c.scheduled_sampling.active:  # its own host RNG: turning it off leaves every other draw as it was
                ss_rng = random.Random(c.seed * 104_729 + step * 31 + micro)
                drawn = []

                def draw(n):
                    drawn[:] = c.scheduled_sampling.draw_offsets(ss_rng, n, step, c.steps)
                    return drawn
                offsets = self.dist.shard(draw, c.batch_size)
                if self.sharded:  # every rank rolls out as long as the longest rollout of the global batch
                    rollout_steps = max(drawn, default=0)
            last = micro == c.grad_accumulation - 1
            with contextlib.nullcontext() if last else self.dist.accumulating(self.train_net):
                loss = self.loss(x0, cond, g, noise, offsets, rollout_steps) / c.grad_accumulation
                loss.backward()  # the last one also averages the accumulated gradients over ranks (DDP)
            total += loss.detach()
            # Nothing of this micro-batch's autograd graph may outlive it: a CUDA-graph capture in the next
            # micro-batch must not meet the parameters' AccumulateGrad nodes alive from an eager backward on
            # another stream (the capture is then invalidated).
            del loss
        if c.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, c.max_grad_norm, foreach=True)
        self.optimizer.step()
        if self.ema is not None:
            self.ema.update(step)
        self.optimizer.zero_grad(set_to_none=False)
        return total

    # --- the loop ---------------------------------------------------------------------------------
    def run(self, start_step: int = 0, should_stop: Callable[[], bool] | None = None,
            on_progress: Callable[[int, list[float], float], None] | None = None,
            on_save: Callable[[int], None] | None = None, save_every: int = 0,
            on_preview: Callable[[int], None] | None = None, preview_every: int = 0,
            on_validate: Callable[[int], None] | None = None, validate_every: int = 0,
            stop_exceptions: tuple[type[BaseException], ...] = ()) -> TrainResult:
        """Train from ``start_step`` to ``config.steps``.

        ``on_validate(step)`` runs every ``validate_every`` steps and after the last step (rank 0; under DDP the
        other ranks wait for it in the next collective). Its time is measured and left out of the
        samples/s that ``on_progress`` gets and of ``result.samples_per_second``: throughput is training only.

        Every ``sync_every`` steps the pending losses are read (one host sync), checked for NaN/inf and
        passed to ``on_progress(step, new_losses, samples_per_second)``. ``should_stop()`` (a host-side
        flag, e.g. the UI's stop button) ends the run after the current step: status "interrupted".
        ``stop_exceptions``: exceptions that mean the same stop request raised from inside the network (a
        host that checks its stop flag in every layer): the unfinished step is dropped, the run ends
        "interrupted" with the weights of the last completed step.

        With ``dist`` of world size > 1, every rank must call ``run`` with the same arguments; losses are the
        ranks' mean, ``result.samples`` counts the global batch, and the callbacks run on rank 0 only. A stop
        needs every rank's agreement, which costs a collective: ``should_stop()`` (any rank's), a stop raised by
        rank 0's preview and ``stop_exceptions`` raised inside the network on any rank are honoured at the next
        read-out, within ``sync_every`` steps; the rank whose step a stop exception cut off redoes that step
        (the other ranks wait for it in the gradient all-reduce), so every rank ends on the same weights. Not
        covered: a stop raised in the backward (gradient checkpointing's recomputation), after DDP may have
        reduced part of the gradients; that rank's redo would not meet the others' reductions.
        """
        c = self.config
        dist = self.dist
        result = TrainResult(step=start_step)
        watch = LossWatch(start_step, self.snapshot, self.restore, reduce=dist.mean if dist.distributed else None)
        samples_per_step = c.batch_size * dist.world_size * c.grad_accumulation
        t0 = time.perf_counter()

        def flush(step_done: int):
            values = watch.read(step_done)
            if not values:
                return
            result.losses.extend(values)
            result.step = step_done
            if on_progress and dist.is_main:
                elapsed = time.perf_counter() - t0
                elapsed -= result.validation_seconds  # validation is not training throughput
                on_progress(step_done, values, result.samples / elapsed if elapsed > 0 else 0.0)

        step = start_step
        stop_raised = False  # by the network during a step of this rank, not yet agreed on by the others
        while step < c.steps:
            try:
                watch.add(self.step(step))
            except stop_exceptions:
                if self.sharded and dist.distributed:
                    raise ShardedStepAborted(
                        f"a stop was raised inside the network on rank {dist.rank} during sharded (FSDP) step "
                        f"{step + 1}: its collectives cannot be resumed; stop through should_stop instead") from None
                self.optimizer.zero_grad(set_to_none=False)  # the partial step's gradients, never applied
                if dist.distributed:
                    # Its draws are seeded by the step: redone, it gives the gradients the others wait for.
                    stop_raised = True
                    continue
                result.status = "interrupted"
                break
            step += 1
            result.samples += samples_per_step
            due_save = save_every > 0 and step % save_every == 0
            due_preview = preview_every > 0 and step % preview_every == 0
            due_validate = on_validate is not None and validate_every > 0 and (step % validate_every == 0
                                                                               or step == c.steps)
            due_read = due_save or due_preview or due_validate or step % max(1, c.sync_every) == 0 or step == c.steps
            # Ranks read out together (the loss mean is a collective), so a stop is agreed on only then.
            stop = (not dist.distributed or due_read) and (stop_raised or should_stop is not None and should_stop())
            if stop or due_read:
                flush(step)
            callbacks = dist.is_main or self.sharded
            if due_save and on_save and callbacks:
                on_save(step)
            if due_preview and on_preview and callbacks:
                try:
                    on_preview(step)
                except stop_exceptions:
                    stop = True
            if due_validate and dist.is_main and not stop:
                t_val = time.perf_counter()
                try:
                    on_validate(step)
                except stop_exceptions:
                    stop = True
                finally:
                    result.validation_seconds += time.perf_counter() - t_val
            if dist.distributed and due_read:
                stop = dist.any(stop)
            if stop:
                result.status = "interrupted"
                break
        flush(step)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        result.seconds = time.perf_counter() - t0
        return result
