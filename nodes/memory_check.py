"""D2FTrain's memory pre-flight (issue 12 part 5): the host side of :mod:`d2f_core.training.memory`.

Before the private copy of the model is loaded, :func:`check` reads the model's counts from its module tree
(no device work), estimates the run's peak GPU memory with and without gradient checkpointing, decides
``gradient_checkpointing = auto``, and refuses at once a run that cannot fit, naming the settings that would.
On a device without a known limit (the CPU) it only logs the estimate.
"""

from __future__ import annotations

import logging
import os

import comfy.model_management as mm
import torch
import torch.distributed as dist

from ..d2f_core.training.adapters import attention_only
from ..d2f_core.training.checkpointing import blocks_by_class_name
from ..d2f_core.training.options import SHARDINGS
from ..d2f_core.training.memory import (CHECKPOINTING_CHOICES, MemoryPreflightError, Preflight, RunSettings,
                                        checkpointing_choice, data_bytes, family_of, network_facts, preflight)

__all__ = ["CHECKPOINTING_CHOICES", "SHARDINGS", "available_memory", "check", "sharding_choice", "validate_checkpointing"]


def available_memory(device: torch.device) -> int | None:
    """Bytes a training run may use on ``device``: what is free (the driver's free memory plus what torch holds
    cached) and what the other loaded models occupy (the private copy's load unloads them as the estimate
    asks). None where no limit is known: the CPU, and devices other than CUDA."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    loaded = 0
    for lm in list(mm.current_loaded_models):
        try:
            if lm.model is not None and torch.device(lm.device) == device:
                loaded += int(lm.model_loaded_memory())
        except Exception:  # a model being collected: not counted
            continue
    return int(mm.get_free_memory(device)) + loaded


def validate_checkpointing(value) -> bool | str:
    """The executor's check of the gradient_checkpointing input: auto/on/off, or a boolean from a workflow saved
    before it became a choice (list-input node: a list of values)."""
    for v in value if isinstance(value, list) else [value]:
        try:
            checkpointing_choice(v)
        except ValueError as exc:
            return str(exc)
    return True


def _world_size() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return max(1, int(os.environ.get("WORLD_SIZE", "1") or 1))


def _graphs(device: torch.device, opts: dict, world: int, checkpointing: bool) -> bool:
    """Whether D2FTrain's step replays CUDA graphs for these options (its own rule, ``train_node.fast_paths``)."""
    from .train_node import fast_paths  # imported here: train_node imports this module
    return fast_paths(device.type, dict(opts, gradient_checkpointing=checkpointing), ddp=world > 1)[1]


def _context_tokens(buckets) -> int:
    longest = 0
    for bucket in buckets:
        conds = bucket[1]
        for c in conds if isinstance(conds, list) else [conds]:
            ctx = c.get("context") if isinstance(c, dict) else None
            if isinstance(ctx, torch.Tensor) and ctx.ndim >= 2:
                longest = max(longest, int(ctx.shape[-2]))
    return longest or 77




def sharding_choice(opts: dict, world: int) -> str:
    """The ``sharding`` option checked against the run: "ddp", "fsdp" or "auto" (decided by :func:`plan`)."""
    value = str(opts.get("sharding", "auto") or "auto").strip().lower()
    if value not in SHARDINGS:
        raise ValueError(f"D2FTrain: sharding must be one of {', '.join(SHARDINGS)}, not '{value}'.")
    if value == "fsdp" and opts["mode"] != "full":
        raise ValueError("D2FTrain: sharding fsdp shards a full fine-tune's weights; a LoRA run is replicated (ddp). "
                         "Set sharding to auto or ddp, or mode to full.")
    if value != "ddp" and (opts["mode"] != "full" or world <= 1):
        return "ddp" if value == "auto" else value  # fsdp on one process: the plain path (nothing to shard over)
    return value


