"""FP8 (e4m3) attention: Q·Kᵀ and P·V on FP8 operands with fp32 accumulation, flash-style (one pass over the keys).

Numerics (one definition for the Triton kernel and the torch reference; shapes (B, H, L, D), any float dtype):
  Q and K get one fp32 scale per token (amax over the head dimension / 448), V one per channel (amax over the keys
    of each batch and head / 448): q8 = e4m3(q / s_q), k8 = e4m3(k / s_k), v8 = e4m3(v / s_v), rounded to nearest
    even (diffptq.kernels.fp8: act_scale, quantize_e4m3). Per-token and per-channel scales factor out of the
    products exactly, so every tiling of the kernel computes the same logits.
  logits in log2 units: t_ij = (q8_i · k8_j) · (s_q[i] · c) · s_k[j], c = log2(e) / √D.
  keys in blocks of BLOCK_N = 64, in order, with a running row maximum m: per block m' = max(m, max_j t_ij),
    α = 2^(m − m'), p_ij = e4m3(2^(t_ij − m') · 448) (a probability in units of 1/448: the largest of a row's block
    is exactly 448), l ← α·l + Σ_j p_ij, acc ← α·acc + p @ v8 (l: `denom` in the code).
  out = acc / l · s_v (the 1/448 cancels): a convex combination of the quantized values, since l sums the same
    quantized p that weight them. Returned in q's dtype.
Only the rounding of p depends on the key blocking (through the running maximum); the reference walks the same
blocks. Error against exact attention: Q, K, V each carry e4m3's relative error of 2^-4 (3 mantissa bits) and p
the same; on random inputs the output's relative error is about 2-3 % (tests/kernels/test_fp8_attention.py), its
effect on images is measured by benchmarks/fp8_attention_quality.py.

The kernel (Triton, sm_89+): one program per (BLOCK_M queries, batch·head), Q tile in registers, K and V tiles of 64
keys streamed, both products on FP8 tensor cores. Head dimensions that are not a power of two (PixArt's 72, SD's
40 / 80 / 160) are zero-padded to the next one inside the kernel. Under Triton's CPU interpreter, whose float8
conversions are not round-to-nearest-even, the kernel takes the codes as fp32 and rounds p with `_round_e4m3`
(exact round-to-nearest-even in fp32 arithmetic); on the GPU p is cast by the hardware (cvt.rn.satfinite), the same
values. The kernel is the torch op diffptq::fp8_attention_codes (with a fake implementation, so torch.compile
traces around it); the quantization of Q, K and V before it is plain torch code that torch.compile fuses.
"""
from __future__ import annotations

import functools
import math
import os

import torch
from torch import Tensor

from diffptq.kernels.fp8 import E4M3, E4M3_MAX, act_scale, fp8_support, quantize_e4m3

try:  # Triton is optional: without it the reference runs
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

BLOCK_N = 64  # keys per block: part of the numerics (the running maximum is taken per block)
BLOCK_M = 64  # queries per program: free (scales are per token), chosen for the kernel
BACKENDS = ("auto", "kernel", "reference")
_LOG2E = math.log2(math.e)


