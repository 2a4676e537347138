"""Where a D2FTrain run's files go in ComfyUI's output folder, and how ``resume_from`` is read.

Every run gets its own counter NNNNN (ComfyUI's SaveImage convention), reserved when it starts by creating
its state folder, so no run ever writes over another run's files, including a run resumed from another:

* ``output/loras/<run_name>_<NNNNN>_<step:06d>_steps.safetensors``: the LoRA (full mode: the weight
  differences) of each saved step, written once, never replaced;
* ``output/d2f_states/<run_name>_<NNNNN>/state.safetensors``: the run's resumable state, which the run
  rewrites at each save.

Every write is ``d2f_core.storage.files.atomic_save``: a file is complete or absent, whatever stops the process.
Every file carries ``modelspec.*`` / ``diff2flow.*`` metadata (``d2f_core.storage.metadata``).
"""

from __future__ import annotations

import os
from typing import Callable

import folder_paths

from ..d2f_core.storage.files import atomic_save, reserve_numbered, resolve_inside, used_counters

LORA_DIR = "loras"
STATES_DIR = "d2f_states"
STATE_FILE = "state.safetensors"
WHERE = (f"output/{LORA_DIR}/<run_name>_<NNNNN>_<step>_steps.safetensors (LoRA) and "
         f"output/{STATES_DIR}/<run_name>_<NNNNN>/{STATE_FILE} (resumable state)")


def resume_state_path(value: str) -> str:
    """The training state ``resume_from`` names: a path relative to output/ (or absolute) that must lie
    inside output/; a run folder stands for the state file in it."""
    path = resolve_inside(folder_paths.get_output_directory(), value, "resume_from")
    if os.path.isdir(path):
        path = os.path.join(path, STATE_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"resume_from: no training state at '{path}'")
    return path


class RunFiles:
    """One run's files. Creating it reserves the run's counter; ``release`` gives an unused one back."""

    def __init__(self, run_name: str):
        out = folder_paths.get_output_directory()
        self.lora_dir = os.path.join(out, LORA_DIR)
        taken = used_counters(self.lora_dir, run_name)  # LoRA files whose state folder was deleted
        self.counter, self.folder = reserve_numbered(os.path.join(out, STATES_DIR), run_name, taken)
        self.name = f"{run_name}_{self.counter:05d}"
        self.state_path = os.path.join(self.folder, STATE_FILE)
        self.lora_paths: dict[int, str] = {}  # step → LoRA file written by this run
        self.state_step: int | None = None

    def lora_path(self, step: int) -> str:
        return os.path.join(self.lora_dir, f"{self.name}_{step:06d}_steps.safetensors")

    def save(self, step: int, lora: dict, write_state: Callable[[str], object],
             metadata: dict[str, str] | None = None) -> str:
        """The LoRA of ``step`` (once per step: a file is never written twice), with ``metadata`` in its header,
        and then the run's state (``write_state(path)``), unless the state already holds ``step``. Returns the
        LoRA's path."""
        if step not in self.lora_paths:
            self.lora_paths[step] = atomic_save(lora, self.lora_path(step), metadata)
        if self.state_step != step:
            write_state(self.state_path)
            self.state_step = step
        return self.lora_paths[step]

    def kept(self) -> str:
        """What this run has on disk, for error messages."""
        parts = []
        if self.lora_paths:
            step, path = next(reversed(self.lora_paths.items()))
            parts.append(f"the LoRA of step {step} in {path}")
        if self.state_step is not None:
            parts.append(f"the resumable state of step {self.state_step} in {self.state_path}")
        return f"Kept: {' and '.join(parts)}." if parts else "Nothing of this run was saved."

    def release(self) -> None:
        """Remove the run's state folder if the run saved nothing (the counter is then free again)."""
        try:
            os.rmdir(self.folder)
        except OSError:
            pass
