"""Fp8W4A8Linear: the W4A8 speed path. 4-bit weight codes held as exact e4m3, FP8 activations, FP8 tensor-core GEMM.

Built from a quantized QuantLinear with one scale per output channel: the weight codes q − z become an e4m3 tensor
(N, K) (exact, see diffptq.kernels.fp8), the per-channel scale s_w becomes the GEMM's row-wise `scale_b`, so the
weight side is bit-for-bit the fake-quant W4 weight: s_w · (q − z). Activations are quantized to e4m3 with a per-row
scale (the GEMM's `scale_a`): per token (dynamic), per tensor (dynamic), or "static", derived from the layer's
calibrated integer activation quantizer (static or time-conditioned): scale = the grid's largest magnitude / 448.
e4m3 activations are not the integer A8 grid of the fake-quant model: the benchmark reports their quality.
Per-token quantization runs as torch ops (act_kernel "torch") or as one Triton kernel (act_kernel "triton",
diffptq.kernels.fp8_quant_triton: what the torch ops compute eagerly, bit for bit, in one pass over x; inductor's
fusion of the torch ops divides approximately, so compiled "torch" may differ from both in rare codes).
Memory: 1 byte per weight (the memory path is Int4WeightOnlyLinear).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from diffptq.kernels.common import KeepDtypeBuffers, frozen_parameter, profile_scope
from diffptq.kernels.fp8 import ACT_MODES, E4M3_MAX, act_scale, codes_to_e4m3, fp8_scaled_mm, quantize_e4m3
from diffptq.kernels.fp8_quant_triton import fp8_quant_rows, triton_available
from diffptq.quant.act import ActQuantizer, DynamicActQuantizer
from diffptq.quant.layers import QuantConv2d, QuantLinear

GEMM_ALIGN = 16  # torch._scaled_mm needs K and N divisible by 16
ACT_KERNELS = ("torch", "triton")


def fp8_unsupported_reason(layer: nn.Module) -> str | None:
    """Why `layer` cannot become an Fp8W4A8Linear (None when it can)."""
    if not isinstance(layer, QuantLinear):
        return f"{type(layer).__name__} is not a QuantLinear"
    return _codes_reason(layer, layer.out_features, layer.in_features)


def _codes_reason(layer: QuantLinear | QuantConv2d, out: int, cols: int) -> str | None:
    """Why a quant layer's codes (out, cols) cannot feed the FP8 GEMM (None when they can)."""
    if not layer.is_quantized:
        return "not quantized"
    if layer.weight_scale.shape[1] != 1:
        return f"{layer.weight_scale.shape[1]} weight groups per row (the FP8 GEMM takes one scale per channel)"
    if cols % GEMM_ALIGN or out % GEMM_ALIGN:
        return f"shape {out}x{cols} is not divisible by {GEMM_ALIGN}"
    span = (layer.weight_codes.float() - layer.weight_zero.float()).abs().max()
    if float(span) > 16:
        return f"codes minus zero reach {int(span)} (more than 4 bits: not exact in e4m3)"
    return None


