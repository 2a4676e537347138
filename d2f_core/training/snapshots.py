"""Recovery snapshots of trained tensors kept in host memory.

The Trainer keeps the last weights proven good (and the latest, not yet proven) to restore after a
non-finite loss. For a LoRA that is a few MB and lives on the GPU. For a full fine-tune it is two more
copies of every weight (2 × 3.4 GB for SD1.5 in float32), which would cost more GPU memory than the
model itself; ``HostSnapshots`` keeps them in host memory instead.

Buffers are allocated once (page-locked where the system allows, so the device-to-host copy is
asynchronous and overlaps the next steps) and used in turn. Two slots are enough under the Trainer's
contract: at most two snapshots are referenced at a time, and a new one is taken only after the older
of the two was released.
"""

from __future__ import annotations

import torch


class HostSnapshots:
    """``take()`` → {name: host copy of tensor} for the live tensors ``named`` (e.g. the trained parameters).

    A returned snapshot stays valid until ``slots`` further snapshots have been taken.
    """

    def __init__(self, named: dict[str, torch.Tensor], slots: int = 2):
        if slots < 1:
            raise ValueError("slots must be at least 1")
        self.named = dict(named)
        self.pinned = torch.cuda.is_available() and any(t.is_cuda for t in self.named.values())
        self.buffers = [self._allocate() for _ in range(slots)]
        self.taken = 0

    def _allocate(self) -> dict[str, torch.Tensor]:
        if self.pinned:
            try:
                return {k: torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for k, t in self.named.items()}
            except RuntimeError:  # the system refused that much page-locked memory: plain host memory
                self.pinned = False
        return {k: torch.empty(t.shape, dtype=t.dtype) for k, t in self.named.items()}

    def take(self) -> dict[str, torch.Tensor]:
        buffer = self.buffers[self.taken % len(self.buffers)]
        self.taken += 1
        with torch.no_grad():
            for k, t in self.named.items():
                # Ordered on the current stream before any later in-place update of t; the host reads the
                # buffer only in a restore, which follows a loss read-out (a synchronisation).
                buffer[k].copy_(t.detach(), non_blocking=self.pinned)
        return buffer

    @property
    def nbytes(self) -> int:
        """Host memory held by the buffers."""
        return sum(t.numel() * t.element_size() for b in self.buffers for t in b.values())
