"""D2FTrain's rarely changed settings, as one plain value (the D2FTrainAdvanced node's output).

Issue 12: D2FTrain keeps its everyday inputs; the rest comes in as small option values on optional inputs
(``advanced``: :class:`AdvancedOptions`; ``scheduled_sampling``: :class:`ScheduledSampling`; ``ema``:
:class:`EMAOptions`). Each is a plain dataclass of numbers and strings: it pickles as is, so it travels to the
worker processes of a run on several GPUs, and it validates itself before any work.

The field names are the settings' names in D2FTrain's flat option dict (and in its files' metadata), so
:meth:`AdvancedOptions.flat` is all the caller needs; the defaults are the ones D2FTrain always used, so a
D2FTrain without the option node trains exactly as before.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from ..flow.losses import TIME_SAMPLINGS
from .scheduled_sampling import ScheduledSampling
from .trainer import LR_SCHEDULES, OBJECTIVES, OPTIMIZERS

__all__ = ["AdvancedOptions", "LORA_TARGETS", "SHARDINGS", "TRAINING_DTYPES", "SCHEDULED_SAMPLING_DEFAULTS",
           "scheduled_sampling_flat"]

LORA_TARGETS = ("attention", "all")
TRAINING_DTYPES = ("bf16", "fp32")
SHARDINGS = ("auto", "ddp", "fsdp")  # full fine-tunes on several processes: decided by the memory pre-flight

#: What D2FTrain always used without scheduled sampling settings. The ramp is linear (D2FTrain's own
#: default), not the engine's constant: with probability 0 it does nothing either way.
SCHEDULED_SAMPLING_DEFAULTS = ScheduledSampling(probability=0.0, ramp="linear", max_offset=0, strategy="uniform",
                                                solver_steps=25)


@dataclass
class AdvancedOptions:
    lora_targets: str = "attention"   # attention: transformer-block linears; all: also convolutions (LoCon)
    alpha: float = 16.0               # LoRA alpha; 0 means alpha = rank
    loss: str = "diff2flow"           # the objective (OBJECTIVES)
    time_sampling: str = "uniform"
    time_shift: float = 1.0
    warmup_steps: int = 0
    lr_schedule: str = "constant"
    optimizer: str = "adamw"
    training_dtype: str = "bf16"
    cuda_graphs: bool = True
    compile: bool = False
    caption_dropout: float = 0.0
    sharding: str = "auto"            # auto | ddp | fsdp (SHARDINGS)

    def validate(self) -> "AdvancedOptions":
        for name, allowed in (("lora_targets", LORA_TARGETS), ("loss", OBJECTIVES), ("time_sampling", TIME_SAMPLINGS),
                              ("lr_schedule", LR_SCHEDULES), ("optimizer", OPTIMIZERS),
                              ("training_dtype", TRAINING_DTYPES), ("sharding", SHARDINGS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if self.alpha < 0:
            raise ValueError(f"alpha must be ≥ 0 (0 means alpha = rank), got {self.alpha}")
        if self.time_shift <= 0:
            raise ValueError(f"time_shift must be > 0, got {self.time_shift}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be ≥ 0, got {self.warmup_steps}")
        if not 0.0 <= self.caption_dropout <= 1.0:
            raise ValueError(f"caption_dropout is a probability in [0, 1], got {self.caption_dropout}")
        return self

    def flat(self) -> dict:
        """The settings under D2FTrain's option names (plain Python values)."""
        return asdict(self)

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))


def scheduled_sampling_flat(ss: ScheduledSampling) -> dict:
    """Scheduled sampling under D2FTrain's flat option names (``ss_probability``, …), as its files record them."""
    return {f"ss_{k}": v for k, v in asdict(ss).items()}
