"""The training engine: Diff2Flow / native fine-tuning of a network seen through the bridge.

``trainer`` (the optimizer step written as the equations, and the loop around it), ``adapters`` (LoRA
bypass and full fine-tune on a frozen shared module), ``data`` (latent buckets), ``distributed`` (data-parallel
ranks over torch.distributed), ``couplings`` (Reflow pairs:
store and line noise), ``scheduled_sampling``, ``ema`` (moving average of the trained weights), and what keeps a step fast and safe: ``graphs`` (CUDA-graph
replay), ``compilation`` (torch.compile with a way out), ``checkpointing``, ``precision``, ``snapshots``
(NaN-recovery copies). Imports ``d2f_core.flow`` and ``d2f_core.storage``; never ComfyUI.
"""
