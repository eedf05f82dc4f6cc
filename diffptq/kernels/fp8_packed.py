"""Fp8W4A8PackedLinear: the W4A8 speed path with its 4-bit weight codes stored packed, two per byte.

Fp8W4A8Linear holds the codes q − z as e4m3, one byte per weight: half of BF16's weight memory. Here the codes stay
packed as the checkpoint stores them (diffptq.kernels.int4 layout, with an integer zero point per output channel for
asymmetric grids), about a quarter of BF16's, and every call unpacks them to the same exact e4m3 tensor q − z
before the FP8 GEMM: under torch.compile one fused kernel that reads 0.5 and writes 1 byte per weight. The outputs
are Fp8W4A8Linear's, bit for bit; what it trades is that unpacking per call for the memory of the W4 memory path
(diffptq.kernels.int4_weight_only) with the W4A8 path's FP8 GEMMs (and its e4m3 activations: W4A8 numerics).
"""
from __future__ import annotations

import torch
from torch import Tensor

from diffptq.kernels.common import profile_scope
from diffptq.kernels.fp8 import E4M3
from diffptq.kernels.fp8_linear import Fp8W4A8Linear, fp8_unsupported_reason
from diffptq.kernels.int4 import pack_int4_rows, unpack_int4_rows
from diffptq.kernels.int4_weight_only import int4_unsupported_reason
from diffptq.quant.act import ActQuantizer
from diffptq.quant.layers import QuantLinear


def packed_fp8_unsupported_reason(layer) -> str | None:
    """Why `layer` cannot become an Fp8W4A8PackedLinear (None when it can): the FP8 GEMM's and int4 storage's
    conditions together."""
    return fp8_unsupported_reason(layer) or int4_unsupported_reason(layer)


class Fp8W4A8PackedLinear(Fp8W4A8Linear):
    """Fp8W4A8Linear whose weight codes are stored packed. x: (..., in) -> (..., out) in x's dtype.

    Buffers: weight_packed (out, in / 2) uint8, two codes per byte (low nibble first); weight_zero (out, 1) int8, the
    integer zero point of an asymmetric grid, or None (symmetric); weight_scale (1, out) float32. signed: the codes
    are two's-complement nibbles in [-8, 7] (else unsigned in [0, 15]). Activation settings as Fp8W4A8Linear.
    """

    _keep_dtype = ("weight_scale",)

    def __init__(self, weight_packed: Tensor, signed: bool, weight_zero: Tensor | None, weight_scale: Tensor,
                 bias: Tensor | None = None, act_mode: str = "token", act_quant: ActQuantizer | None = None,
                 use_fast_accum: bool = True, backend: str = "auto", act_kernel: str = "torch"):
        super(Fp8W4A8Linear, self).__init__()  # the storage differs: Fp8W4A8Linear's checks and settings only
        out_features, half = weight_packed.shape
        if weight_packed.dtype != torch.uint8:
            raise ValueError(f"weight_packed must be uint8 (two codes per byte), got {weight_packed.dtype}")
        if weight_zero is not None and tuple(weight_zero.shape) != (out_features, 1):
            raise ValueError(f"weight_zero must be ({out_features}, 1), got {tuple(weight_zero.shape)}")
        self._init_gemm(out_features, 2 * half, weight_scale, bias, act_mode, act_quant, use_fast_accum, backend,
                        act_kernel)
        self.signed = signed
        self.register_buffer("weight_packed", weight_packed.contiguous())
        self.register_buffer("weight_zero", None if weight_zero is None else weight_zero.to(torch.int8).contiguous())

    @classmethod
    @torch.no_grad()
    def from_quant_linear(cls, layer: QuantLinear, act_mode: str = "token", use_fast_accum: bool = True,
                          backend: str = "auto", act_kernel: str = "torch") -> Fp8W4A8PackedLinear:
        """Convert a quantized per-channel QuantLinear of a 4-bit grid (its codes, packed; never the float weight)."""
        reason = packed_fp8_unsupported_reason(layer)
        if reason is not None:
            raise ValueError(f"cannot build an {cls.__name__}: {reason}")
        signed = layer.weight_codes.dtype == torch.int8
        zero = layer.weight_zero.round()
        keep_zero = bool(zero.any())
        return cls(pack_int4_rows(layer.weight_codes), signed, zero.to(torch.int8) if keep_zero else None,
                   layer.weight_scale[:, 0], layer.bias, act_mode, layer.act_quant, use_fast_accum, backend,
                   act_kernel)

    def gemm_weight(self) -> Tensor:
        """q − z (out, in) as exact e4m3, unpacked from the stored codes (|q − z| ≤ 15 is exact in fp16 and e4m3)."""
        with profile_scope("diffptq::int4_to_e4m3"):
            codes = unpack_int4_rows(self.weight_packed, self.signed)
            if self.weight_zero is not None:
                codes = codes - self.weight_zero
            return codes.to(torch.float16).to(E4M3)

    def bits_per_weight(self) -> float:
        """Storage bits per weight: packed codes, zero points and scales, bias excluded."""
        tensors = (self.weight_packed, self.weight_zero, self.weight_scale)
        return 8.0 * sum(t.numel() * t.element_size() for t in tensors if t is not None) / (
            self.in_features * self.out_features)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", packed int4 (signed={self.signed}, zero={self.weight_zero is not None})"
