"""One D2FReflowPairs run on every process that makes its pairs: the job rank 0 (the node) decides and sends to the
worker processes of ``gpus`` > 1 (:class:`PairsJob`), this process's part of the run (:func:`make_pairs`; the
chunks dealt by ``d2f_core.training.couplings.generate``) and the host's sampling path for one chunk
(:class:`PairSampler`: CFGGuider + the flow Euler sampler, with progress and previews on rank 0)."""

from __future__ import annotations

import dataclasses
import logging
import pickle

import comfy.model_management as mm
import comfy.samplers
import comfy.utils
import torch

from ..d2f_core.training.couplings import CouplingsError, CouplingsWriter, generate, missing_chunks
from ..d2f_core.training.data import _common_length
from ..d2f_core.training.distributed import DistributedContext
from ..d2f_core.flow.samplers import sample_euler_flow
from .flow_sampling import FlowBridgeSampling


# --- several prompts in one sampler call ---------------------------------------------------------------
def _same(a, b) -> bool:
    if a is b:
        return True
    if torch.is_tensor(a) or torch.is_tensor(b):
        return torch.is_tensor(a) and torch.is_tensor(b) and a.shape == b.shape and bool(torch.equal(a, b))
    try:
        return bool(a == b)
    except Exception:
        return False


def batched_positive(entries: list):
    """One CONDITIONING whose batch row j is the prompt ``entries[j]`` (text embeddings tiled to a common
    token length and stacked, per-prompt tensors such as SDXL's pooled output stacked, other settings
    shared), so a chunk that mixes prompts is one sampler call. None when the prompts carry settings that
    differ: then each prompt is sampled on its own."""
    keys = set(entries[0][1])
    if any(set(e[1]) != keys for e in entries):
        return None
    extras = {}
    for k in keys:
        values = [e[1][k] for e in entries]
        if all(torch.is_tensor(v) and v.ndim >= 1 and v.shape[0] == 1 and v.shape == values[0].shape for v in values):
            extras[k] = torch.cat(values)
        elif all(_same(v, values[0]) for v in values):
            extras[k] = values[0]
        else:
            return None
    cross = torch.stack(_common_length([e[0][0] for e in entries]))
    return [[cross, extras]]


# --- the job -------------------------------------------------------------------------------------------
@dataclasses.dataclass
class PairsJob:
    """What every process of a D2FReflowPairs run needs, decided once by rank 0 (the node) and sent to the worker
    processes of ``gpus`` > 1 as it is (plain values and CPU tensors). The model's flow view travels as its
    ``bridge`` (the host's own model_sampling is not picklable): each process rebuilds it on its copy's."""
    folder: str
    meta: dict
    table: dict
    entries: list
    negative: list
    cfg: float
    sigmas: torch.Tensor
    seed: int
    count: int
    batch_size: int
    shape: tuple
    bridge: object
    family: str
    schedule_source: str
    model_patches: dict  # model_options and object patches a worker's reloaded copy must carry too


def _patches_for_workers(model) -> dict:
    """The sampling-relevant patches of ``model`` beyond its weights (a worker reloads the file and its weight
    patches; see local_workers): its model_options (CFG functions, attention patches) and its object patches but
    the flow patch. Refused, before anything starts, when they cannot be sent to another process."""
    patches = {"model_options": model.model_options,
               "object_patches": {k: v for k, v in model.object_patches.items() if k != "model_sampling"}}
    try:
        pickle.dumps(patches)
    except Exception as exc:  # noqa: BLE001  (closures, locks, host objects: whatever it is, say so)
        raise ValueError("D2FReflowPairs: gpus > 1 sends the model to worker processes, but a patch on it cannot be "
                         f"sent ({type(exc).__name__}: {exc}). Apply that patch after D2FReflowPairs' run (it only "
                         "changes sampling), or set gpus to 1.") from None
    return patches


def _flow_model(model, job: PairsJob, sampling=None):
    """``model`` sampled in flow time: as it is when flow-patched, else a clone with the flow view (``sampling``,
    or one rebuilt from the job's bridge over the model's own model_sampling)."""
    base = model.get_model_object("model_sampling")
    if isinstance(base, FlowBridgeSampling):
        return model
    flow = model.clone()
    flow.add_object_patch("model_sampling", sampling if sampling is not None else
                          FlowBridgeSampling(base, job.bridge, job.family, job.schedule_source))
    return flow