class Fp8W4A8Linear(KeepDtypeBuffers):
    """y = x @ (s_w · (q − z))ᵀ + b with FP8 activations. x: (..., in) any float dtype -> (..., out) in x's dtype.

    Buffers: weight_fp8 (out, in) float8_e4m3fn (q − z, exact), weight_scale (1, out) float32; bias (out,) Parameter.
    act_mode: "token" | "tensor" | "static" (static needs `act_quant`: a calibrated per-tensor quantizer whose
      params() give the integer grid's scale and zero). use_fast_accum: the FP8 tensor cores' fast accumulation.
    backend: "auto" (torch._scaled_mm on CUDA, the fp32 reference elsewhere), "kernel" or "reference".
    act_kernel: "torch" (torch ops; under torch.compile inductor fuses them with the producer of x) or "triton" (one
      kernel computing the same values: used for act_mode "token" on CUDA inputs when Triton imports, the torch ops
      elsewhere; static and per-tensor scales always take the torch ops, pointwise ops inductor fuses anyway).
    The GEMM outputs bf16 (row-wise scaling supports no other output on every sm_89+ build), cast to x's dtype.
    """

    _keep_dtype = ("weight_fp8", "weight_scale")

    def __init__(self, weight_fp8: Tensor, weight_scale: Tensor, bias: Tensor | None = None, act_mode: str = "token",
                 act_quant: ActQuantizer | None = None, use_fast_accum: bool = True, backend: str = "auto",
                 act_kernel: str = "torch"):
        super().__init__()
        self._init_gemm(*weight_fp8.shape, weight_scale, bias, act_mode, act_quant, use_fast_accum, backend,
                        act_kernel)
        self.register_buffer("weight_fp8", weight_fp8.contiguous())

    def _init_gemm(self, out_features: int, in_features: int, weight_scale: Tensor, bias: Tensor | None,
                   act_mode: str, act_quant: ActQuantizer | None, use_fast_accum: bool, backend: str,
                   act_kernel: str) -> None:
        """Everything but the weight codes' storage: checks, per-channel scales, bias, activation settings."""
        if in_features % GEMM_ALIGN or out_features % GEMM_ALIGN:
            raise ValueError(f"{type(self).__name__} needs both dimensions divisible by {GEMM_ALIGN}, "
                             f"got {(out_features, in_features)}")
        if act_mode not in ACT_MODES:
            raise ValueError(f"act_mode must be one of {ACT_MODES}, got {act_mode!r}")
        if act_mode == "static" and (act_quant is None or isinstance(act_quant, DynamicActQuantizer)):
            raise ValueError("act_mode 'static' needs a calibrated static or time-conditioned activation quantizer")
        if act_kernel not in ACT_KERNELS:
            raise ValueError(f"act_kernel must be one of {ACT_KERNELS}, got {act_kernel!r}")
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight_scale", weight_scale.detach().float().reshape(1, out_features).contiguous())
        self.bias = frozen_parameter(bias)
        self.act_mode = act_mode
        self.act_quant = act_quant if act_mode == "static" else None
        self.use_fast_accum = use_fast_accum
        self.backend = backend
        self.act_kernel = act_kernel
        self.out_dtype = torch.bfloat16

    @classmethod
    @torch.no_grad()
    def from_quant_linear(cls, layer: QuantLinear, act_mode: str = "token", use_fast_accum: bool = True,
                          backend: str = "auto", act_kernel: str = "torch") -> Fp8W4A8Linear:
        """Convert a quantized per-channel QuantLinear (codes, never re-quantizing the float weight)."""
        return cls._from_codes(layer, fp8_unsupported_reason(layer), act_mode, use_fast_accum, backend, act_kernel)

    @classmethod
    def _from_codes(cls, layer: QuantLinear | QuantConv2d, reason: str | None, act_mode: str, use_fast_accum: bool,
                    backend: str, act_kernel: str):
        """The module of a layer's codes (out, cols): q − z as e4m3, the per-channel scales, its bias; ValueError
        with `reason` (why the layer cannot be converted) when that is not None."""
        if reason is not None:
            raise ValueError(f"cannot build an {cls.__name__}: {reason}")
        w8 = codes_to_e4m3(layer.weight_codes, layer.weight_zero)
        return cls(w8, layer.weight_scale[:, 0], layer.bias, act_mode, layer.act_quant, use_fast_accum, backend,
                   act_kernel)

    def gemm_weight(self) -> Tensor:
        """The e4m3 weight codes q − z (out, in) the GEMM takes."""
        return self.weight_fp8

    def dequantized_weight(self) -> Tensor:
        """The weight the GEMM multiplies by, s_w · (q − z), float32 (out, in): equal to the fake-quant weight."""
        return self.gemm_weight().float() * self.weight_scale.t()

    def activation_scale(self, x: Tensor, x2d: Tensor) -> Tensor:
        """Per-row e4m3 scale (M, 1) float32 for x (..., in) viewed as x2d (M, in)."""
        if self.act_mode != "static":
            return act_scale(x2d, self.act_mode)
        scale, zero = self.act_quant.params(x)  # integer grid: x̂ ∈ s·[qmin − z, qmax − z]
        spec = self.act_quant.spec
        span = torch.maximum((spec.qmax - zero).abs(), (spec.qmin - zero).abs()).float() * scale.float()
        per_row = (span / E4M3_MAX).expand(*x.shape[:-1], 1)  # per tensor, or per sample for (B, 1, ..) scales
        return per_row.reshape(-1, 1).contiguous()

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        x2d = x.reshape(-1, self.in_features)
        with profile_scope("diffptq::fp8_quant_act"):
            if self.act_kernel == "triton" and self.act_mode == "token" and x2d.is_cuda and triton_available():
                x8, scale_a = fp8_quant_rows(x2d)
            else:
                scale_a = self.activation_scale(x, x2d)
                x8 = quantize_e4m3(x2d, scale_a)
        with profile_scope("diffptq::fp8_gemm"):
            y = fp8_scaled_mm(x8, scale_a, self.gemm_weight(), self.weight_scale, self.bias, self.out_dtype,
                              self.use_fast_accum, self.backend)
        return y.to(x.dtype).reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"act_mode={self.act_mode}, fast_accum={self.use_fast_accum}, backend={self.backend}, "
                f"act_kernel={self.act_kernel}")


def fp8_conv1x1_unsupported_reason(layer: nn.Module) -> str | None:
    """Why `layer` cannot become an Fp8W4A8Conv1x1 (None when it can): a quantized 1×1 QuantConv2d with stride 1, no
    padding, that the FP8 GEMM takes as a Linear over channels."""
    if not isinstance(layer, QuantConv2d):
        return f"{type(layer).__name__} is not a QuantConv2d"
    if tuple(layer.kernel_size) != (1, 1) or tuple(layer.stride) != (1, 1) or tuple(layer.padding) != (0, 0):
        return (f"kernel {tuple(layer.kernel_size)}, stride {tuple(layer.stride)}, padding {layer.padding}: not a "
                "1x1 conv")
    return _codes_reason(layer, layer.out_channels, layer.in_channels)


class Fp8W4A8Conv1x1(Fp8W4A8Linear):
    """A 1×1 convolution (stride 1, no padding) on the W4A8 speed path: the FP8 GEMM over channels at every position.
    x (N, C, H, W) -> (N, out, H, W) in x's dtype; per-token activation scales are per position (as QuantConv2d's
    per-token quantizer has them), static ones per tensor. The output keeps the GEMM's layout (channels last
    in memory, an (N, out, H, W) view)."""

    @classmethod
    @torch.no_grad()
    def from_quant_conv(cls, layer: QuantConv2d, act_mode: str = "token", use_fast_accum: bool = True,
                        backend: str = "auto", act_kernel: str = "torch") -> Fp8W4A8Conv1x1:
        """Convert a quantized 1×1 QuantConv2d with one scale per output channel (its codes (out, in))."""
        return cls._from_codes(layer, fp8_conv1x1_unsupported_reason(layer), act_mode, use_fast_accum, backend,
                               act_kernel)

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

