"""Damping chosen on held-out data (Damping mode "adaptive"): per layer, the δ of a grid whose solve generalises.

A solve's damping trades fitting the calibration records against staying near the float weights; the right amount
depends on how well H from few records predicts unseen inputs, which no statistic of H alone tells. So each grid
value g (δ = g · mean diag H) is tried: Q_g is solved from the statistics of the training records, and its output
error is measured on held-out records from prompts the training records never saw:

    err(Q) = ‖X̃_h Qᵀ − X_h Wᵀ‖ / ‖X_h Wᵀ‖,  err² = (tr(Q H_h Qᵀ) − 2 tr(Q G_h Wᵀ) + tr(W F_h Wᵀ)) / tr(W F_h Wᵀ)

with H_h = X̃_hᵀX̃_h/n, G_h = X̃_hᵀX_h/n and F_h = X_hᵀX_h/n over the held-out rows (X̃: the quantized stream's input
as the matmul sees it, X: the float stream's; the target is the float output, as in Qronos; err is on the scale of
the driver's rel_out_err). The chosen g is then
applied to a solve on all records (training and held-out pooled). docs/ALGORITHMS.md §7.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from diffptq.algo.damping import Damping, fp32_matmul
from diffptq.algo.gptq import gptq_quantize_ex
from diffptq.algo.qronos import qronos_quantize_ex
from diffptq.algo.rtn import QuantResult
from diffptq.quant.quantizer import QuantSpec


@dataclass
class Grams:
    """Input statistics of one layer over n rows: H = X̃ᵀX̃/n, G = X̃ᵀX/n (None when not gathered), F = XᵀX/n
    (held-out records only), each (in, in) float32."""

    H: Tensor
    G: Tensor | None
    n: int
    F: Tensor | None = None


def pooled(a: Grams, b: Grams) -> Grams:
    """The statistics of a's and b's rows together (row-weighted means)."""
    w = a.n / (a.n + b.n)
    G = None if a.G is None or b.G is None else a.G * w + b.G * (1 - w)
    return Grams(a.H * w + b.H * (1 - w), G, a.n + b.n)


def heldout_error(Q: Tensor, W: Tensor, held: Grams) -> float:
    """err(Q) of the module docstring for Q, W (out, in) float32 (any shape that flattens to it)."""
    with fp32_matmul(), torch.no_grad():
        Q, W = Q.reshape(Q.shape[0], -1).float(), W.reshape(W.shape[0], -1).float()
        target = float(((W @ held.F) * W).sum())
        err = float(((Q @ held.H) * Q).sum()) - 2 * float(((Q @ held.G) * W).sum()) + target
    return math.sqrt(max(err, 0.0) / max(target, 1e-30))


def solve(method: str, W: Tensor, grams: Grams, spec: QuantSpec, damp: Damping, act_order: bool = False,
          block_size: int = 128, consume: bool = False, correction: float = 1.0) -> QuantResult:
    """GPTQ (from H) or Qronos (from H and G, correcting the share `correction` of the upstream error) of W."""
    if method == "gptq":
        return gptq_quantize_ex(W, grams.H, spec, damp, act_order, block_size, consume)
    return qronos_quantize_ex(W, grams.H, grams.G, spec, damp, act_order, block_size, consume, correction)


def select_damping(method: str, W: Tensor, train: Grams, held: Grams, spec: QuantSpec, damping: Damping,
                   act_order: bool = False, block_size: int = 128,
                   correction: float = 1.0) -> tuple[float, dict[float, float]]:
    """(the grid value with the lowest held-out error, {grid value: held-out error}). Solves that fall back to RTN
    count with their RTN weights' error."""
    errors = {}
    for g in damping.grid:
        res = solve(method, W, train, spec, damping.fixed(g), act_order, block_size, correction=correction)
        errors[g] = heldout_error(res.weight, W, held)
    best = min(errors, key=lambda g: (errors[g] if math.isfinite(errors[g]) else math.inf, g))
    return best, errors
