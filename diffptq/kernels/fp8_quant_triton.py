"""Per-token e4m3 activation quantization in one Triton kernel: the values of act_scale(x, "token") and
quantize_e4m3, bit for bit, in one read of x and one write of the codes.

x (M, K) bf16 / fp16 / fp32, rows of stride ≥ K and unit column stride -> x8 (M, K) float8_e4m3fn and
s (M, 1) float32, s = max(amax_row, 1e-12) · fl(1/448), x8 = e4m3(clamp(x / s, -448, 448)).
Blocking: one program owns BLOCK_M rows. When a row fits one tile (K ≤ MAX_TILE_K, padded to a power of 2) the
tile is loaded once, reduced to the row's amax and quantized from registers: x is read once. Longer rows are swept
in chunks twice (amax, then quantize): the second read mostly hits L2. H100, bf16 x (16384, K): K = 1152 in 30 µs,
4608 in 93 µs (1.9 / 2.4 TB/s; a plain x.to(float8) cast: 25 / 83 µs; inductor's fused amax + quantize: 50 / 230 µs).
Exactness: amax is a max of exact values; the scale is one rounded product, as in act_scale; the clamp is exact;
the fp32 -> e4m3 cast is the hardware's round-to-nearest-even (cvt.rn.satfinite, sm_89+), as torch's cast. x / s
is IEEE division rounded to nearest (what torch computes for a tensor divisor), without a division per element
(with div.rn per element it ran 25-35 % slower; Triton's `/`, which inductor emits, is approximate to 2 ulp): with
y = RN(1/s) once per row, q0 = RN(x·y) is within 2 ulp of x/s, one fma correction q1 = RN(q0 + RN(x − s·q0)·y)
brings it within 1 ulp, and a second one is then exactly RN(x/s) (Markstein's theorem: y within ½ ulp of 1/s, q1
within 1 ulp of x/s). That holds while the quotient is a normal float (≥ 2^-126); below, e4m3 rounds to ±0 anyway,
with x's sign (zeros keep their sign explicitly). Rows holding inf / nan are not defined (torch gives nan codes).
Under Triton's CPU interpreter, whose tl.fma rounds twice, the kernel divides with div_rn instead (same values).
Registered as the torch op diffptq::fp8_quant_rows with a fake implementation, so torch.compile traces through it
(it stays opaque to inductor: the producer of x writes x, this kernel reads it).
"""
from __future__ import annotations

import os

import torch
from torch import Tensor

from diffptq.kernels.fp8 import _AMAX_FLOOR, E4M3, E4M3_INV_MAX, E4M3_MAX

try:  # Triton is optional: without it Fp8W4A8Linear quantizes with torch ops
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

MAX_TILE_K = 8192  # longest row kept in registers as one tile; longer rows are swept in chunks of this size
TILE_ELEMS = 4096  # elements per program for short rows (BLOCK_M · BLOCK_K)
NUM_WARPS = 4  # the fastest on an H100 for K = 1152 and 4608 (swept over 1-8 rows, 4-16 warps)


def triton_available() -> bool:
    """Whether Triton imports (the kernel itself also needs a CUDA device of sm_89+ for its e4m3 cast)."""
    return triton is not None


def _blocks(K: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_K, chunks) for rows of K elements."""
    block_k = min(triton.next_power_of_2(max(K, 16)), MAX_TILE_K)
    return max(1, TILE_ELEMS // block_k), block_k, triton.cdiv(K, block_k)


def quantize_rows(x: Tensor, out_dtype: torch.dtype = E4M3) -> tuple[Tensor, Tensor]:
    """Launch the kernel: (x8 (M, K) `out_dtype`, s (M, 1) float32) for x (M, K).

    out_dtype: float8_e4m3fn (the codes), or float32: the clamped quotient clamp(x / s, ±448) before the cast, which
    tests compare under Triton's CPU interpreter (its float8 cast does not round to nearest even).
    """
    if triton is None:
        raise RuntimeError("diffptq::fp8_quant_rows needs Triton, which does not import here")
    if x.dim() != 2 or x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"fp8_quant_rows takes a 2-D bf16/fp16/fp32 tensor, got {tuple(x.shape)} {x.dtype}")
    if out_dtype not in (E4M3, torch.float32):
        raise ValueError(f"out_dtype must be float8_e4m3fn or float32, got {out_dtype}")
    if x.stride(1) != 1 or x.stride(0) < x.shape[1]:
        x = x.contiguous()
    M, K = x.shape
    q = torch.empty((M, K), dtype=out_dtype, device=x.device)
    s = torch.empty((M, 1), dtype=torch.float32, device=x.device)
    if M == 0 or K == 0:
        return q, s.fill_(_AMAX_FLOOR).mul_(E4M3_INV_MAX)  # what act_scale gives a row of zeros
    block_m, block_k, chunks = _blocks(K)
    _quant_rows_kernel[(triton.cdiv(M, block_m),)](
        x, q, s, M, K, x.stride(0), q.stride(0), _AMAX_FLOOR, E4M3_MAX, E4M3_INV_MAX,
        BLOCK_M=block_m, BLOCK_K=block_k, CHUNKS=chunks, DIV_RN=os.environ.get("TRITON_INTERPRET") == "1",
        num_warps=NUM_WARPS)
    return q, s


@torch.library.custom_op("diffptq::fp8_quant_rows", mutates_args=())
def fp8_quant_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-row e4m3 quantization of x (M, K): (x8 (M, K) float8_e4m3fn, s (M, 1) float32), in one kernel."""
    return quantize_rows(x)


