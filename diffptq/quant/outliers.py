"""Outlier handling beyond rotation: per-channel smoothing and a low-rank high-precision branch (docs/ALGORITHMS.md
§8a).

Smoothing moves the range of outlier input channels into the weights: with s (in,) > 0, x' = x / s and W' = W·diag(s),
so W'x' = Wx, and s_j = max|x_j|^α / max_i|W_ij|^(1−α) (α in (0, 1): the share of the difficulty given to the
weights). The low-rank branch keeps the weights' dominant directions in high precision: W' = L_up L_down + R with
L_up L_down the best rank-r approximation of W' (truncated SVD), applied to the unquantized input, and only the
residual R quantized (RTN, GPTQ or Qronos), so y = Q(x') Q(R)ᵀ + x' (L_up L_down)ᵀ.
"""
from __future__ import annotations

import torch
from torch import Tensor

MIN_SCALE, MAX_SCALE = 1e-5, 1e5  # bounds of a smoothing factor (a dead channel gets 1)


@torch.no_grad()
def smoothing_scales(x_absmax: Tensor, weights: list[Tensor], alpha: float) -> Tensor:
    """s (in,) float32 for inputs whose per-channel max |x| is `x_absmax` (in,), feeding `weights` (each (out, in),
    the layers that read the same input: one s for all of them, so their inputs stay one tensor)."""
    w_absmax = torch.stack([w.detach().float().abs().amax(dim=0) for w in weights]).amax(dim=0)
    xa = x_absmax.float().to(w_absmax.device)
    s = xa.clamp_min(1e-12).pow(alpha) / w_absmax.clamp_min(1e-12).pow(1 - alpha)
    s = torch.where((xa > 0) & (w_absmax > 0), s, torch.ones_like(s))
    return s.clamp(MIN_SCALE, MAX_SCALE)


BRANCH_SHARE = 4  # a branch holds at most 1/4 of a layer's rank: one as wide as the layer leaves nothing quantized


def branch_rank(rank: int, shape: tuple[int, ...]) -> int:
    """The rank of a layer's branch for the asked `rank`: at most min(out, in) // BRANCH_SHARE (0: no branch)."""
    return min(rank, min(shape[0], shape[1]) // BRANCH_SHARE)


@torch.no_grad()
def lowrank_split(W: Tensor, rank: int) -> tuple[Tensor, Tensor, Tensor]:
    """(R, up, down): the best rank-`rank` approximation up @ down of W (out, in) (SVD in float64; up (out, r) =
    U_r Σ_r, down (r, in) = V_rᵀ) and the residual R = W − up @ down, all float32."""
    rank = min(rank, *W.shape)
    U, S, Vh = torch.linalg.svd(W.detach().double(), full_matrices=False)
    up, down = U[:, :rank] * S[:rank], Vh[:rank]
    R = W.double() - up @ down
    return R.float(), up.float(), down.float()
