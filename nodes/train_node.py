"""D2FTrain: Diff2Flow fine-tuning (LoRA or full) inside ComfyUI."""

from __future__ import annotations

import contextlib
import logging

import comfy.model_management as mm
import comfy.sd
import torch
from comfy_api.latest import io

from ..d2f_core.training.adapters import FullAdapters, LoraAdapters, attention_only
from ..d2f_core.training.checkpointing import blocks_by_class_name, checkpointed
from ..d2f_core.training.data import LatentBuckets
from ..d2f_core.training.distributed import DistributedContext
from ..d2f_core.training.ema import EMA, split_ema, with_ema
from ..d2f_core.training.compilation import CompiledNet
from ..d2f_core.training.graphs import GraphedNet
from ..d2f_core.training.snapshots import HostSnapshots
from ..d2f_core.flow.losses import TIME_SAMPLINGS
from ..d2f_core.training.precision import cast_for_training
from ..d2f_core.training.scheduled_sampling import RAMPS, STRATEGIES, ScheduledSampling
from ..d2f_core.flow.samplers import flow_sigmas, sample_euler_flow
from ..d2f_core.storage.files import plain_name
from ..d2f_core.storage.metadata import file_metadata
from ..d2f_core.storage.state import (architecture_fingerprint, read_state, read_state_meta, resume_mismatches,
                              save_state)
from ..d2f_core.training.trainer import LR_SCHEDULES, OBJECTIVES, OPTIMIZERS, NonFiniteLossError, TrainConfig, Trainer
from .reflow_nodes import CouplingsIO
from .ema_node import EMAOptionsIO
from .file_metadata import describe_training
from . import memory_check
from .local_workers import (GPUS_TOOLTIP, gpu_choices, local_world, train_inputs_for_workers, train_worker,
                            world_size_for)
from .run_files import WHERE, RunFiles, resume_state_path
from .train_inputs import assemble_buckets, bridge_sampling_of, coupling_buckets_for, empty_prompt_kwargs
from .ui_events import TrainingReporter

