"""D2FEMA: the EMA option of D2FTrain, as a small node feeding its optional ``ema`` input (issue 12: option nodes
instead of more widgets on D2FTrain)."""

from __future__ import annotations

from comfy_api.latest import io

from ..d2f_core.training.ema import EMA_DTYPES, EMAOptions

CATEGORY = "Diff2Flow"
EMA_TYPE = "D2F_EMA"
EMAOptionsIO = io.Custom(EMA_TYPE)


class D2FEMA(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="D2FEMA",
            display_name="Diff2Flow EMA",
            category=CATEGORY,
            description=(
                "Keeps an exponential moving average of the trained weights, θ_ema ← β_k·θ_ema + (1−β_k)·θ after "
                "every optimizer step, with warm-up β_k = min(β, (1+k)/(10+k)). Connect it to D2FTrain's ema input: "
                "previews, the saved LoRAs and the returned model and LoRA then use the EMA; the resumable state "
                "keeps both the training weights and the EMA. Memory: one more copy of the trained weights on the "
                "GPU (negligible for a LoRA; a full SD1.5 fine-tune in fp32: 3.4 GB), and for a full fine-tune two "
                "more in host memory for NaN recovery."),
            inputs=[
                io.Float.Input("decay", default=0.999, min=0.0, max=0.99999, step=0.0001,
                               tooltip="β: the EMA averages about the last 1/(1−β) steps (0.999: ~1000 steps, 0.99: "
                                       "~100). For runs of a few hundred steps use 0.99 or less."),
                io.Boolean.Input("warmup", default=True,
                                 tooltip="β_k = min(β, (1+k)/(10+k)) at the EMA's k-th update: a short run's EMA is "
                                         "not dominated by the untrained start weights. Off: β from the first step."),
                io.Combo.Input("dtype", options=list(EMA_DTYPES), default="fp32",
                               tooltip="Where the EMA is kept. fp32: exact (recommended). training: D2FTrain's "
                                       "training_dtype (bf16 halves the EMA's memory in a full fine-tune, but bf16 "
                                       "rounds away any update smaller than ~0.2% of the weight: with β ≥ 0.99 the EMA "
                                       "stops moving)."),
            ],
            outputs=[EMAOptionsIO.Output(display_name="ema", tooltip="For D2FTrain's ema input.")],
        )

    @classmethod
    def execute(cls, decay: float, warmup: bool, dtype: str) -> io.NodeOutput:
        return io.NodeOutput(EMAOptions(decay=float(decay), warmup=bool(warmup), dtype=dtype).validate())


OPTION_NODES = [D2FEMA]
