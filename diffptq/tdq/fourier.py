"""Fourier features of a scalar condition c (normalised to about [−1, 1], see ``schedule``)."""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def fourier_frequencies(n_freqs: int, base: float = math.pi / 2) -> Tensor:
    """Fixed angular frequencies base·2^k, k = 0..F−1: (F,) float32.

    With c ∈ [−1, 1], the lowest, π/2, keeps sin(f c) monotone over the range (its two ends don't alias). F = 3 (the
    TDQ default) goes up to 2π, a period of half the range: enough to follow a scale that drifts over the noise
    levels, coarse enough that the MLP interpolates between calibrated conditions instead of memorising them.
    """
    return base * 2.0 ** torch.arange(n_freqs, dtype=torch.float32)


def fourier_features(c: Tensor, freqs: Tensor) -> Tensor:
    """c: () or (B,) → (B, 2F+1) = [c, sin(f_k c)..., cos(f_k c)...] in the dtype/device of ``freqs``."""
    c = c.to(freqs).reshape(-1, 1)
    angles = c * freqs
    return torch.cat([c, angles.sin(), angles.cos()], dim=-1)


class FourierFeatures(nn.Module):
    """Module form of ``fourier_features`` with the frequencies as a (non-trained) buffer."""

    def __init__(self, n_freqs: int = 3, base: float = math.pi / 2):
        super().__init__()
        self.register_buffer("freqs", fourier_frequencies(n_freqs, base))

    @property
    def out_dim(self) -> int:
        return 2 * self.freqs.numel() + 1

    def forward(self, c: Tensor) -> Tensor:
        return fourier_features(c, self.freqs)
