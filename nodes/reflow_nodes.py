"""Reflow in the UI: D2FReflowPairs makes couplings with the model's own flow ODE, D2FLoadReflowPairs
reopens them, and D2FTrain (``couplings`` input) trains on them.

The storage format, the noise of pair i and the chunked, resumable writer are in ``d2f_core.training.couplings``;
a run's sampling on every process in ``pairs_sampling``, the digests of what was sampled in ``pairs_identity``.
This module holds the nodes, their folders and their prompt checks.
"""

from __future__ import annotations

import os

import folder_paths
import torch
from comfy_api.latest import io

from ..d2f_core import __version__ as PACK_VERSION
from ..d2f_core.training.couplings import (Couplings, CouplingsError, folder_pair_count, is_couplings_folder,
                                           load_couplings)
from ..d2f_core.training.data import stack_conditioning
from ..d2f_core.storage.files import folder_name, resolve_inside
from ..d2f_core.flow.samplers import flow_sigmas
from .local_workers import gpu_choices, local_world, world_size_for
from .pairs_identity import conditioning_digest, model_fingerprint
from .pairs_sampling import PairsJob, _flow_model, _patches_for_workers, make_pairs, pairs_worker
from .train_inputs import _conditioning_entries, bridge_sampling_of, unet_kwargs

CATEGORY = "Diff2Flow"
COUPLINGS_DIR = "d2f_couplings"
COUPLINGS_TYPE = "D2F_COUPLINGS"
NO_FOLDERS = "(none yet)"
CouplingsIO = io.Custom(COUPLINGS_TYPE)
PAIRS_GPUS_TOOLTIP = ("Make the pairs on this many local GPUs at once: this ComfyUI is the first, it starts one worker "
                      "process per other GPU (each loads its own copy of the model from its file); the chunks are dealt "
                      "round-robin, and the pairs are the same tensors whatever the count. all: every GPU. Without a GPU, "
                      "a count above 1 starts CPU processes. The stop button stops them all.")


def _first(value):
    return value[0] if isinstance(value, list) else value


# --- folders -----------------------------------------------------------------------------------------
def couplings_root() -> str:
    return os.path.join(folder_paths.get_output_directory(), COUPLINGS_DIR)


def couplings_folder(name: str) -> str:
    """output/d2f_couplings/<name>, for writing: ``name`` is checked by the pack's one rule for the names it
    creates (plain names, '/'-separated sub-folders allowed), so it never leaves output/d2f_couplings."""
    return os.path.join(couplings_root(), folder_name(name, f"name (a folder inside output/{COUPLINGS_DIR}/)"))


def list_couplings_folders() -> list[str]:
    """Names (relative to output/d2f_couplings, '/'-separated) of the folders that hold couplings."""
    root = couplings_root()
    found = []
    if os.path.isdir(root):
        for dirpath, dirnames, _ in os.walk(root):
            dirnames.sort()
            if dirpath != root and is_couplings_folder(dirpath):
                found.append(os.path.relpath(dirpath, root).replace(os.sep, "/"))
                dirnames.clear()  # a couplings folder has no nested couplings
    return sorted(found)


def _folder_fingerprint(folder: str) -> str:
    """Pairs on disk and the newest file time: changes whenever a run adds chunks."""
    try:
        mtime = max((os.path.getmtime(os.path.join(folder, f)) for f in os.listdir(folder)), default=0.0)
    except OSError:
        mtime = 0.0
    return f"{folder}:{folder_pair_count(folder)}:{mtime}"


# --- prompts -----------------------------------------------------------------------------------------
def prompt_entries(positive: list) -> list:
    """One [cross_attn (1, T, D), extras] entry per prompt; refuses what training cannot reproduce."""
    entries = []
    for i, conditioning in enumerate(positive):
        items = _conditioning_entries(conditioning)
        if len(items) != 1:
            raise ValueError(f"prompt {i} has {len(items)} conditioning entries (ConditioningCombine / area prompts). "
                             "D2FReflowPairs needs one entry per prompt, because training can only reproduce the "
                             "UNet inputs of a single entry: use ConditioningConcat, or give the prompts as a list.")
        cross_attn = items[0][0]
        if cross_attn.ndim != 3 or cross_attn.shape[0] != 1:
            raise ValueError(f"prompt {i}: expected one text embedding (1, tokens, dim), got {tuple(cross_attn.shape)}")
        entries.append(items[0])
    if not entries:
        raise ValueError("connect a positive prompt (one CONDITIONING, or a list of them)")
    return entries


