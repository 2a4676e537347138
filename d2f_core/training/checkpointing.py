"""Activation checkpointing for modules we do not own the code of.

``checkpointed(modules)`` swaps each module's bound ``forward`` for one that runs under
``torch.utils.checkpoint`` (activations recomputed in backward: memory for compute) and restores the
originals on exit, even after an exception.

The block's forward and its recomputation in backward run under the same attention-kernel choice (cuDNN
attention excluded, :data:`RECOMPUTABLE_ATTENTION`): non-reentrant checkpointing hands the backward of the
forward's kernels the tensors that the recomputation produced, so both passes must pick the same kernel.
Left to itself, scaled_dot_product_attention picked cuDNN attention in the first checkpointed forward of a
process and flash attention in its recomputation (H100, torch 2.11, SD1.5 at batch 1; flash's philox state and
log-sum-exp differ in shape from cuDNN's), which checkpointing rejects with a CheckpointError
(``bench/results/checkpoint_attention_h100.md``).
"""

from __future__ import annotations

import contextlib

import torch
import torch.utils.checkpoint
from torch.nn.attention import SDPBackend, sdpa_kernel

# The attention kernels a checkpointed block may use, in torch's own order of preference; the same list in the
# forward and in the recomputation makes the choice a function of the shapes alone.
RECOMPUTABLE_ATTENTION = (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH)


def _same_attention_kernels():
    return sdpa_kernel(list(RECOMPUTABLE_ATTENTION)), sdpa_kernel(list(RECOMPUTABLE_ATTENTION))


def _checkpointing_forward(forward):
    def run(args, kwargs):
        return forward(*args, **kwargs)

    def wrapped(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        # No RNG state saving: the networks we train have no dropout, and reading the CUDA RNG state
        # is not allowed while a CUDA graph is being captured.
        return torch.utils.checkpoint.checkpoint(run, args, kwargs, use_reentrant=False, preserve_rng_state=False,
                                                 context_fn=_same_attention_kernels)
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