def quantize_qkv(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(q8, k8, v8, s_q, s_k, s_v): e4m3 codes of q, k (B, H, L, D) with per-token scales s_q (B, H, Lq), s_k
    (B, H, Lk), and of v with per-channel scales s_v (B, H, D), all scales fp32."""
    def per_token(x: Tensor) -> tuple[Tensor, Tensor]:
        x2d = x.reshape(-1, x.shape[-1])
        s = act_scale(x2d, "token")
        return quantize_e4m3(x2d, s).reshape(x.shape), s.reshape(x.shape[:-1])

    q8, s_q = per_token(q)
    k8, s_k = per_token(k)
    vt8, s_v = per_token(v.transpose(-1, -2))  # per channel of v = per row of vᵀ
    return q8, k8, vt8.transpose(-1, -2), s_q, s_k, s_v


def fp8_attention_reference(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """The FP8 attention numerics (module docstring) in torch fp32, on any device. q (B, H, Lq, D), k and v
    (B, H, Lk, D) -> (B, H, Lq, D) in q's dtype."""
    _check(q, k, v)
    q8, k8, v8, s_q, s_k, s_v = quantize_qkv(q, k, v)
    c = _LOG2E / math.sqrt(q.shape[-1])
    qf, kf, vf = q8.float(), k8.float(), v8.float()
    row_scale = (s_q * c)[..., None]
    m = torch.full(q.shape[:-1], -math.inf, device=q.device)
    denom = torch.zeros(q.shape[:-1], device=q.device)
    acc = torch.zeros(q.shape[:-1] + (v.shape[-1],), device=q.device)
    for start in range(0, k.shape[-2], BLOCK_N):
        keys = slice(start, start + BLOCK_N)
        t = (qf @ kf[..., keys, :].transpose(-1, -2)) * row_scale * s_k[..., None, keys]
        m_new = torch.maximum(m, t.amax(-1))
        alpha = torch.exp2(m - m_new)
        p = (torch.exp2(t - m_new[..., None]) * E4M3_MAX).to(E4M3).float()
        denom = denom * alpha + p.sum(-1)
        acc = acc * alpha[..., None] + p @ vf[..., keys, :]
        m = m_new
    return (acc / denom[..., None] * s_v[..., None, :]).to(q.dtype)


def _check(q: Tensor, k: Tensor, v: Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"fp8 attention takes (B, H, L, D) tensors, got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"fp8 attention needs k and v of one shape and q of their batch, heads and head size, got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape[-2] == 0:
        raise ValueError("fp8 attention needs at least one key")


def kernel_unsupported_reason(q: Tensor) -> str | None:
    """Why the Triton kernel cannot run on q's device (None when it can)."""
    if triton is None:
        return "Triton does not import here"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return None
    return _device_reason(q.device) if q.is_cuda else "the tensors are not on a CUDA device"


@functools.lru_cache(maxsize=None)
def _device_reason(device: torch.device) -> str | None:
    """fp8_support's verdict for a CUDA device, asked once per device (fp8_attention dispatches on every call)."""
    ok, reason = fp8_support(device)
    return None if ok else reason


KERNEL_TILES = {"block_m": BLOCK_M, "num_warps": 4, "num_stages": 3}  # the launch; a benchmark may try others


def run_kernel(q: Tensor, k: Tensor, v: Tensor, **tiles) -> Tensor:
    """The Triton kernel on (B, H, L, D) tensors; out (B, H, Lq, D) in q's dtype. The quantization of q, k, v is
    plain torch code (traced by torch.compile, which fuses it with the projections around it); only the kernel is
    an opaque op. tiles: block_m, num_warps, num_stages (default KERNEL_TILES)."""
    _check(q, k, v)
    reason = kernel_unsupported_reason(q)
    if reason is not None:
        raise RuntimeError(f"the FP8 attention kernel cannot run: {reason}")
    q8, k8, v8, s_q, s_k, s_v = quantize_qkv(q, k, v)
    cfg = {**KERNEL_TILES, **tiles}
    # V as (B, H, D, Lk), keys contiguous: the second product's B operand K-major, as FP8 tensor cores take it
    # (quantize_qkv made v8 as a transposed view of exactly that tensor: no copy)
    return fp8_attention_codes(q8, k8, v8.transpose(-1, -2), s_q, s_k, s_v, q.dtype, cfg["block_m"],
                                cfg["num_warps"], cfg["num_stages"])


@torch.library.custom_op("diffptq::fp8_attention_codes", mutates_args=())
def fp8_attention_codes(q8: Tensor, k8: Tensor, vt8: Tensor, s_q: Tensor, s_k: Tensor, s_v: Tensor,
                         out_dtype: torch.dtype, block_m: int, num_warps: int, num_stages: int) -> Tensor:
    """The kernel on e4m3 codes q8 (B, H, Lq, D), k8 (B, H, Lk, D), vᵀ codes (B, H, D, Lk) and fp32 scales s_q
    (B, H, Lq), s_k (B, H, Lk), s_v (B, H, D) -> (B, H, Lq, D) in out_dtype."""
    emulate = os.environ.get("TRITON_INTERPRET") == "1"
    if emulate:  # the interpreter's float8 conversions are not the hardware's: hand it the codes as fp32
        q8, k8, vt8 = q8.float(), k8.float(), vt8.float()
    B, H, Lq, D = q8.shape
    Lk = k8.shape[-2]
    out = torch.empty((B, H, Lq, D), dtype=out_dtype, device=q8.device)
    q8, k8, vt8 = q8.contiguous(), k8.contiguous(), vt8.contiguous()
    s_q, s_k, s_v = s_q.contiguous(), s_k.contiguous(), s_v.contiguous()
    grid = (triton.cdiv(Lq, block_m), B * H)
    _fp8_attention_kernel[grid](
        q8, k8, vt8, s_q, s_k, s_v, out, Lq, D, _LOG2E / math.sqrt(D), E4M3_MAX, Lk=Lk,
        BLOCK_M=block_m, BLOCK_N=BLOCK_N, BLOCK_D=max(32, triton.next_power_of_2(D)), EMULATE=emulate,
        num_warps=num_warps, num_stages=num_stages)
    return out


@fp8_attention_codes.register_fake
def _fp8_attention_codes_fake(q8: Tensor, k8: Tensor, vt8: Tensor, s_q: Tensor, s_k: Tensor, s_v: Tensor,
                              out_dtype: torch.dtype, block_m: int, num_warps: int, num_stages: int) -> Tensor:
    return q8.new_empty(q8.shape, dtype=out_dtype)


def fp8_attention(q: Tensor, k: Tensor, v: Tensor, backend: str = "auto") -> Tensor:
    """FP8 attention (module docstring) of q (B, H, Lq, D) over k, v (B, H, Lk, D) -> (B, H, Lq, D), q's dtype.

    backend: "auto" (the Triton kernel where it runs, i.e. CUDA sm_89+, else the reference), "kernel" or
    "reference".
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "reference" or (backend == "auto" and kernel_unsupported_reason(q) is not None):
        return fp8_attention_reference(q, k, v)
    return run_kernel(q, k, v)


if triton is not None:
    @triton.jit
    def _round_e4m3(x):
        """x (fp32, 0 ≤ x ≤ 448) rounded to the nearest e4m3 value, ties to even, in fp32 arithmetic: normal values
        (≥ 2^-6) keep 3 mantissa bits (integer rounding of the bit pattern), subnormals are multiples of 2^-9."""
        bits = x.to(tl.int32, bitcast=True)
        half = 0x7FFFF + ((bits >> 20) & 1)  # round half to even on the 20 dropped mantissa bits
        normal = ((bits + half) & -0x100000).to(tl.float32, bitcast=True)
        big = 12582912.0  # 1.5 · 2^23: adding and subtracting it rounds to an integer, ties to even
        sub = ((x * 512.0 + big) - big) * 0.001953125
        return tl.where(x >= 0.015625, normal, sub)

    @triton.jit
    def _fp8_attention_kernel(q_ptr, k_ptr, vt_ptr, sq_ptr, sk_ptr, sv_ptr, o_ptr, Lq, D, c, p_max,
                              Lk: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                              EMULATE: tl.constexpr):
        """Queries [pid·BLOCK_M, +BLOCK_M) of one batch·head; contiguous codes q (B·H, Lq, D), k (B·H, Lk, D),
        vᵀ (B·H, D, Lk) and scales (B·H, L), (B·H, D). Lk is compile-time (one kernel per key count: the loop
        over key blocks has a fixed trip count)."""
        pid_m = tl.program_id(0)
        bh = tl.program_id(1).to(tl.int64)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        dcol = tl.arange(0, BLOCK_D)
        rmask = rows < Lq
        dmask = dcol < D
        q = tl.load(q_ptr + bh * Lq * D + rows[:, None] * D + dcol[None, :], mask=rmask[:, None] & dmask[None, :],
                    other=0.0)
        row_scale = tl.load(sq_ptr + bh * Lq + rows, mask=rmask, other=0.0) * c
        m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        denom = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        for start in range(0, Lk, BLOCK_N):
            keys = start + tl.arange(0, BLOCK_N)
            kmask = keys < Lk
            kv_mask = kmask[:, None] & dmask[None, :]
            k = tl.load(k_ptr + bh * Lk * D + keys[:, None] * D + dcol[None, :], mask=kv_mask, other=0.0)
            s_k = tl.load(sk_ptr + bh * Lk + keys, mask=kmask, other=0.0)
            t = tl.dot(q, tl.trans(k)) * row_scale[:, None] * s_k[None, :]
            t = tl.where(kmask[None, :], t, float("-inf"))
            m_new = tl.maximum(m, tl.max(t, axis=1))
            alpha = tl.math.exp2(m - m_new)
            p = tl.math.exp2(t - m_new[:, None]) * p_max
            v = tl.load(vt_ptr + bh * D * Lk + dcol[None, :] * Lk + keys[:, None], mask=kv_mask, other=0.0)
            if EMULATE:
                p = _round_e4m3(p)
                pv = tl.dot(p, v)
            else:
                p8 = p.to(tl.float8e4nv)
                pv = tl.dot(p8, v)
                p = p8.to(tl.float32)
            denom = denom * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + pv
            m = m_new
        s_v = tl.load(sv_ptr + bh * D + dcol, mask=dmask, other=0.0)
        out = acc / denom[:, None] * s_v[None, :]
        tl.store(o_ptr + bh * Lq * D + rows[:, None] * D + dcol[None, :], out.to(o_ptr.dtype.element_ty),
                 mask=rmask[:, None] & dmask[None, :])
