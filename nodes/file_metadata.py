"""What D2FTrain's files say about themselves: the host facts behind ``d2f_core.storage.metadata``.

The engine spells the keys; this module reads the facts only the host knows (the model's config class, its β
schedule settings, the latent format's pixel scale) and the run's settings, once per save.
"""

from __future__ import annotations


from ..d2f_core import __version__ as PACK_VERSION
from ..d2f_core.flow.bridge import FlowBridge
from ..d2f_core.storage.metadata import TrainingDescription

# The D2FTrain settings a file records (diff2flow.settings): what decides the weights, not the UI's switches.
# "processes" is the run's world size (batch_size is per process); "sharding" how a run on several was split
# (ddp / fsdp: in bf16 they round differently).
SETTINGS = ("rank", "alpha", "lora_targets", "learning_rate", "optimizer", "lr_schedule", "warmup_steps",
            "batch_size", "processes", "sharding", "grad_accumulation", "time_sampling", "time_shift", "caption_dropout", "training_dtype",
            "ss_probability", "ss_ramp", "ss_max_offset", "ss_strategy", "ss_solver_steps")
LORA_ONLY = ("rank", "alpha", "lora_targets")


def schedule_description(model, bridge: FlowBridge) -> dict:
    """The base schedule as plain JSON: the host's β settings, and the table the bridge really uses (its size,
    zsnr, flow σ range and a sha256 of its bytes in the dtype it is kept in, which identifies a custom table
    exactly; made with the table itself: any tensor op on the table here would make float64 outside the
    schedule, which the pack never does, ``tests/float64_guard.py``)."""
    config = getattr(getattr(model, "model", None), "model_config", None)
    settings = dict(getattr(config, "sampling_settings", None) or {})
    out = {k: settings[k] for k in ("beta_schedule", "linear_start", "linear_end") if k in settings}
    out.update(timesteps=len(bridge.schedule), zsnr=bool(bridge.schedule.zsnr),
               flow_sigma_min=float(bridge.sigma_min), flow_sigma_max=float(bridge.sigma_max),
               table_sha256=bridge.schedule.table_sha256)
    return out


def describe_training(model, bridge: FlowBridge, buckets: list, config, opts: dict, run_name: str,
                      ema: dict | None = None) -> TrainingDescription:
    """``buckets``: D2FTrain's assembled buckets, (latents, conds) for images and (x0, conds, noise) for Reflow
    pairs; latents are (N, C, h, w), recorded in pixels through the latent format's downscale ratio."""
    scale = int(getattr(model.get_model_object("latent_format"), "spacial_downscale_ratio", 8))
    images = pairs = 0
    sizes: dict[tuple[int, int], int] = {}
    for bucket in buckets:
        latents = bucket[0]
        n, h, w = int(latents.shape[0]), int(latents.shape[-2]), int(latents.shape[-1])
        if len(bucket) > 2 and bucket[2] is not None:
            pairs += n
        else:
            images += n
        sizes[(w * scale, h * scale)] = sizes.get((w * scale, h * scale), 0) + n
    lora = opts.get("mode") == "lora"
    settings = {k: opts[k] for k in SETTINGS if k in opts and (lora or k not in LORA_ONLY)}
    if lora and "alpha" in settings:
        settings["alpha"] = float(opts["alpha"] or opts["rank"])  # 0 on the node means α = rank: record what acts
    config_class = getattr(model.model, "model_config", None)
    return TrainingDescription(
        family=type(config_class).__name__ if config_class is not None else type(model.model).__name__,
        prediction=bridge.prediction,
        schedule=schedule_description(model, bridge), label_offset=bridge.label_offset, objective=config.objective,
        mode=opts.get("mode", "lora"), total_steps=config.steps, dataset_size=images,
        buckets=[(w, h, n) for (w, h), n in sizes.items()], seed=config.seed, pack_version=PACK_VERSION,
        run_name=run_name, settings=settings, ema=ema, reflow_pairs=pairs)
