"""D2FTrainAdvanced: D2FTrain's rarely changed settings (LoRA layout, objective, time sampling, learning-rate
schedule, optimizer, precision, speed switches, caption dropout, sharding), as a small node feeding its optional
``advanced`` input (issue 12: D2FTrain keeps the everyday widgets only)."""

from __future__ import annotations

from comfy_api.latest import io

from ..d2f_core.flow.losses import TIME_SAMPLINGS
from ..d2f_core.training.options import LORA_TARGETS, SHARDINGS, TRAINING_DTYPES, AdvancedOptions
from ..d2f_core.training.trainer import LR_SCHEDULES, OBJECTIVES, OPTIMIZERS

CATEGORY = "Diff2Flow"
ADVANCED_TYPE = "D2F_TRAIN_ADVANCED"
AdvancedOptionsIO = io.Custom(ADVANCED_TYPE)
D = AdvancedOptions()  # the defaults D2FTrain uses when nothing is connected


class D2FTrainAdvanced(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="D2FTrainAdvanced",
            display_name="Diff2Flow Train Advanced",
            category=CATEGORY,
            description=(
                "The settings of D2FTrain that most runs leave alone. Connect it to D2FTrain's advanced input; "
                "without it D2FTrain uses exactly these defaults. A resumed run needs the lora_targets and alpha "
                "it was trained with."),
            inputs=[
                io.Combo.Input("lora_targets", options=list(LORA_TARGETS), default=D.lora_targets,
                               tooltip="attention: the transformer blocks' linear layers (the usual SD LoRA). all: "
                                       "also every ResNet convolution and embedding (LoCon-style; larger, slower)."),
                io.Float.Input("alpha", default=D.alpha, min=0.0, max=1024.0, step=0.5,
                               tooltip="LoRA alpha; the update is scaled by alpha/rank. 0 means alpha = rank."),
                io.Combo.Input("loss", options=list(OBJECTIVES), default=D.loss,
                               tooltip="diff2flow: flow-velocity loss through the bridge (the paper's objective). "
                                       "native: plain ε/v MSE (for comparison)."),
                io.Combo.Input("time_sampling", options=list(TIME_SAMPLINGS), default=D.time_sampling,
                               tooltip="How flow times σ are drawn: uniform, or logit-normal (mid-noise heavy, as in "
                                       "SD3)."),
                io.Float.Input("time_shift", default=D.time_shift, min=0.05, max=20.0, step=0.05,
                               tooltip="SD3 time shift s applied to the drawn times; >1 favours high noise."),
                io.Int.Input("warmup_steps", default=D.warmup_steps, min=0, max=100_000,
                             tooltip="Linear learning-rate warm-up over this many steps."),
                io.Combo.Input("lr_schedule", options=list(LR_SCHEDULES), default=D.lr_schedule,
                               tooltip="After warm-up: constant, or cosine decay to 0."),
                io.Combo.Input("optimizer", options=list(OPTIMIZERS), default=D.optimizer,
                               tooltip="adamw (fused on GPU) is the default; sgd uses momentum 0.9."),
                io.Combo.Input("training_dtype", options=list(TRAINING_DTYPES), default=D.training_dtype,
                               tooltip="Compute precision. bf16 on any recent GPU; fp32 for CPU or debugging."),
                io.Boolean.Input("cuda_graphs", default=D.cuda_graphs,
                                 tooltip="Replay each step's forward/backward as CUDA graphs: much faster at small "
                                         "batch. Used for LoRA with gradient_checkpointing and compile off, where "
                                         "graphed training was checked against normal training; elsewhere the step "
                                         "runs normally. Falls back by itself if capture fails."),
                io.Boolean.Input("compile", default=D.compile,
                                 tooltip="torch.compile the UNet's training step: 20–35% faster steps with "
                                         "gradient_checkpointing off (no gain with it on), after a one-time "
                                         "compilation of about 2 minutes per resolution: worth it for runs of several "
                                         "hundred steps. Falls back to normal execution if compilation fails."),
                io.Float.Input("caption_dropout", default=D.caption_dropout, min=0.0, max=1.0, step=0.01,
                               tooltip="Probability of training a sample on the empty prompt (needs D2FTrain's "
                                       "empty_conditioning); keeps CFG working."),
                io.Combo.Input("sharding", options=list(SHARDINGS), default=D.sharding,
                               tooltip="Full fine-tunes on several GPUs (D2FTrain's gpus, d2f run --nproc-per-node, "
                                       "torchrun). ddp: every GPU holds the whole training state. fsdp: the weights, "
                                       "gradients and optimizer state are split over the GPUs (FSDP), for models whose "
                                       "full fine-tune does not fit one GPU; more communication per step. auto: fsdp "
                                       "only when the memory estimate says ddp does not fit and fsdp does. LoRA always "
                                       "uses ddp."),
            ],
            outputs=[AdvancedOptionsIO.Output(display_name="advanced", tooltip="For D2FTrain's advanced input.")],
        )

    @classmethod
    def execute(cls, **settings) -> io.NodeOutput:
        return io.NodeOutput(AdvancedOptions(**settings).validate())


ADVANCED_NODES = [D2FTrainAdvanced]
