"""The W4 memory path's linear layers in one Triton kernel: int4 codes dequantized in registers, never a full
16-bit weight in memory.

y (M, N) = x (M, K) @ Wᵀ + b with W = s_g · (q − z_g) per group g of `group_size` input columns: the packed codes of
diffptq.kernels.int4 (two per byte along each row, column 2j in the low nibble), scales (N, G) fp16 or fp32, integer
zero points (N, G) uint8 or none (signed codes). Each program computes one (BLOCK_M, BLOCK_N) tile of y, walking K in
chunks of BLOCK_K: it loads the chunk of x, the chunk's bytes of BLOCK_N weight rows (half a byte per weight), their
scales (and zeros), forms w = s · (q − z) in fp32, rounds it to x's dtype (the value dequantize_int4_rows gives:
bit for bit the fake-quant weight in that dtype) and multiplies on the tensor cores with fp32 accumulation; the bias
is added in fp32 before the one rounding of y to x's dtype. So the result is F.linear(x, dequantized W, b) up to the
order of accumulation. The separate path it replaces writes and re-reads the whole bf16 weight on every call
(2 + 2 bytes per weight of traffic against half a byte here).
Registered as the torch op diffptq::int4_linear with a fake implementation, so torch.compile traces through it.
"""
from __future__ import annotations

import torch
from torch import Tensor

try:  # Triton is optional: without it the memory path dequantizes with torch ops
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

BLOCK_M, BLOCK_N, BLOCK_K = 64, 64, 64
NUM_WARPS, NUM_STAGES = 4, 3


def int4_linear_kernel(x: Tensor, packed: Tensor, scale: Tensor, zero: Tensor | None, signed: bool,
                       bias: Tensor | None) -> Tensor:
    """Launch the kernel: x (M, K) fp16 / bf16 / fp32, packed (N, K / 2) uint8, scale (N, G), zero (N, G) uint8 or
    None, bias (N,) or None -> y (M, N) in x's dtype."""
    if triton is None:
        raise RuntimeError("diffptq::int4_linear needs Triton, which does not import here")
    M, K = x.shape
    N = packed.shape[0]
    if packed.dtype != torch.uint8 or packed.shape[1] * 2 != K or scale.shape[0] != N or K % scale.shape[1]:
        raise ValueError(f"int4_linear: x {tuple(x.shape)}, packed {tuple(packed.shape)} {packed.dtype} and scale "
                         f"{tuple(scale.shape)} do not fit together")
    if x.stride(1) != 1:
        x = x.contiguous()
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0:
        return y
    group = K // scale.shape[1]
    dummy = scale  # never read when the flag says so
    grid = (triton.cdiv(M, BLOCK_M), triton.cdiv(N, BLOCK_N))
    _int4_linear_kernel[grid](
        x, packed.contiguous(), scale.contiguous(), zero.contiguous() if zero is not None else dummy,
        bias if bias is not None else dummy, y, M, N, K, x.stride(0), group, scale.shape[1],
        HAS_ZERO=zero is not None, SIGNED=signed, HAS_BIAS=bias is not None,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, num_warps=NUM_WARPS, num_stages=NUM_STAGES)
    return y


@torch.library.custom_op("diffptq::int4_linear", mutates_args=())
def int4_linear(x: Tensor, packed: Tensor, scale: Tensor, zero: Tensor | None, signed: bool,
                bias: Tensor | None) -> Tensor:
    """F.linear(x, s · (q − z), bias) for x (M, K) from packed int4 codes, in one kernel: (M, N) in x's dtype."""
    return int4_linear_kernel(x, packed, scale, zero, signed, bias)


@int4_linear.register_fake
def _int4_linear_fake(x: Tensor, packed: Tensor, scale: Tensor, zero: Tensor | None, signed: bool,
                      bias: Tensor | None) -> Tensor:
    return x.new_empty((x.shape[0], packed.shape[0]))


if triton is not None:
    @triton.jit
    def _int4_linear_kernel(x_ptr, p_ptr, s_ptr, z_ptr, b_ptr, y_ptr, M, N, K, stride_xm, group, n_groups,
                            HAS_ZERO: tl.constexpr, SIGNED: tl.constexpr, HAS_BIAS: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """Tile (pid_m, pid_n) of y: rows [pid_m·BLOCK_M, +BLOCK_M), output channels [pid_n·BLOCK_N, +BLOCK_N)."""
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        rmask, cmask = rows < M, cols < N
        half_k = K // 2
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            kmask = ks < K
            x = tl.load(x_ptr + rows.to(tl.int64)[:, None] * stride_xm + ks[None, :],
                        mask=rmask[:, None] & kmask[None, :], other=0.0)
            wmask = cmask[:, None] & kmask[None, :]
            byte = tl.load(p_ptr + cols.to(tl.int64)[:, None] * half_k + (ks // 2)[None, :], mask=wmask, other=0)
            nib = (byte.to(tl.int32) >> ((ks & 1) * 4)[None, :]) & 0xF
            q = ((nib ^ 8) - 8) if SIGNED else nib
            g_offs = cols.to(tl.int64)[:, None] * n_groups + (ks // group)[None, :]
            s = tl.load(s_ptr + g_offs, mask=wmask, other=0.0).to(tl.float32)
            if HAS_ZERO:
                z = tl.load(z_ptr + g_offs, mask=wmask, other=0).to(tl.float32)
                w = s * (q.to(tl.float32) - z)
            else:
                w = s * q.to(tl.float32)
            acc += tl.dot(x, tl.trans(w.to(x.dtype)))
        if HAS_BIAS:
            acc += tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + rows.to(tl.int64)[:, None] * N + cols[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=rmask[:, None] & cmask[None, :])