def plan(model, buckets, opts: dict, dtype: torch.dtype, blocks: tuple[str, ...], world_size: int = 1,
         device=None) -> Preflight:
    """:func:`plan_one` with ``sharding`` decided: "auto" shards a full fine-tune on several processes (FSDP)
    exactly when the replicated run would be refused (it does not fit) and the sharded one would not be; the result's
    ``sharding`` says which ("ddp" for every run that is not sharded)."""
    world = max(int(world_size or 1), _world_size())
    choice = sharding_choice(opts, world)
    if choice != "auto":
        result = plan_one(model, buckets, opts, dtype, blocks, world_size, device, sharded=choice == "fsdp"
                          and world > 1)
        result.sharding = "fsdp" if choice == "fsdp" and world > 1 else "ddp"
        return result
    replicated = plan_one(model, buckets, opts, dtype, blocks, world_size, device, sharded=False)
    replicated.sharding = "ddp"
    if replicated.refusal is None:
        return replicated
    sharded = plan_one(model, buckets, opts, dtype, blocks, world_size, device, sharded=True)
    if sharded.refusal is not None:
        return replicated
    sharded.sharding = "fsdp"
    return sharded


def plan_one(model, buckets, opts: dict, dtype: torch.dtype, blocks: tuple[str, ...], world_size: int = 1,
             device=None, sharded: bool = False) -> Preflight:
    """The pre-flight of a D2FTrain run on ``device`` (default: the host's torch device), without acting on it.
    ``world_size``: processes the run trains on (the gpus input's; torchrun's are read from the environment)."""
    device = torch.device(device if device is not None else mm.get_torch_device())
    world = max(int(world_size or 1), _world_size())
    unet = model.model.diffusion_model
    checkpoint_blocks = blocks_by_class_name(unet, blocks)
    facts = {}

    def facts_for(targets: str):
        if targets not in facts:
            facts[targets] = network_facts(unet, checkpoint_blocks, attention_only if targets == "attention" else None)
        return facts[targets]

    weight_bytes = torch.tensor([], dtype=dtype).element_size()
    ema = opts.get("ema")
    ema_bytes = torch.tensor([], dtype=ema.torch_dtype(dtype)).element_size() if ema is not None else 0
    data, shapes = data_bytes(buckets, weight_bytes)
    settings = RunSettings(
        mode=opts["mode"], rank=int(opts.get("rank", 16)), batch_size=int(opts["batch_size"]), shapes=tuple(shapes),
        weight_bytes=weight_bytes, lora_targets=opts.get("lora_targets", "attention"),
        optimizer=opts.get("optimizer", "adamw"), ema_bytes=ema_bytes,
        # CUDA graphs as TrainingRun decides them (fast_paths), without and with checkpointing
        cuda_graphs=_graphs(device, opts, world, False), graphs_with_checkpointing=_graphs(device, opts, world, True),
        world_size=world, sharded=sharded, grad_accumulation=int(opts.get("grad_accumulation", 1)),
        data_bytes=data, context_tokens=_context_tokens(buckets))
    config = getattr(model.model, "model_config", None)
    names = [c.__name__ for c in type(config).__mro__] if config is not None else []
    family, calibrated, _ = family_of(names)
    return preflight(facts_for, settings, opts.get("gradient_checkpointing", "auto"), available_memory(device),
                     family, calibrated)


def check(model, buckets, opts: dict, dtype: torch.dtype, blocks: tuple[str, ...], world_size: int = 1) -> Preflight:
    """:func:`plan`, logged; raises :class:`MemoryPreflightError` (before anything is loaded) when the run cannot
    fit. ``result.checkpointing`` is the setting to train with (every process of the run uses it: they get these
    options)."""
    result = plan(model, buckets, opts, dtype, blocks, world_size)
    logging.info(f"D2FTrain: {result.summary()}; {'sharded (FSDP)' if result.sharding == 'fsdp' else 'replicated'}")
    if result.refusal:
        raise MemoryPreflightError(result.refusal)
    return result
