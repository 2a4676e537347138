"""Self-describing files: the safetensors metadata (str → str) of every LoRA, weight-difference and training-state
file the pack writes.

Two families of keys:

* ``modelspec.*`` — the Stability AI Model Spec (github.com/Stability-AI/ModelSpec, version 1.0.0), which model
  browsers and trainers read: ``sai_model_spec`` (the spec version), ``architecture``, ``implementation`` and
  ``title`` (the spec's MUST keys), ``description``, ``date`` (ISO-8601), ``resolution`` ("WxH"),
  ``prediction_type`` ("epsilon" / "v") and ``usage_hint``.

  ``architecture`` is the base model's ID from the spec's listing (``stable-diffusion-v1``,
  ``stable-diffusion-v2-512``, ``stable-diffusion-v2-768-v``, ``stable-diffusion-xl-v1-base``, …) followed by
  ``/lora`` for an adapter, the form kohya's sd-scripts writes and readers such as SwarmUI sort by (the spec's own
  example spells it ``-lora``; the slash form is what existing files carry). Full fine-tunes are saved as weight
  differences that the host's LoRA loaders apply, so they are ``/lora`` files too (``diff2flow.kind`` tells
  them apart); a training state is ``/diff2flow-training-state``, which no model loader claims. Families the spec
  does not list get ``comfyui-<config class>`` (unique per inference path, as the spec asks).

  ``implementation`` is ComfyUI: the tensors are keyed as ComfyUI's own ``SaveLoRA`` writes them
  (``diffusion_model.<module>.lora_up.weight`` …, ``.diff`` for weight differences).

* ``diff2flow.*`` — what the spec has no key for and a user of the file needs: the base model's prediction type,
  schedule and label offset (the D2FFlowPatch settings the file was trained under), the objective, the step of
  the file and the run's total, dataset size and resolution buckets, seed, mode and adapter settings, the EMA
  (and whether the file's weights are the EMA), Reflow pair count and the pack version. Lists and dicts are
  JSON strings; numbers are their Python ``repr`` (floats round-trip exactly).

A training state also keeps its own header keys (``step``, ``param_groups``, ``meta``, ``ema``: see
``state.py``); :data:`RESERVED` lists them, and descriptive metadata may never overwrite them.

Pure Python: the nodes gather the facts from the host (``TrainingDescription``), this module only spells them.
"""

from __future__ import annotations

import datetime
import json
import math
from dataclasses import dataclass, field

__all__ = ["SPEC_VERSION", "IMPLEMENTATION", "KINDS", "RESERVED", "TrainingDescription", "architecture",
           "file_metadata", "check_metadata", "diff2flow_fields"]

SPEC_VERSION = "1.0.0"
IMPLEMENTATION = "https://github.com/comfyanonymous/ComfyUI"
FORMAT_VERSION = "1"
#: What a file holds → the architecture suffix it carries.
KINDS = {"lora": "lora", "full": "lora", "state": "diff2flow-training-state"}
#: Header keys of a training state (state.py) that descriptive metadata may not overwrite.
RESERVED = frozenset({"step", "param_groups", "meta", "ema"})

# Host model-config class names (comfy/supported_models.py) → the spec's architecture IDs.
_ARCHITECTURES = {
    "SD15": "stable-diffusion-v1",
    "SD15_instructpix2pix": "stable-diffusion-v1-edit",
    "SD20": "stable-diffusion-v2-512",             # the v-prediction variant: see architecture()
    "SD21UnclipL": "stable-diffusion-v2-unclip-l",
    "SD21UnclipH": "stable-diffusion-v2-unclip-h",
    "SDXL": "stable-diffusion-xl-v1-base",
    "SDXL_instructpix2pix": "stable-diffusion-xl-v1-edit",  # as the host's CheckpointSave spells it
    "SDXLRefiner": "stable-diffusion-xl-v1-refiner",
}
_PREDICTION_TYPES = {"eps": "epsilon", "v_prediction": "v", "x0": "x0"}


def architecture(family: str, prediction: str) -> str:
    """The spec's ID for a base model of host config class ``family`` and ``prediction`` (eps / v_prediction / x0).
    SD2.x is one host class for both of the spec's IDs: v-prediction is ``stable-diffusion-v2-768-v``."""
    if family == "SD20" and prediction == "v_prediction":
        return "stable-diffusion-v2-768-v"
    return _ARCHITECTURES.get(family, f"comfyui-{family.lower()}")


