"""Int4WeightOnlyLinear / Int4WeightOnlyConv2d: the W4 memory path. Packed int4 weights, dequantized on the fly.

Storage per layer: `packed` (out, cols / 2) uint8 (two codes per byte, diffptq.kernels.int4 layout), `scale`
(out, n_groups) float16 by default, `zero` (out, n_groups) uint8 for unsigned grids (None for symmetric ones), and
the bias in the model's dtype. With groups of 128 columns that is 4 + 16/128 = 4.125 bits per weight (+ 8/128 for
a zero point): ≤ 4.25 bits on disk and in memory. Activations are not quantized (weight-only path).

Scales in fp16: the fake-quant layers keep fp32 scales; fp16 rounds each scale by at most 2^-11 relative
(≤ 4.9e-4), so this path computes exactly the fake-quant output of the same codes with `scale.half().float()`.
Scales of real groups below fp16's normal range (< 2^-14) or above its maximum would lose more: `scale_dtype=None`
picks fp16 unless that happens, then fp32 (4.25 bits at group 128, exact).
Forward: w = dequantize (one fused kernel under torch.compile; a few small ones in eager), then F.linear / F.conv2d;
or, for a Linear with `matmul = "triton"` (set_int4_matmul) on a CUDA input, one Triton kernel that dequantizes in
registers (diffptq.kernels.int4_gemm_triton: the same result up to the order of accumulation).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffptq.kernels.common import KeepDtypeBuffers, frozen_parameter, profile_scope
from diffptq.kernels.int4 import dequantize_int4_rows, pack_int4_rows
from diffptq.quant.layers import QuantConv2d, QuantLayer, QuantLinear

FP16_MIN_NORMAL = 2.0**-14
NEGLIGIBLE_SCALE = 1e-8  # groups this small are zero in practice (all-zero rows get scale 1e-10): fp16 may flush


def choose_scale_dtype(scale: Tensor) -> torch.dtype:
    """fp16 when every non-negligible scale is a normal fp16 number, else fp32."""
    s = scale.float()
    real = s[s >= NEGLIGIBLE_SCALE]
    if real.numel() and (float(real.min()) < FP16_MIN_NORMAL or float(real.max()) > torch.finfo(torch.float16).max):
        return torch.float32
    return torch.float16


def int4_unsupported_reason(layer: nn.Module) -> str | None:
    """Why a quant layer cannot go to the memory path (None when it can)."""
    if not isinstance(layer, (QuantLinear, QuantConv2d)):
        return f"{type(layer).__name__} is not a quant layer"
    if not layer.is_quantized:
        return "not quantized"
    codes = layer.weight_codes
    if codes.shape[1] % 2:
        return f"odd number of weight columns ({codes.shape[1]})"
    lo, hi = int(codes.min()), int(codes.max())
    signed = codes.dtype == torch.int8
    if (signed and not -8 <= lo <= hi <= 7) or (not signed and hi > 15):
        return f"codes span [{lo}, {hi}]: not a 4-bit grid"
    if not torch.equal(layer.weight_zero, layer.weight_zero.round()) or float(layer.weight_zero.abs().max()) > 15:
        return "zero points are not 4-bit integers"
    if isinstance(layer, QuantConv2d) and (layer.groups != 1 or layer.padding_mode != "zeros"):
        return f"conv with groups={layer.groups}, padding_mode={layer.padding_mode}"
    return None


class Int4WeightOnly(KeepDtypeBuffers):
    """Shared storage and dequantization of the memory-path modules (subclasses add the layer op)."""

    _keep_dtype = ("scale",)

    def _init_weight(self, packed: Tensor, scale: Tensor, zero: Tensor | None, signed: bool,
                     weight_shape: tuple[int, ...], bias: Tensor | None) -> None:
        out = weight_shape[0]
        cols = 2 * packed.shape[1]
        if packed.dtype != torch.uint8 or packed.shape[0] != out or scale.shape[0] != out or cols % scale.shape[1]:
            raise ValueError(f"packed {tuple(packed.shape)} {packed.dtype} / scale {tuple(scale.shape)} do not fit "
                             f"a weight of shape {weight_shape}")
        self.weight_shape = tuple(int(d) for d in weight_shape)
        self.signed = signed
        self.group_size = cols // scale.shape[1]
        self.register_buffer("packed", packed.contiguous())
        self.register_buffer("scale", scale.contiguous())
        self.register_buffer("zero", None if zero is None else zero.to(torch.uint8).contiguous())
        self.bias = frozen_parameter(bias)

    @staticmethod
    def _storage_from_codes(codes: Tensor, scale: Tensor, zero: Tensor, signed: bool,
                            scale_dtype: torch.dtype | None) -> tuple[Tensor, Tensor, Tensor | None]:
        """(packed, scale, zero) storage from integer codes (out, cols) and fp32 scale/zero (out, G)."""
        dtype = scale_dtype or choose_scale_dtype(scale)
        keep_zero = (not signed) or bool(zero.any())
        return pack_int4_rows(codes), scale.to(dtype), (zero.round().to(torch.uint8) if keep_zero else None)

    def weight_matrix(self, dtype: torch.dtype) -> Tensor:
        """The dequantized weight (out, in·k·k) in `dtype`."""
        with profile_scope("diffptq::int4_dequant"):
            return dequantize_int4_rows(self.packed, self.scale, self.zero, self.signed, dtype)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The dequantized weight in the layer's own shape."""
        return self.weight_matrix(dtype).reshape(self.weight_shape)

    def bits_per_weight(self) -> float:
        """Storage bits per weight: packed codes + scales (+ zero points), bias excluded."""
        n = 1
        for d in self.weight_shape:
            n *= d
        size = sum(t.numel() * t.element_size() for t in (self.packed, self.scale, self.zero) if t is not None)
        return 8.0 * size / n


