"""Packed int4 weights by rows, and their dequantization in plain tensor ops that torch.compile fuses into one kernel.

Layout: codes (rows, cols) with cols even, two per uint8 byte along each row: column 2j in the low nibble, 2j+1 in
the high nibble. This is exactly diffptq.quant.quantizer.pack_int4 of the row-major codes (what checkpoints store),
viewed as (rows, cols / 2), so a checkpoint's bytes load without unpacking.
Dequantization: w = s_g · (q − z_g) per group g of `cols / n_groups` columns, as the fake-quant layers compute it.
"""
from __future__ import annotations

import torch
from torch import Tensor

from diffptq.quant.quantizer import pack_int4


def pack_int4_rows(codes: Tensor) -> Tensor:
    """Codes (rows, cols) in [-8, 7] or [0, 15], cols even -> packed uint8 (rows, cols / 2)."""
    rows, cols = codes.shape
    if cols % 2:
        raise ValueError(f"int4 rows need an even number of columns, got {cols}")
    return pack_int4(codes).reshape(rows, cols // 2)


def unpack_nibbles(packed: Tensor) -> Tensor:
    """The raw nibbles (rows, 2 · packed.shape[1]) uint8 in [0, 15] of packed rows, in column order."""
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).reshape(packed.shape[0], -1)


def unpack_int4_rows(packed: Tensor, signed: bool) -> Tensor:
    """Inverse of pack_int4_rows: int8 codes (rows, 2 · packed.shape[1]), sign-extended when `signed`.

    A two's-complement nibble v is the code (v XOR 8) − 8. Only uint8 AND / shift / XOR with results in [0, 15] are
    used (no bit casts, nothing that depends on integer promotion), which torch.compile fuses safely.
    """
    nib = unpack_nibbles(packed)
    return (nib ^ 8).to(torch.int8) - 8 if signed else nib.to(torch.int8)


def dequantize_int4_rows(packed: Tensor, scale: Tensor, zero: Tensor | None, signed: bool,
                         dtype: torch.dtype) -> Tensor:
    """Weight (rows, cols) in `dtype` from packed codes, scale (rows, G) and integer zero (rows, G) or None.

    Computed as s · (q − z) rounded once to `dtype`: for fp16 scales and an fp16 target the fp16 product is that
    exact value rounded (s has 11 significant bits and |q − z| ≤ 15 four more, so s · (q − z) is exact in fp32 and
    fp16 arithmetic rounds it once); otherwise in fp32, then cast. Either way bit-identical to
    `dequantize(codes, scale.float(), zero.float()).to(dtype)`, the fake-quant weight.
    """
    rows, n_groups = scale.shape
    compute = torch.float16 if (dtype == torch.float16 and scale.dtype == torch.float16) else torch.float32
    nib = unpack_nibbles(packed)
    if signed:
        nib = nib ^ 8  # code + 8, in [0, 15]
    w = nib.reshape(rows, n_groups, -1).to(compute)
    if signed:  # in place: eager peak memory stays at one weight-sized temporary
        w.sub_(8)
    if zero is not None:
        w.sub_(zero.to(compute).unsqueeze(-1))
    w.mul_(scale.to(compute).unsqueeze(-1))
    return w.reshape(rows, -1).to(dtype)
