"""Diff2Flow engine: the exact bridge between discrete VP diffusion (ε / v / x0) and flow matching.

Pure torch; nothing here imports ComfyUI or the application (``d2f_app``, ``d2f_host``). Three rooms:

* ``flow/`` — the math: the discrete schedule and its exact inverse, the bridge's change of coordinates,
  samplers, guidance, losses. Imports nothing of the pack outside ``flow``.
* ``training/`` — the training engine: the Trainer, LoRA / full adapters, data buckets, Reflow couplings,
  scheduled sampling, and what makes a step fast and safe (CUDA graphs, compile, checkpointing, precision,
  NaN snapshots). Imports ``flow`` and ``storage``.
* ``storage/`` — the files the engine writes and reads: atomic never-clobbering writes, training state.
  Imports nothing else of the pack.

Notation (DESIGN §2):

* ``ς`` (``ve_sigma``): the model's own sigma in ComfyUI's VE coordinates, ``x_VE = x0 + ς·ε``,
  ``ς_n = sqrt((1 - ᾱ_n) / ᾱ_n)``.
* ``σ`` (``sigma``): flow time, ``x = (1 - σ)·x0 + σ·ε``, σ = 1 is pure noise.
* ``σ = ς / (1 + ς)``, ``x = x_VE / (1 + ς) = (1 - σ)·x_VE``.
"""

from .flow.schedule import DiscreteSchedule, make_betas
from .flow.bridge import FlowBridge, PREDICTION_TYPES, flow_sigma, ve_sigma

__all__ = ["DiscreteSchedule", "make_betas", "FlowBridge", "PREDICTION_TYPES", "flow_sigma", "ve_sigma"]
__version__ = "0.1.0"