CATEGORY = "Diff2Flow"
CHECKPOINT_BLOCKS = ("ResBlock", "SpatialTransformer", "PixArtMSBlock", "HunYuanDiTBlock")  # UNets; DiTs
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def _first(value):
    return value[0] if isinstance(value, list) else value


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
                "straighter paths, good 2–4-step samples."),
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
                io.Combo.Input("lora_targets", options=["attention", "all"], default="attention",
                               tooltip="attention: the transformer blocks' linear layers (the usual SD LoRA). all: also "
                                       "every ResNet convolution and embedding (LoCon-style; larger, slower)."),
                io.Float.Input("alpha", default=16.0, min=0.0, max=1024.0, step=0.5,
                               tooltip="LoRA alpha; the update is scaled by alpha/rank. 0 means alpha = rank."),
                io.Combo.Input("loss", options=list(OBJECTIVES), default="diff2flow",
                               tooltip="diff2flow: flow-velocity loss through the bridge (the paper's objective). "
                                       "native: plain ε/v MSE (for comparison)."),
                io.Combo.Input("time_sampling", options=list(TIME_SAMPLINGS), default="uniform",
                               tooltip="How flow times σ are drawn: uniform, or logit-normal (mid-noise heavy, as in SD3)."),
                io.Float.Input("time_shift", default=1.0, min=0.05, max=20.0, step=0.05,
                               tooltip="SD3 time shift s applied to the drawn times; >1 favours high noise."),
                io.Int.Input("warmup_steps", default=0, min=0, max=100_000, tooltip="Linear learning-rate warm-up."),
                io.Combo.Input("lr_schedule", options=list(LR_SCHEDULES), default="constant",
                               tooltip="After warm-up: constant, or cosine decay to 0."),
                io.Combo.Input("optimizer", options=list(OPTIMIZERS), default="adamw",
                               tooltip="adamw (fused on GPU) is the default; sgd uses momentum 0.9."),
                io.Combo.Input("gradient_checkpointing", options=list(memory_check.CHECKPOINTING_CHOICES),
                               default="auto",
                               tooltip="Recompute activations in backward: much less memory, ~30% slower. auto: on "
                                       "only when the run's estimated memory without it does not fit the GPU (a run "
                                       "that cannot fit even with it stops before loading, saying what to lower)."),
                io.Combo.Input("training_dtype", options=list(DTYPES), default="bf16",
                               tooltip="Compute precision. bf16 on any recent GPU; fp32 for CPU or debugging."),
                io.Boolean.Input("cuda_graphs", default=True, advanced=True,
                                 tooltip="Replay each step's forward/backward as CUDA graphs: much faster at small "
                                         "batch. Used for LoRA with gradient_checkpointing and compile off, where graphed "
                                         "training was checked against normal training; elsewhere the step runs "
                                         "normally. Falls back by itself if capture fails."),
                io.Float.Input("caption_dropout", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Probability of training a sample on the empty prompt (needs empty_conditioning); keeps CFG working."),
                io.Float.Input("ss_probability", default=0.0, min=0.0, max=1.0, step=0.01, advanced=True,
                               tooltip="Scheduled sampling: probability that a sample is trained on the state the "
                                       "model's own Euler solver reaches from a few steps earlier (corrects exposure "
                                       "bias). 0 = off."),
                io.Combo.Input("ss_ramp", options=list(RAMPS), default="linear", advanced=True,
                               tooltip="How the scheduled-sampling probability grows from 0 over the run."),
                io.Int.Input("ss_max_offset", default=0, min=0, max=50, advanced=True,
                             tooltip="Scheduled sampling: the most solver steps a rollout starts before the training "
                                     "time (each costs one extra forward pass, no backward). 0 = off."),
                io.Combo.Input("ss_strategy", options=list(STRATEGIES), default="uniform", advanced=True,
                               tooltip="How rollout lengths are drawn: uniform, early (short ones likelier), late (long ones likelier)."),
                io.Int.Input("ss_solver_steps", default=25, min=1, max=1000, advanced=True,
                             tooltip="The sampler grid whose step size one rollout step takes: the step count you sample with."),
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
                                        "needs the same model, mode, rank, alpha and lora_targets. The resumed run "
                                        "writes under a new number and leaves that state as it is."),
                io.Boolean.Input("compile", default=False, advanced=True, optional=True,
                                 tooltip="torch.compile the UNet's training step: 20–35% faster steps with "
                                         "gradient_checkpointing off (no gain with it on), after a one-time "
                                         "compilation of about 2 minutes per resolution: worth it for runs of several "
                                         "hundred steps. Falls back to normal execution if compilation fails."),
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
                **options) -> io.NodeOutput:
        model = _first(model)
        opts = {k: _first(v) for k, v in options.items()}
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
                probability=opts.get("ss_probability", 0.0), ramp=opts.get("ss_ramp", "linear"),
                max_offset=opts.get("ss_max_offset", 0), strategy=opts.get("ss_strategy", "uniform"),
                solver_steps=opts.get("ss_solver_steps", 25)))
        config.validate()

        # Everything that can be wrong with the inputs fails here, before any GPU work.
        sampling = bridge_sampling_of(model)
        couplings = [c for c in (couplings or []) if c is not None]
        has_images = any(v is not None for v in (latents or []) + (positive or []))
        buckets = assemble_buckets(model, latents, positive) if has_images or not couplings else []
        if couplings:
            buckets += coupling_buckets_for(model, couplings)
        empty = empty_prompt_kwargs(model, _first(empty_conditioning), buckets[0][0].shape[1:])
        if config.caption_dropout > 0 and empty is None:
            raise ValueError("caption_dropout needs the empty prompt: connect empty_conditioning (CLIP Text Encode of '').")
        # Memory pre-flight: decides gradient_checkpointing auto, refuses a run that cannot fit (before any load).
        memory = memory_check.check(model, buckets, opts, DTYPES[opts["training_dtype"]], CHECKPOINT_BLOCKS, world_size)
        opts["gradient_checkpointing"] = memory.checkpointing

        inputs = dict(sampling=sampling, buckets=buckets, empty=empty, config=config, opts=opts,
                      node_id=cls.hidden.unique_id, run_name=run_name, identity=identity)
        with torch.inference_mode(False), local_world("D2FTrain", world_size, model, train_worker,
                                                      **train_inputs_for_workers(inputs, resume_path)) as world:
            run = TrainingRun(model, **inputs)
            world.kept = lambda: run.files.kept() if run.files is not None else ""
            run.memory_required = memory.memory_required
            return run.execute(resume_path)


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

    # --- files ------------------------------------------------------------------------------------
    def save(self, step: int) -> str:
        """The LoRA of ``step`` and the run's resumable state, atomically (see ``run_files``)."""
        meta = dict(self.identity, run_name=self.files.name, resumed_from=self.resumed_from)
        ema = self.ema
        described = describe_training(self.model, self.bridge, self.buckets, self.config,
                                      dict(self.opts, processes=self.dist.world_size), self.files.name,
                                      ema=self.ema_options.info() if ema else None)

        def write_state(path):  # the training weights (to resume from) and the EMA beside them
            save_state(path, self.adapters.state_tensors(), self.trainer.optimizer, step, meta,
                       ema=ema.named_tensors() if ema else None, ema_info=ema.info() if ema else None,
                       metadata=file_metadata(described, "state", step))
        try:
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
                                         dist=self.dist)
        start = 0
        if resume_path:
            state = read_state(resume_path, trainer.optimizer, device=device)
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
            with active, checkpointed(blocks):
                result = trainer.run(
                    start_step=start, should_stop=self.reporter.should_stop, on_progress=progress,
                    on_save=self.save, save_every=self.opts["save_every"],
                    on_preview=self.preview, preview_every=self.opts["preview_every"],
                    # the stop button also raises from inside the UNet (comfy.ops checks the flag in every layer)
                    stop_exceptions=(mm.InterruptProcessingException,))
            status, step_done = result.status, result.step
        except NonFiniteLossError as exc:
            # The optimizer's moments took the non-finite gradients (its state is not restored with the
            # weights): drop them, so that resuming from the saved state starts them afresh, not as NaN.
            trainer.optimizer.state.clear()
            good = exc.last_good_step  # with loss read-outs every N steps, older than exc.step - 1
            path = self.save(good) if good > start and main else None
            kept = f" The last good weights were saved to {path}." if path else ""
            raise RuntimeError(f"D2FTrain: {exc}{kept}") from None
        except torch.OutOfMemoryError:
            trainer.optimizer.zero_grad(set_to_none=True)
            raise RuntimeError(
                f"D2FTrain ran out of GPU memory (mode {self.mode}, batch size {c.batch_size}, "
                f"gradient checkpointing {'on' if blocks else 'off'}). Lower batch_size (use grad_accumulation "
                "instead), turn gradient_checkpointing on, use mode lora with a lower rank, or train at a lower "
                f"resolution.{self._keep_after_oom(read_out, start)}") from None

        if status == "interrupted":
            mm.interrupt_current_processing(False)  # the stop ends training only: downstream saves still run
            logging.info(f"D2FTrain: stopped at step {step_done}; keeping what was trained")
        if main:
            if step_done > start:  # every run that trained ends saved (once per step: a due save is not redone)
                self.save(step_done)
            self.reporter.finished(step_done, status)
        with self.ema_weights():
            return io.NodeOutput(self._trained_model(), self.adapters.export(), {"loss": result.losses}, step_done)

    def restore(self, state: dict) -> None:
        """Put a snapshot back: the trained tensors, and the EMA when the run keeps one."""
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
