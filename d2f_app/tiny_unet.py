"""A small pure-torch UNet for the CPU demo, shaped like the SD UNet where it matters for the bridge.

What it shares with a real checkpoint's UNet: it reads the VP state x_VP = sqrt(ᾱ)·x0 + sqrt(1-ᾱ)·ε
and a *time label* n ∈ [0, T-1] through the sinusoidal embedding

    emb(n)_k = cos(n·ω_k), emb(n)_{k+h} = sin(n·ω_k),   ω_k = 10000^(-k/h),  k = 0 … h-1

(the host's ``timestep_embedding``), which is smooth in n, so a fractional label (the bridge's
exact n(σ), DESIGN §2) is as meaningful to it as an integer one. Everything else is kept small:
conv + GroupNorm residual blocks at three resolutions (16, 8, 4 for 16×16 inputs), one skip per
resolution, no attention, about 0.3 M parameters.
"""

from __future__ import annotations

import math

import torch
from torch import nn
import torch.nn.functional as F


def timestep_embedding(label: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of a float label (any real value, typically [0, 999]); shape (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=label.device) / half)
    # The product is formed in float32 at least: a bf16/fp16 label would round n itself.
    args = label.reshape(-1, 1).to(torch.float32) * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(8, channels), channels)


class ResBlock(nn.Module):
    """GN → SiLU → conv, add the projected time embedding, GN → SiLU → conv, residual."""

    def __init__(self, c_in: int, c_out: int, emb_dim: int):
        super().__init__()
        self.norm1 = _norm(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb_dim, c_out)
        self.norm2 = _norm(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()
        # Zero-init the last conv so each block starts as the identity: stable from step 0 with no warm-up.
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(emb)[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class TinyUNet(nn.Module):
    """``net(x_VP, label) -> output`` (ε or v_VP, whatever it was trained on), same shape as x_VP.

    ``channels``: width per resolution; each level halves the spatial size (input sides must be
    divisible by 2^(levels-1)).
    """

    def __init__(self, in_channels: int = 1, channels=(32, 64, 64), emb_dim: int = 64):
        super().__init__()
        self.channels = tuple(channels)
        self.emb_dim = emb_dim
        self.time_mlp = nn.Sequential(nn.Linear(emb_dim, emb_dim * 2), nn.SiLU(), nn.Linear(emb_dim * 2, emb_dim * 2))
        t_dim = emb_dim * 2
        self.conv_in = nn.Conv2d(in_channels, channels[0], 3, padding=1)
        self.down_blocks = nn.ModuleList()
        self.downsamples = nn.ModuleList()
        prev = channels[0]
        for i, c in enumerate(channels):
            self.down_blocks.append(ResBlock(prev, c, t_dim))
            prev = c
            if i < len(channels) - 1:
                self.downsamples.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
        self.mid = ResBlock(prev, prev, t_dim)
        self.up_blocks = nn.ModuleList()
        for i, c in reversed(list(enumerate(channels))):
            self.up_blocks.append(ResBlock(prev + c, c, t_dim))
            prev = c
        self.norm_out = _norm(prev)
        self.conv_out = nn.Conv2d(prev, in_channels, 3, padding=1)
        # Zero output at init: the first loss is E‖target‖² = 1 for ε and v alike, no blow-up.
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        label = torch.as_tensor(label, device=x.device)
        if label.numel() == 1:
            label = label.reshape(1).expand(x.shape[0])
        emb = self.time_mlp(timestep_embedding(label, self.emb_dim).to(x.dtype))
        h = self.conv_in(x)
        skips = []
        for i, block in enumerate(self.down_blocks):
            h = block(h, emb)
            skips.append(h)
            if i < len(self.downsamples):
                h = self.downsamples[i](h)
        h = self.mid(h, emb)
        for block in self.up_blocks:
            skip = skips.pop()
            if h.shape[-1] != skip.shape[-1]:
                h = F.interpolate(h, size=skip.shape[-2:], mode="nearest")
            h = block(torch.cat([h, skip], dim=1), emb)
        return self.conv_out(F.silu(self.norm_out(h)))


def count_parameters(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())
