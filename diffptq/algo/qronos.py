"""Qronos on one weight matrix (Zhang, Colbert, Lybrand, Saab 2025): min over grid Q of ‖X Wᵀ − X̃ Qᵀ‖.

Column 0 (after act-order) "corrects the past": it is chosen against the float target X·w using G = X̃ᵀX/n, with
the other columns at their current values, then all later columns are re-solved by ridge least squares against the
same target ("shape the future"). From column 1 on every step is a GPTQ step on H = X̃ᵀX̃/n; the inverse it needs,
the rank-one downdate of (H + δI)⁻¹, is factored by U[1:, 1:] of GPTQ's factor U, so the shared sweep continues.
With G = H this is GPTQ exactly (up to float rounding). Groups, act-order, dead columns, damping: as gptq.py.
"""
from __future__ import annotations

from torch import Tensor

from diffptq.algo.damping import Damping
from diffptq.algo.gptq import hessian_quantize
from diffptq.algo.rtn import QuantResult
from diffptq.config.quant import DEFAULT_DAMPING
from diffptq.quant.quantizer import QuantSpec, round_to_grid


def qronos_first_column(v: Tensor, g: Tensor, h0: Tensor, delta: float, U: Tensor, s_cols: Tensor, z_cols: Tensor,
                        codes: Tensor, spec: QuantSpec) -> None:
    """Quantize column 0 of v (out, in) in place and re-solve columns 1.. (docs/ALGORITHMS.md §6, steps 1–2).

    g: (out, in), g[r] = G w_r = ⟨X̃_j, X w_r⟩ / n for the float weights w_r of the target; h0: (in,) row 0 of H,
    undamped (dead columns set to 1; H is symmetric, so also its column 0); U: upper Cholesky factor of
    (H + δI)⁻¹; s_cols, z_cols: per-column grid (out, in); codes: (out, in) float out.
    """
    num0 = g[:, 0] + delta * v[:, 0] - v[:, 1:] @ h0[1:]
    q, q0 = round_to_grid(num0 / (h0[0] + delta), s_cols[:, 0], z_cols[:, 0], spec.qmin, spec.qmax)
    codes[:, 0] = q
    rhs = g[:, 1:] + delta * v[:, 1:] - q0[:, None] * h0[1:][None, :]
    U11 = U[1:, 1:]
    v[:, 1:] = (rhs @ U11.T) @ U11  # rows of rhs times (H_11 + δI)⁻¹ = U11ᵀ U11
    v[:, 0] = q0


def blended_cross(H: Tensor, G: Tensor, correction: float) -> Tensor:
    """G of a target that corrects only the share `correction` (0..1) of the upstream error: (1 − c)·H + c·G, i.e.
    the target (1 − c)·X̃W + c·XW (docs/ALGORITHMS.md §6, "Partial correction"); G itself at c = 1, H (GPTQ) at 0."""
    if correction == 1:
        return G
    return H * (1 - correction) + G * correction


def qronos_quantize_ex(W: Tensor, H: Tensor, G: Tensor, spec: QuantSpec, damp: float | str | Damping = DEFAULT_DAMPING,
                       act_order: bool = False, block_size: int = 128, consume: bool = False,
                       correction: float = 1.0) -> QuantResult:
    """Qronos with the full record (codes, scale, zero, damping used, RTN fallback). consume: see hessian_quantize.
    correction: the share of the upstream error corrected (blended_cross; 1: Qronos as published)."""
    blended = blended_cross(H, G, correction)
    if consume and blended is not G:
        G.set_()  # the caller gave G up: the blend is the copy worked on
    return hessian_quantize(W, H, spec, damp, act_order, block_size, G=blended, first_column=qronos_first_column,
                            method="qronos", consume=consume)


def qronos_quantize(W: Tensor, H: Tensor, G: Tensor, spec: QuantSpec, damp: float | str | Damping = DEFAULT_DAMPING,
                    act_order: bool = False, block_size: int = 128) -> Tensor:
    """Qronos-quantized weight (dequantized, W's shape and dtype). W: (out, in); H = X̃ᵀX̃/n, G = X̃ᵀX/n (in, in)."""
    return qronos_quantize_ex(W, H, G, spec, damp, act_order, block_size).weight