class Int4WeightOnlyLinear(Int4WeightOnly):
    """Memory-path linear: x (..., in) -> (..., out), weight dequantized to x's dtype each call."""

    def __init__(self, packed: Tensor, scale: Tensor, zero: Tensor | None, signed: bool, in_features: int,
                 bias: Tensor | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, packed.shape[0]
        self._init_weight(packed, scale, zero, signed, (packed.shape[0], in_features), bias)

    @classmethod
    @torch.no_grad()
    def from_quant_layer(cls, layer: QuantLinear, scale_dtype: torch.dtype | None = torch.float16):
        """From a quantized QuantLinear's codes (never re-quantizing the float weight)."""
        reason = int4_unsupported_reason(layer)
        if reason is not None or not isinstance(layer, QuantLinear):
            raise ValueError(f"cannot build an Int4WeightOnlyLinear: {reason or 'not a QuantLinear'}")
        signed = layer.weight_codes.dtype == torch.int8
        packed, scale, zero = cls._storage_from_codes(layer.weight_codes, layer.weight_scale, layer.weight_zero,
                                                      signed, scale_dtype)
        return cls(packed, scale, zero, signed, layer.in_features, layer.bias)

    matmul = "dequant"  # or "triton": the fused kernel on CUDA inputs (set_int4_matmul)

    def forward(self, x: Tensor) -> Tensor:
        if self.matmul == "triton" and x.is_cuda:
            from diffptq.kernels.int4_gemm_triton import int4_linear

            with profile_scope("diffptq::int4_linear"):
                y = int4_linear(x.reshape(-1, self.in_features), self.packed, self.scale, self.zero, self.signed,
                                self.bias)
            return y.reshape(*x.shape[:-1], self.out_features)
        return F.linear(x, self.weight_matrix(x.dtype), self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}, "
                f"scale={self.scale.dtype}, signed={self.signed}, bias={self.bias is not None}")


class Int4WeightOnlyConv2d(Int4WeightOnly):
    """Memory-path Conv2d (groups = 1, zero padding): x (N, C, H, W), weight dequantized to x's dtype each call."""

    def __init__(self, packed: Tensor, scale: Tensor, zero: Tensor | None, signed: bool,
                 weight_shape: tuple[int, int, int, int], bias: Tensor | None = None, stride=1, padding=0,
                 dilation=1):
        super().__init__()
        self.out_channels, self.in_channels = weight_shape[0], weight_shape[1]
        self.kernel_size = tuple(weight_shape[2:])
        self.stride, self.padding, self.dilation = stride, padding, dilation
        self._init_weight(packed, scale, zero, signed, tuple(weight_shape), bias)

    @classmethod
    @torch.no_grad()
    def from_quant_layer(cls, layer: QuantConv2d, scale_dtype: torch.dtype | None = torch.float16):
        """From a quantized QuantConv2d's codes (out, C·kh·kw)."""
        reason = int4_unsupported_reason(layer)
        if reason is not None or not isinstance(layer, QuantConv2d):
            raise ValueError(f"cannot build an Int4WeightOnlyConv2d: {reason or 'not a QuantConv2d'}")
        signed = layer.weight_codes.dtype == torch.int8
        packed, scale, zero = cls._storage_from_codes(layer.weight_codes, layer.weight_scale, layer.weight_zero,
                                                      signed, scale_dtype)
        return cls(packed, scale, zero, signed, tuple(layer.weight.shape), layer.bias, layer.stride, layer.padding,
                   layer.dilation)

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight_matrix(x.dtype).reshape(self.weight_shape)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, group_size={self.group_size}, scale={self.scale.dtype}")


MATMULS = ("dequant", "triton")


def set_int4_matmul(model: nn.Module, matmul: str) -> int:
    """Set how every Int4WeightOnlyLinear of `model` multiplies: "dequant" (dequantize, then F.linear) or "triton"
    (the fused kernel, on CUDA inputs; elsewhere they keep dequantizing; layers whose group size the kernel cannot
    chunk, int4_gemm_triton.block_k, keep dequantizing too). Returns how many layers were set."""
    if matmul not in MATMULS:
        raise ValueError(f"matmul must be one of {MATMULS}, got {matmul!r}")
    from diffptq.kernels.int4_gemm_triton import block_k

    layers = [m for m in model.modules() if isinstance(m, Int4WeightOnlyLinear)
              and (matmul != "triton" or block_k(m.group_size) is not None)]
    for layer in layers:
        layer.matmul = matmul
    return len(layers)


def int4_module_from_layer(layer: QuantLayer, scale_dtype: torch.dtype | None = torch.float16) -> Int4WeightOnly:
    """The memory-path module for a quantized QuantLinear or QuantConv2d."""
    cls = Int4WeightOnlyConv2d if isinstance(layer, QuantConv2d) else Int4WeightOnlyLinear
    return cls.from_quant_layer(layer, scale_dtype)
