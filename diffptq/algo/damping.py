"""Damping of H and the inverse Cholesky factor GPTQ and Qronos sweep with.

Modes (δ is the absolute damping added to diag H):
  "mean_diag"   δ = value · mean(diag H)                          (value = 0.01: the GPTQ reference rule)
  "lambda_max"  δ = value · λ_max(H), power iteration              (the Brevitas rule; value ~ 1e-6 .. 1e-3)
  "adaptive"    δ = max(value · boost · mean(diag H), cond_floor · λ_max(H)), per layer:
                boost = min(max_boost, sqrt(max(1, spread / ref_spread)) · (1 + 10 · near_dead)),
                spread = max / median of the live diagonal, near_dead = share of live columns with
                H_ii < 1e-6 · median. Heavy-tailed inputs (outlier channels, FFN layers) get more damping; the
                λ_max floor bounds the condition number of H + δI by about 1/cond_floor.
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

log = logging.getLogger(__name__)
DAMP_MODES = ("mean_diag", "lambda_max", "adaptive")


@dataclass(frozen=True)
class Damping:
    """How δ is chosen; `value` is relative (to mean diag H, or to λ_max for mode "lambda_max")."""

    mode: str = "mean_diag"
    value: float = 0.01
    max_retries: int = 4
    factor: float = 10.0
    ref_spread: float = 100.0
    max_boost: float = 10.0
    cond_floor: float = 1e-6

    def __post_init__(self) -> None:
        if self.mode not in DAMP_MODES:
            raise ValueError(f"Damping.mode must be one of {DAMP_MODES}, got {self.mode!r}")
        if not self.value > 0:
            raise ValueError(f"Damping.value must be > 0, got {self.value!r}")


def as_damping(damp: float | str | Damping) -> Damping:
    """float → mean_diag with that value; "adaptive" / "lambda_max" → that mode with its defaults."""
    if isinstance(damp, Damping):
        return damp
    if isinstance(damp, str):
        if damp == "adaptive":
            return Damping("adaptive")
        if damp == "lambda_max":
            return Damping("lambda_max", value=1e-6)
        raise ValueError(f"damp must be a float, 'adaptive', 'lambda_max' or a Damping, got {damp!r}")
    return Damping("mean_diag", float(damp))


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


def _inverse_cholesky_upper(A: Tensor) -> tuple[Tensor | None, Tensor | None]:
    """Upper U with A⁻¹ = UᵀU: (U, None). A not positive definite: (None, None), A untouched. A factored but A⁻¹'s
    factorization failed: (None, A⁻¹). A's memory is released once its factor exists (A.set_()), so at most two
    (in, in) matrices are alive at a time."""
    L, info = torch.linalg.cholesky_ex(A)
    if int(info) != 0:
        return None, None
    A.set_()
    inv = torch.cholesky_inverse(L)
    del L
    U, info = torch.linalg.cholesky_ex(inv, upper=True)
    if int(info) != 0 or not bool(torch.isfinite(U).all()):
        return None, inv
    return U, None


def damped_inverse_cholesky(H: Tensor, damping: Damping, live: Tensor | None = None,
                            overwrite: bool = False) -> DampedFactor:
    """Upper Cholesky factor U of (H + δI)⁻¹ (so (H + δI)⁻¹ = UᵀU), retrying with larger δ on failure.

    H: (in, in) float32, symmetric, dead columns already set to 1. live: (in,) bool, columns that were not dead.
    overwrite: H is damped in place and its memory released once factored (it becomes an empty tensor, or holds a
    damped H if every try fails): no (in, in) copy of H, for the largest layers (a 23040-wide UNet conv: 2.1 GB
    each). Without it one working copy is made. Either way δ is added to the diagonal exactly (H + δI); in the rare
    retry after (H + δI)⁻¹ failed to factor, an overwritten H is rebuilt from that inverse (off-diagonal entries to
    rounding), a copied one from H.
    """
    mean_diag = float(torch.diagonal(H).mean())
    if not bool(torch.isfinite(H).all()):
        return DampedFactor(None, float("nan"), float("nan"), 0, "H has non-finite entries")
    if not mean_diag > 0:
        reason = f"H has a non-positive mean diagonal ({mean_diag:.3g})"
        return DampedFactor(None, float("nan"), float("nan"), 0, reason)
    delta = initial_delta(H, damping, live)
    if not (math.isfinite(delta) and delta > 0):
        delta = damping.value * mean_diag
    diag = torch.diagonal(H).clone()
    A = H if overwrite else H.clone()
    for attempt in range(damping.max_retries + 1):
        torch.diagonal(A).copy_(diag + delta)  # exactly H + δI
        U, inv = _inverse_cholesky_upper(A)
        rel = delta / mean_diag
        if U is not None:
            if attempt:
                log.info("Cholesky succeeded after %d retries with damp %.3g (delta %.3g)", attempt, rel, delta)
            return DampedFactor(U, delta, rel, attempt)
        if inv is not None:  # A was released: rebuild it for the next try
            if overwrite:
                rebuilt = torch.linalg.inv(inv)
                del inv
                H.set_((rebuilt + rebuilt.T) / 2)  # the caller's H holds it until it is factored
                del rebuilt
                A = H
            else:
                del inv
                A = H.clone()
        if attempt < damping.max_retries:
            delta *= damping.factor
    msg = f"Cholesky of H + delta*I failed {damping.max_retries + 1} times (last delta {delta:.3g}, damp {rel:.3g})"
    return DampedFactor(None, delta, rel, damping.max_retries, msg)
