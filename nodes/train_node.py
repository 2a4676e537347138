"""D2FTrain: Diff2Flow fine-tuning (LoRA or full) inside ComfyUI."""

from __future__ import annotations

import contextlib
import gc
import logging

import comfy.model_management as mm
import comfy.sd
import torch
from comfy_api.latest import io

from ..d2f_core.training.adapters import FullAdapters, LoraAdapters, attention_only
from ..d2f_core.training.checkpointing import blocks_by_class_name, checkpointed
from ..d2f_core.training.data import LatentBuckets
from ..d2f_core.training.distributed import (DistributedContext, full_tensor, gather_optimizer_state, local,
                                             shard_optimizer_state)
from ..d2f_core.training.ema import EMA, split_ema, with_ema
from ..d2f_core.training.compilation import CompiledNet
from ..d2f_core.training.graphs import GraphedNet
from ..d2f_core.training.snapshots import HostSnapshots
from ..d2f_core.training.precision import cast_for_training
from ..d2f_core.training.options import SCHEDULED_SAMPLING_DEFAULTS, AdvancedOptions, scheduled_sampling_flat
from ..d2f_core.training.scheduled_sampling import ScheduledSampling
from ..d2f_core.flow.samplers import flow_sigmas, sample_euler_flow
from ..d2f_core.storage.files import plain_name
from ..d2f_core.storage.metadata import file_metadata
from ..d2f_core.storage.state import (architecture_fingerprint, read_state, read_state_meta, resume_mismatches,
                              save_state)
from ..d2f_core.training.trainer import NonFiniteLossError, TrainConfig, Trainer
from .reflow_nodes import CouplingsIO
from .advanced_node import AdvancedOptionsIO
from .ema_node import EMAOptionsIO
from .scheduled_sampling_node import ScheduledSamplingIO
from .file_metadata import describe_training
from . import memory_check
from .local_workers import (GPUS_TOOLTIP, gpu_choices, local_world, train_inputs_for_workers, train_worker,
                            world_size_for)
from .run_files import WHERE, RunFiles, resume_state_path
from .train_inputs import assemble_buckets, bridge_sampling_of, coupling_buckets_for, empty_prompt_kwargs
from .ui_events import TrainingReporter
from .validation_node import ValidationIO, ValidationRun, plan_validation

CATEGORY = "Diff2Flow"
CHECKPOINT_BLOCKS = ("ResBlock", "SpatialTransformer", "PixArtMSBlock", "HunYuanDiTBlock")  # UNets; DiTs
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def _first(value):
    return value[0] if isinstance(value, list) else value


def merged_options(opts: dict, advanced: AdvancedOptions | None, scheduled_sampling: ScheduledSampling | None) -> dict:
    """D2FTrain's own widget values plus its option nodes' settings, in one flat dict under the settings' names
    (``lora_targets``, ``ss_probability``, …): what the pre-flight, the run, its workers and its files read.
    An unconnected option node gives its defaults, which are what D2FTrain always used: the run is the same.

    A setting that moved to an option node refuses to come in flat (only a Python caller can send one; the
    executor drops inputs a node does not define): silently training with the default instead would be worse."""
    moved = sorted(set(opts) & (set(AdvancedOptions.names()) | set(scheduled_sampling_flat(SCHEDULED_SAMPLING_DEFAULTS))))
    if moved:
        raise TypeError(f"D2FTrain has no input {', '.join(moved)} any more: these settings come from the "
                        "D2FTrainAdvanced / D2FScheduledSampling nodes (its advanced / scheduled_sampling inputs)")
    merged = dict(opts)
    merged.update((advanced or AdvancedOptions()).validate().flat())
    ss = scheduled_sampling or SCHEDULED_SAMPLING_DEFAULTS
    ss.validate()
    merged.update(scheduled_sampling_flat(ss))
    return merged


def run_identity(model, opts: dict) -> dict:
    """What a resumable state must share with the run that resumes it (``resume_mismatches``), recorded in
    every state this run writes. Read from the model's key names and shapes only: no device work."""
    return {"mode": opts["mode"], "rank": int(opts["rank"]), "alpha": float(opts["alpha"] or opts["rank"]),
            "lora_targets": opts.get("lora_targets", "attention"),
            "model": architecture_fingerprint(model.model.diffusion_model.state_dict())}


