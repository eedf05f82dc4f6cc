"""Uncertainty of the quality metrics: a 95% interval for an accuracy (Wilson) and for a mean over images
(bootstrap), so that tables can mark differences inside the intervals as ties."""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch

Z95 = 1.959964  # two-sided 95% normal quantile


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion successes / n (default 95%); (0, 1) for n = 0."""
    if n <= 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def bootstrap_interval(values: Sequence[float] | torch.Tensor, n_boot: int = 2000, seed: int = 0,
                       level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of per-image `values` (resampling images with replacement;
    deterministic for a seed)."""
    v = torch.as_tensor(values, dtype=torch.float64).flatten()
    if v.numel() == 0:
        return math.nan, math.nan
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, v.numel(), (n_boot, v.numel()), generator=gen)
    means = v[idx].mean(dim=1)
    lo, hi = torch.quantile(means, torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64))
    return float(lo), float(hi)


def overlaps(a: tuple[float, float], b: tuple[float, float]) -> bool:
    """Two intervals overlap: their difference is not resolved (a tie)."""
    return a[0] <= b[1] and b[0] <= a[1]
