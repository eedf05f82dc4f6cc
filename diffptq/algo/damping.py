"""Damping of H and the inverse Cholesky factor GPTQ and Qronos sweep with.

Modes (δ is the absolute damping added to diag H):
  "mean_diag"   δ = value · mean(diag H)                          (value = 0.01: the GPTQ reference rule)
  "lambda_max"  δ = value · λ_max(H), power iteration              (the Brevitas rule; value ~ 1e-6 .. 1e-3)
  "spread"      δ = max(value · boost · mean(diag H), cond_floor · λ_max(H)), per layer:
                boost = min(max_boost, sqrt(max(1, spread / ref_spread)) · (1 + 10 · near_dead)),
                spread = max / median of the live diagonal, near_dead = share of live columns with
                H_ii < 1e-6 · median. Heavy-tailed inputs (outlier channels, FFN layers) get more damping; the
                λ_max floor bounds the condition number of H + δI by about 1/cond_floor.
  "adaptive"    δ = g · mean(diag H) with g the value of a grid whose solve gives the lowest output error on held-out
                records (diffptq.algo.heldout, run by the sequential driver); a solve without held-out data uses
                value · mean(diag H).
Every mode retries a failed Cholesky with δ × factor, at most max_retries times; the caller falls back to RTN
when all fail. H passed here already has dead columns set to H_ii = 1.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
import torch
from torch import Tensor

from diffptq.config.quant import DAMP_MODES, Damping, as_damping  # noqa: F401 - the rule's config, used here

log = logging.getLogger(__name__)
@contextmanager
def matmul_precision(precision: str) -> Iterator[None]:
    """torch.set_float32_matmul_precision(precision) inside the block; restores the previous setting."""
    prev = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(prev)


def fp32_matmul():
    """Full-precision float32 matmuls (TF32 off) inside the block; restores the previous setting."""
    return matmul_precision("highest")


def any_nonfinite(t: Tensor) -> Tensor:
    """0-dim bool tensor, True when t has a NaN or ±inf entry (no sync). By one min/max reduction: torch.isfinite(t)
    allocates elementwise temporaries (on CUDA 1.75× t's size: for a 23040-wide H, 3.5 GB)."""
    if t.numel() == 0:
        return torch.zeros((), dtype=torch.bool, device=t.device)
    lo, hi = torch.aminmax(t)
    return ~(torch.isfinite(lo) & torch.isfinite(hi))  # NaN propagates through min and max


def all_finite(t: Tensor) -> bool:
    """Every entry of t finite (see any_nonfinite)."""
    return not bool(any_nonfinite(t))


def lambda_max(H: Tensor, iters: int = 30) -> float:
    """Largest |eigenvalue| of a symmetric H (in, in) by power iteration (deterministic start)."""
    gen = torch.Generator(device=H.device).manual_seed(0)
    v = torch.randn(H.shape[0], 1, device=H.device, dtype=H.dtype, generator=gen)
    lam = 0.0
    for _ in range(iters):
        hv = H @ v
        norm = float(hv.norm())
        if not norm > 0 or not math.isfinite(norm):
            return 0.0 if norm == 0 else float("inf")
        lam = float((v * hv).sum().abs() / (v * v).sum())
        v = hv / norm
    return lam


def diag_stats(H: Tensor, live: Tensor | None = None) -> dict[str, float]:
    """mean, median, spread (max / median) and near-dead share of diag H over the live columns."""
    d = torch.diagonal(H)
    if live is not None and bool(live.any()):
        d = d[live]
    med = float(d.median())
    mean = float(d.mean())
    spread = float(d.max()) / med if med > 0 else float("inf")
    near_dead = float((d < 1e-6 * med).float().mean()) if med > 0 else 1.0
    return {"mean": mean, "median": med, "spread": spread, "near_dead": near_dead}


def initial_delta(H: Tensor, damping: Damping, live: Tensor | None = None) -> float:
    """The first δ to try for H (in, in) under `damping`."""
    mean_diag = float(torch.diagonal(H).mean())
    if damping.mode == "mean_diag":
        return damping.value * mean_diag
    if damping.mode == "adaptive":  # chosen on held-out data by the driver (algo.heldout); alone: the fixed rule
        return damping.value * mean_diag
    lam = lambda_max(H)
    if damping.mode == "lambda_max":
        return damping.value * lam
    st = diag_stats(H, live)
    boost = min(damping.max_boost, math.sqrt(max(1.0, st["spread"] / damping.ref_spread)) * (1 + 10 * st["near_dead"]))
    return max(damping.value * boost * st["mean"], damping.cond_floor * lam)


@dataclass
class DampedFactor:
    """Outcome of damped_inverse_cholesky. U is None when every try failed (see `error`)."""

    U: Tensor | None
    delta: float
    damp_rel: float
    retries: int
    error: str = ""


def reverse_in_place(A: Tensor, chunk: int = 1 << 24) -> Tensor:
    """A (n, n) → J A J (rows and columns reversed), in place. Row- or column-major A (LAPACK's factors are
    column-major): its elements in memory are reversed, with at most 2·chunk elements of scratch; any other layout
    goes through one copy. Returns A."""
    if not (A.is_contiguous() or A.t().is_contiguous()):
        return A.copy_(A.flip(0, 1))
    a = (A if A.is_contiguous() else A.t()).view(-1)
    n, i = a.numel(), 0
    while i < n // 2:
        c = min(chunk, n // 2 - i)
        lo, hi = a[i:i + c], a[n - i - c:n - i]
        tmp = lo.flip(0)
        lo.copy_(hi.flip(0))
        hi.copy_(tmp)
        i += c
    return A


def invert_lower_in_place(L: Tensor, block: int = 1024) -> Tensor:
    """L (n, n) lower triangular (zeros above the diagonal) → L⁻¹, in place, block column by block column from the
    last: with L = [[A, 0], [B, C]] and C already inverted, L⁻¹ = [[A⁻¹, 0], [−C⁻¹ B A⁻¹, C⁻¹]]. Scratch: one
    (n, block) panel. Returns L."""
    n = L.shape[0]
    for j in reversed(range(0, n, block)):
        e = min(j + block, n)
        eye = torch.eye(e - j, dtype=L.dtype, device=L.device)
        d_inv = torch.linalg.solve_triangular(L[j:e, j:e], eye, upper=False)
        if e < n:
            L[e:, j:e] = (L[e:, e:] @ L[e:, j:e]) @ d_inv
            L[e:, j:e].neg_()
        L[j:e, j:e] = d_inv
    return L


def _inverse_cholesky_upper(A: Tensor) -> Tensor | None:
    """Upper U with A⁻¹ = UᵀU, or None when A is not positive definite (A then left as it was).

    With J the reversal, J A J = L Lᵀ gives A⁻¹ = (J L⁻¹ J)ᵀ (J L⁻¹ J), and J L⁻¹ J is upper triangular with a
    positive diagonal: the factor, without forming A⁻¹. A is reversed in place, factored into a new L, released
    (A.set_()), and L is inverted and reversed in place: at most two (in, in) matrices are alive at a time."""
    L, info = torch.linalg.cholesky_ex(reverse_in_place(A))
    if int(info) != 0:
        reverse_in_place(A)
        return None
    A.set_()
    return reverse_in_place(invert_lower_in_place(L))


def damped_inverse_cholesky(H: Tensor, damping: Damping, live: Tensor | None = None,
                            overwrite: bool = False) -> DampedFactor:
    """Upper Cholesky factor U of (H + δI)⁻¹ (so (H + δI)⁻¹ = UᵀU), retrying with larger δ on failure.

    H: (in, in) float32, symmetric, dead columns already set to 1. live: (in,) bool, columns that were not dead.
    overwrite: H is damped in place and its memory released once factored (it becomes an empty tensor, or holds a
    damped H if every try fails): no (in, in) copy of H, for the largest layers (a 23040-wide UNet conv: 2.1 GB
    each), and at most two such matrices alive (H and its factor). Without it one working copy is made. Either way
    δ is added to the diagonal exactly (H + δI). An inverse factor that overflows (not finite) counts as a failed
    try; with overwrite, H is gone by then and the layer falls back.
    """
    mean_diag = float(torch.diagonal(H).mean())
    if not all_finite(H):
        return DampedFactor(None, float("nan"), float("nan"), 0, "H has non-finite entries")
    if not mean_diag > 0:
        reason = f"H has a non-positive mean diagonal ({mean_diag:.3g})"
        return DampedFactor(None, float("nan"), float("nan"), 0, reason)
    delta = initial_delta(H, damping, live)
    if not (math.isfinite(delta) and delta > 0):
        delta = damping.value * mean_diag
    diag = torch.diagonal(H).clone()
    if overwrite and not H.is_contiguous():
        H.set_(H.contiguous())  # the row-major layout the in-place reversal needs; values unchanged
    A = H if overwrite else H.clone(memory_format=torch.contiguous_format)
    for attempt in range(damping.max_retries + 1):
        torch.diagonal(A).copy_(diag + delta)  # exactly H + δI
        U = _inverse_cholesky_upper(A)
        rel = delta / mean_diag
        if U is not None and not all_finite(U):  # overflow in L⁻¹: A is gone
            if overwrite:
                msg = f"the inverse Cholesky factor of H + delta*I is not finite (delta {delta:.3g}, damp {rel:.3g})"
                return DampedFactor(None, delta, rel, attempt, msg)
            U, A = None, H.clone(memory_format=torch.contiguous_format)
        if U is not None:
            if attempt:
                log.info("Cholesky succeeded after %d retries with damp %.3g (delta %.3g)", attempt, rel, delta)
            return DampedFactor(U, delta, rel, attempt)
        if attempt < damping.max_retries:
            delta *= damping.factor
    msg = f"Cholesky of H + delta*I failed {damping.max_retries + 1} times (last delta {delta:.3g}, damp {rel:.3g})"
    return DampedFactor(None, delta, rel, damping.max_retries, msg)
