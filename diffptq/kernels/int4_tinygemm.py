"""The memory path's int4 codes in the layout of torch's tinygemm kernel (`aten._weight_int4pack_mm`, the int4
weight-only GEMM of PyTorch's CUDA build that torchao's Int4WeightOnlyConfig calls), so that a benchmark (and later
the layers) can run our codes through that library kernel.

tinygemm computes with unsigned codes u in [0, 15] and, per group g of K columns and output row n, a scale and a
zero in the activation dtype (bf16): w = (u − 8) · scale + zero. Our codes are either signed, q in [-8, 7], with
w = s · q, or unsigned with an integer zero point z, w = s · (u − z) = (u − 8) · s + (8 − z) · s. So:
signed: u = q + 8, zero = 0; unsigned: u = q, zero = (8 − z) · s. Scales and zeros are rounded to bf16 (8
significant bits against fp16's 11 in our storage): the weights it multiplies differ from our dequantized bf16
weights by about one bf16 rounding.

Layouts: `scales_and_zeros` (G, N, 2) [scale, zero]; on CUDA `aten._convert_weight_to_int4pack` takes the codes as
uint8 (N, K / 2) with column 2j in the high nibble (ours: the low one) and `inner_k_tiles` ∈ {2, 4, 8} (K a multiple
of 16 · inner_k_tiles); on the CPU `aten._convert_weight_to_int4pack_for_cpu` takes them as int32 (N, K).
"""
from __future__ import annotations

import torch
from torch import Tensor

from diffptq.kernels.int4 import unpack_nibbles

GROUP_SIZES = (32, 64, 128, 256)  # the group sizes the kernel takes


def tinygemm_unsupported_reason(n: int, k: int, group: int) -> str | None:
    """Why a (n, k) weight with groups of `group` columns cannot go through tinygemm (None when it can)."""
    if group not in GROUP_SIZES:
        return f"group size {group} (tinygemm takes {', '.join(map(str, GROUP_SIZES))})"
    if k % 32 or n % 8:
        return f"weight ({n}, {k}): tinygemm needs k a multiple of 32 and n of 8"
    return None


def inner_k_tiles(k: int) -> int:
    """The largest of 8, 4, 2 whose tile (16 · it columns) divides k."""
    return next(t for t in (8, 4, 2) if k % (16 * t) == 0)


def tinygemm_codes(packed: Tensor, signed: bool) -> Tensor:
    """Unsigned codes u (N, K) uint8 in [0, 15] from our packed rows (N, K / 2): u = q + 8 for signed codes."""
    nib = unpack_nibbles(packed)
    return nib ^ 8 if signed else nib  # a two's-complement nibble v holds q; v XOR 8 = q + 8


def tinygemm_scales_and_zeros(scale: Tensor, zero: Tensor | None, signed: bool,
                              dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """(G, N, 2) [scale, zero] in `dtype` from our scale (N, G) and integer zero (N, G) or None."""
    s = scale.float()
    if signed or zero is None:
        z = torch.zeros_like(s) if signed else 8.0 * s  # unsigned codes without a zero point: w = s · u
    else:
        z = (8.0 - zero.float()) * s
    return torch.stack((s, z), dim=-1).transpose(0, 1).contiguous().to(dtype)


def pack_for_cuda(codes: Tensor) -> Tensor:
    """tinygemm's CUDA weight from unsigned codes (N, K) uint8 (on a CUDA device): column 2j in the high nibble."""
    high_first = (codes[:, ::2] << 4) | codes[:, 1::2]
    return torch.ops.aten._convert_weight_to_int4pack(high_first.contiguous(), inner_k_tiles(codes.shape[1]))


def pack_for_cpu(codes: Tensor) -> Tensor:
    """tinygemm's CPU weight from unsigned codes (N, K)."""
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(),
                                                              inner_k_tiles(codes.shape[1]))


def tinygemm_linear(x: Tensor, weight: Tensor, group: int, scales_and_zeros: Tensor) -> Tensor:
    """x (M, K) @ Wᵀ through tinygemm: (M, N) in x's dtype (bf16), on x's device (CUDA, or the CPU kernel)."""
    if x.is_cuda:
        return torch.ops.aten._weight_int4pack_mm(x, weight, group, scales_and_zeros)
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x, weight, group, scales_and_zeros)
