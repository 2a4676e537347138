"""Host training inputs → engine types: LATENT/CONDITIONING lists → latent buckets, model → bridge.

Everything here runs before any GPU work, so bad inputs fail fast with a message naming the fix.
"""

from __future__ import annotations

import torch

from ..d2f_core.training.couplings import couplings_buckets
from ..d2f_core.training.data import DatasetError
from .flow_sampling import FlowBridgeSampling, family_of, flow_model_sampling


# Families the training nodes refuse before any work, by host class: why, and what to use instead.
_NOT_TRAINABLE = {
    "SD_X4Upscaler": "its inputs are a low-resolution image, noise-augmented anew from each sampling seed, and that "
                     "augmentation's noise level as a class label; D2FTrain has no low-resolution input to build them "
                     "from, and a fixed augmentation per image would teach it one noise draw. D2FFlowPatch samples it; "
                     "fine-tune it with an upscaler training script",
}

# The image channels InstructPix2Pix concatenates to its input: without them (the host substitutes zeros) a
# fine-tune would teach the edit model to ignore its source image.
_NEEDS_CONCAT = {"SD15_instructpix2pix", "SDXL_instructpix2pix"}


def _host_class(model) -> str:
    config = getattr(getattr(model, "model", None), "model_config", None)
    return type(config).__name__ if config is not None else ""


def bridge_sampling_of(model) -> FlowBridgeSampling:
    """The model's flow view: its own if already patched, else a fresh one (refusing flow-native models and the
    families the training nodes cannot build inputs for)."""
    sampling = model.get_model_object("model_sampling")
    if not isinstance(sampling, FlowBridgeSampling):
        sampling = flow_model_sampling(model)
    if sampling.bridge.input_space != "vp":
        # LotusD maps an image latent to a prediction latent in one step: the patch samples it exactly, but a
        # denoising fine-tune from noise is not its task.
        raise ValueError(f"D2FTrain and D2FReflowPairs do not support {sampling.family or 'this model'}: it predicts "
                         "x0 from an unscaled image latent (image to prediction), it is not a denoiser from noise. "
                         "D2FFlowPatch samples it.")
    why = _NOT_TRAINABLE.get(_host_class(model))
    if why:
        raise ValueError(f"D2FTrain and D2FReflowPairs do not support {sampling.family}: {why}.")
    return sampling


# extra_conds entries the diffusion model takes under another name (BaseModel._apply_model): the text as
# ``context``. ``c_concat`` keeps its name: the training net concatenates it to the input channels, as
# _apply_model does. Every other entry is a keyword of the diffusion model's forward as it is (SDXL's ``y``,
# PixArt's ``c_size``/``c_ar``, HunyuanDiT's masks, mT5 states and ``image_meta_size``).
_RENAMED = {"c_crossattn": "context"}


def unet_kwargs(model, pair, latent_shape, need_image: bool = True) -> dict[str, torch.Tensor]:
    """One CONDITIONING entry [cross_attn, extras] → the diffusion model's keyword tensors for one sample (no
    batch dim), via the host model's own ``extra_conds``: whatever the family adds (SDXL's size/pooled ``y``,
    unCLIP's image embedding in ``y``, InstructPix2Pix's ``c_concat``, the DiTs' size and mask inputs) is built
    exactly as the host builds it for sampling. ``need_image``: refuse an InstructPix2Pix caption without its
    source image (the empty prompt for caption dropout may go without: the host's unconditional is zeros)."""
    cross_attn, extras = pair[0], dict(pair[1])
    family = family_of(model)
    if need_image and _host_class(model) in _NEEDS_CONCAT and extras.get("concat_latent_image") is None:
        raise ValueError(f"D2FTrain: {family} needs each caption's source image: pass every positive conditioning "
                         "through InstructPixToPixConditioning (with that image) before training.")
    params = dict(extras)
    params.update(cross_attn=cross_attn, device=cross_attn.device, noise=torch.zeros((1,) + tuple(latent_shape)),
                  prompt_type="positive")
    params.setdefault("width", latent_shape[-1] * 8)
    params.setdefault("height", latent_shape[-2] * 8)
    conds = model.model.extra_conds(**params)
    if "c_concat" in conds and _host_class(model) not in _NEEDS_CONCAT:
        # Inpainting and other concat-conditioned models: their extra channels (mask, masked image, …) are built
        # from inputs a caption does not carry; the host would fill in blanks and the fine-tune would learn those.
        raise ValueError(f"D2FTrain cannot train {family} (an inpainting or image-conditioned model with extra input "
                         "channels) yet. Use a plain text-to-image checkpoint.")
    out = {}
    for key, cond in conds.items():
        value = getattr(cond, "cond", None)
        if not torch.is_tensor(value):
            raise ValueError(f"D2FTrain cannot train {family} with this conditioning: its input '{key}' is not a "
                             f"tensor ({type(value).__name__}). Use plain text conditioning.")
        if value.shape[0] != 1:
            raise ValueError(f"D2FTrain: {family}'s input '{key}' has batch {value.shape[0]} for one caption: give "
                             "one conditioning entry per image.")
        out[_RENAMED.get(key, key)] = value[0]
    if "context" not in out:
        raise ValueError(f"D2FTrain: the conditioning gave {family} no text input: connect CLIP Text Encode output.")
    # float32 (cast to the training dtype later): masks and sizes too, which the models read as float or bool.
    return {k: v.detach().clone().float() for k, v in out.items()}


