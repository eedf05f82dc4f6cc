"""The GPTQ column sweep (docs/ALGORITHMS.md §4, steps 4–5): the sequential inner loop GPTQ and Qronos share.

Two backends compute the same thing:
- ``eager``: torch ops, one column at a time inside lazy blocks. About seven small kernels per column, so on a GPU
  it is bound by kernel launches (≈ 0.3 s for a 4608-column layer on an H100).
- ``triton``: one kernel per lazy block; each program owns a tile of rows and sweeps the block's columns in
  registers (rows are independent given U), then one matmul applies the block's errors to the later columns.
Backend choice: ``backend`` argument, else the ``DIFFPTQ_SWEEP`` environment variable (auto | eager | triton);
auto takes triton for CUDA tensors when Triton imports and the lazy block fits a tile (≤ 128 columns), and falls
back to eager for good (with one warning) if the kernel fails to build.
Both round half to even with a correctly rounded division, as ``round_to_grid`` does; they can differ from each
other only by float rounding in the updates (fused multiply-adds), which may flip a rare near-tie code.
"""
from __future__ import annotations

import torch
from torch import Tensor

from diffptq.quant.quantizer import QuantSpec
from diffptq.triton_backend import TritonBackend

MAX_TRITON_BLOCK = 128

try:  # Triton is optional: CPU-only installs sweep eagerly
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

BACKEND = TritonBackend("DIFFPTQ_SWEEP", "Triton GPTQ sweep", lambda: triton is not None)


def gptq_sweep(W: Tensor, U: Tensor, s_cols: Tensor, z_cols: Tensor, codes: Tensor, spec: QuantSpec,
               block_size: int = 128, start: int = 0, backend: str | None = None) -> None:
    """Quantize columns start.. of W (out, in) float32 in lazy blocks, in place; float codes go to `codes` (out, in).

    U: upper Cholesky factor of the damped H⁻¹ (in, in); s_cols, z_cols: per-column scale/zero (out, in), views
    allowed. Column i: q = Q(w_i); e = (w_i − q)/U_ii; w_{>i} −= e·U_{i,>i} (inside the block now, after it once
    per block). On return W[:, i] holds the value column i had when it was quantized.
    backend: "auto" | "eager" | "triton" (None: the DIFFPTQ_SWEEP environment variable, default auto).
    """
    if BACKEND.choose(W.is_cuda and block_size <= MAX_TRITON_BLOCK, backend) == "triton":
        if block_size > MAX_TRITON_BLOCK:
            raise ValueError(f"the Triton sweep takes block_size <= {MAX_TRITON_BLOCK}, got {block_size}")
        try:
            _sweep_triton(W, U, s_cols, z_cols, codes, spec, block_size, start)
            return
        except Exception as e:  # noqa: BLE001 - any build/launch failure: the eager sweep is always right
            BACKEND.fall_back(e, backend)
    _sweep_eager(W, U, s_cols, z_cols, codes, spec, block_size, start)


def _sweep_eager(W: Tensor, U: Tensor, s_cols: Tensor, z_cols: Tensor, codes: Tensor, spec: QuantSpec,
                 block_size: int, start: int) -> None:
    """Column by column with torch ops; the same arithmetic as round_to_grid (zero terms skipped when symmetric,
    where zero is exactly 0: adding or subtracting it changes nothing)."""
    cols = W.shape[1]
    qmin, qmax, has_zero = spec.qmin, spec.qmax, not spec.symmetric
    for i1 in range(start, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1 = W[:, i1:i2].clone()
        E1 = torch.empty_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            w, s, z, q, e = W1[:, i], s_cols[:, i1 + i], z_cols[:, i1 + i], codes[:, i1 + i], E1[:, i]
            t = torch.div(w, s).round_()
            if has_zero:
                t.add_(z)
            torch.clamp(t, qmin, qmax, out=q)
            wq = s * (q - z) if has_zero else s * q
            torch.sub(w, wq, out=e).div_(U1[i, i])
            W1[:, i + 1:].addr_(e, U1[i, i + 1:], alpha=-1.0)
        W[:, i1:i2] = W1
        if i2 < cols:
            W[:, i2:].addmm_(E1, U[i1:i2, i2:], alpha=-1.0)


def _sweep_triton(W: Tensor, U: Tensor, s_cols: Tensor, z_cols: Tensor, codes: Tensor, spec: QuantSpec,
                  block_size: int, start: int) -> None:
    rows, cols = W.shape
    if rows == 0 or cols <= start:
        return
    block_c = max(16, triton.next_power_of_2(block_size))
    block_r = 16
    E1 = torch.empty(rows, block_size, device=W.device, dtype=torch.float32)
    grid = (triton.cdiv(rows, block_r),)
    for i1 in range(start, cols, block_size):
        i2 = min(i1 + block_size, cols)
        _sweep_block_kernel[grid](
            W, U, s_cols, z_cols, codes, E1, rows, i1, i2 - i1,
            W.stride(0), W.stride(1), U.stride(0), U.stride(1), s_cols.stride(0), s_cols.stride(1),
            z_cols.stride(0), z_cols.stride(1), codes.stride(0), codes.stride(1), E1.stride(0), E1.stride(1),
            float(spec.qmin), float(spec.qmax), HAS_ZERO=not spec.symmetric, BLOCK_R=block_r, BLOCK_C=block_c)
        if i2 < cols:
            W[:, i2:].addmm_(E1[:, :i2 - i1], U[i1:i2, i2:], alpha=-1.0)


if triton is not None:
    from diffptq.quant.fused import round_half_even  # torch.round's rounding, one definition for both kernels

    @triton.jit(do_not_specialize=["n_rows", "i1", "width"])
    def _sweep_block_kernel(W, U, S, Z, Q, E, n_rows, i1, width,
                            sw_r, sw_c, su_r, su_c, ss_r, ss_c, sz_r, sz_c, sq_r, sq_c, se_r, se_c,
                            qmin, qmax, HAS_ZERO: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        """Columns i1 .. i1+width of rows [pid·BLOCK_R, +BLOCK_R): quantize each column, update the later ones."""
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.arange(0, BLOCK_C)
        rmask = rows < n_rows
        cmask = cols < width
        tile_ptr = W + rows[:, None] * sw_r + (i1 + cols)[None, :] * sw_c
        tile_mask = rmask[:, None] & cmask[None, :]
        tile = tl.load(tile_ptr, mask=tile_mask, other=0.0)
        for i in range(0, width):
            c = i1 + i
            w = tl.sum(tl.where((cols == i)[None, :], tile, 0.0), axis=1)
            s = tl.load(S + rows * ss_r + c * ss_c, mask=rmask, other=1.0)
            q = round_half_even(tl.math.div_rn(w, s))
            if HAS_ZERO:
                z = tl.load(Z + rows * sz_r + c * sz_c, mask=rmask, other=0.0)
                q = tl.minimum(tl.maximum(q + z, qmin), qmax)
                wq = s * (q - z)
            else:
                q = tl.minimum(tl.maximum(q, qmin), qmax)
                wq = s * q
            d = tl.load(U + c * su_r + c * su_c)
            e = tl.math.div_rn(w - wq, d)
            tl.store(Q + rows * sq_r + c * sq_c, q, mask=rmask)
            tl.store(E + rows * se_r + i * se_c, e, mask=rmask)
            u = tl.load(U + c * su_r + (i1 + cols) * su_c, mask=cmask & (cols > i), other=0.0)
            tile = tile - e[:, None] * u[None, :]
        tl.store(tile_ptr, tile, mask=tile_mask)
