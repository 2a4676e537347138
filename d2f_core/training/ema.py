"""Exponential moving average (EMA) of the trained weights, for LoRA factors and full fine-tunes alike.

After optimizer step ``k`` of the EMA (k = 0, 1, …, counted from ``start_step``, the optimizer step the EMA
started at), with θ the trained tensors just updated by the optimizer::

    β_k = min(β, (1 + k) / (10 + k))      (warmup=True)
    β_k = β                               (warmup=False)
    θ_ema ← β_k·θ_ema + (1 − β_k)·θ

and θ_ema starts as a copy of θ (the weights the EMA starts from, θ_0). Unrolled, after K updates, with θ_j
the weights after the EMA's j-th update::

    θ_ema_K = (Π_{k<K} β_k)·θ_0 + Σ_{j=1..K} (1 − β_{j−1})·(Π_{j≤k<K} β_k)·θ_j        (weights sum to 1)

With constant β the weight of θ_j is (1 − β)·β^(K−j): the EMA averages about the last 1/(1 − β) steps. On a
steady drift (SGD on a constant gradient g at learning rate η: θ_j = θ_0 − j·η·g) it lags the weights by

    θ_ema_K − θ_K = η·g · β·(1 − β^K)/(1 − β)      (→ β/(1 − β) steps' worth of updates)

Why the warm-up (timm's and diffusers' form): without it θ_0, the untrained start, keeps weight β^K — 37% after
1000 steps at β = 0.999 — so a short run's EMA would mostly be its initial weights. (1+k)/(10+k) is 0.1 at the
first update, 0.5 at k = 8, 0.9 at k = 80 and 0.99 at k = 890, so β_k reaches β only once the run has lasted
long enough for an average over 1/(1 − β) steps to mean something.

Storage dtype (``dtype``): float32 (the default), or e.g. the training's bfloat16 to halve the EMA's memory in a
full fine-tune. Each update is computed in float32 (torch's op math for low-precision tensors) and rounded once
to the storage dtype. Caveat of bfloat16
(8 significant bits): an update (1 − β_k)·(θ − θ_ema) below half a unit in the last place, ≈ 2⁻⁹·|θ_ema|, is
rounded away, so with β = 0.999 a bf16 EMA only moves where θ and θ_ema differ by about 2·|θ_ema|, i.e. it
freezes. bfloat16 is for β ≤ 0.99 at most; float32 has no such floor in practice.

The EMA lives on the trained tensors' devices and is updated with one fused multi-tensor lerp per step, with
Python-float weights: no host sync. Under data parallelism every rank applies the same averaged gradient, so
each rank's EMA is the same without any collective.

:meth:`EMA.applied` swaps the EMA into the trained tensors for previews, exports and saves, and puts the training
weights back on exit, whatever happens inside. The trained tensors are changed in place (the same Parameter
objects and storages), so optimizers, hooks and captured CUDA graphs stay valid.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch

from .distributed import copy_into, local

__all__ = ["EMA", "EMAOptions", "EMA_DTYPES", "EMA_PREFIX", "with_ema", "split_ema", "warmup_decay"]

#: Storage choices of :class:`EMAOptions`: float32, or the dtype the caller trains in (resolved by the caller).
EMA_DTYPES = ("fp32", "training")
#: Name prefix of the EMA tensors next to the trained ones (snapshots, training-state files).
EMA_PREFIX = "ema."


def warmup_decay(decay: float, k: int, warmup: bool) -> float:
    """β_k = min(β, (1 + k)/(10 + k)) with warm-up, else β (k ≥ 0: updates since the EMA started)."""
    return min(decay, (1.0 + k) / (10.0 + k)) if warmup else decay


@dataclass
class EMAOptions:
    """What a user sets for the EMA (the D2FEMA node's output). ``dtype``: "fp32", or "training" for the
    dtype the run computes in (the caller resolves it with :meth:`torch_dtype`)."""

    decay: float = 0.999
    warmup: bool = True
    dtype: str = "fp32"

    def validate(self) -> "EMAOptions":
        d = float(self.decay)
        # β = 1 would keep the start weights forever, β < 0 is no average: both are input mistakes.
        if not (0.0 <= d < 1.0):
            raise ValueError(f"EMA decay must be in [0, 1) (e.g. 0.999), got {self.decay}")
        if self.dtype not in EMA_DTYPES:
            raise ValueError(f"EMA dtype must be one of {EMA_DTYPES}, got {self.dtype!r}")
        return self

    def torch_dtype(self, training_dtype: torch.dtype) -> torch.dtype:
        return torch.float32 if self.dtype == "fp32" else training_dtype

    def info(self) -> dict:
        """Plain-JSON description (file metadata)."""
        return {"decay": float(self.decay), "warmup": bool(self.warmup), "dtype": self.dtype}


class EMA:
    """θ_ema of the tensors ``named`` (name → live trained tensor, e.g. ``adapters.named_trainables()``).

    ``dtype``: storage dtype of θ_ema (None: each tensor's own). ``start_step``: the optimizer step (0-based) of
    the EMA's first update, so that ``update(step)`` uses k = step − start_step and a resumed run continues the
    warm-up where it was. The Trainer calls :meth:`update` after every optimizer step.
    """

    def __init__(self, named: dict[str, torch.Tensor], decay: float = 0.999, warmup: bool = True,
                 dtype: torch.dtype | None = torch.float32, start_step: int = 0):
        EMAOptions(decay, warmup).validate()
        if not named:
            raise ValueError("EMA: no tensors to average")
        self.decay, self.warmup, self.start_step = float(decay), bool(warmup), int(start_step)
        self.dtype = dtype
        self._live = dict(named)
        # A node runs under inference_mode: tensors made there are inference tensors, which can never be
        # updated in place outside it (the training loop runs outside it).
        with torch.inference_mode(False), torch.no_grad():
            self._ema = {k: t.detach().to(dtype=dtype or t.dtype, copy=True) for k, t in self._live.items()}
        self._applied = False

    @classmethod
    def from_options(cls, named: dict[str, torch.Tensor], options: EMAOptions, training_dtype: torch.dtype,
                     start_step: int = 0) -> "EMA":
        options.validate()
        return cls(named, options.decay, options.warmup, options.torch_dtype(training_dtype), start_step)

    # -- the update ----------------------------------------------------------------------------------
    def decay_at(self, step: int) -> float:
        """β_k for optimizer step ``step`` (k = step − start_step)."""
        k = int(step) - self.start_step
        if k < 0:
            raise ValueError(f"EMA update for step {step}, before the step it started at ({self.start_step})")
        return warmup_decay(self.decay, k, self.warmup)

    def update(self, step: int) -> None:
        """θ_ema ← β_k·θ_ema + (1 − β_k)·θ, after optimizer step ``step`` (0-based)."""
        if self._applied:
            # θ holds the EMA itself inside applied(): averaging it in would be a silent no-op at best, and the
            # training weights the exit restores would miss this step.
            raise RuntimeError("EMA.update inside EMA.applied(): the trained tensors hold the EMA, not the "
                               "training weights; update after leaving the block")
        weight = 1.0 - self.decay_at(step)
        same, mixed = ([], []), []
        for k, e in self._ema.items():
            t = self._live[k].detach()
            if t.dtype == e.dtype:
                same[0].append(e)
                same[1].append(t)
            else:
                mixed.append((e, t))
        with torch.inference_mode(False), torch.no_grad():
            # lerp(e, θ, w) = e + w·(θ − e) = β·e + (1 − β)·θ, in one fused launch over all tensors.
            if same[0]:
                torch._foreach_lerp_(same[0], same[1], weight)
            # Another storage dtype (a bf16 EMA of float32 weights): the update in float32 or better, rounded once,
            # one tensor at a time so the temporaries never exceed one tensor. θ is not rounded first.
            for e, t in mixed:
                ct = torch.promote_types(torch.promote_types(e.dtype, t.dtype), torch.float32)
                e.copy_(torch.lerp(e.to(ct), t.to(ct), weight))

    # -- state ---------------------------------------------------------------------------------------
    def named_tensors(self) -> dict[str, torch.Tensor]:
        """The live EMA tensors by the trained tensors' names (not copies)."""
        return dict(self._ema)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Detached copies of the EMA tensors (a snapshot later updates do not change)."""
        return {k: v.detach().clone() for k, v in self._ema.items()}

    def info(self) -> dict:
        """Plain JSON: what a training-state file records next to the tensors (see :meth:`load`)."""
        return {"decay": self.decay, "warmup": self.warmup, "start_step": self.start_step,
                "dtype": str(self.dtype).replace("torch.", "") if self.dtype is not None else "params"}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy ``tensors`` (names and shapes as :meth:`state_tensors`) into the EMA, cast to its dtype."""
        got, expected = set(tensors), set(self._ema)
        if got != expected:
            missing, extra = sorted(expected - got), sorted(got - expected)
            raise ValueError(f"EMA state does not fit these weights: {len(missing)} missing (e.g. {missing[:3]}), "
                             f"{len(extra)} unexpected (e.g. {extra[:3]})")
        for k, e in self._ema.items():
            if tuple(tensors[k].shape) != tuple(e.shape):
                raise ValueError(f"EMA state '{k}': shape {tuple(tensors[k].shape)}, the weights' is {tuple(e.shape)}")
        with torch.inference_mode(False), torch.no_grad():
            for k, e in self._ema.items():
                copy_into(e, tensors[k])  # a sharded EMA (FSDP) takes its rows of the whole tensor

    def load(self, tensors: dict[str, torch.Tensor], info: dict) -> None:
        """Resume: the saved EMA tensors, and the step the saved EMA started at (so the warm-up continues where
        it was). β, warm-up and dtype stay this object's: a resumed run may change them."""
        self.load_state_tensors(tensors)
        self.start_step = int(info.get("start_step", self.start_step))

    def restart(self, start_step: int) -> None:
        """θ_ema ← θ, and k counts from ``start_step``: an EMA begun in a run resumed from a state that had none."""
        if self._applied:
            raise RuntimeError("EMA.restart inside EMA.applied(): the trained tensors hold the EMA")
        with torch.inference_mode(False), torch.no_grad():
            for k, e in self._ema.items():
                e.copy_(self._live[k].detach())
        self.start_step = int(start_step)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._ema.values())

    # -- using the EMA -------------------------------------------------------------------------------
    @contextlib.contextmanager
    def applied(self, backup_device=None) -> Iterator["EMA"]:
        """Inside the block the trained tensors hold θ_ema (cast to their dtype); on exit, also on an exception,
        they hold the training weights again, bit for bit.

        Where the EMA has the tensors' dtype the two are swapped tensor by tensor (no memory beyond one tensor's
        temporary); otherwise the training weights are backed up first, on ``backup_device`` (default: their
        own device; e.g. "cpu" for a full fine-tune short of GPU memory).
        """
        if self._applied:
            raise RuntimeError("EMA.applied() is already active: nested use would back up the EMA as the "
                               "training weights")
        swapped: list[str] = []
        backup: dict[str, torch.Tensor] = {}
        self._applied = True
        try:
            with torch.inference_mode(False), torch.no_grad():
                for k, t in self._live.items():
                    e = self._ema[k]
                    if e.dtype == t.dtype:
                        tmp = t.detach().clone()
                        t.copy_(e)
                        e.copy_(tmp)  # the EMA slot holds the training weights until the swap back
                        swapped.append(k)
                    else:
                        # this rank's shard only, under FSDP (a DTensor is not moved between devices piecewise)
                        lt = local(t.detach())
                        backup[k] = lt.to(backup_device if backup_device is not None else lt.device, copy=True)
                        t.copy_(e)
            yield self
        finally:
            with torch.inference_mode(False), torch.no_grad():
                for k in swapped:
                    t, e = self._live[k], self._ema[k]
                    tmp = t.detach().clone()
                    t.copy_(e)
                    e.copy_(tmp)
                for k, saved in backup.items():
                    local(self._live[k]).copy_(saved)
            self._applied = False

    @property
    def is_applied(self) -> bool:
        return self._applied


# --- snapshots that include the EMA ------------------------------------------------------------------
def with_ema(named: dict[str, torch.Tensor], ema: EMA | None) -> dict[str, torch.Tensor]:
    """The trained tensors and, when there is an EMA, its tensors under ``ema.<name>``: what a recovery snapshot
    must hold, since an EMA updated after the last good step has averaged in the weights a NaN is restored from."""
    if ema is None:
        return dict(named)
    clash = [k for k in named if k.startswith(EMA_PREFIX)]
    if clash:  # split_ema would take them for EMA tensors
        raise ValueError(f"trained tensor names may not start with '{EMA_PREFIX}': {clash[:3]}")
    out = dict(named)
    out.update({EMA_PREFIX + k: v for k, v in ema.named_tensors().items()})
    return out


def split_ema(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Inverse of :func:`with_ema`: (trained tensors, EMA tensors by the trained names)."""
    weights = {k: v for k, v in state.items() if not k.startswith(EMA_PREFIX)}
    emas = {k[len(EMA_PREFIX):]: v for k, v in state.items() if k.startswith(EMA_PREFIX)}
    return weights, emas

