"""The W4 memory path's linear layers in one Triton kernel: int4 codes dequantized in registers, never a full
16-bit weight in memory.

y (M, N) = x (M, K) @ Wᵀ + b with W = s_g · (q − z_g) per group g of `group_size` input columns: the packed codes of
diffptq.kernels.int4 (two per byte along each row, column 2j in the low nibble), scales (N, G) fp16 or fp32, integer
zero points (N, G) uint8 or none (signed codes). Each program computes one (BLOCK_M, BLOCK_N) tile of y, walking K in
chunks of BLOCK_K, a power of two dividing the group size (so a chunk has one scale per weight row): it loads the
chunk of x and the chunk's bytes of BLOCK_N weight rows as one contiguous tile (half a byte per weight), splits each
byte into its two codes, loads one scale (and zero) per row, forms w = s · (q − z) in fp32, rounds it to x's dtype
(the value dequantize_int4_rows gives: bit for bit the fake-quant weight in that dtype) and multiplies on the tensor
cores with fp32 accumulation; the bias is added in fp32 before the one rounding of y to x's dtype. So the result is
F.linear(x, dequantized W, b) up to the order of accumulation. The separate path it replaces writes and re-reads the
whole bf16 weight on every call (2 + 2 bytes per weight of traffic against half a byte here).
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

MAX_BLOCK_K = 128  # K chunk: the largest power of two dividing the group size, at most this
MIN_BLOCK_K = 16  # tl.dot's smallest K


def block_k(group: int) -> int | None:
    """The K chunk for a group size: the largest power of two ≤ MAX_BLOCK_K dividing it, so that every chunk lies
    in one group (one scale per row and chunk); None when that is below MIN_BLOCK_K (the layer keeps dequantizing)."""
    chunk = min(group & -group, MAX_BLOCK_K)
    return chunk if chunk >= MIN_BLOCK_K else None


def tile_config(M: int, N: int) -> dict:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for an (M, N) output: tiles of 128 × 128 where the output has that
    many rows, smaller ones for few rows (tl.dot needs at least 16)."""
    block_m = 16 if M <= 16 else 32 if M <= 32 else 64 if M <= 64 else 128
    block_n = 128 if N >= 128 else 64
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "num_warps": 8 if block_m * block_n >= 128 * 128 else 4,
            "num_stages": 3}


def int4_linear_kernel(x: Tensor, packed: Tensor, scale: Tensor, zero: Tensor | None, signed: bool,
                       bias: Tensor | None, tiles: dict | None = None) -> Tensor:
    """Launch the kernel: x (M, K) fp16 / bf16 / fp32, packed (N, K / 2) uint8, scale (N, G), zero (N, G) uint8 or
    None, bias (N,) or None -> y (M, N) in x's dtype. tiles: BLOCK_M, BLOCK_N, num_warps, num_stages (default
    tile_config; a benchmark may try others)."""
    if triton is None:
        raise RuntimeError("diffptq::int4_linear needs Triton, which does not import here")
    M, K = x.shape
    N = packed.shape[0]
    if packed.dtype != torch.uint8 or packed.shape[1] * 2 != K or scale.shape[0] != N or K % scale.shape[1]:
        raise ValueError(f"int4_linear: x {tuple(x.shape)}, packed {tuple(packed.shape)} {packed.dtype} and scale "
                         f"{tuple(scale.shape)} do not fit together")
    group = K // scale.shape[1]
    chunk = block_k(group)
    if chunk is None:
        raise ValueError(f"int4_linear: group size {group} has no power-of-two divisor ≥ {MIN_BLOCK_K} (the K chunk)")
    if x.stride(1) != 1:
        x = x.contiguous()
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0:
        return y
    cfg = {**tile_config(M, N), **(tiles or {})}
    dummy = scale  # never read when the flag says so
    grid = (triton.cdiv(M, cfg["BLOCK_M"]), triton.cdiv(N, cfg["BLOCK_N"]))
    _int4_linear_kernel[grid](
        x, packed.contiguous(), scale.contiguous(), zero.contiguous() if zero is not None else dummy,
        bias if bias is not None else dummy, y, M, N, x.stride(0), K=K, GROUP=group,
        HAS_ZERO=zero is not None, SIGNED=signed, HAS_BIAS=bias is not None, BLOCK_K=chunk, **cfg)
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
    def _int4_linear_kernel(x_ptr, p_ptr, s_ptr, z_ptr, b_ptr, y_ptr, M, N, stride_xm, K: tl.constexpr,
                            GROUP: tl.constexpr, HAS_ZERO: tl.constexpr, SIGNED: tl.constexpr, HAS_BIAS: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """Tile (pid_m, pid_n) of y: rows [pid_m·BLOCK_M, +BLOCK_M), output channels [pid_n·BLOCK_N, +BLOCK_N).
        K and GROUP are compile-time (a kernel per layer shape); BLOCK_K divides GROUP, which divides K."""
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        rmask, cmask = rows < M, cols < N
        rows64, cols64 = rows.to(tl.int64), cols.to(tl.int64)
        x_ptrs = x_ptr + rows64[:, None] * stride_xm + tl.arange(0, BLOCK_K)[None, :]
        p_ptrs = p_ptr + cols64[:, None] * (K // 2) + tl.arange(0, BLOCK_K // 2)[None, :]
        g_ptrs = cols64 * (K // GROUP)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            x = tl.load(x_ptrs + k0, mask=rmask[:, None], other=0.0)
            byte = tl.load(p_ptrs + k0 // 2, mask=cmask[:, None], other=0)  # (BLOCK_N, BLOCK_K / 2), contiguous
            nib = tl.reshape(tl.join(byte & 0xF, byte >> 4), (BLOCK_N, BLOCK_K))  # column 2j: the low nibble
            q = nib.to(tl.int32)
            if SIGNED:
                q = (q ^ 8) - 8
            s = tl.load(s_ptr + g_ptrs + k0 // GROUP, mask=cmask, other=0.0).to(tl.float32)
            if HAS_ZERO:
                z = tl.load(z_ptr + g_ptrs + k0 // GROUP, mask=cmask, other=0).to(tl.float32)
                w = s[:, None] * (q.to(tl.float32) - z[:, None])
            else:
                w = s[:, None] * q.to(tl.float32)
            acc = tl.dot(x, tl.trans(w.to(x.dtype)), acc)
        if HAS_BIAS:
            acc += tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + rows64[:, None] * N + cols[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=rmask[:, None] & cmask[None, :])
