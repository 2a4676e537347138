"""The ``gpus`` input: a node of the pack trains on several local GPUs from inside the ComfyUI server (DESIGN §7).

The server process is rank 0. For ``gpus`` = N > 1 it spawns N-1 worker processes (never a second ComfyUI: a
worker imports ComfyUI's model code and this pack's modules, not its server or ``main.py``), one per other local
GPU (on a machine without CUDA, N-1 CPU processes that talk through gloo), and all N join one torch.distributed
group for this run (:mod:`~d2f_core.training.local_group`). Each worker reloads its private model copy from the
model's file, as the node's own private copy is made (``ModelPatcher.cached_patcher_init``, the loader and its
arguments), with the weight patches of the node's input (a LoRA applied upstream), receives the node's prepared
inputs (dataset tensors through shared memory), and runs the same engine code with its rank; it writes no file
and sends nothing to the UI. Rank 0 alone does both, as under ``d2f run --nproc-per-node``.

Contract of :func:`local_world`:

* ``gpus`` is "1" … or "all" (every visible GPU; on the CPU, one process). Wrong values, too few GPUs, or a model
  that cannot be reloaded from a file are refused before anything starts, with a message saying what to do.
* Inside the block torch.distributed's default group exists with this process as rank 0 (for N = 1, or inside a
  run that is already distributed (``torchrun``), nothing is started and the block runs as it would without).
* The stop button stops every rank (the engine agrees on stops at its read-outs). A worker that dies ends the run
  with an error naming its rank; what rank 0 saved stays. After the block no worker is left and the group is
  gone, whatever happened in it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import traceback
import types
from typing import Callable

import comfy.model_management as mm
import torch
import torch.distributed as dist

from ..d2f_core.training import local_group

# The package names this pack's modules have in the server (ComfyUI imports custom nodes under a name of its own):
# a worker imports them under the same names, so that what rank 0 pickles by reference resolves there.
PACK = __package__.rpartition(".")[0]
PACK_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def gpu_choices() -> list[str]:
    """The ``gpus`` input's values: counts up to this machine's GPUs (at least 8, so a workflow made on a bigger
    machine still loads), and "all"."""
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return [str(n) for n in range(1, max(8, count) + 1)] + ["all"]


GPUS_TOOLTIP = ("Train on this many local GPUs at once: this ComfyUI is the first, it starts one worker process per "
                "other GPU (each loads its own copy of the model from its file). batch_size is per GPU: a step sees "
                "batch_size × GPUs × grad_accumulation images. all: every GPU. Without a GPU, a count above 1 "
                "starts CPU processes. The stop button stops them all; only this ComfyUI writes files.")

# Executed first in every worker (``ARGS``: see LocalGroup). ComfyUI's settings before any of its modules read them
# (its device choice happens at import of comfy.model_management); then this pack, imported as the server has it.
_BOOTSTRAP = """
import importlib, sys, types
import torch
torch.set_num_threads(ARGS["threads"])
if ARGS["device_index"] is not None:
    torch.cuda.set_device(ARGS["device_index"])
import comfy.cli_args
vars(comfy.cli_args.args).update(ARGS["extra"]["comfy_args"])
pack = ARGS["extra"]["pack"]
if pack not in sys.modules:  # the package itself without its __init__ (which registers nodes with a server)
    module = types.ModuleType(pack)
    module.__path__ = [ARGS["extra"]["pack_dir"]]
    module.__package__ = pack
    sys.modules[pack] = module
