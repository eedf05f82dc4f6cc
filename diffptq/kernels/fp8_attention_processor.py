"""FP8 self-attention in diffusers models: an attention processor that computes softmax(QKᵀ/√D)·V with
diffptq.kernels.fp8_attention, and `use_fp8_attention` to install it.

Only self-attention changes: it is where the cost is (PixArt-XL-2 at 512 px: 1024 × 1024 scores per head and block;
the SD 1.5 UNet: 4096 × 4096 in its first blocks), while cross-attention over 77-300 text tokens stays on
torch's scaled_dot_product_attention. A call with an attention mask also falls back to it (the kernel takes none).
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch.nn.functional as F
from torch import Tensor, nn

from diffptq.kernels.fp8_attention import fp8_attention

AttentionFn = Callable[[Tensor, Tensor, Tensor], Tensor]


class Fp8SelfAttnProcessor:
    """diffusers' AttnProcessor2_0 / FusedAttnProcessor2_0 for self-attention (q/k/v separate or fused as to_qkv),
    with `attention_fn(q, k, v)` (B, H, L, D) -> (B, H, L, D) in place of scaled_dot_product_attention when no mask
    is given. attention_fn: default FP8 attention with `backend` ("auto", "kernel" or "reference")."""

    def __init__(self, backend: str = "auto", attention_fn: AttentionFn | None = None):
        self.backend = backend
        self.attention_fn = attention_fn or (lambda q, k, v: fp8_attention(q, k, v, backend))

    def __call__(self, attn: nn.Module, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                 attention_mask: Tensor | None = None, temb: Tensor | None = None, *args, **kwargs) -> Tensor:
        if encoder_hidden_states is not None:
            raise ValueError("Fp8SelfAttnProcessor serves self-attention only (encoder_hidden_states given)")
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        image_shape = hidden_states.shape if hidden_states.ndim == 4 else None
        if image_shape is not None:  # (B, C, H, W) -> (B, H·W, C)
            hidden_states = hidden_states.flatten(2).transpose(1, 2)
        batch, length, _ = hidden_states.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, length, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        if getattr(attn, "fused_projections", False) and hasattr(attn, "to_qkv"):
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (x.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for x in (query, key, value))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if attention_mask is None:
            out = self.attention_fn(query, key, value)
        else:
            out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask)
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if image_shape is not None:
            out = out.transpose(-1, -2).reshape(image_shape)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def fp8_attention_unsupported_reason(attn: nn.Module) -> str | None:
    """Why a diffusers Attention module keeps its processor (None when Fp8SelfAttnProcessor serves it)."""
    from diffusers.models.attention_processor import AttnProcessor2_0, FusedAttnProcessor2_0

    if attn.is_cross_attention:
        return "cross-attention (stays on scaled_dot_product_attention)"
    if type(attn.processor) not in (AttnProcessor2_0, FusedAttnProcessor2_0):
        return f"runs {type(attn.processor).__name__}, not diffusers' scaled-dot-product processors"
    head_dim = attn.inner_dim // attn.heads
    if not math.isclose(attn.scale, head_dim ** -0.5, rel_tol=1e-6):
        return f"scale {attn.scale} is not 1/sqrt(head_dim)"
    return None


def use_fp8_attention(model: nn.Module, backend: str = "auto") -> int:
    """Give every self-attention module of `model` that runs diffusers' scaled-dot-product processor the FP8
    processor (in place). Returns how many were switched."""
    from diffusers.models.attention_processor import Attention

    switched = 0
    for module in model.modules():
        if isinstance(module, Attention) and fp8_attention_unsupported_reason(module) is None:
            module.set_processor(Fp8SelfAttnProcessor(backend))
            switched += 1
    return switched
