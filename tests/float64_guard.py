"""A dispatch-level guard: which float64 tensors does the pack's code make?

Apple MPS has no float64, so every float64 tensor the pack makes on the model's device breaks a Mac.
CI has only a CPU, where float64 exists, so the guard is stricter than "not on a device": it counts
every float64 tensor produced while a frame of the pack's engine or nodes (``d2f_core/``, ``nodes/``)
is the nearest owner on the Python stack, on any device. The host itself may make float64 on the CPU (its
own business, e.g. when D2FTrain asks it to reload the checkpoint and it rebuilds its β schedule); those are
counted apart and never fail a test.

``TorchDispatchMode`` sees every aten op, factory functions and ``torch.tensor``/``from_numpy``
(as ``lift_fresh``) included, below autograd, so it works in training steps too.
"""

from __future__ import annotations

import os
import sys
import traceback

import torch
from torch.utils._pytree import tree_leaves
from torch.utils._python_dispatch import TorchDispatchMode

PACK_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACK_PARTS = ("d2f_core", "nodes")

# Where float64 is the design: a schedule's tables are built once, in float64 on the CPU (exact), when a
# model is patched or a training run is set up; a call never builds them. (file, function) of those builders.
TABLE_BUILDERS = frozenset({
    ("schedule.py", "make_betas"), ("schedule.py", "rescale_zero_terminal_snr"), ("schedule.py", "from_betas"),
    ("schedule.py", "__init__"), ("schedule.py", "_build_tables"), ("schedule.py", "_split"),
    ("bridge.py", "__init__"), ("flow_sampling.py", "schedule_of"), ("flow_sampling.py", "__init__"),
})


_LIBRARY_ROOTS = tuple(dict.fromkeys(os.path.join(os.path.realpath(p), "") for p in
                                    (sys.prefix, sys.base_prefix, sys.exec_prefix, os.path.dirname(torch.__file__))))


def pack_roots(*pack_dirs: str) -> tuple[str, ...]:
    """The engine and node folders of the pack, as given and resolved (the host may load the pack through a
    symlink in custom_nodes/)."""
    roots = []
    for pack in (PACK_DIR,) + tuple(pack_dirs):
        for path in (pack, os.path.realpath(pack)):
            roots += [os.path.join(path, part) + os.sep for part in PACK_PARTS]
    return tuple(dict.fromkeys(roots))


class Float64Guard(TorchDispatchMode):
    """``with Float64Guard() as guard: …`` then ``guard.violations`` (pack) and ``guard.host_float64``
    (everything else). ``strict=True`` raises on leaving the block when the pack made any float64.
    ``allow_table_building=True`` lets the table builders (``TABLE_BUILDERS``) make float64 on the CPU, as
    designed, for guards that span a node which sets up a run (D2FTrain); never on a device."""

    def __init__(self, *pack_dirs: str, host_dirs: tuple[str, ...] = (), strict: bool = True,
                 allow_table_building: bool = False):
        super().__init__()
        self.roots = pack_roots(*pack_dirs)
        self.host_roots = tuple(dict.fromkeys(os.path.join(p, "") for d in host_dirs for p in (d, os.path.realpath(d))))
        self.strict = strict
        self.allow_table_building = allow_table_building
        self.violations: list[tuple[str, str, str]] = []  # (op, device, innermost pack frame + stack)
        self.host_float64 = 0
        self.table_float64 = 0  # CPU float64 of the table builders, when allowed
        self._owner: dict[str, str] = {}

    def _owner_of(self, name: str) -> str:
        owner = self._owner.get(name)
        if owner is None:
            real = os.path.realpath(name)
            if name.startswith(self.roots) or real.startswith(self.roots):
                owner = "pack"
            elif real.startswith(_LIBRARY_ROOTS) or f"{os.sep}site-packages{os.sep}" in real:
                owner = "other"  # torch & co., also when the host's venv lives inside the host folder
            elif self.host_roots and (name.startswith(self.host_roots) or real.startswith(self.host_roots)):
                owner = "host"
            else:
                owner = "other"  # torch, the standard library, the tests themselves
            self._owner[name] = owner
        return owner

    def _pack_frame(self, frame):
        """The frame that made the tensor, if it is the pack's: walking out from the innermost frame, the first
        frame of the pack or of the host (``host_dirs``) decides; torch's, the standard library's and the tests'
        frames are skipped (a test's stand-in called from pack code is the pack's doing). Without ``host_dirs``,
        any pack frame on the stack counts."""
        while frame is not None:
            owner = self._owner_of(frame.f_code.co_filename)
            if owner == "pack":
                return frame
            if owner == "host":
                return None
            frame = frame.f_back
        return None

    def _building_tables(self, frame) -> bool:
        """Whether a pack table builder is on the stack (the float64-on-the-CPU-by-design case)."""
        while frame is not None:
            code = frame.f_code
            if (os.path.basename(code.co_filename), code.co_name) in TABLE_BUILDERS and self._owner_of(code.co_filename) == "pack":
                return True
            frame = frame.f_back
        return False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        made = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor) and t.dtype == torch.float64]
        if made:
            frame = self._pack_frame(sys._getframe(1))
            if frame is None:
                self.host_float64 += 1
            elif (self.allow_table_building and all(t.device.type == "cpu" for t in made)
                  and self._building_tables(frame)):
                self.table_float64 += 1
            else:
                where = f"{frame.f_code.co_filename}:{frame.f_lineno} in {frame.f_code.co_name}"
                stack = "".join(traceback.format_stack(sys._getframe(1), limit=12))
                self.violations.append((str(func), str(made[0].device), where + "\n" + stack))
        return out

    def report(self, limit: int = 3) -> str:
        lines = [f"{len(self.violations)} float64 tensor(s) made by the pack's code:"]
        for op, device, where in self.violations[:limit]:
            lines.append(f"--- {op} on {device}, made at {where}")
        return "\n".join(lines)

    def __exit__(self, exc_type, exc, tb):
        result = super().__exit__(exc_type, exc, tb)
        if self.strict and exc_type is None and self.violations:
            raise AssertionError(self.report())
        return result