def _conditioning_entries(conditioning) -> list:
    """A CONDITIONING (list of [tensor, dict]) or a bare [tensor, dict] pair → list of pairs."""
    if isinstance(conditioning, (list, tuple)) and len(conditioning) == 2 and torch.is_tensor(conditioning[0]) \
            and isinstance(conditioning[1], dict):
        return [conditioning]
    return list(conditioning)


def assemble_buckets(model, latents: list[dict], positive: list) -> list[tuple[torch.Tensor, list[dict]]]:
    """Pair latents with captions and group them by resolution.

    Accepts what the host's dataset nodes give: ``MakeTrainingDataset`` (one latent and one
    conditioning per image), ``ResolutionBucket`` (a batch of latents and a list of conditionings per
    bucket), or a plain LATENT batch with one CONDITIONING for every image.
    """
    latents = [l for l in (latents or []) if l is not None]
    positive = [p for p in (positive or []) if p is not None]
    if not latents or not positive:
        raise DatasetError("the dataset is empty: connect latents and positive conditioning "
                           "(e.g. from MakeTrainingDataset)")
    if len(positive) not in (1, len(latents)):
        raise DatasetError(f"{len(latents)} latent inputs but {len(positive)} conditioning inputs: give one "
                           "conditioning per latent input, or a single one for all")
    channels = model.get_model_object("latent_format").latent_channels
    by_shape: dict[tuple, tuple[list, list]] = {}
    for j, latent in enumerate(latents):
        samples = latent["samples"]
        if samples.ndim != 4:
            raise DatasetError(f"latent {j} has shape {tuple(samples.shape)}; D2FTrain trains image models (N, C, H, W)")
        if samples.shape[1] != channels:
            raise DatasetError(f"latent {j} has {samples.shape[1]} channels but this model works on {channels}: "
                               "encode the images with this checkpoint's VAE")
        if samples.shape[0] == 0:
            continue
        entries = _conditioning_entries(positive[j if len(positive) > 1 else 0])
        if len(entries) not in (1, samples.shape[0]):
            raise DatasetError(f"latent {j} holds {samples.shape[0]} images but {len(entries)} captions")
        x0 = model.get_model_object("latent_format").process_in(samples.detach().clone().float())
        for i in range(samples.shape[0]):
            pair = entries[i if len(entries) > 1 else 0]
            kwargs = unet_kwargs(model, pair, samples.shape[1:])
            group = by_shape.setdefault(tuple(samples.shape[1:]), ([], []))
            group[0].append(x0[i])
            group[1].append(kwargs)
    if not by_shape:
        raise DatasetError("the dataset is empty: all latent batches have zero images")
    return [(torch.stack(lat), conds) for lat, conds in by_shape.values()]


def empty_prompt_kwargs(model, conditioning, latent_shape) -> dict[str, torch.Tensor] | None:
    if conditioning is None:
        return None
    entries = _conditioning_entries(conditioning)
    if not entries:
        return None
    return unet_kwargs(model, entries[0], latent_shape, need_image=False)


def coupling_buckets_for(model, couplings: list) -> list[tuple]:
    """Reflow couplings (D2FReflowPairs / D2FLoadReflowPairs) → latent buckets (x0, conds, noise), after checking
    they live in this model's latent space (same latent format and channels)."""
    latent_format = model.get_model_object("latent_format")
    channels, name = latent_format.latent_channels, type(latent_format).__name__
    for j, c in enumerate(couplings):
        made_for = c.meta.get("latent_format")
        if made_for is not None and made_for != name:
            raise DatasetError(f"couplings {j} were made for {made_for} latents but this model works on {name} latents: "
                               "make the pairs with a model of the same family (SD1.x / SD2.x / SDXL)")
        if c.shape[0] != channels:
            raise DatasetError(f"couplings {j} have {c.shape[0]} latent channels but this model works on {channels}")
        if not len(c):
            raise DatasetError(f"couplings {j} hold no pairs")
    return couplings_buckets(couplings)
