"""Reading the losses every few steps, and keeping the last weights a finite loss has proven good.

A step's loss stays on the device (reading it is a host sync); every few steps the pending losses are read
at once and checked. The weights after step n are proven good only by the loss of step n+1, which is computed
with them: the snapshot taken at one read-out (``latest``) becomes ``good`` once the next read-out begins with a
finite loss. On a non-finite loss the good weights are restored and the run stops with
:class:`NonFiniteLossError`. At most two snapshots are referenced at a time, and a new one is taken only
after the older was released (so a two-slot ring such as :class:`~d2f_core.training.snapshots.HostSnapshots`
may serve ``snapshot``).
"""

from __future__ import annotations

import math
from typing import Callable

import torch


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; ``step`` is the first bad optimizer step (1-based),
    ``last_good_step`` the step whose weights were restored (the last loss check before it)."""

    def __init__(self, step: int, message: str, last_good_step: int | None = None):
        super().__init__(message)
        self.step = step
        self.last_good_step = step - 1 if last_good_step is None else last_good_step


class LossWatch:
    """``add(loss)`` after each step (a device tensor, no sync); ``read(step)`` at a read-out.

    ``reduce``: applied to the stacked pending losses before they are read, e.g. the mean over data-parallel
    ranks (:meth:`~d2f_core.training.distributed.DistributedContext.mean`): one collective per read-out, and
    every rank then judges the same values, so a non-finite loss on one rank stops all of them.
    """

    def __init__(self, start_step: int, snapshot: Callable[[], dict] | None = None,
                 restore: Callable[[dict], None] | None = None,
                 reduce: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self.snapshot, self.restore, self.reduce = snapshot, restore, reduce
        self.pending: list[torch.Tensor] = []
        self.good = self.latest = snapshot() if snapshot else None
        self.good_step = self.latest_step = start_step

    def add(self, loss: torch.Tensor) -> None:
        self.pending.append(loss)

    def read(self, step_done: int) -> list[float]:
        """The losses of the steps since the last read-out (one host sync), in order. Raises
        :class:`NonFiniteLossError` after restoring the last good weights if any of them is not finite."""
        if not self.pending:
            return []
        stacked = torch.stack(self.pending)
        values = (self.reduce(stacked) if self.reduce else stacked).tolist()
        self.pending = []
        first_step = step_done - len(values) + 1
        for i, v in enumerate(values):
            if not math.isfinite(v):
                self._fail(first_step + i, v, first_loss_was_finite=i > 0)
        if self.snapshot:
            self.good, self.good_step = self.latest, self.latest_step  # releases the older snapshot first
            self.latest, self.latest_step = self.snapshot(), step_done
        return values

    def _fail(self, bad_step: int, value: float, first_loss_was_finite: bool):
        if first_loss_was_finite:  # the weights of the last read-out were used by a finite loss: they are good
            self.good, self.good_step = self.latest, self.latest_step
        if self.good is not None and self.restore:
            self.restore(self.good)
            last_good = self.good_step
        else:
            last_good = bad_step - 1
        raise NonFiniteLossError(bad_step, (
            f"the loss became {value} at step {bad_step}: training stopped and the weights were "
            f"reset to the last good state (step {last_good}). Lower the learning rate, keep "
            "gradient clipping on, or train in bf16/fp32 instead of fp16."), last_good_step=last_good)