@fp8_quant_rows.register_fake
def _fp8_quant_rows_fake(x: Tensor) -> tuple[Tensor, Tensor]:
    return x.new_empty(x.shape, dtype=E4M3), x.new_empty((x.shape[0], 1), dtype=torch.float32)


if triton is not None:
    @triton.jit
    def _quotient_tile(v, s, y, e4m3_max, DIV_RN: tl.constexpr):
        """clamp(v / s, ±448) of a (BLOCK_M, BLOCK_K) fp32 tile, fp32; s, y = RN(1/s) per row (BLOCK_M,). The store
        casts it to the output's type (the e4m3 codes, or fp32 as it is)."""
        s, y = s[:, None], y[:, None]
        if DIV_RN:
            q = tl.math.div_rn(v, s)
        else:  # RN(v / s) from the reciprocal: two fma corrections (module docstring)
            q = v * y
            q = tl.fma(tl.fma(-q, s, v), y, q)
            q = tl.fma(tl.fma(-q, s, v), y, q)
            q = tl.where(v == 0.0, v, q)  # -0 / s is -0 (the corrections would give +0)
        return tl.minimum(tl.maximum(q, -e4m3_max), e4m3_max)

    # from this tile width on, x stays in its dtype in registers until quantized (H100, 4 warps: K = 4608 in 93
    # instead of 117 µs, 80 registers instead of 128; at K = 1152 converting at once was faster, 30 vs 41 µs)
    _WIDE_TILE_K = tl.constexpr(4096)

    @triton.jit(do_not_specialize=["M"])
    def _quant_rows_kernel(x_ptr, q_ptr, s_ptr, M, K, stride_xm, stride_qm, amax_floor, e4m3_max, inv_max,
                           BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, CHUNKS: tl.constexpr, DIV_RN: tl.constexpr):
        """Rows [pid·BLOCK_M, +BLOCK_M): their scales and codes."""
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.arange(0, BLOCK_K)
        rmask = rows < M
        x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_xm
        q_rows = q_ptr + rows.to(tl.int64)[:, None] * stride_qm
        if CHUNKS == 1:  # the whole row block in registers: one read of x
            mask = rmask[:, None] & (cols < K)[None, :]
            v = tl.load(x_rows + cols[None, :], mask=mask, other=0.0)
            if BLOCK_K < _WIDE_TILE_K:
                v = v.to(tl.float32)
            s = tl.maximum(tl.max(tl.abs(v), axis=1).to(tl.float32), amax_floor) * inv_max
            y = tl.math.div_rn(1.0, s)
            q = _quotient_tile(v.to(tl.float32), s, y, e4m3_max, DIV_RN)
            tl.store(q_rows + cols[None, :], q.to(q_ptr.dtype.element_ty), mask=mask)
        else:  # long rows: amax over the chunks, then quantize them (the re-read mostly hits L2)
            amax = tl.zeros([BLOCK_M], dtype=tl.float32)
            for c in range(CHUNKS):
                k = c * BLOCK_K + cols
                mask = rmask[:, None] & (k < K)[None, :]
                v = tl.load(x_rows + k[None, :], mask=mask, other=0.0).to(tl.float32)
                amax = tl.maximum(amax, tl.max(tl.abs(v), axis=1))
            s = tl.maximum(amax, amax_floor) * inv_max
            y = tl.math.div_rn(1.0, s)
            for c in range(CHUNKS):
                k = c * BLOCK_K + cols
                mask = rmask[:, None] & (k < K)[None, :]
                v = tl.load(x_rows + k[None, :], mask=mask, other=0.0).to(tl.float32)
                q = _quotient_tile(v, s, y, e4m3_max, DIV_RN)
                tl.store(q_rows + k[None, :], q.to(q_ptr.dtype.element_ty), mask=mask)
        tl.store(s_ptr + rows, s, mask=rmask)
