"""GPTQ on one weight matrix (Frantar et al. 2023), and the Hessian-based engine Qronos shares (the column sweep
itself is in sweep.py).

Groups: static. All group (and channel) scales are fitted up front on the weight after dead-column zeroing, in
the original column order; act-order then only permutes which column is swept when, each column keeping its
group's scale. So codes stay on the grid the saved scales describe, with or without act-order.
"""
from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import Tensor

from diffptq.algo.damping import Damping, all_finite, as_damping, damped_inverse_cholesky, fp32_matmul
from diffptq.algo.rtn import QuantResult, rtn_quantize_ex
from diffptq.algo.sweep import gptq_sweep
from diffptq.config.quant import DEFAULT_DAMPING
from diffptq.quant.quantizer import QuantSpec, dequantize, expand_params, fit_weight_params

log = logging.getLogger(__name__)

# (v, g, h0, delta, U, s_cols, z_cols, codes, spec) -> None: quantizes column 0 of v in place and updates the later
# columns (Qronos "correct the past, shape the future"); g = W·Gᵀ (out, in), h0 = row 0 of H (in,); all tensors
# already act-order permuted.
FirstColumn = Callable[..., None]


def _fallback(W: Tensor, spec: QuantSpec, method: str, reason: str, delta: float, rel: float, retries: int):
    log.warning("%s fell back to RTN: %s", method, reason)
    res = rtn_quantize_ex(W, spec)
    res.method, res.fell_back, res.reason = method, True, reason
    res.delta, res.damp_rel, res.retries = delta, rel, retries
    return res


def hessian_quantize(W: Tensor, H: Tensor, spec: QuantSpec, damp: float | str | Damping = DEFAULT_DAMPING,
                     act_order: bool = False, block_size: int = 128, G: Tensor | None = None,
                     first_column: FirstColumn | None = None, method: str = "gptq",
                     consume: bool = False) -> QuantResult:
    """The shared engine: dead columns, static group scales, act-order, damping, then the column sweep.

    W: (out, in) or a conv weight (out, C, kh, kw) (flattened to (out, C·kh·kw)); H, G: (in, in).
    With `first_column` (Qronos), column 0 (after act-order) is quantized by it, using g = W·Gᵀ, and the GPTQ sweep
    continues from column 1 with the same factor U (U[1:, 1:] factors the rank-one-downdated inverse).
    consume: H and G (float32, on W's device) are the caller's to give up: H is worked on in place and both are
    released as soon as they are no longer needed (they become empty tensors), so at most two (in, in) float32
    matrices are alive at once instead of four or more.
    """
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    damping = as_damping(damp)
    with fp32_matmul(), torch.no_grad():
        v = W.detach().reshape(W.shape[0], -1).float().clone()
        out, cols = v.shape
        dev = v.device
        if tuple(H.shape) != (cols, cols) or (G is not None and tuple(G.shape) != (cols, cols)):
            raise ValueError(f"H/G must be ({cols}, {cols}) for a weight with {cols} input columns, got "
                             f"{tuple(H.shape)}" + ("" if G is None else f" and {tuple(G.shape)}"))
        owned = consume and H.device == dev and H.dtype == torch.float32  # the caller's very tensor is released
        H = H if owned else H.detach().to(dev, torch.float32, copy=True)  # worked on in place from here on
        if not all_finite(H) or (G is not None and not all_finite(G)):
            return _fallback(W, spec, method, "non-finite H or G", float("nan"), float("nan"), 0)
        g = None
        if G is not None:  # the only use of G: the float target's correlations g[r] = G w_r (Qronos)
            g = v @ G.detach().to(dev, torch.float32).T
            if consume:
                G.set_()
        dead = torch.diagonal(H) == 0
        H[dead, dead] = 1.0
        v[:, dead] = 0.0
        scale, zero = fit_weight_params(v, spec)
        s_cols, z_cols = expand_params(scale, cols).expand(out, cols), expand_params(zero, cols).expand(out, cols)
        perm = torch.argsort(torch.diagonal(H), descending=True) if act_order else None
        if perm is not None:
            v, s_cols, z_cols = v[:, perm], s_cols[:, perm], z_cols[:, perm]
            g = None if g is None else g[:, perm]
            unpermuted, H = H, H[perm][:, perm]
            unpermuted.set_()
        h0 = H[0].clone()  # undamped row 0 (after act-order): all of H that Qronos's first column reads
        fac = damped_inverse_cholesky(H, damping, live=~dead if perm is None else ~dead[perm], overwrite=True)
        del H
        if fac.U is None:
            return _fallback(W, spec, method, fac.error, fac.delta, fac.damp_rel, fac.retries)
        codes = torch.zeros_like(v)
        start = 0
        if first_column is not None and cols > 0:
            first_column(v, g, h0, fac.delta, fac.U, s_cols, z_cols, codes, spec)
            start = 1
        gptq_sweep(v, fac.U, s_cols, z_cols, codes, spec, block_size, start)
        if perm is not None:
            codes = codes[:, torch.argsort(perm)]
        codes = codes.to(spec.code_dtype)
        weight = dequantize(codes, scale, zero).reshape(W.shape).to(W.dtype)
    return QuantResult(weight, codes, scale, zero, method, fac.delta, fac.damp_rel, fac.retries)


def gptq_quantize_ex(W: Tensor, H: Tensor, spec: QuantSpec, damp: float | str | Damping = DEFAULT_DAMPING,
                     act_order: bool = False, block_size: int = 128, consume: bool = False) -> QuantResult:
    """GPTQ with the full record (codes, scale, zero, damping used, RTN fallback). See hessian_quantize."""
    return hessian_quantize(W, H, spec, damp, act_order, block_size, method="gptq", consume=consume)


def gptq_quantize(W: Tensor, H: Tensor, spec: QuantSpec, damp: float | str | Damping = DEFAULT_DAMPING,
                  act_order: bool = False, block_size: int = 128) -> Tensor:
    """GPTQ-quantized weight (dequantized, W's shape and dtype). H = X̃ᵀX̃/n (in, in); damp relative to mean diag H,
    or "adaptive" / "lambda_max" / a Damping."""
    return gptq_quantize_ex(W, H, spec, damp, act_order, block_size).weight