@dataclass
class TrainingDescription:
    """The facts about a training run that its files carry (gathered by the node from the host and the run).

    ``buckets``: (width, height, images) per resolution bucket, in pixels. ``schedule``: the base model's discrete
    schedule as plain JSON (β schedule, timesteps, zsnr, flow σ range). ``settings``: further training settings,
    recorded as they are (plain JSON values). ``ema``: the EMA's options (None: no EMA).
    """

    family: str
    prediction: str
    schedule: dict
    label_offset: float
    objective: str
    mode: str
    total_steps: int
    dataset_size: int
    buckets: list
    seed: int
    pack_version: str
    run_name: str
    settings: dict = field(default_factory=dict)
    ema: dict | None = None
    reflow_pairs: int = 0

    def resolution(self) -> str | None:
        """"WxH" of the bucket holding most images (the first of equals): the size the run mostly trained at."""
        if not self.buckets:
            return None
        w, h, _ = max(self.buckets, key=lambda b: b[2])
        return f"{int(w)}x{int(h)}"


def _text(value) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"metadata value {value} is not finite")
        return repr(value)
    if isinstance(value, int):
        return str(value)
    # allow_nan=False: NaN/inf are not JSON, and a reader's json.loads must accept every value written here.
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)


def diff2flow_fields(desc: TrainingDescription, step: int, ema_weights: bool = False) -> dict[str, str]:
    """The ``diff2flow.*`` keys of a file saved at ``step``. ``ema_weights``: the file's weights are the EMA."""
    fields = {
        "format_version": FORMAT_VERSION,
        "pack_version": desc.pack_version,
        "base_family": desc.family,
        "base_prediction": desc.prediction,
        "schedule": desc.schedule,
        "label_offset": float(desc.label_offset),
        "objective": desc.objective,
        "mode": desc.mode,
        "steps": int(step),
        "total_steps": int(desc.total_steps),
        "dataset_size": int(desc.dataset_size),
        "resolution_buckets": [list(b) for b in desc.buckets],
        "seed": int(desc.seed),
        "run_name": desc.run_name,
        "reflow_pairs": int(desc.reflow_pairs),
        "settings": desc.settings,
        "ema": desc.ema if desc.ema is not None else "off",
        "ema_weights": bool(ema_weights),
    }
    return {f"diff2flow.{k}": _text(v) for k, v in fields.items()}


def _description(desc: TrainingDescription, kind: str, step: int, ema_weights: bool) -> str:
    what = {"lora": "LoRA", "full": "full fine-tune (weight differences)", "state": "resumable training state"}[kind]
    text = (f"Diff2Flow {what} of a {desc.prediction} model ({desc.family}), {desc.objective} objective, "
            f"step {step} of {desc.total_steps}, {desc.dataset_size} training images")
    if desc.reflow_pairs:
        text += f" and {desc.reflow_pairs} Reflow pairs"
    if ema_weights:
        text += "; the weights are the EMA"
    return text + ". Made with Diff2Flow Bridge for ComfyUI."


def _usage_hint(desc: TrainingDescription, kind: str) -> str:
    if kind == "state":
        return "Not a model: give it to D2FTrain's resume_from to continue the run."
    return (f"Load with LoraLoader / LoraLoaderModelOnly, then apply D2FFlowPatch (prediction "
            f"{'auto' if desc.prediction in ('eps', 'v_prediction') else desc.prediction}, label_offset "
            f"{desc.label_offset:g}) and sample with a flow sampler (e.g. euler): the weights were trained in flow time.")


def file_metadata(desc: TrainingDescription, kind: str, step: int, *, ema_weights: bool = False,
                  date: datetime.datetime | None = None) -> dict[str, str]:
    """Every metadata key of a ``kind`` file ("lora", "full" or "state") saved at optimizer step ``step``."""
    if kind not in KINDS:
        raise ValueError(f"file kind must be one of {sorted(KINDS)}, got {kind!r}")
    when = (date or datetime.datetime.now(datetime.timezone.utc)).replace(microsecond=0)
    title = f"{desc.run_name} step {int(step)}" + (" EMA" if ema_weights else "")
    spec = {
        "sai_model_spec": SPEC_VERSION,
        "architecture": f"{architecture(desc.family, desc.prediction)}/{KINDS[kind]}",
        "implementation": IMPLEMENTATION,
        "title": title,
        "description": _description(desc, kind, step, ema_weights),
        "date": when.isoformat(),
        "prediction_type": _PREDICTION_TYPES.get(desc.prediction, desc.prediction),
        "usage_hint": _usage_hint(desc, kind),
    }
    resolution = desc.resolution()
    if resolution:
        spec["resolution"] = resolution
    out = {f"modelspec.{k}": v for k, v in spec.items()}
    out.update(diff2flow_fields(desc, step, ema_weights))
    return check_metadata(out)


def check_metadata(metadata: dict) -> dict[str, str]:
    """``metadata`` if every key and value is a str (what safetensors stores), else a TypeError naming the first
    offender: safetensors' own error names neither, and would come only after the tensors were prepared."""
    for k, v in metadata.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise TypeError(f"safetensors metadata must map str to str; {k!r} has a {type(v).__name__} value {v!r}")
    return metadata
