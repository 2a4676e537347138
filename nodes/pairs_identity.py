"""What a set of Reflow pairs was made from, as digests: the model's weights and patches (``model_fingerprint``) and
each prompt's conditioning (``conditioning_digest``). D2FReflowPairs records them in a couplings folder's metadata,
so that continuing a folder with another model or prompt is refused."""

from __future__ import annotations

import hashlib

import comfy.model_management as mm
import torch

from .train_inputs import _conditioning_entries


def _hash_value(h, value, depth: int = 0):
    """Feed a conditioning value / model patch into a hash: tensors by a strided sample of their values,
    plain values by repr, containers recursively, anything else by its type name."""
    if depth > 6:
        return
    if torch.is_tensor(value):
        flat = value.detach().reshape(-1)
        h.update(f"T{tuple(value.shape)}{value.dtype}".encode())
        if flat.numel() and flat.device.type != "meta":
            step = max(1, flat.numel() // 256)
            h.update(flat[::step][:256].float().cpu().numpy().tobytes())
    elif isinstance(value, (str, int, float, bool)) or value is None:
        h.update(repr(value).encode())
    elif isinstance(value, (list, tuple)):
        h.update(f"[{len(value)}".encode())
        for v in value:
            _hash_value(h, v, depth + 1)
    elif isinstance(value, dict):
        for k in sorted(value, key=str):
            h.update(str(k).encode())
            _hash_value(h, value[k], depth + 1)
    else:
        h.update(type(value).__name__.encode())
        weights = getattr(value, "weights", None)  # comfy.weight_adapter (LoRA, LoHa, …)
        if weights is not None:
            _hash_value(h, weights, depth + 1)


def conditioning_digest(conditioning) -> str:
    h = hashlib.sha256()
    _hash_value(h, [[e[0], e[1]] for e in _conditioning_entries(conditioning)])
    return h.hexdigest()[:16]


def model_fingerprint(model) -> str:
    """A digest of the UNet's own weights (strided samples of every tensor) and of the model's weight patches
    (LoRAs, strengths). The model and its clones are unloaded first: while a clone is loaded the host merges
    that clone's patches into the shared weights, which must not change the digest."""
    mm.unload_model_and_clones(model)
    h = hashlib.sha256(type(model.model).__name__.encode())
    unet = model.model.diffusion_model
    samples, names = [], []
    for name, t in sorted(unet.state_dict().items()):
        names.append(f"{name}{tuple(t.shape)}")
        if t.numel() and t.device.type != "meta":
            flat = t.detach().reshape(-1)
            samples.append(flat[::max(1, flat.numel() // 64)][:64].float())
    h.update("|".join(names).encode())
    if samples:
        h.update(torch.cat([s.cpu() for s in samples]).numpy().tobytes())
    for key in sorted(model.patches):
        h.update(key.encode())
        _hash_value(h, model.patches[key])
    return h.hexdigest()[:16]
