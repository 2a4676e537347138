"""D2FScheduledSampling: D2FTrain's scheduled-sampling settings, as a small node feeding its optional
``scheduled_sampling`` input (issue 12: option nodes instead of more widgets on D2FTrain)."""

from __future__ import annotations

from comfy_api.latest import io

from ..d2f_core.training.options import SCHEDULED_SAMPLING_DEFAULTS as DEFAULTS
from ..d2f_core.training.scheduled_sampling import RAMPS, STRATEGIES, ScheduledSampling

CATEGORY = "Diff2Flow"
SCHEDULED_SAMPLING_TYPE = "D2F_SCHEDULED_SAMPLING"
ScheduledSamplingIO = io.Custom(SCHEDULED_SAMPLING_TYPE)


class D2FScheduledSampling(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="D2FScheduledSampling",
            display_name="Diff2Flow Scheduled Sampling",
            category=CATEGORY,
            description=(
                "Trains some samples on the states the model's own sampler visits: with probability p (ramped up "
                "over the run) a sample starts k solver steps noisier than its training time, the model's own Euler "
                "solver rolls it forward (no gradient), and the pair's own target is kept. Corrects exposure bias; "
                "it does not straighten paths (that is Reflow). Each rollout step costs one extra forward pass. "
                "Connect it to D2FTrain's scheduled_sampling input; without it D2FTrain trains without."),
            inputs=[
                io.Float.Input("probability", default=DEFAULTS.probability, min=0.0, max=1.0, step=0.01,
                               tooltip="Peak probability that a sample is trained on a rolled-out state. 0 = off."),
                io.Combo.Input("ramp", options=list(RAMPS), default=DEFAULTS.ramp,
                               tooltip="How the probability grows from 0 over the run: constant (from the first "
                                       "step), linear or cosine."),
                io.Int.Input("max_offset", default=DEFAULTS.max_offset, min=0, max=50,
                             tooltip="The most solver steps a rollout starts before the training time (each costs "
                                     "one extra forward pass, no backward). 0 = off."),
                io.Combo.Input("strategy", options=list(STRATEGIES), default=DEFAULTS.strategy,
                               tooltip="How rollout lengths are drawn: uniform, early (short ones likelier), late "
                                       "(long ones likelier)."),
                io.Int.Input("solver_steps", default=DEFAULTS.solver_steps, min=1, max=1000,
                             tooltip="The sampler grid whose step size one rollout step takes: the step count you "
                                     "sample with."),
            ],
            outputs=[ScheduledSamplingIO.Output(display_name="scheduled_sampling",
                                                tooltip="For D2FTrain's scheduled_sampling input.")],
        )

    @classmethod
    def execute(cls, probability: float, ramp: str, max_offset: int, strategy: str,
                solver_steps: int) -> io.NodeOutput:
        options = ScheduledSampling(probability=float(probability), ramp=ramp, max_offset=int(max_offset),
                                    strategy=strategy, solver_steps=int(solver_steps))
        options.validate()
        return io.NodeOutput(options)


SCHEDULED_SAMPLING_NODES = [D2FScheduledSampling]
