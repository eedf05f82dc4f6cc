"""Intervals of the quality metrics against independent computations."""
import math

import pytest
import torch

from diffptq.eval.stats import bootstrap_interval, overlaps, wilson_interval


def test_wilson_interval_matches_the_formula_and_known_values():
    lo, hi = wilson_interval(90, 100)
    # closed form with z = 1.96: centre (p + z²/2n)/(1 + z²/n), half-width z·sqrt(p(1-p)/n + z²/4n²)/(1 + z²/n)
    z, n, p = 1.959964, 100, 0.9
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    assert (lo, hi) == pytest.approx((centre - half, centre + half))
    assert (lo, hi) == pytest.approx((0.8256, 0.9448), abs=1e-3)  # published value for 90/100
    assert wilson_interval(0, 50)[0] == 0.0 and wilson_interval(50, 50)[1] == pytest.approx(1.0)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    # more images, narrower interval (about ±3 points at 256 images around 0.9, ±2.6 at 512)
    w256, w512 = (lambda t: t[1] - t[0])(wilson_interval(230, 256)), (lambda t: t[1] - t[0])(wilson_interval(461, 512))
    assert w512 < w256 < 0.08


def test_bootstrap_interval_covers_the_mean_and_shrinks_with_n():
    g = torch.Generator().manual_seed(1)
    small, large = torch.randn(64, generator=g) + 30, torch.randn(1024, generator=g) + 30
    lo, hi = bootstrap_interval(small)
    assert lo < float(small.mean()) < hi
    # the normal-theory half-width 1.96·sd/√n is about what the bootstrap gives
    assert (hi - lo) / 2 == pytest.approx(1.96 * float(small.std()) / 8, rel=0.2)
    lo2, hi2 = bootstrap_interval(large)
    assert hi2 - lo2 < (hi - lo) / 2
    assert bootstrap_interval(small, seed=3) == bootstrap_interval(small, seed=3)


def test_overlap_is_a_tie():
    assert overlaps((0.8, 0.9), (0.85, 0.95)) and not overlaps((0.8, 0.84), (0.85, 0.95))
