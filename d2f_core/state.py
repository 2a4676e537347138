"""Training-state files: trained tensors + optimizer state + step, in one safetensors file.

Layout: ``weights.<name>`` for the adaptation's tensors, ``optim.<param index>.<field>`` for the
optimizer's per-parameter state; the metadata holds ``step``, the optimizer's param groups and any
caller fields as JSON. Resuming from such a file continues the run exactly (the training loop's
randomness is a function of (seed, step)).
"""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import load_file, save_file


def save_state(path: str, weights: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer | None,
               step: int, meta: dict | None = None) -> str:
    tensors = {f"weights.{k}": v.detach().contiguous().cpu() for k, v in weights.items()}
    groups = []
    if optimizer is not None:
        sd = optimizer.state_dict()
        for idx, fields in sd["state"].items():
            for name, value in fields.items():
                value = torch.as_tensor(value)
                tensors[f"optim.{idx}.{name}"] = value.detach().contiguous().cpu()
        groups = sd["param_groups"]
    header = {"step": str(int(step)), "param_groups": json.dumps(groups), "meta": json.dumps(meta or {})}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".partial"
    save_file(tensors, tmp, metadata=header)
    os.replace(tmp, path)  # a crash mid-write never leaves a truncated state behind
    return path


def read_metadata(path: str) -> dict:
    from safetensors import safe_open
    with safe_open(path, framework="pt") as f:
        return f.metadata() or {}


def load_state(path: str, optimizer: torch.optim.Optimizer | None = None, device=None):
    """Returns (weights, step, meta); loads the optimizer state into ``optimizer`` when given."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"no training state at '{path}'")
    header = read_metadata(path)
    if "step" not in header:
        raise ValueError(f"'{path}' is not a Diff2Flow training state (no step in its metadata)")
    tensors = load_file(path, device=str(device) if device is not None else "cpu")
    weights = {k[len("weights."):]: v for k, v in tensors.items() if k.startswith("weights.")}
    if optimizer is not None:
        state: dict = {}
        for k, v in tensors.items():
            if k.startswith("optim."):
                _, idx, name = k.split(".", 2)
                state.setdefault(int(idx), {})[name] = v
        groups = json.loads(header.get("param_groups", "[]"))
        if groups:
            optimizer.load_state_dict({"state": state, "param_groups": groups})
    return weights, int(header["step"]), json.loads(header.get("meta", "{}"))