def make_pairs(flow, job: PairsJob, node_id=None) -> int:
    """This process's part of the run (rank 0: the node; others: :func:`pairs_worker`): open the folder, make the
    chunks :func:`generate` deals this rank, and return the pairs the folder holds from 0 on. Progress and
    previews on rank 0 only. A stop on rank 0 keeps what is finished; a run that ended short for another
    reason (a worker's error) raises, so that the node fails naming it."""
    ctx = DistributedContext.from_environment()  # single() unless under torchrun or the gpus workers (DESIGN §7)
    try:
        writer = CouplingsWriter.open(job.folder, job.meta, job.table, ctx)
    except CouplingsError as exc:
        raise ValueError(f"D2FReflowPairs: {exc}") from None
    missing = missing_chunks(writer.ranges, job.count, job.batch_size)
    if not missing:
        return writer.count
    steps = len(job.sigmas) - 1
    mine = sum(n for _, n in ctx.deal(missing))
    run = PairSampler(flow, job.entries, job.negative, job.cfg, job.sigmas, job.seed, total=mine * steps,
                      node_id=node_id, progress=ctx.is_main)
    if ctx.is_main:
        ranks = f" on {ctx.world_size} ranks" if ctx.distributed else ""
        logging.info(f"D2FReflowPairs: {writer.count} pairs in '{job.folder}', making "
                     f"{sum(n for _, n in missing)} more{ranks}")
    stopped = []  # this process was told to stop (the host's interrupt: rank 0's stop button)

    def should_stop() -> bool:
        if mm.processing_interrupted():
            stopped.append(True)
        return bool(stopped)
    try:
        generate(writer, job.count, job.batch_size, run.sample, seed=job.seed, shape=job.shape,
                 should_stop=should_stop, dist=ctx)
    except mm.InterruptProcessingException:
        stopped.append(True)
    except torch.OutOfMemoryError:
        raise RuntimeError(
            f"D2FReflowPairs ran out of GPU memory at batch size {job.batch_size} ({writer.count} pairs are saved in "
            f"'{job.folder}'). Lower batch_size and run again: it continues from there.") from None
    if writer.count >= job.count or not ctx.is_main:
        return writer.count
    if not stopped:  # every rank stopped because another one failed: that one is named by the gpus workers
        raise RuntimeError(f"D2FReflowPairs: another process of the run failed ({writer.count}/{job.count} pairs are "
                           f"saved in '{job.folder}')")
    mm.interrupt_current_processing(False)
    if writer.count == 0:
        raise mm.InterruptProcessingException()
    logging.info(f"D2FReflowPairs: stopped with {writer.count}/{job.count} pairs in '{job.folder}'; "
                 "run again with the same inputs to continue")
    return writer.count


def pairs_worker(model, job: PairsJob) -> None:
    """D2FReflowPairs on a worker rank of ``gpus`` > 1: this rank's chunks with its reloaded copy of the model."""
    model.model_options = job.model_patches.get("model_options", model.model_options)
    for name, value in job.model_patches.get("object_patches", {}).items():
        model.add_object_patch(name, value)
    make_pairs(_flow_model(model, job), job)


class PairSampler:
    """The host's own sampling path for one chunk: CFGGuider + KSAMPLER(sample_euler_flow) over flow sigmas,
    with the node's progress bar and latent previews when ``progress`` (rank 0 only: the other ranks of a
    distributed run have no UI)."""

    def __init__(self, model, entries, negative, cfg: float, sigmas: torch.Tensor, seed: int, total: int, node_id,
                 progress: bool = True):
        self.model, self.entries, self.negative, self.cfg = model, entries, negative, cfg
        self.sigmas, self.seed = sigmas, seed
        self.sampler = comfy.samplers.KSAMPLER(sample_euler_flow)
        self.latent_format = model.get_model_object("latent_format")
        self.pbar = comfy.utils.ProgressBar(total, node_id=node_id) if progress else None
        self.done = 0  # pair-steps finished
        self.previewer = None
        if progress:
            try:
                import latent_preview
                self.previewer = latent_preview.get_previewer(model.load_device, model.model.latent_format)
            except Exception as exc:  # previews are optional
                logging.warning(f"D2FReflowPairs: no previews ({exc})")

    def _callback(self, rows: int):
        if self.pbar is None:
            return None
        base = self.done

        def callback(step, x0, x, total_steps):
            preview = None
            if self.previewer is not None:
                try:
                    preview = self.previewer.decode_latent_to_preview_image("JPEG", x0[:1])
                except Exception:
                    preview = None
            self.pbar.update_absolute(base + (step + 1) * rows, None, preview)
        return callback

    def _solve(self, positive, noise: torch.Tensor) -> torch.Tensor:
        guider = comfy.samplers.CFGGuider(self.model)
        guider.set_conds(positive, self.negative)
        guider.set_cfg(self.cfg)
        out = guider.sample(noise, torch.zeros_like(noise), self.sampler, self.sigmas,
                            callback=self._callback(noise.shape[0]),
                            disable_pbar=self.pbar is None or not comfy.utils.PROGRESS_BAR_ENABLED,
                            seed=self.seed)
        self.done += noise.shape[0] * (len(self.sigmas) - 1)
        return self.latent_format.process_in(out.float().cpu())

    def sample(self, noise: torch.Tensor, prompt_index: torch.Tensor, start: int) -> torch.Tensor:
        index = prompt_index.tolist()
        if len(set(index)) == 1:
            return self._solve([self.entries[index[0]]], noise)
        merged = batched_positive([self.entries[p] for p in index])
        if merged is not None:
            return self._solve(merged, noise)
        out = torch.empty_like(noise)
        for p in sorted(set(index)):
            rows = torch.tensor([j for j, q in enumerate(index) if q == p])
            out[rows] = self._solve([self.entries[p]], noise[rows])
        return out
