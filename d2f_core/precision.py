"""Weight precision for training a (private) network copy."""

from __future__ import annotations

import torch

NORMS = (torch.nn.GroupNorm, torch.nn.LayerNorm, torch.nn.modules.batchnorm._BatchNorm)


def cast_for_training(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Matrix weights in the compute ``dtype`` (autocast then casts nothing per step); normalisation
    layers stay float32, where autocast runs them anyway and where bf16 statistics lose too much."""
    module.to(dtype)
    if dtype != torch.float32:
        for m in module.modules():
            if isinstance(m, NORMS):
                m.float()
    return module