def check_resume(path: str, identity: dict) -> None:
    """Refuse a state that does not fit this run, from its header alone (before the model is loaded)."""
    _, stored = read_state_meta(path)
    diffs = resume_mismatches(stored, identity)
    if diffs:
        raise ValueError(f"resume_from '{path}' does not fit this run: {'; '.join(diffs)}. Set these inputs back "
                         "to what the state was trained with (or load the same model), or clear resume_from to "
                         "start a new run.")


class D2FTrain(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="D2FTrain",
            display_name="Diff2Flow Train (LoRA / full)",
            category=CATEGORY,
            description=(
                "Fine-tunes an ε/v checkpoint toward flow matching with the Diff2Flow objective "
                "‖v̂ - (ε - x0)‖². Returns the trained, flow-patched model, a LoRA that the core LoRA "
                "loaders read and SaveLoRA writes, and the loss history. Never changes the input model. With Reflow "
                "couplings (D2FReflowPairs) it trains on x = (1-σ)·x̂0 + σ·ε' along each pair's straight line through "
                "the state its sampler started from (ε' = (D(σ_max)·ε - (1-σ_max)·x̂0)/σ_max): "
                "straighter paths, good 2–4-step samples. The everyday settings are on the node; the rest come from "
                "small option nodes on its optional inputs: D2FTrainAdvanced, D2FScheduledSampling, D2FEMA."),
            is_input_list=True,
            inputs=[
                io.Model.Input("model", tooltip="The ε- or v-prediction model to fine-tune (flow-patched or not)."),
                io.Latent.Input("latents", optional=True,
                                tooltip="Training latents, e.g. from MakeTrainingDataset or ResolutionBucket "
                                        "(may stay unconnected when couplings are given)."),
                io.Conditioning.Input("positive", optional=True,
                                      tooltip="One caption conditioning per latent (or one for all); not needed for couplings."),
                io.Combo.Input("mode", options=["lora", "full"], default="lora",
                               tooltip="lora: small adapter (fits 12 GB). full: every weight, returned as weight "
                                       "differences (needs far more memory; use a ~10× lower learning rate)."),
                io.Int.Input("steps", default=500, min=1, max=1_000_000, tooltip="Total optimizer steps (a resumed run continues up to this)."),
                io.Int.Input("batch_size", default=1, min=1, max=256,
                             tooltip="Images per micro-batch of each process. Trained on several processes (gpus, d2f "
                                     "run --nproc-per-node / torchrun), an optimizer step sees batch_size × processes "
                                     "× grad_accumulation images."),
                io.Int.Input("grad_accumulation", default=1, min=1, max=1024,
                             tooltip="Micro-batches per optimizer step: a larger effective batch without more memory."),
                io.Float.Input("learning_rate", default=1e-4, min=1e-8, max=1.0, step=1e-6,
                               tooltip="Peak learning rate. LoRA: 1e-4; full fine-tune: 1e-5."),
                io.Int.Input("rank", default=16, min=1, max=512, tooltip="LoRA rank (lora mode)."),
                io.Combo.Input("gradient_checkpointing", options=list(memory_check.CHECKPOINTING_CHOICES),
                               default="auto",
                               tooltip="Recompute activations in backward: much less memory, ~30% slower. auto: on "
                                       "only when the run's estimated memory without it does not fit the GPU (a run "
                                       "that cannot fit even with it stops before loading, saying what to lower)."),
                io.Int.Input("seed", default=0, min=0, max=2 ** 31 - 1, tooltip="Seed for noise, times and batches."),
                io.Int.Input("save_every", default=0, min=0, max=1_000_000,
                             tooltip="Also save the LoRA and the resumable state every N steps (0: only at the end). "
                                     "The end of every run saves too (finished, stopped, or reset after a NaN "
                                     f"loss), once per step: {WHERE}."),
                io.Int.Input("preview_every", default=0, min=0, max=1_000_000,
                             tooltip="Show a flow-Euler sample on the node every N steps (0: never)."),
                io.String.Input("run_name", default="d2f_lora",
                                tooltip="Names this run's files: letters, digits, '-', '_', '.' (no folders). Each run "
                                        f"gets a new number NNNNN, so no run replaces another's files: {WHERE}."),
                io.String.Input("resume_from", default="", optional=True,
                                tooltip="Continue an earlier run from its state, e.g. d2f_states/d2f_lora_00001/"
                                        "state.safetensors (relative to output/, or an absolute path inside it). It "
                                        "needs the same model, mode, rank, alpha and lora_targets (the last two: "
                                        "D2FTrainAdvanced). The resumed run "
                                        "writes under a new number and leaves that state as it is."),
                io.Combo.Input("gpus", options=gpu_choices(), default="1", advanced=True, optional=True,
                               tooltip=GPUS_TOOLTIP),
                io.Conditioning.Input("empty_conditioning", optional=True,
                                      tooltip="The empty prompt's conditioning, for caption dropout and CFG previews."),
                CouplingsIO.Input("couplings", optional=True,
                                  tooltip="Reflow pairs from D2FReflowPairs / D2FLoadReflowPairs: trains on each pair's "
                                          "sample and noise (Reflow). Latents/positive, if also given, are mixed in."),
                EMAOptionsIO.Input("ema", optional=True,
                                   tooltip="From D2FEMA: keep an EMA of the weights; previews, saved LoRAs and the outputs "
                                           "use it. Resuming a state saved without EMA starts it from the resumed weights."),
                AdvancedOptionsIO.Input("advanced", optional=True,
                                        tooltip="From D2FTrainAdvanced: LoRA targets and alpha, loss, time sampling, "
                                                "learning-rate schedule, optimizer, precision, CUDA graphs, compile, "
                                                "caption dropout. Unconnected: that node's defaults."),
                ScheduledSamplingIO.Input("scheduled_sampling", optional=True,
                                          tooltip="From D2FScheduledSampling: train some samples on the states the "
                                                  "model's own sampler reaches (exposure bias). Unconnected: off."),
                ValidationIO.Input("validation", optional=True,
                                   tooltip="From D2FValidation: every N steps and at the end, a held-out loss (second "
                                           "chart series), a fixed-seed sample grid saved in the run's folder and, "
                                           "for Reflow, straightness. Its time is not counted in samples/s."),
            ],
            outputs=[
                io.Model.Output(display_name="model", tooltip="The trained model, flow-patched (non-destructive)."),
                io.Custom("LORA_MODEL").Output(display_name="lora", tooltip="Trained weights for SaveLoRA / LoraModelLoader."),
                io.Custom("LOSS_MAP").Output(display_name="loss", tooltip="Loss per step, for the core Plot Loss Graph node."),
                io.Int.Output(display_name="steps", tooltip="Optimizer steps trained in total."),
            ],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def validate_inputs(cls, gradient_checkpointing=None):
        return memory_check.validate_checkpointing(gradient_checkpointing)  # also a saved workflow's true/false

    @classmethod
    def execute(cls, model, latents=None, positive=None, empty_conditioning=None, resume_from=None, couplings=None,
                advanced=None, scheduled_sampling=None, **options) -> io.NodeOutput:
        model = _first(model)
        opts = merged_options({k: _first(v) for k, v in options.items()}, _first(advanced), _first(scheduled_sampling))
        resume_from = (_first(resume_from) or "").strip()
        # Names and files first: nothing below may start on a name that writes elsewhere or a state that won't fit.
        run_name = plain_name(opts["run_name"], "run_name")
        world_size = world_size_for("D2FTrain", opts.get("gpus"), model)  # refuses gpus > 1 it cannot start
        identity = run_identity(model, opts)
        resume_path = None
        if resume_from:
            resume_path = resume_state_path(resume_from)
            check_resume(resume_path, identity)
        config = TrainConfig(
            steps=opts["steps"], batch_size=opts["batch_size"], grad_accumulation=opts["grad_accumulation"],
            learning_rate=opts["learning_rate"], warmup_steps=opts["warmup_steps"], lr_schedule=opts["lr_schedule"],
            optimizer=opts["optimizer"], objective=opts["loss"], time_sampling=opts["time_sampling"],
            time_shift=opts["time_shift"], caption_dropout=opts["caption_dropout"], seed=opts["seed"],
            sync_every=1 if mm.get_torch_device().type == "cpu" else 10,
            scheduled_sampling=ScheduledSampling(
                probability=opts["ss_probability"], ramp=opts["ss_ramp"], max_offset=opts["ss_max_offset"],
                strategy=opts["ss_strategy"], solver_steps=opts["ss_solver_steps"]))
        config.validate()

        # Everything that can be wrong with the inputs fails here, before any GPU work.
        sampling = bridge_sampling_of(model)
        couplings = [c for c in (couplings or []) if c is not None]
        has_images = any(v is not None for v in (latents or []) + (positive or []))
        buckets = assemble_buckets(model, latents, positive) if has_images or not couplings else []
        if couplings:
            buckets += coupling_buckets_for(model, couplings)
        buckets, opts["validation"] = plan_validation(model, opts.get("validation"), buckets)  # may hold some out
        empty = empty_prompt_kwargs(model, _first(empty_conditioning), buckets[0][0].shape[1:])
        if config.caption_dropout > 0 and empty is None:
            raise ValueError("caption_dropout needs the empty prompt: connect empty_conditioning (CLIP Text Encode of '').")
        # Memory pre-flight: decides gradient_checkpointing auto, refuses a run that cannot fit (before any load).
        memory = memory_check.check(model, buckets, opts, DTYPES[opts["training_dtype"]], CHECKPOINT_BLOCKS, world_size)
        opts["gradient_checkpointing"] = memory.checkpointing
        requested, opts["sharding"] = opts.get("sharding"), memory.sharding  # every process gets the decided one
        if memory.sharding == "fsdp" and opts["validation"] is not None:
            # Rank 0 validates alone, but a sharded net's every forward is a collective of all ranks.
            raise ValueError("D2FTrain: D2FValidation does not work with a sharded (FSDP) full fine-tune yet"
                             + (" (sharding auto chose FSDP: the replicated run does not fit one GPU)"
                                if requested == "auto" else "")
                             + ". Disconnect D2FValidation, or set D2FTrainAdvanced's sharding to ddp where the "
                             "replicated run fits.")

        inputs = dict(sampling=sampling, buckets=buckets, empty=empty, config=config, opts=opts,
                      node_id=cls.hidden.unique_id, run_name=run_name, identity=identity)
        run = world = None
        try:
            with torch.inference_mode(False), local_world("D2FTrain", world_size, model, train_worker,
                                                          **train_inputs_for_workers(inputs, resume_path)) as world:
                run = TrainingRun(model, **inputs)
                world.kept = lambda: run.files.kept() if run.files is not None else ""
                run.memory_required = memory.memory_required
                return run.execute(resume_path)
        finally:
            # The run's closures (its net, its snapshot function) hold it in reference cycles, and with it the
            # trainer, the optimizer state and the CUDA graphs' private pools: free them now, not at some later
            # collection while the next node samples.
            run = world = None
            gc.collect()
            mm.soft_empty_cache()


def fast_paths(device_type: str, opts: dict, ddp: bool) -> tuple[bool, bool, str | None]:
    """(compile, CUDA graphs, why a fast path that was asked for is off) for a run on ``device_type``.

    Graphs replay only where ``bench/check_graphs.py`` showed graphed training within eager training's own
    run-to-run spread: LoRA, checkpointing off, not compiled, one process (``bench/results/graphs_check_h200_sgd.md``).
    Elsewhere the step runs eagerly, rather than possibly wrong:

    * checkpointing on: a checkpointed block recomputed inside the backward's capture met RNG-state tensors
      (flash attention's philox seed/offset) recorded differently in the forward: a CheckpointError (H100, H200);
    * full mode (checkpointing off) and compile: not yet checked at the weight level;
    * DDP (compile too): its gradient hooks fire inside the backward; neither a graph replay nor a compiled
      backward has been checked to keep its bucket order and averaging intact.
    """
    compile_ = bool(opts.get("compile", False))
    graphs = device_type == "cuda" and bool(opts.get("cuda_graphs", True))
    if ddp and (compile_ or graphs):
        return False, False, ("CUDA graphs and torch.compile are off for a run on several processes (DDP); the step "
                              "runs eagerly.")
    if not graphs:
        return compile_, False, None
    unchecked = [why for why, on in (("gradient checkpointing on (its recomputation inside a capture fails)",
                                      bool(opts.get("gradient_checkpointing"))),
                                     ("mode full (not yet checked against eager training)", opts.get("mode") == "full"),
                                     ("compile on (not yet checked against eager training)", compile_)) if on]
    if unchecked:
        return compile_, False, f"CUDA graphs are off with {'; '.join(unchecked)}: the step runs without them."
    return compile_, True, None

@contextlib.contextmanager
def _stops_at_read_outs(sharded: bool):
    """A sharded (FSDP) run takes the stop button at its loss read-outs only (``should_stop``, agreed on by every
    rank): ComfyUI's layers raise the stop from inside the network (``comfy.ops.run_every_op``), which would leave
    this rank out of step with the others' weight gathers (the Trainer then fails the run rather than continue out
    of step). ComfyUI runs one prompt at a time, so nothing else runs these layers meanwhile; restored on exit."""
    import comfy.ops

    check = getattr(comfy.ops, "run_every_op", None)
    if not sharded or check is None:
        yield
        return
    comfy.ops.run_every_op = lambda: None
    try:
        yield
    finally:
        comfy.ops.run_every_op = check


class TrainingRun:
    """One training run on a private copy of the model (the loader's model is never touched).

    In a world of several processes (``d2f run --nproc-per-node``, torchrun) every rank runs it with the same
    inputs on its own device and trains its share of each batch; rank 0 alone reserves the run's number,
    writes its files and reports to the UI (DESIGN §7)."""

    def __init__(self, model, sampling, buckets, empty, config: TrainConfig, opts: dict, node_id, run_name: str,
                 identity: dict):
        self.model, self.sampling, self.bridge = model, sampling, sampling.bridge
        self.buckets, self.empty, self.config, self.opts = buckets, empty, config, opts
        self.mode = opts["mode"]
        self.dtype = DTYPES[opts["training_dtype"]]
        self.run_name, self.identity = run_name, identity
        self.reporter = TrainingReporter(node_id, config.steps)
        self.dist = DistributedContext.from_environment(device=mm.get_torch_device())
        self.files: RunFiles | None = None  # rank 0's
        self.resumed_from: str | None = None
        self.ema_options = opts.get("ema")  # D2FEMA's options, or None
        self.ema: EMA | None = None
        self.validation: ValidationRun | None = None  # rank 0's, when D2FValidation is connected
        self.sharded = False  # set by _train: a full fine-tune sharded over the ranks (FSDP)

    # --- files ------------------------------------------------------------------------------------
    def save(self, step: int) -> str | None:
        """The LoRA of ``step`` and the run's resumable state, atomically (see ``run_files``). Sharded (FSDP): every
        rank calls it and gathers the whole tensors with the others (collectives, in one order); rank 0 writes."""
        ema = self.ema
        if self.sharded:
            with self.ema_weights():
                lora = self.adapters.export()
            weights, optimizer = self.adapters.state_tensors(), gather_optimizer_state(self.trainer.optimizer)
            emas = {k: full_tensor(v) for k, v in ema.named_tensors().items()} if ema else None
            if not self.dist.is_main:
                return None
        else:
            lora = None
            weights, optimizer = None, self.trainer.optimizer
            emas = ema.named_tensors() if ema else None
        meta = dict(self.identity, run_name=self.files.name, resumed_from=self.resumed_from)
        described = describe_training(self.model, self.bridge, self.buckets, self.config,
                                      dict(self.opts, processes=self.dist.world_size), self.files.name,
                                      ema=self.ema_options.info() if ema else None)

        def write_state(path):  # the training weights (to resume from) and the EMA beside them
            save_state(path, weights if weights is not None else self.adapters.state_tensors(), optimizer, step, meta,
                       ema=emas, ema_info=ema.info() if ema else None,
                       metadata=file_metadata(described, "state", step))
        try:
            if lora is None:
                with self.ema_weights():
                    lora = self.adapters.export()
            path = self.files.save(step, lora, write_state,
                                   file_metadata(described, self.mode, step, ema_weights=ema is not None))
        except OSError as exc:
            raise RuntimeError(f"D2FTrain could not save step {step}: {exc}. {self.files.kept()}") from exc
        self.reporter.saved(step, path)
        return path

    # --- setup ------------------------------------------------------------------------------------
    def _private_model(self):
        try:
            private = self.model.clone(force_deepcopy=True)
        except RuntimeError as exc:
            raise ValueError("D2FTrain needs a model that comes from a loader node (Load Checkpoint / Load "
                             f"Diffusion Model), so it can train a private copy: {exc}") from exc
        # memory_required: the host unloads other models until the whole run (not only the weights) fits.
        mm.load_models_gpu([private], memory_required=getattr(self, "memory_required", 0), force_full_load=True)
        return private

    def _adapters(self, unet, device):
        if self.mode == "lora":
            alpha = self.opts["alpha"] or float(self.opts["rank"])
            include = attention_only if self.opts.get("lora_targets", "attention") == "attention" else None
            return LoraAdapters(unet, rank=self.opts["rank"], alpha=alpha, dtype=torch.float32, device=device,
                                include=include, key_prefix="diffusion_model.", seed=self.config.seed)
        return FullAdapters(unet, dtype=torch.float32, device=device, key_prefix="diffusion_model.")

    def ema_weights(self):
        """The EMA swapped into the trained tensors for the block (previews, exports, the returned model); without
        an EMA, the training weights as they are."""
        return self.ema.applied(backup_device="cpu") if self.ema is not None else contextlib.nullcontext()

    def preview(self, step: int):
        with self.ema_weights():
            self._preview(step)

    def _preview(self, step: int):
        """A flow-Euler sample with the weights trained so far, shown on the node."""
        x0_data, conds = self.data.latents[0], self.data.conds[0]
        cond = {k: v[:1] for k, v in conds.items()}
        uncond = self.data.empty[0] if self.data.empty is not None else None
        g = torch.Generator(device=self.device).manual_seed(self.config.seed)
        sigmas = flow_sigmas(16, self.bridge.sigma_max).to(self.device)
        noise = torch.randn((1,) + tuple(x0_data.shape[1:]), generator=g, device=self.device)

        def denoise(x, sigma):
            def x0_for(c):
                out = self.net(self.bridge.model_input(sigma, x).to(self.dtype), self.bridge.label(sigma).float(), **c)
                return self.bridge.denoised(sigma, out.float(), x)
            x0 = x0_for(cond)
            if uncond is not None:
                x0_u = x0_for({k: v[None] for k, v in uncond.items()})
                x0 = x0_u + 5.0 * (x0 - x0_u)
            return x0

        with torch.no_grad():
            x0 = sample_euler_flow(denoise, self.bridge.start_state(sigmas[:1], noise, torch.zeros_like(noise), True), sigmas)
        if self.dist.is_main:  # sharded (FSDP): every rank ran the sample with rank 0 (its forwards gather weights)
            self.reporter.preview(step, x0, self.model.get_model_object("latent_format"), self.device)

    # --- the run ----------------------------------------------------------------------------------
    def execute(self, resume_path: str | None) -> io.NodeOutput:
        self._reserve_files()  # before the model load: an unwritable output folder fails early
        try:
            private = self._private_model()
            try:
                return self._train(private, resume_path)
            finally:
                mm.unload_model_and_clones(private)
                mm.soft_empty_cache()
        finally:
            if self.files is not None:
                self.files.release()  # gives the number back if nothing was saved

    def _reserve_files(self) -> None:
        """Rank 0 reserves the run's number; the other ranks learn whether it could, so none trains alone."""
        try:
            if self.dist.is_main:
                self.files = RunFiles(self.run_name)
        finally:
            name = self.dist.broadcast(self.files.name if self.files is not None else None)
        if name is None:
            raise RuntimeError("D2FTrain: rank 0 could not reserve this run's files (its error says why)")

    def _train(self, private, resume_path: str | None) -> io.NodeOutput:
        c = self.config
        self.device = device = private.load_device
        unet = private.model.diffusion_model
        unet.requires_grad_(False)
        channels_last = device.type == "cuda"
        cast_for_training(unet, self.dtype, channels_last)  # the private copy only
        self.data = LatentBuckets(self.buckets, device=device, dtype=torch.float32, cond_dtype=self.dtype,
                                  empty_cond=self.empty)
        self.sharded = self.mode == "full" and self.opts.get("sharding") == "fsdp" and self.dist.distributed
        sharded_root = None
        if self.sharded:
            # Masters made on the CPU and moved to the device shard by shard (no rank ever holds them all there);
            # the FSDP units are the checkpointing blocks (ResBlocks, transformer blocks), then the UNet itself.
            self.adapters = adapters = FullAdapters(unet, dtype=torch.float32, device="cpu",
                                                    key_prefix="diffusion_model.")
            sharded_root = adapters.shard(self.dist, blocks_by_class_name(unet, CHECKPOINT_BLOCKS), self.dtype)
            logging.info(f"D2FTrain: full fine-tune sharded over {self.dist.world_size} processes (FSDP)")
        else:
            self.adapters = adapters = self._adapters(unet, device)

        # Full mode trains float32 masters installed in the (bf16) private copy: autocast casts them per op, as
        # the LoRA hooks cast their own factors (without it every layer fails on a float32 weight, bf16 input).
        autocast = self.mode == "full" and self.dtype != torch.float32

        def net(x, t, c_concat=None, **cond):  # cond: the family's extra_conds tensors by keyword (train_inputs)
            if c_concat is not None:  # InstructPix2Pix's source-image channels, after the input as _apply_model puts them
                x = torch.cat([x, c_concat.to(x.dtype)], dim=1)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=self.dtype, enabled=autocast, cache_enabled=False):
                return adapters(x, t, control=None, transformer_options={}, **cond)
        self.net = net
        train_net = net
        compile_, graphs, why_eager = fast_paths(device.type, self.opts, ddp=self.dist.backend is not None)
        if self.sharded:  # nothing of FSDP's hooks has been checked under capture or compile
            compile_, graphs = False, False
        if why_eager:
            logging.info(f"D2FTrain: {why_eager}")
        if compile_:
            train_net = CompiledNet(net, adapters.parameters(), passthrough=(mm.InterruptProcessingException,))
        if graphs:
            train_net = GraphedNet(train_net, adapters.parameters())

        if self.ema_options is not None:
            self.ema = EMA.from_options(adapters.named_trainables(), self.ema_options, self.dtype)
        # Snapshots hold the EMA too: after a NaN it must be reset with the weights (it averaged the bad ones in).
        tracked = with_ema(adapters.named_trainables(), self.ema)
        if self.sharded:  # each rank snapshots (and restores) its own shards: the NaN recovery needs no collective
            tracked = {k: local(v.detach()) for k, v in tracked.items()}
            self._local_tracked = tracked
        take = HostSnapshots(tracked).take if self.mode == "full" else \
            (lambda: {k: v.detach().clone() for k, v in tracked.items()})
        # The trainer snapshots the weights at each loss read-out, just before it reports that step to `progress`
        # (LoRA: detached copies; full: two weight copies in host memory). The latest one and its step are kept
        # here too: what an out-of-memory error (no step count of its own) falls back to.
        read_out = {"weights": None, "step": 0}

        def snapshot():
            read_out["weights"] = take()
            return read_out["weights"]

        self.trainer = trainer = Trainer(train_net, self.bridge, adapters.parameters(), self.data, c, device=device,
                                         compute_dtype=self.dtype, snapshot=snapshot, restore=self.restore, ema=self.ema,
                                         dist=self.dist, sharded=sharded_root)
        start = 0
        if resume_path:
            state = read_state(resume_path, trainer.optimizer, device=device)
            shard_optimizer_state(trainer.optimizer)  # sharded: each rank keeps its rows of the moments
            start = state.step
            adapters.load_state_tensors(state.weights)
            if self.ema is not None and state.ema is not None:
                self.ema.load(state.ema, state.ema_info)
            elif self.ema is not None:  # a state saved without EMA: the EMA starts from the resumed weights
                self.ema.restart(start)
            self.resumed_from = resume_path
            logging.info(f"D2FTrain: resumed '{resume_path}' at step {start}")

        blocks = blocks_by_class_name(unet, CHECKPOINT_BLOCKS) if self.opts["gradient_checkpointing"] else []
        main = self.dist.is_main
        plan = self.opts.get("validation")
        if plan is not None and main:  # rank 0 validates; under DDP the others wait at the next collective
            self.validation = ValidationRun(self, plan)
        if main:
            self.reporter.started(start)
        read_out["step"] = start

        def progress(step, new_losses, rate):
            read_out["step"] = step  # the snapshot just taken holds this step's weights
            self.reporter.progress(step, new_losses, rate)

        try:
            # LoRA: hooks on the private copy. Full: the trained tensors installed in it, so that
            # per-block checkpoint recomputation in backward sees them too.
            active = adapters.installed() if self.mode == "full" else adapters.attached()
            with active, checkpointed(blocks), _stops_at_read_outs(self.sharded):
                result = trainer.run(
                    start_step=start, should_stop=self.reporter.should_stop, on_progress=progress,
                    on_save=self.save, save_every=self.opts["save_every"],
                    on_preview=self.preview, preview_every=self.opts["preview_every"],
                    on_validate=self.validation, validate_every=plan.options.every_n_steps if plan else 0,
                    # the stop button also raises from inside the UNet (comfy.ops checks the flag in every layer)
                    stop_exceptions=(mm.InterruptProcessingException,))
            status, step_done = result.status, result.step
        except NonFiniteLossError as exc:
            # The optimizer's moments took the non-finite gradients (its state is not restored with the
            # weights): drop them, so that resuming from the saved state starts them afresh, not as NaN.
            trainer.optimizer.state.clear()
            good = exc.last_good_step  # with loss read-outs every N steps, older than exc.step - 1
            path = self.save(good) if good > start and (main or self.sharded) else None
            kept = f" The last good weights were saved to {path}." if path else ""
            raise RuntimeError(f"D2FTrain: {exc}{kept}") from None
        except torch.OutOfMemoryError:
            trainer.optimizer.zero_grad(set_to_none=True)
            if self.sharded:  # the other ranks are stuck in this step's collectives: no gathered save is possible
                read_out["weights"] = None
            raise RuntimeError(
                f"D2FTrain ran out of GPU memory (mode {self.mode}, batch size {c.batch_size}, "
                f"gradient checkpointing {'on' if blocks else 'off'}). Lower batch_size (use grad_accumulation "
                "instead), turn gradient_checkpointing on, use mode lora with a lower rank, or train at a lower "
                f"resolution.{self._keep_after_oom(read_out, start)}") from None

        if status == "interrupted":
            mm.interrupt_current_processing(False)  # the stop ends training only: downstream saves still run
            logging.info(f"D2FTrain: stopped at step {step_done}; keeping what was trained")
        if step_done > start and (main or self.sharded):  # every run that trained ends saved (once per step)
            self.save(step_done)
        if main:
            self.reporter.finished(step_done, status)
        with self.ema_weights():
            loss_map = {"loss": result.losses}
            if self.validation is not None:
                loss_map.update(self.validation.history.loss_map())
            return io.NodeOutput(self._trained_model(), self.adapters.export(), loss_map, step_done)

    def restore(self, state: dict) -> None:
        """Put a snapshot back: the trained tensors, and the EMA when the run keeps one."""
        if getattr(self, "sharded", False):  # this rank's own shards, as snapshot() took them
            with torch.no_grad():
                for k, v in state.items():
                    self._local_tracked[k].copy_(v)
            return
        weights, emas = split_ema(state)
        self.adapters.load_state_tensors(weights)
        if self.ema is not None:
            self.ema.load_state_tensors(emas)

    def _keep_after_oom(self, read_out: dict, start: int) -> str:
        """Save the weights of the last loss read-out (a step cut off by the error may have half-updated the
        live ones) and say where. The optimizer's moments may belong to later steps: dropped, as after a NaN,
        so a resumed run starts them afresh."""
        step = read_out["step"]
        if step <= start or read_out["weights"] is None or not self.dist.is_main:
            return ""
        try:
            self.restore(read_out["weights"])
            self.trainer.optimizer.state.clear()
            return f" The weights of step {step} were saved to {self.save(step)}."
        except Exception as exc:  # still out of memory, disk full, …: the original error comes first
            return f" Saving step {step} failed too: {exc}"

    def _trained_model(self):
        """The input model with the trained weights as patches (never merged into shared weights)."""
        if self.mode == "lora":
            trained, _ = comfy.sd.load_lora_for_models(self.model, None, self.adapters.export(), 1.0, 0)
        else:
            trained = self.model.clone()
            trained.add_patches(self.adapters.patches())
        if not isinstance(trained.get_model_object("model_sampling"), type(self.sampling)):
            trained.add_object_patch("model_sampling", self.sampling)
        return trained


TRAIN_NODES = [D2FTrain]
