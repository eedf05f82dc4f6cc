"""Fused attention projections for the inference modules: one GEMM for q, k, v (self-attention) or k, v (cross).

Per-channel weights concatenated along the output dimension compute exactly what the separate layers compute:
each output row keeps its codes and scale. For Fp8W4A8Linear with per-token activation scales, or static ones of
equal scale and zero, the three layers quantize the same input identically, so fusing also shares one activation
quantization instead of three.
The diffusers Attention module then runs FusedAttnProcessor2_0, which calls `to_qkv` / `to_kv`.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from diffptq.kernels.fp8_linear import Fp8W4A8Linear
from diffptq.kernels.fp8_packed import Fp8W4A8PackedLinear
from diffptq.kernels.int4_weight_only import Int4WeightOnlyLinear
from diffptq.quant.act import same_quantization

log = logging.getLogger(__name__)


def _cat_bias(layers: list[nn.Module]) -> torch.Tensor | None:
    if all(m.bias is None for m in layers):
        return None
    ref = next(m.bias for m in layers if m.bias is not None)
    return torch.cat([m.bias.detach() if m.bias is not None else ref.new_zeros(m.out_features) for m in layers])


def _same_static_scales(layers: list[Fp8W4A8Linear]) -> bool:
    """All layers use static scales from calibrated per-tensor quantizers with one grid and equal scale and zero
    (e.g. q/k/v calibrated on their one shared input): one quantization of x serves them all."""
    # act_mode "static" guarantees a quantizer; same_quantization is False unless both are equal calibrated static ones
    return (all(m.act_mode == "static" for m in layers)
            and all(same_quantization(layers[0].act_quant, m.act_quant) for m in layers))


def _concat_packed(layers: list[Fp8W4A8PackedLinear], scale: torch.Tensor, bias: torch.Tensor | None,
                   act: tuple) -> Fp8W4A8PackedLinear | None:
    """Packed FP8 layers of one code signedness as one (zero points of 0 where a layer has none)."""
    if any(m.signed != layers[0].signed for m in layers):
        return None
    zero = None
    if any(m.weight_zero is not None for m in layers):
        zero = torch.cat([m.weight_zero if m.weight_zero is not None else m.weight_packed.new_zeros(
            m.out_features, 1, dtype=torch.int8) for m in layers])
    return Fp8W4A8PackedLinear(torch.cat([m.weight_packed for m in layers]), layers[0].signed, zero, scale, bias,
                               *act)


def concat_layers(layers: list[nn.Module]) -> nn.Module | None:
    """One module computing torch.cat([m(x) for m in layers], -1), or None when they cannot be fused."""
    first = layers[0]
    if any(type(m) is not type(first) or m.in_features != first.in_features for m in layers):
        return None
    bias = _cat_bias(layers)
    if isinstance(first, Fp8W4A8Linear):
        if any(m.use_fast_accum != first.use_fast_accum or m.backend != first.backend
               or m.act_kernel != first.act_kernel for m in layers):
            return None
        if not (all(m.act_mode == "token" for m in layers) or _same_static_scales(layers)):
            return None  # different (or per-tensor dynamic) scales would change the numerics
        scale = torch.cat([m.weight_scale for m in layers], 1)
        act = (first.act_mode, first.act_quant, first.use_fast_accum, first.backend, first.act_kernel)
        if isinstance(first, Fp8W4A8PackedLinear):
            return _concat_packed(layers, scale, bias, act)
        return Fp8W4A8Linear(torch.cat([m.weight_fp8 for m in layers]), scale, bias, *act)
    if isinstance(first, Int4WeightOnlyLinear):
        if any(m.signed != first.signed or m.scale.shape[1] != first.scale.shape[1]
               or m.scale.dtype != first.scale.dtype or (m.zero is None) != (first.zero is None) for m in layers):
            return None
        zero = None if first.zero is None else torch.cat([m.zero for m in layers])
        return Int4WeightOnlyLinear(torch.cat([m.packed for m in layers]), torch.cat([m.scale for m in layers]), zero,
                                    first.signed, first.in_features, bias)
    return None


def fuse_attention_projections(model: nn.Module) -> int:
    """Fuse to_q/to_k/to_v (self-attention) or to_k/to_v (cross-attention) of every diffusers Attention whose
    projections are inference modules of one kind and that runs AttnProcessor2_0. Returns how many were fused."""
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0, FusedAttnProcessor2_0

    fused = 0
    for _, attn in model.named_modules():
        if not isinstance(attn, Attention) or type(attn.processor) is not AttnProcessor2_0:
            continue
        names = ("to_k", "to_v") if attn.is_cross_attention else ("to_q", "to_k", "to_v")
        new = concat_layers([getattr(attn, n) for n in names])
        if new is None:
            continue
        for n in names:  # the fused processor never calls them (cross-attention keeps to_q)
            delattr(attn, n)
        setattr(attn, "to_kv" if attn.is_cross_attention else "to_qkv", new)
        attn.set_processor(FusedAttnProcessor2_0())
        attn.fused_projections = True
        fused += 1
    return fused
