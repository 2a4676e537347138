"""Data-parallel training over torch.distributed (DESIGN §7): who this process is, and the few collectives
the Trainer needs.

Contract (N ranks, per-rank batch b, accumulation A):

* the global batch of an optimizer step is N·b·A samples; micro-batch m of step k is the global micro-batch
  of N·b samples that a single process with batch N·b would draw from the generator seeded by (seed, k, m);
* every rank makes exactly those global draws (sample indices, σ, noise, caption dropout, scheduled-sampling
  offsets) and keeps its own rows [r·b, (r+1)·b) (:meth:`DistributedContext.shard`);
* each rank's loss is the mean over its b rows, so the gradient of the global mean over N·b rows is the
  average over ranks of the per-rank gradients: ``g = (1/N) Σ_r g_r``. PyTorch's DDP takes it
  (:meth:`DistributedContext.wrap`): its reducer all-reduces the trained tensors' gradients only, in
  buckets, each launched as soon as the backward of the last micro-batch has produced it (overlapped with the
  rest of that backward); the earlier micro-batches accumulate locally (``no_sync``). Clipping and the
  optimizer then see the same tensor on every rank and the weights stay identical;
* the reported loss of a step is the same average, ``L = (1/N) Σ_r L_r`` (:meth:`mean`), reduced only at
  read-out time, once for all pending steps: a non-finite loss on any rank is then seen by every rank.

Hence N ranks × batch b train the same weights as 1 rank × batch N·b, up to the rounding of the reduction
order.

Sharded (FSDP2, :meth:`DistributedContext.fully_shard`, for full fine-tunes whose replicated training state does
not fit one device): every trained tensor θ of P elements lives as a DTensor whose local shard on rank r is its
rows [o_r, o_r + n_r) along dim 0 (``torch.chunk`` sizes, the last ranks possibly empty), so the float32 masters,
their gradients and the optimizer's moments cost ``(4 + 4 + k_opt)·P / N`` per rank instead of ``(…)·P``. A
block's parameters are all-gathered (in the compute dtype) just before its forward and again before its
backward, freed after each; its gradients are reduce-scattered in float32: ``g_r = (1/N) Σ_r' g_r'[o_r : o_r+n_r]``,
the rows of the very average DDP computes, so clipping (a norm over all shards, one all-reduce) and the
element-wise optimizer update give every row the value the replicated run gives it. Micro-batches before a step's
last accumulate unreduced gradients (``set_requires_gradient_sync(False)``, FSDP's ``no_sync``; they are held
unsharded in float32 until the last micro-batch reduces their sum). Whatever reads or writes whole tensors
(exports, saves, resumes) goes through :func:`full_tensor` / :func:`copy_into` / :func:`gather_optimizer_state`
/ :func:`shard_optimizer_state`: gathers are collectives, so every rank makes them in the same order, and only
rank 0 writes what they return. World size 1 (:meth:`DistributedContext.single`) is the single-process code path itself: ``shard``
is the identity on the draw and no collective is ever issued.

The process group is torch.distributed's (gloo on CPU, NCCL on CUDA); nothing here communicates by itself.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Sequence, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

try:  # FSDP2 and DTensor (torch >= 2.6); a build without them trains with DDP only
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
except ImportError:  # pragma: no cover
    DTensor = None

T = TypeVar("T")

# The size of one gradient all-reduce (DDP's default): large enough to amortise a collective's latency, small
# enough that the first buckets are ready early in the backward and overlap with the rest of it.
BUCKET_MB = 25


@dataclass(frozen=True)
class DistributedContext:
    """This process's place in the data-parallel group: ``rank`` of ``world_size``, on ``device``.

    ``backend`` is the process group's ("gloo", "nccl") or None for a single process; ``group`` the process
    group the collectives run on (None: torch.distributed's default group).
    """

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    backend: str | None = None
    group: Any = None

    def __post_init__(self):
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is not in a world of size {self.world_size}")

    @property
    def is_main(self) -> bool:
        """Rank 0: the only one that writes files and talks to the UI."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @classmethod
    def single(cls, device=None) -> "DistributedContext":
        """One process, world size 1: the Trainer's plain code path."""
        return cls(device=torch.device(device) if device is not None else torch.device("cpu"))

    @classmethod
    def from_environment(cls, device=None, timeout: timedelta | None = None) -> "DistributedContext":
        """The context of this process: torch.distributed's default group if it is initialised; else, when
        ``torchrun``'s variables (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``) say the world is
        larger than one, the default group is initialised from them (``env://``; NCCL for a CUDA ``device``, or
        when ``device`` is None and CUDA is there; else gloo); else :meth:`single`. ``device`` defaults to
        ``cuda:LOCAL_RANK`` under NCCL, else CPU.
        """
        if not (dist.is_available() and dist.is_initialized()):
            if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available():
                return cls.single(device)
            cuda = torch.device(device).type == "cuda" if device is not None else torch.cuda.is_available()
            backend = "nccl" if cuda else "gloo"
            if backend == "nccl":  # bind before the group exists, so NCCL's communicator uses this card
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group(backend, init_method="env://",
                                    **({"timeout": timeout} if timeout is not None else {}))
        backend = dist.get_backend()
        if device is None:
            device = (torch.device("cuda", int(os.environ.get("LOCAL_RANK", torch.cuda.current_device())))
                      if backend == "nccl" else torch.device("cpu"))
        return cls(rank=dist.get_rank(), world_size=dist.get_world_size(), device=torch.device(device),
                   backend=backend)

    # --- data -------------------------------------------------------------------------------------
    def rows(self, per_rank: int) -> slice:
        """This rank's rows of a global batch of ``world_size · per_rank``: [r·b, (r+1)·b)."""
        return slice(self.rank * per_rank, (self.rank + 1) * per_rank)

    def shard(self, draw: Callable[[int], T], per_rank: int) -> T:
        """``draw(N·b)[rows(b)]``: this rank's part of a random draw made for the whole global batch.

        Every rank consumes the generator exactly as a single process with batch N·b does, so the draws that
        follow stay aligned across world sizes. ``draw`` returns a tensor or list with the batch first. World
        size 1: ``draw(b)`` itself, no slicing.
        """
        if self.world_size == 1:
            return draw(per_rank)
        return draw(per_rank * self.world_size)[self.rows(per_rank)]

    def deal(self, items: Sequence[T]) -> Sequence[T]:
        """This rank's share of a work list that every rank holds alike: items r, r+N, r+2N, … (round-robin,
        so neighbouring items, e.g. chunks of similar cost, go to different ranks). World size 1: all."""
        return items[self.rank::self.world_size]

    # --- collectives ------------------------------------------------------------------------------
    def fully_shard(self, root: nn.Module, blocks: Sequence[nn.Module], compute_dtype: torch.dtype) -> nn.Module:
        """Shard ``root``'s parameters over the ranks with FSDP2: ``fully_shard`` on each of ``blocks`` (the units
        gathered and freed one at a time: a UNet's ResBlocks and transformer blocks), then on ``root`` for the
        parameters outside them. Returns ``root`` (now an FSDP module); its parameters are replaced by DTensor
        parameters (read them again from the modules).

        Mixed precision: parameters stay in their own dtype in the shards (the float32 masters) and are gathered
        in ``compute_dtype`` (bf16: half the all-gather traffic, and the dtype the layers run in); gradients are
        reduce-scattered and kept in float32. Forward inputs are not cast: the fractional time label must stay
        float32 (a bf16 label near 999 is off by up to 4 steps).
        """
        if self.backend is None:
            raise ValueError("sharding needs a process group (torchrun, d2f run --nproc-per-node or gpus > 1)")
        if DTensor is None:  # pragma: no cover
            raise RuntimeError(f"this torch ({torch.__version__}) has no FSDP2 (torch.distributed.fsdp.fully_shard)")
        from torch.distributed.device_mesh import DeviceMesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = DeviceMesh.from_group(self.group if self.group is not None else dist.group.WORLD, self.device.type)
        policy = MixedPrecisionPolicy(param_dtype=None if compute_dtype == torch.float32 else compute_dtype,
                                      reduce_dtype=torch.float32, cast_forward_inputs=False)
        for block in blocks:
            fully_shard(block, mesh=mesh, mp_policy=policy)
        # The root's own parameters are gathered for the whole forward anyway: no reshard between forward and
        # backward for it (FSDP's default for the root, said here because it matters for memory).
        fully_shard(root, mesh=mesh, mp_policy=policy)
        return root

    def wrap(self, net: Callable, params: Sequence[nn.Parameter], sharded: nn.Module | None = None) -> Callable:
        """``net`` for data-parallel training: a :class:`~torch.nn.parallel.DistributedDataParallel` over a
        module that owns exactly ``params`` (the trained tensors: LoRA factors, or full mode's masters); ``net``
        itself without a process group (:meth:`single`). A group of one rank gets DDP too: its hooks and a
        one-rank all-reduce are the whole cost the distributed path adds before any communication, which
        ``bench/bench_scale.py`` measures against the plain path.

        DDP checks at construction that every rank trains tensors of the same shapes and broadcasts rank 0's
        values (the ranks start identical even if a rank's initialisation differed); its backward hooks then
        average the gradients, ``p.grad ← (1/N) Σ_r p.grad_r``, bucket by bucket as they become ready. A
        forward under ``torch.no_grad`` (scheduled sampling's rollout) costs DDP nothing. Call the result
        once per micro-batch with gradients on, inside :meth:`accumulating` for all but the last.
        """
        if self.backend is None:
            return net
        if sharded is not None:  # FSDP reduces the gradients itself (reduce-scatter per block in the backward)
            return _ShardedNet(net, sharded)
        device_ids = [self.device] if self.device.type == "cuda" else None
        return DistributedDataParallel(_Trained(net, params), device_ids=device_ids, process_group=self.group,
                                       bucket_cap_mb=BUCKET_MB)  # no buffers: nothing to broadcast per forward

    @staticmethod
    def accumulating(net: Callable):
        """Context of a micro-batch whose gradients are only accumulated locally (DDP's ``no_sync``); the
        next backward outside it reduces the sum. A null context for a plain network."""
        if isinstance(net, (DistributedDataParallel, _ShardedNet)):
            return net.no_sync()
        return contextlib.nullcontext()

    def mean(self, tensor: torch.Tensor) -> torch.Tensor:
        """The element-wise mean over ranks of ``tensor`` (a new tensor; the input itself for world size 1)."""
        if self.world_size == 1:
            return tensor
        out = tensor.detach().clone()
        dist.all_reduce(out, group=self.group)
        return out.div_(self.world_size)

    def broadcast(self, value: T) -> T:
        """Rank 0's ``value`` (any picklable object) on every rank; ``value`` itself for world size 1."""
        if self.world_size == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, group=self.group, group_src=0, device=self.device)
        return box[0]

    def any(self, flag: bool) -> bool:
        """True on every rank if ``flag`` is true on any rank (one collective and a host sync)."""
        if self.world_size == 1:
            return bool(flag)
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return bool(t.item())


