"""Training data: latent buckets with per-sample conditioning, kept on the training device.

A bucket holds images of one resolution: latents (N, C, H, W) in the model's working scale and a dict
of conditioning tensors with a leading N (e.g. ``context`` (N, 77, 768), SDXL's ``y`` (N, 2816)), and
for Reflow couplings the noise (N, C, H, W) each latent was generated from.
Batches are drawn on the device with a device generator, so drawing never waits on the GPU.
"""

from __future__ import annotations

import math
import random

import torch


class DatasetError(ValueError):
    """The training data cannot be used as given (empty, mismatched, wrong channels)."""


def _common_length(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Token sequences of different lengths tiled to their least common multiple, as the host does
    when it batches prompts of 77 and 154 tokens."""
    lengths = {t.shape[0] for t in tensors}
    if len(lengths) == 1:
        return tensors
    target = math.lcm(*lengths)
    return [t.repeat((target // t.shape[0],) + (1,) * (t.ndim - 1)) for t in tensors]


def stack_conditioning(per_sample: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """List of per-sample dicts (tensors without batch dim) → dict of batched tensors."""
    if not per_sample:
        return {}
    keys = set(per_sample[0])
    for i, c in enumerate(per_sample):
        if set(c) != keys:
            raise DatasetError(f"conditioning {i} has keys {sorted(c)}, expected {sorted(keys)}: "
                               "all captions must come from the same text encoder setup")
    out = {}
    for k in sorted(keys):
        items = [c[k] for c in per_sample]
        if k == "context":
            items = _common_length(items)
        out[k] = torch.stack(items)
    return out


class LatentBuckets:
    """Buckets of (latents, conditioning); draws batches from one bucket at a time.

    A bucket is chosen with probability proportional to its size, then ``batch_size`` samples in it
    uniformly with replacement when the bucket is smaller than the batch, without otherwise.
    """

    def __init__(self, buckets: list[tuple], device=None,
                 dtype=torch.float32, cond_dtype=None, channels: int | None = None,
                 empty_cond: dict[str, torch.Tensor] | None = None):
        if not buckets or all(bucket[0].shape[0] == 0 for bucket in buckets):
            raise DatasetError("the dataset is empty: give at least one latent image and its caption")
        self.latents, self.conds, self.noise = [], [], []
        for i, (latents, conds, *noise) in enumerate(buckets):
            if latents.ndim != 4:
                raise DatasetError(f"bucket {i}: latents must be (N, C, H, W), got shape {tuple(latents.shape)}")
            if channels is not None and latents.shape[1] != channels:
                raise DatasetError(f"bucket {i}: latents have {latents.shape[1]} channels but the model expects "
                                   f"{channels}: encode the images with this model's VAE")
            if len(conds) == 1 and latents.shape[0] > 1:
                conds = conds * latents.shape[0]
            if len(conds) != latents.shape[0]:
                raise DatasetError(f"bucket {i}: {latents.shape[0]} images but {len(conds)} captions; "
                                   "give one caption per image, or a single caption for all")
            if noise and noise[0] is not None and noise[0].shape != latents.shape:
                raise DatasetError(f"bucket {i}: the couplings' noise has shape {tuple(noise[0].shape)}, their "
                                   f"latents {tuple(latents.shape)}")
            self.latents.append(latents.detach().clone().to(device=device, dtype=dtype))
            self.noise.append(noise[0].detach().clone().to(device=device, dtype=dtype)
                              if noise and noise[0] is not None else None)
            self.conds.append({k: v.to(device=device, dtype=cond_dtype or v.dtype)
                               for k, v in stack_conditioning(conds).items()})
        self.sizes = [lat.shape[0] for lat in self.latents]
        self.device = device
        self.empty = None if empty_cond is None else [self._fit_empty(empty_cond, c) for c in self.conds]

    @staticmethod
    def _fit_empty(empty: dict[str, torch.Tensor], batched: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The empty-prompt conditioning (no batch dim) shaped like one sample of ``batched``."""
        if set(empty) != set(batched):
            raise DatasetError(f"the empty-prompt conditioning has keys {sorted(empty)}, the captions "
                               f"{sorted(batched)}: encode both with the same CLIP")
        out = {}
        for k, v in empty.items():
            target = batched[k].shape[1:]
            if k == "context" and v.shape[0] != target[0] and target[0] % v.shape[0] == 0:
                v = v.repeat((target[0] // v.shape[0],) + (1,) * (v.ndim - 1))
            if v.shape != target:
                raise DatasetError(f"the empty-prompt conditioning '{k}' has shape {tuple(v.shape)}, the "
                                   f"captions {tuple(target)}")
            out[k] = v.to(batched[k].device, batched[k].dtype)
        return out

    def __len__(self) -> int:
        return sum(self.sizes)

    def choose_bucket(self, rng: random.Random) -> int:
        return rng.choices(range(len(self.sizes)), weights=self.sizes)[0] if len(self.sizes) > 1 else 0

    def indices(self, bucket: int, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        """``batch_size`` sample indices in ``bucket``: without replacement, or uniformly with replacement
        when the bucket is smaller than the batch."""
        n = self.sizes[bucket]
        device = self.latents[bucket].device
        if n >= batch_size:
            return torch.randperm(n, generator=generator, device=device)[:batch_size]
        return torch.randint(0, n, (batch_size,), generator=generator, device=device)

    def take(self, bucket: int, idx: torch.Tensor):
        """(x0, conditioning, noise) of the samples ``idx``; noise is None unless the bucket holds Reflow
        couplings (each x0 paired with the noise it was generated from)."""
        latents, conds, noise = self.latents[bucket], self.conds[bucket], self.noise[bucket]
        return latents[idx], {k: v[idx] for k, v in conds.items()}, (noise[idx] if noise is not None else None)

    def sample(self, bucket: int, batch_size: int, generator: torch.Generator):
        """``take(bucket, indices(bucket, batch_size, generator))``."""
        return self.take(bucket, self.indices(bucket, batch_size, generator))