def prompt_table(model, entries: list, latent_shape) -> dict[str, torch.Tensor]:
    """The UNet keyword tensors of each prompt (the host's own extra_conds), stacked (P, …) in float32."""
    return stack_conditioning([unet_kwargs(model, entry, latent_shape) for entry in entries])


# --- the node ----------------------------------------------------------------------------------------
class D2FReflowPairs(io.ComfyNode):
    """Reflow couplings from the model's own flow ODE.

    Pair i: ε_i ~ N(0, I) seeded by (seed, i) only; prompt i mod P; Euler on the bridged model's flow ODE
    dx/dσ = (x - x̂0_cfg(x, σ))/σ over ``flow_sigmas(steps, σ_max, shift)`` with classifier-free guidance
    (the host's CFGGuider and the D2FEulerFlowSampler sampler, i.e. exactly what stock sampling on a
    D2FFlowPatch'ed model does), from the host's max-denoise start; stored: (ε_i, x̂0_i = process_in(output)).

    What the coupling means, given σ_max < 1: an ε/v checkpoint's schedule ends at σ_max = φ(ς_max) < 1
    (SD: 0.936), so the ODE cannot start at pure noise σ = 1. The host's txt2img start at σ_max is
    x = D(σ_max)·ε with D = sqrt((1-σ)² + σ²), the flow image of the native VE start sqrt(1+ς²)·ε (a unit
    Gaussian in the network's VP coordinates), so ε here is exactly the noise the native sampler would use
    and x̂0 is the model's (CFG) sample from it. Training on x = (1-σ)·x̂0 + σ·ε, target ε - x̂0, over
    σ ∈ [σ_min, σ_max] fits the straight line through ε and x̂0; at σ_max that line passes σ_max·ε +
    (1-σ_max)·x̂0, within (D - σ_max)·|ε| + (1-σ_max)·|x̂0| (≈ 0.002·|ε| + 0.064·|x̂0| on SD) of the
    sampler's start, the same gap every flow-patched sampler run has at its first step.
    """

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="D2FReflowPairs",
            display_name="Diff2Flow Reflow Pairs",
            category=CATEGORY,
            description=(
                "Makes Reflow training pairs: for each seeded noise ε, solves the model's own flow ODE (Euler flow "
                "sampler, with CFG and the prompt) to its sample x̂0 and stores (ε, x̂0, prompt) under "
                "output/d2f_couplings/<name>. Training D2FTrain on these straightens the sampling paths, so 2–4 "
                "steps work. Chunks are saved as they are made: stopping keeps them, and running again with the "
                "same inputs continues where it stopped."),
            is_input_list=True,
            inputs=[
                io.Model.Input("model", tooltip="The ε- or v-prediction model whose ODE is distilled (flow-patched or not; "
                                                "LoRAs applied are part of it)."),
                io.Conditioning.Input("positive", tooltip="The prompt, or a list of prompts: pair i uses prompt i mod "
                                                          "(number of prompts)."),
                io.Conditioning.Input("negative", tooltip="The negative prompt for classifier-free guidance (one)."),
                io.Int.Input("count", default=512, min=1, max=10_000_000,
                             tooltip="Number of pairs. Raising it later with the same inputs adds pairs to the folder."),
                io.Int.Input("width", default=512, min=16, max=16384, step=8, tooltip="Image width in pixels."),
                io.Int.Input("height", default=512, min=16, max=16384, step=8, tooltip="Image height in pixels."),
                io.Int.Input("steps", default=25, min=1, max=1000,
                             tooltip="Euler steps of the ODE solve that defines each pair's x̂0 (more: closer to the exact ODE)."),
                io.Float.Input("cfg", default=7.0, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="Classifier-free guidance scale the pairs are sampled with (use the one you will sample with)."),
                io.Int.Input("seed", default=0, min=0, max=0xffffffffffffffff,
                             tooltip="Noise seed: pair i's noise depends on (seed, i) only, so runs are resumable and reproducible."),
                io.Int.Input("batch_size", default=8, min=1, max=256,
                             tooltip="Pairs per sampler call and per saved chunk (speed/memory only; a stop loses at most one chunk)."),
                io.Float.Input("shift", default=1.0, min=0.01, max=100.0, step=0.01,
                               tooltip="Time shift of the solver grid (as D2FFlowScheduler): 1 = uniform in flow time."),
                io.String.Input("name", default="reflow",
                                tooltip="Folder under output/d2f_couplings/: letters, digits, '-', '_', '.' "
                                        "(sub-folders separated by '/'; no absolute paths, no '..'). An existing "
                                        "folder made with the same settings is continued; one made with other settings is "
                                        "refused. Files are written whole or not at all, never replacing one."),
                io.Combo.Input("gpus", options=gpu_choices(), default="1", advanced=True, optional=True,
                               tooltip=PAIRS_GPUS_TOOLTIP),
            ],
            outputs=[
                CouplingsIO.Output(display_name="couplings", tooltip="The (noise, sample, prompt) pairs, for D2FTrain's couplings input."),
                io.Int.Output(display_name="count", tooltip="Pairs returned (fewer than asked when stopped)."),
            ],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def fingerprint_inputs(cls, **kwargs):
        # Re-run whenever the folder changed (e.g. a stopped run left it incomplete): the run then resumes.
        try:
            return _folder_fingerprint(couplings_folder(_first(kwargs.get("name"))))
        except (ValueError, TypeError):
            return ""

    @classmethod
    def execute(cls, model, positive, negative, **options) -> io.NodeOutput:
        model, negative = _first(model), _first(negative)
        opts = {k: _first(v) for k, v in options.items()}
        count, steps, cfg, seed = int(opts["count"]), int(opts["steps"]), float(opts["cfg"]), int(opts["seed"])
        batch_size, shift = int(opts["batch_size"]), float(opts["shift"])
        folder = couplings_folder(opts["name"])

        # Everything that can be wrong with the inputs fails here, before any sampling.
        world_size = world_size_for("D2FReflowPairs", opts.get("gpus"), model)
        if world_size > 1 and os.path.isdir(folder) and folder_pair_count(folder) >= count:
            world_size = 1  # nothing left to make: no worker to start (the folder's identity is checked below)
        sampling = bridge_sampling_of(model)
        latent_format = model.get_model_object("latent_format")
        ratio = int(getattr(latent_format, "spacial_downscale_ratio", 8) or 8)
        shape = (int(latent_format.latent_channels), int(opts["height"]) // ratio, int(opts["width"]) // ratio)
        if negative is None:
            raise ValueError("connect a negative prompt (CLIP Text Encode of '' works)")
        entries = prompt_entries([p for p in (positive or []) if p is not None])
        meta = {
            "model": model_fingerprint(model), "model_type": type(model.model).__name__,
            "prediction": sampling.prediction, "label_offset": float(sampling.bridge.label_offset),
            "sigma_max": float(sampling.sigma_max), "latent_format": type(latent_format).__name__,
            "shape": list(shape), "sampler": "euler_flow", "steps": steps, "cfg": cfg, "shift": shift, "seed": seed,
            "prompts": [conditioning_digest([e]) for e in entries], "negative": conditioning_digest(negative),
            "pack_version": PACK_VERSION, "batch_size": batch_size,
        }
        job = PairsJob(folder=folder, meta=meta, table=prompt_table(model, entries, shape), entries=entries,
                       negative=negative, cfg=cfg, sigmas=flow_sigmas(steps, float(sampling.sigma_max), shift),
                       seed=seed, count=count, batch_size=batch_size, shape=shape, bridge=sampling.bridge,
                       family=sampling.family, schedule_source=sampling.schedule_source,
                       model_patches=_patches_for_workers(model) if world_size > 1 else {})
        with local_world("D2FReflowPairs", world_size, model, pairs_worker, job=job) as world:
            world.kept = lambda: (f"Kept: {folder_pair_count(folder)} pairs in '{folder}'; run D2FReflowPairs again "
                                  "with the same inputs to continue.")
            made = make_pairs(_flow_model(model, job, sampling), job, node_id=cls.hidden.unique_id)
        # generate's last collective came after every rank's last chunk: the folder holds every rank's pairs
        couplings = load_couplings(folder, limit=min(count, made))
        return io.NodeOutput(couplings, len(couplings), ui={"d2f_couplings": [couplings_readout(couplings)]})


class D2FLoadReflowPairs(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        folders = list_couplings_folders()
        return io.Schema(
            node_id="D2FLoadReflowPairs",
            display_name="Diff2Flow Load Reflow Pairs",
            category=CATEGORY,
            description="Loads Reflow pairs made earlier by D2FReflowPairs (a folder under output/d2f_couplings/), "
                        "for D2FTrain's couplings input. After it ran, the node shows how the pairs were made (model, "
                        "prediction, size, solver steps, CFG, seed, prompts).",
            inputs=[
                io.Combo.Input("name", options=folders or [NO_FOLDERS], default=(folders or [NO_FOLDERS])[0],
                               tooltip="A couplings folder under output/d2f_couplings/ (refresh the page to list new ones)."),
                io.String.Input("path", default="", optional=True, advanced=True,
                                tooltip="Instead of name: a folder path, absolute or relative to output/d2f_couplings/."),
                io.Int.Input("limit", default=0, min=0, max=10_000_000, optional=True, advanced=True,
                             tooltip="Load only the first N pairs (0: all)."),
            ],
            outputs=[
                CouplingsIO.Output(display_name="couplings", tooltip="The stored (noise, sample, prompt) pairs."),
                io.Int.Output(display_name="count", tooltip="Pairs loaded."),
            ],
        )

    @staticmethod
    def _folder(name: str, path: str | None) -> str:
        path = (path or "").strip()
        if path:
            return path if os.path.isabs(path) else os.path.join(couplings_root(), path)
        if not name or name == NO_FOLDERS:
            raise ValueError(f"no couplings in output/{COUPLINGS_DIR}/ yet: make them with D2FReflowPairs (then refresh), "
                             "or type a folder in path")
        # reading: any folder listed under output/d2f_couplings (also ones named before the naming rule)
        return resolve_inside(couplings_root(), name, "name")

    @classmethod
    def fingerprint_inputs(cls, name, path=None, limit=0):
        try:
            return _folder_fingerprint(cls._folder(name, path)) + f":{limit}"
        except ValueError:
            return ""

    @classmethod
    def execute(cls, name, path=None, limit=0) -> io.NodeOutput:
        folder = cls._folder(name, path)
        try:
            couplings = load_couplings(folder, limit=limit or None)
        except CouplingsError as exc:
            raise ValueError(f"D2FLoadReflowPairs: {exc}") from None
        return io.NodeOutput(couplings, len(couplings), ui={"d2f_couplings": [couplings_readout(couplings)]})


def couplings_readout(couplings: Couplings) -> dict:
    """What the web extension shows on D2FReflowPairs / D2FLoadReflowPairs after they ran: how the pairs were made
    (the folder's recorded settings), so a user sees which model, prompts and solver a set of pairs distils."""
    meta = couplings.meta or {}
    channels, height, width = (list(meta.get("shape") or couplings.shape[1:]) + [0, 0, 0])[:3]
    return {"pairs": len(couplings), "folder": os.path.basename(couplings.folder or ""),
            "model_type": meta.get("model_type"), "prediction": meta.get("prediction"),
            "model": meta.get("model"), "latent": [channels, height, width], "sampler": meta.get("sampler"),
            "steps": meta.get("steps"), "cfg": meta.get("cfg"), "shift": meta.get("shift"), "seed": meta.get("seed"),
            "prompts": couplings.num_prompts, "pack_version": meta.get("pack_version")}


REFLOW_NODES = [D2FReflowPairs, D2FLoadReflowPairs]

__all__ = ["REFLOW_NODES", "COUPLINGS_TYPE", "CouplingsIO", "Couplings", "couplings_folder", "couplings_root"]
