"""Sample-quality metrics for the CPU demo and the quality benchmark: Fréchet distances in fixed,
documented feature spaces that never see a generated sample.

    FD(a, b) = ‖μ_a - μ_b‖² + tr(C_a + C_b - 2·(C_a^½ C_b C_a^½)^½)

between Gaussians fitted to the features of two image sets (float64, symmetric eigendecompositions
only). Two feature spaces, both fitted or seeded once and then frozen:

* :class:`PixelPCAFrechet` — f = (x - μ_train)·V_k, the top-k principal directions of the *training*
  images' pixels (linear; what the demo has always reported).
* :class:`RandomConvFrechet` — a fixed random two-layer conv net (weights from a seeded CPU generator, the
  same numbers on every machine), its pooled ReLU activations projected to ``dim`` features and scaled
  per feature by the training images' std (nonlinear; spatial structure survives the 4×4 pooling).

Both read images in [-1, 1] (clamped), shape (N, C, H, W). Like any Fréchet distance on N samples the
estimate is biased upwards by O(dim/N): compare numbers computed with the same N, and read them against
the real-vs-real reference the callers print.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _sqrtm_psd(m: torch.Tensor) -> torch.Tensor:
    evals, evecs = torch.linalg.eigh((m + m.T) / 2)
    return (evecs * evals.clamp_min(0).sqrt()) @ evecs.T


def frechet_distance(fa: torch.Tensor, fb: torch.Tensor) -> float:
    """‖μ_a - μ_b‖² + tr(C_a + C_b - 2·(C_a^½ C_b C_a^½)^½), all symmetric eigendecompositions."""
    fa, fb = fa.double(), fb.double()
    mu_a, mu_b = fa.mean(0), fb.mean(0)
    ca, cb = torch.cov(fa.T), torch.cov(fb.T)
    ra = _sqrtm_psd(ca)
    cross = torch.linalg.eigvalsh(ra @ cb @ ra).clamp_min(0).sqrt().sum()
    return float((mu_a - mu_b).pow(2).sum() + ca.trace() + cb.trace() - 2 * cross)


class _FeatureFrechet:
    kind = "frechet"
    k: int
    _reference: tuple = (None, None)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def distance(self, a: torch.Tensor, b: torch.Tensor) -> float:
        """FD between the image sets ``a`` and ``b``. ``b`` is usually the same reference set call after
        call: its features are kept while the very same tensor comes back unchanged."""
        ref, feats = self._reference
        if ref is not b or self._reference_version != b._version:
            feats = self.features(b)
            self._reference, self._reference_version = (b, feats), b._version
        return frechet_distance(self.features(a), feats)

    def describe(self) -> str:
        raise NotImplementedError


class PixelPCAFrechet(_FeatureFrechet):
    """Fréchet distance between Gaussians fitted to k-dim features f = (x - μ_train)·V_k, where V_k
    are the top-k principal directions of the training images' pixels (float64 throughout)."""

    kind = "frechet_pixel_pca"

    def __init__(self, real_train: torch.Tensor, k: int):
        flat = real_train.flatten(1).double()
        self.mean = flat.mean(0)
        cov = torch.cov((flat - self.mean).T)
        evals, evecs = torch.linalg.eigh(cov)
        self.k = min(k, flat.shape[1])
        self.basis = evecs[:, -self.k:].flip(1)
        self.explained = float(evals[-self.k:].sum() / evals.sum())

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return (x.flatten(1).double().clamp(-1, 1) - self.mean) @ self.basis

    def describe(self) -> str:
        return (f"{self.k}-dim pixel-PCA space (top principal components of the training images' pixels, "
                f"{100 * self.explained:.0f}% of their variance)")


class RandomConvFrechet(_FeatureFrechet):
    """Fréchet distance in a fixed random-conv feature space.

    f(x) = P·vec(pool₄ₓ₄(ReLU(W₂ ∗ avgpool₂(ReLU(W₁ ∗ x)))))  / s,  then divided per feature by s, the std of
    f over the training images. W₁: 5×5, C→``width`` channels; W₂: 3×3, ``width``→``width``; He-normal, zero
    bias; P: Gaussian (``width``·16 → ``dim``) / sqrt(fan-in). All drawn in float64 from
    ``torch.Generator().manual_seed(seed)``, so the space is the same on every machine and never trained.
    """

    kind = "frechet_random_conv"

    def __init__(self, real_train: torch.Tensor, dim: int = 32, width: int = 32, seed: int = 1234):
        g = torch.Generator().manual_seed(seed)
        c = real_train.shape[1]
        self.w1 = torch.randn(width, c, 5, 5, generator=g, dtype=torch.float64) * (2.0 / (c * 25)) ** 0.5
        self.w2 = torch.randn(width, width, 3, 3, generator=g, dtype=torch.float64) * (2.0 / (width * 9)) ** 0.5
        fan_in = width * 16
        self.proj = torch.randn(fan_in, dim, generator=g, dtype=torch.float64) / fan_in ** 0.5
        self.k, self.width, self.seed = dim, width, seed
        self.scale = torch.ones(dim, dtype=torch.float64)
        self.scale = self.features(real_train).std(0).clamp_min(1e-12)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        h = x.double().clamp(-1, 1)
        h = F.avg_pool2d(F.relu(F.conv2d(h, self.w1, padding=2)), 2)
        h = F.adaptive_avg_pool2d(F.relu(F.conv2d(h, self.w2, padding=1)), 4)
        return (h.flatten(1) @ self.proj) / self.scale

    def describe(self) -> str:
        return (f"{self.k}-dim random-conv space (fixed seeded 2-layer ReLU conv net, width {self.width}, "
                f"seed {self.seed}, 4x4 pooled, projected; per-feature std 1 on the training images)")
