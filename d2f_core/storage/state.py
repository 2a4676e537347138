"""Training-state files: trained tensors + optimizer state + step, in one safetensors file.

Layout: ``weights.<name>`` for the adaptation's tensors, ``optim.<param index>.<field>`` for the
optimizer's per-parameter state, ``ema.<name>`` for the EMA of the weights when the run keeps one; the metadata
holds ``step``, the optimizer's param groups and any caller fields as JSON (``meta``), the EMA's own fields as
JSON (``ema``: decay, warm-up, the step it started at), and the caller's descriptive keys (``modelspec.*``,
``diff2flow.*``: ``metadata.py``), which may not reuse those names. Resuming from such a file continues the run
exactly, EMA included (the training loop's randomness is a function of (seed, step)).

A state only fits the run that made it: ``meta`` records what decides that (mode, LoRA rank/alpha/targets,
the model's ``architecture_fingerprint``) and ``resume_mismatches`` compares it with a new run's settings
from the header alone, so a mismatch is refused before any model is loaded.

Files are written with ``files.atomic_save`` (a run rewrites its own state as it goes: ``replace``);
damaged files raise ``files.DamagedFileError`` naming the file.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

import torch

from .files import atomic_save, read_header, read_tensors
from .metadata import RESERVED, check_metadata

WHAT = "training state"


def save_state(path: str, weights: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer | dict | None,
               step: int, meta: dict | None = None, *, ema: dict[str, torch.Tensor] | None = None,
               ema_info: dict | None = None, metadata: dict[str, str] | None = None) -> str:
    """Write the state of ``step``: ``weights`` (the training weights), the optimizer's state, ``ema`` (the EMA
    tensors by the weights' names, with ``ema_info``) and descriptive ``metadata`` (str → str)."""
    clash = sorted(RESERVED & set(metadata or {}))
    if clash:  # a descriptive key named like a state field would replace it, and the state would not resume
        raise ValueError(f"metadata keys {clash} are reserved for the training state's own fields")
    tensors = {f"weights.{k}": v for k, v in weights.items()}
    if ema is not None:
        tensors.update({f"ema.{k}": v for k, v in ema.items()})
    groups = []
    if optimizer is not None:
        # a dict: a state dict already made, e.g. a sharded run's gathered whole (gather_optimizer_state)
        sd = optimizer if isinstance(optimizer, dict) else optimizer.state_dict()
        for idx, fields in sd["state"].items():
            for name, value in fields.items():
                tensors[f"optim.{idx}.{name}"] = torch.as_tensor(value)
        groups = sd["param_groups"]
    header = dict(check_metadata(metadata or {}))
    header.update({"step": str(int(step)), "param_groups": json.dumps(groups), "meta": json.dumps(meta or {})})
    if ema is not None:
        header["ema"] = json.dumps(ema_info or {})
    return atomic_save(tensors, path, header, replace=True)


def read_metadata(path: str) -> dict:
    return read_header(path, WHAT)


def read_state_meta(path: str) -> tuple[int, dict]:
    """(step, meta) of a training-state file, from its header only; ValueError if it is not one."""
    header = read_metadata(path)
    if "step" not in header:
        raise ValueError(f"'{path}' is not a Diff2Flow training state (no step in its metadata): resume_from "
                         "takes a state.safetensors from output/d2f_states/, not a LoRA file")
    try:
        return int(header["step"]), json.loads(header.get("meta", "{}"))
    except ValueError as exc:
        raise ValueError(f"the {WHAT} '{path}' has an unreadable header ({exc}): delete or replace that file") from None


@dataclass
class TrainingState:
    """What a training-state file holds. ``ema``/``ema_info``: None for a state saved without an EMA."""
    weights: dict[str, torch.Tensor]
    step: int
    meta: dict
    ema: dict[str, torch.Tensor] | None = None
    ema_info: dict | None = None


def load_state(path: str, optimizer: torch.optim.Optimizer | None = None, device=None):
    """Returns (weights, step, meta); loads the optimizer state into ``optimizer`` when given."""
    state = read_state(path, optimizer, device)
    return state.weights, state.step, state.meta


def read_state(path: str, optimizer: torch.optim.Optimizer | None = None, device=None) -> TrainingState:
    """The whole state (:class:`TrainingState`); loads the optimizer state into ``optimizer`` when given."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"no training state at '{path}'")
    step, meta = read_state_meta(path)
    tensors, header = read_tensors(path, WHAT, device=device if device is not None else "cpu")
    weights = {k[len("weights."):]: v for k, v in tensors.items() if k.startswith("weights.")}
    ema = ema_info = None
    if "ema" in header:
        ema = {k[len("ema."):]: v for k, v in tensors.items() if k.startswith("ema.")}
        try:
            ema_info = json.loads(header["ema"])
        except ValueError as exc:
            raise ValueError(f"the {WHAT} '{path}' has an unreadable EMA header ({exc}): delete or replace that "
                             "file") from None
    if optimizer is not None:
        state: dict = {}
        for k, v in tensors.items():
            if k.startswith("optim."):
                _, idx, name = k.split(".", 2)
                state.setdefault(int(idx), {})[name] = v
        groups = json.loads(header.get("param_groups", "[]"))
        if groups:
            optimizer.load_state_dict({"state": state, "param_groups": groups})
    return TrainingState(weights, step, meta, ema, ema_info)


def architecture_fingerprint(state_dict: dict[str, torch.Tensor]) -> str:
    """sha256 over the key names and shapes of a model's state dict: which architecture a state's tensors
    fit. Weights are not read (cheap, no device work), so finetunes of one architecture share it: a LoRA
    state carries over between them as a LoRA file does."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        h.update(f"{name}{tuple(state_dict[name].shape)};".encode())
    return h.hexdigest()[:16]


# The settings a state must share with the run that resumes it. LoRA-only fields are skipped in full mode.
RESUME_KEYS = ("mode", "rank", "alpha", "lora_targets", "model")
LORA_ONLY = frozenset({"rank", "alpha", "lora_targets"})


def resume_mismatches(stored: dict, wanted: dict) -> list[str]:
    """What differs between a state's ``meta`` and a new run's settings, one readable item per field.
    Fields the state does not record are skipped: states written before a field was recorded are
    accepted when everything they do record matches (older states hold mode, rank and run_name only)."""
    lora = wanted.get("mode") == "lora"
    diffs = []
    for key in RESUME_KEYS:
        if key not in stored or key not in wanted or (key in LORA_ONLY and not lora):
            continue
        a, b = stored[key], wanted[key]
        same = float(a) == float(b) if key == "alpha" else a == b
        if same:
            continue
        if key == "model":
            diffs.append(f"model: the state was trained on another architecture (fingerprint {a} in the state, "
                         f"{b} for this model)")
        else:
            diffs.append(f"{key} {a!r} in the state, {b!r} in this run")
    return diffs