importlib.import_module(pack + ".nodes.local_workers").worker_main(ARGS)
"""


def world_size_for(node: str, gpus, model) -> int:
    """How many processes ``gpus`` asks for on this machine (1: the plain path); refuses what cannot run."""
    gpus = str(gpus if gpus is not None else "1").strip().lower()
    device = mm.get_torch_device()
    cuda = device.type == "cuda"
    available = torch.cuda.device_count() if cuda else None
    if gpus == "all":
        n = available if cuda else 1
    elif gpus.isdigit() and int(gpus) >= 1:
        n = int(gpus)
    else:
        raise ValueError(f"{node}: gpus must be a count (1, 2, …) or 'all', not '{gpus}'.")
    if n <= 1:
        return 1
    if dist.is_initialized():
        logging.info(f"{node}: gpus={gpus} ignored: this process is already one of {dist.get_world_size()} ranks "
                     "(d2f run --nproc-per-node / torchrun)")
        return 1
    if device.type not in ("cuda", "cpu"):
        raise ValueError(f"{node}: gpus > 1 needs CUDA GPUs (or the CPU); this ComfyUI runs on {device.type}. "
                         "Set gpus to 1.")
    if cuda and n > available:
        raise ValueError(f"{node}: gpus={n} but this machine has {available} GPU(s) visible to ComfyUI. Set gpus "
                         f"to {available} or less, or 'all'.")
    if getattr(model, "cached_patcher_init", None) is None:
        raise ValueError(f"{node}: gpus > 1 needs a model that the worker processes can load from its file, i.e. "
                         "one from a core loader (Load Checkpoint, Load Diffusion Model). This model comes from a "
                         "node that does not say how to reload it: load it with a core loader, or set gpus to 1.")
    return n


class LocalWorld:
    """What :func:`local_world` yields: set ``kept`` to a callable that says what the run has saved (for the
    message after a worker's failure)."""

    def __init__(self):
        self.kept: Callable[[], str] = lambda: ""
        self.group: local_group.LocalGroup | None = None


@contextlib.contextmanager
def local_world(node: str, world_size: int, model, worker: Callable, **kwargs):
    """Run the block as rank 0 of ``world_size`` local processes; every worker calls ``worker(model_copy,
    **kwargs)`` (a module-level function of this pack; the model copy reloaded and its patches applied, not yet
    loaded to the device). See the module's contract."""
    world = LocalWorld()
    if world_size <= 1:
        yield world
        return
    device = mm.get_torch_device()
    if device.type == "cuda":
        here = device.index if device.index is not None else torch.cuda.current_device()
        indices = [i for i in range(torch.cuda.device_count()) if i != here][:world_size - 1]
        backend = "nccl"
    else:
        indices, backend = [None] * (world_size - 1), "gloo"
    job = {"model": _recipe(node, model), "worker": worker, "kwargs": kwargs}
    extra = {"pack": PACK, "pack_dir": PACK_DIR, "comfy_args": _comfy_args()}
    group = world.group = local_group.LocalGroup(world_size, backend, _BOOTSTRAP, extra, indices)
    logging.info(f"{node}: starting {world_size - 1} worker process(es) ({backend}; "
                 f"{'GPUs ' + ', '.join(map(str, indices)) if backend == 'nccl' else 'CPU'})")
    try:
        group.start([job] * (world_size - 1), should_abort=mm.processing_interrupted)
    except local_group.Aborted:
        raise mm.InterruptProcessingException() from None
    except local_group.WorkerFailed as exc:
        raise RuntimeError(f"{node}: worker {exc} while starting; nothing was trained.") from None
    ok = False
    try:
        yield world
        ok = True
    except BaseException as exc:
        group.close(ok=False)
        failure = group.failure()
        if failure is None:
            raise
        kept = world.kept()
        raise RuntimeError(f"{node}: worker process {failure}; every process of the run stopped. "
                           f"{kept}".strip()) from exc
    finally:
        if ok:
            group.close(ok=True)
            if group.failure() is not None:  # after its last collective: the run's result is whole
                logging.warning(f"{node}: worker {group.failure()} after the run was complete")


def _recipe(node: str, model) -> dict:
    """How a worker makes its copy of ``model``: the loader and its arguments, and the weight patches on top."""
    return {"init": model.cached_patcher_init, "patches": {k: list(v) for k, v in model.patches.items()}}


def _comfy_args() -> dict:
    import comfy.cli_args

    return dict(vars(comfy.cli_args.args))


def _reload(recipe: dict):
    init = recipe["init"]
    patcher = init[0](*init[1], disable_dynamic=True)
    if len(init) > 2:
        patcher = patcher[init[2]]
    patcher.patches = {k: list(v) for k, v in recipe["patches"].items()}
    return patcher


def worker_main(args: dict) -> None:
    """A worker's life (called by the bootstrap): take the job, reload the model, say ready, join the group, run
    the job, leave. Any error is reported to rank 0 and ends the process with status 1."""
    local_group.watch_parent()
    try:
        job = local_group.job(args)
        model = _reload(job["model"])
        local_group.report(args, "ready")
        local_group.join(args)
        with torch.inference_mode(False):
            job["worker"](model, **job["kwargs"])
        local_group.leave()
        local_group.report(args, "done")
    except BaseException as exc:  # noqa: BLE001  (rank 0 is told whatever it was)
        logging.error(f"Diff2Flow worker rank {args['rank']}:\n{traceback.format_exc()}")
        local_group.report(args, "error", f"{type(exc).__name__}: {exc}")
        raise SystemExit(1) from None


def train_inputs_for_workers(inputs: dict, resume_path) -> dict:
    """D2FTrain's TrainingRun arguments as a worker gets them: the model's flow sampling (a host object around a
    class the host defines inside a function, which cannot be pickled) reduced to the FlowBridge it carries, the
    only part a worker uses."""
    return dict(inputs, sampling=types.SimpleNamespace(bridge=inputs["sampling"].bridge), resume_path=resume_path)


def train_worker(model, resume_path=None, **kwargs) -> None:
    """D2FTrain on a worker rank: the node's TrainingRun with this rank's reloaded copy as its private model."""
    from .train_node import TrainingRun

    run = TrainingRun(model, **kwargs)

    def private():  # the reloaded copy is this worker's own already: no second load from the file
        mm.load_models_gpu([model], force_full_load=True)
        return model
    run._private_model = private
    # A worker's outputs go nowhere: rank 0 returns the node's. Sharded (FSDP), rank 0's full-mode patches gather
    # whole tensors, which takes every rank: the worker joins that gather and drops the result.
    run._trained_model = lambda: run.adapters.patches() and None if getattr(run, "sharded", False) else None
    run.execute(resume_path)
