"""Activation checkpointing for modules we do not own the code of.

``checkpointed(modules)`` swaps each module's bound ``forward`` for one that runs under
``torch.utils.checkpoint`` (activations recomputed in backward: memory for compute) and restores the
originals on exit, even after an exception.
"""

from __future__ import annotations

import contextlib

import torch
import torch.utils.checkpoint


def _checkpointing_forward(forward):
    def run(args, kwargs):
        return forward(*args, **kwargs)

    def wrapped(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        # No RNG state saving: the networks we train have no dropout, and reading the CUDA RNG state
        # is not allowed while a CUDA graph is being captured.
        return torch.utils.checkpoint.checkpoint(run, args, kwargs, use_reentrant=False, preserve_rng_state=False)
    return wrapped


@contextlib.contextmanager
def checkpointed(modules):
    modules = list(modules)
    patched = []
    try:
        for m in modules:
            had_own = "forward" in m.__dict__
            original = m.__dict__.get("forward")
            m.forward = _checkpointing_forward(m.forward)
            patched.append((m, had_own, original))
        yield modules
    finally:
        for m, had_own, original in reversed(patched):
            if had_own:
                m.forward = original
            else:
                del m.forward


def blocks_by_class_name(root: torch.nn.Module, class_names: tuple[str, ...]) -> list[torch.nn.Module]:
    """The outermost modules under ``root`` whose class name is in ``class_names`` (not nested in one another)."""
    found, skip = [], set()
    for name, m in root.named_modules():
        if any(name.startswith(p + ".") for p in skip):
            continue
        if type(m).__name__ in class_names:
            found.append(m)
            skip.add(name)
    return found
