"""The data sets that ship inside the package (no download at run time).

``digits``: the 1797 8×8 handwritten digits of the UCI "Optical Recognition of Handwritten Digits"
test set as scikit-learn distributes them (see ``data/README.md``), stored as uint8 0…16.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ASSETS_DIR = Path(__file__).resolve().parent / "assets"
DIGITS_LEVELS = 16  # pixel values are counts of "on" pixels in a 4×4 block: 0 … 16


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (1797, 8, 8) in 0…16, labels uint8 (1797,) in 0…9)."""
    path = ASSETS_DIR / "digits.npz"
    if not path.is_file():
        raise FileNotFoundError(f"embedded data set missing: {path} (the package was installed without its data files)")
    with np.load(path) as f:
        return f["images"], f["labels"]


def digits_tensor(size: int = 16, mode: str = "bilinear") -> tuple[torch.Tensor, torch.Tensor]:
    """Digits as float32 images in [-1, 1], shape (1797, 1, size, size), and their class labels.

    x0 = 2·p/16 - 1, then resized from 8×8 (bilinear keeps values inside [-1, 1]).
    """
    images, labels = load_digits()
    x = torch.from_numpy(images.astype(np.float32))[:, None] * (2.0 / DIGITS_LEVELS) - 1.0
    if size != x.shape[-1]:
        kwargs = {"align_corners": False} if mode in ("bilinear", "bicubic") else {}
        x = F.interpolate(x, size=(size, size), mode=mode, **kwargs)
        if mode == "bicubic":
            x = x.clamp(-1, 1)  # bicubic overshoots; the model's data range is [-1, 1]
    return x.contiguous(), torch.from_numpy(labels.astype(np.int64))


def split_indices(n: int, held_out: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed random (train, held-out) split of range(n): same seed, same split, on every machine."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=g)
    n_held = int(round(n * held_out))
    return perm[n_held:], perm[:n_held]