class _ShardedNet:
    """The training network of a sharded run: calls ``net``; :meth:`no_sync` is FSDP's
    ``set_requires_gradient_sync(False)`` on every FSDP module under ``root`` for the block (DDP's ``no_sync``)."""

    def __init__(self, net: Callable, root: nn.Module):
        self.net, self.root = net, root

    def __call__(self, *args, **kwargs):
        return self.net(*args, **kwargs)

    @contextlib.contextmanager
    def no_sync(self):
        self.root.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            self.root.set_requires_gradient_sync(True)


# --- whole tensors of a sharded run ----------------------------------------------------------------------------
def is_sharded(t) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of ``t`` (the tensor whose storage the DTensor holds); ``t`` itself if not sharded."""
    return t.to_local() if is_sharded(t) else t


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor (an all-gather, a collective: every rank calls it, in the same order); ``t`` itself if it is
    not sharded."""
    return t.full_tensor() if is_sharded(t) else t


def local_part(whole: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The rows of ``whole`` (a whole tensor of ``like``'s global shape) that this rank's shard of ``like`` holds,
    by DTensor's own layout rule; no communication (every rank has ``whole``)."""
    if not is_sharded(like):
        return whole
    shape, offset = compute_local_shape_and_global_offset(like.shape, like.device_mesh, like.placements)
    return whole[tuple(slice(o, o + n) for o, n in zip(offset, shape))]


def copy_into(dst: torch.Tensor, src: torch.Tensor) -> None:
    """``dst.copy_(src)`` for a whole ``src``: a sharded ``dst`` takes its rows of it (no communication)."""
    if is_sharded(dst) and not is_sharded(src):
        dst.to_local().copy_(local_part(src, dst))
    else:
        dst.copy_(src)


def gather_optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    """``optimizer.state_dict()`` with every sharded state tensor gathered whole (collectives, in the state dict's
    order, the same on every rank): the layout a single-process run saves, so a state resumes on any world size."""
    sd = optimizer.state_dict()
    return {"state": {i: {k: full_tensor(v) for k, v in fields.items()} for i, fields in sd["state"].items()},
            "param_groups": sd["param_groups"]}


def shard_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """After ``load_state_dict`` of a whole state (:func:`gather_optimizer_state`'s layout) into an optimizer over
    sharded parameters: each state tensor of a parameter's shape becomes a DTensor laid out like the parameter
    (this rank keeps its rows); scalars (Adam's step) stay as they are."""
    for p, fields in optimizer.state.items():
        if not is_sharded(p):
            continue
        for k, v in list(fields.items()):
            if isinstance(v, torch.Tensor) and not is_sharded(v) and tuple(v.shape) == tuple(p.shape):
                part = local_part(v, p).to(device=p.to_local().device, dtype=v.dtype).contiguous()
                fields[k] = DTensor.from_local(part, p.device_mesh, p.placements, run_check=False,
                                               shape=p.shape, stride=p.stride())


class _Trained(nn.Module):
    """The training network as a module whose parameters are exactly the trained tensors (what DDP reduces);
    the frozen base weights the network closes over stay invisible to DDP."""

    def __init__(self, net: Callable, params: Sequence[nn.Parameter]):
        super().__init__()
        self.trained = nn.ParameterList(params)  # the same Parameter objects, not copies
        self._net = (net,)  # a tuple: a module-valued net must not be registered (its frozen weights)

    def forward(self, *args, **kwargs):
        return self._net[0](*args, **kwargs)
