"""Uniform integer grids: QuantSpec, scale/zero fitting, codes, fake-quant with a straight-through gradient.

Grid convention (one for weights and activations):
  symmetric:  signed codes q in [-2^(b-1), 2^(b-1) - 1], zero = 0, scale = absmax / qmax
  asymmetric: unsigned codes q in [0, 2^b - 1], zero an integer in that range, scale = (max - min) / qmax,
              with the range widened to include 0 so that 0 is exactly representable.
  q = clamp(round(x / scale) + zero, qmin, qmax);  x̂ = scale · (q − zero)   (computed in float32).
Parameters are per row of a 2-D view: per output channel for a weight (out, 1), or per group of `group_size`
contiguous input columns (out, in // group_size); activations use the same fitting on their own views.
Storage: int4 codes packed two per byte (pack_int4 / unpack_int4), 5..8-bit codes one per int8/uint8 byte.
"""
from __future__ import annotations

import torch
from torch import Tensor

from diffptq.config.quant import SCALE_METHODS, QuantSpec  # noqa: F401 - the grid's config, used with this module
from diffptq.quant.fused import fused_fake_quant
MIN_SCALE = 1e-10  # floor for all-zero rows: keeps x / scale finite, codes of 0 stay exactly 0


def check_group_size(in_features: int, group_size: int | None) -> None:
    """Raise ValueError unless `group_size` (when set) divides `in_features`."""
    if group_size is not None and in_features % group_size != 0:
        raise ValueError(f"group_size {group_size} does not divide the input width {in_features}")


def expand_params(p: Tensor, width: int) -> Tensor:
    """Broadcast per-group parameters (..., n_groups) over `width` columns; (..., 1) and (..., width) pass through."""
    g = p.shape[-1] if p.dim() > 0 else 1
    if p.dim() == 0 or g in (1, width):
        return p
    if width % g != 0:
        raise ValueError(f"{g} parameter groups do not divide the width {width}")
    return p.repeat_interleave(width // g, dim=-1)


def params_from_range(xmin: Tensor, xmax: Tensor, spec: QuantSpec) -> tuple[Tensor, Tensor]:
    """Scale and zero (float32, integer-valued zero) from a range [xmin, xmax] (any matching shapes)."""
    xmin = torch.minimum(xmin.float(), torch.zeros_like(xmin, dtype=torch.float32))
    xmax = torch.maximum(xmax.float(), torch.zeros_like(xmax, dtype=torch.float32))
    if spec.symmetric:
        scale = (torch.maximum(-xmin, xmax) / spec.qmax).clamp_min(MIN_SCALE)
        return scale, torch.zeros_like(scale)
    scale = ((xmax - xmin) / spec.qmax).clamp_min(MIN_SCALE)
    zero = torch.round(-xmin / scale).clamp(spec.qmin, spec.qmax)
    return scale, zero


def round_to_grid(x: Tensor, scale: Tensor, zero: Tensor, qmin: int, qmax: int) -> tuple[Tensor, Tensor]:
    """Float codes and dequantized values; the one place the grid formula is written."""
    q = torch.clamp(torch.round(x / scale) + zero, qmin, qmax)
    return q, scale * (q - zero)


def fit_rows(x: Tensor, spec: QuantSpec) -> tuple[Tensor, Tensor]:
    """Fit one (scale, zero) per row of x (rows, cols): min-max, or MSE search over clipping ratios.

    Returns float32 tensors of shape (rows, 1).
    """
    x = x.float()
    xmin, xmax = x.amin(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)
    scale, zero = params_from_range(xmin, xmax, spec)
    if spec.scale_method == "minmax":
        return scale, zero
    best = torch.full_like(scale, float("inf"))
    for i in range(spec.mse_steps):
        r = 1.0 - (1.0 - spec.mse_min_ratio) * i / max(spec.mse_steps - 1, 1)
        s, z = params_from_range(r * xmin, r * xmax, spec)
        _, xq = round_to_grid(x, s, z, spec.qmin, spec.qmax)
        err = (xq - x).abs_().pow_(spec.mse_norm).sum(dim=1, keepdim=True)
        better = err < best
        best = torch.where(better, err, best)
        scale, zero = torch.where(better, s, scale), torch.where(better, z, zero)
    return scale, zero


def fit_weight_params(w: Tensor, spec: QuantSpec) -> tuple[Tensor, Tensor]:
    """Per-output-channel or per-group parameters for a weight w (out, in) (conv weights: flatten first).

    Returns (scale, zero), float32, shape (out, 1) or (out, in // group_size).
    """
    out, cols = w.shape
    g = spec.group_size
    if g is None:
        return fit_rows(w, spec)
    check_group_size(cols, g)
    scale, zero = fit_rows(w.reshape(out * (cols // g), g), spec)
    return scale.reshape(out, cols // g), zero.reshape(out, cols // g)


def quantize_codes(x: Tensor, scale: Tensor, zero: Tensor, spec: QuantSpec) -> Tensor:
    """Integer codes (spec.code_dtype) of x; scale/zero broadcast to x or per-group (..., n_groups)."""
    s, z = expand_params(scale, x.shape[-1]), expand_params(zero, x.shape[-1])
    q, _ = round_to_grid(x.float(), s.float(), z.float(), spec.qmin, spec.qmax)
    return q.to(spec.code_dtype)


def dequantize(codes: Tensor, scale: Tensor, zero: Tensor) -> Tensor:
    """x̂ = scale · (codes − zero) in float32; scale/zero broadcast to codes or per-group (..., n_groups)."""
    s, z = expand_params(scale, codes.shape[-1]), expand_params(zero, codes.shape[-1])
    return s.float() * (codes.float() - z.float())


class _FakeQuant(torch.autograd.Function):
    """Forward: the grid values. Backward: straight-through for x inside the range, LSQ gradient for scale."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: Tensor, zero: Tensor, qmin: int, qmax: int) -> Tensor:
        q, xq = round_to_grid(x, scale, zero, qmin, qmax)
        ctx.save_for_backward(x, scale, zero, q)
        ctx.qrange = (qmin, qmax)
        return xq

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, scale, zero, q = ctx.saved_tensors
        y = x / scale + zero
        inside = (y >= ctx.qrange[0]) & (y <= ctx.qrange[1])
        gx = grad * inside if ctx.needs_input_grad[0] else None
        gs = None
        if ctx.needs_input_grad[1]:
            gs = (grad * torch.where(inside, q - zero - x / scale, q - zero)).sum_to_size(scale.shape)
        return gx, gs, None, None, None


def fake_quant(x: Tensor, scale: Tensor, zero: Tensor, spec: QuantSpec) -> Tensor:
    """x̂ = scale · (clamp(round(x / scale) + zero) − zero), in x's dtype, values equal to dequantize(quantize_codes).

    Gradient: straight-through (identity) for x where qmin <= x/scale + zero <= qmax, 0 where clamped; scale gets
    the LSQ gradient (q − zero − x/scale inside, q − zero outside), so a scale predictor can be trained.
    When no gradient is needed, CUDA tensors take one fused Triton kernel (``diffptq.quant.fused``), same values.
    """
    s = expand_params(scale, x.shape[-1]).float()
    z = expand_params(zero, x.shape[-1]).float()
    if not torch.is_grad_enabled() or not (x.requires_grad or s.requires_grad):
        xq = fused_fake_quant(x, s, z, spec.qmin, spec.qmax)  # one kernel on CUDA; None where it does not apply
        if xq is not None:
            return xq
    return _FakeQuant.apply(x.float(), s, z, spec.qmin, spec.qmax).to(x.dtype)


def pack_int4(codes: Tensor) -> Tensor:
    """Pack 4-bit codes (any shape, signed in [-8, 7] or unsigned in [0, 15]) two per uint8, flattened.

    Element 2i goes to the low nibble of byte i, element 2i+1 to the high nibble; an odd count is padded with 0.
    Returns a 1-D uint8 tensor of ceil(numel / 2) bytes; unpack_int4 needs the shape and signedness back.
    """
    flat = codes.reshape(-1).to(torch.int16)
    if flat.numel() and (int(flat.min()) < -8 or int(flat.max()) > 15):
        raise ValueError(f"codes out of 4-bit range: [{int(flat.min())}, {int(flat.max())}]")
    nib = (flat & 0xF).to(torch.uint8)  # two's complement nibble for negative codes
    if nib.numel() % 2:
        nib = torch.cat([nib, nib.new_zeros(1)])
    return nib[0::2] | (nib[1::2] << 4)


def unpack_int4(packed: Tensor, shape: tuple[int, ...] | torch.Size, signed: bool) -> Tensor:
    """Inverse of pack_int4: int8 codes of `shape` (sign-extended when `signed`)."""
    numel = 1
    for d in shape:
        numel *= int(d)
    b = packed.reshape(-1).to(torch.uint8)
    if b.numel() != (numel + 1) // 2:
        raise ValueError(f"{b.numel()} packed bytes do not hold {numel} int4 codes")
    nib = torch.stack([b & 0xF, b >> 4], dim=1).reshape(-1)[:numel].to(torch.int8)
    if signed:
        nib = torch.where(nib > 7, nib - 16, nib)
    return nib.reshape(tuple(shape))


def pack_codes(codes: Tensor, spec: QuantSpec) -> Tensor:
    """Compact storage for codes of `spec`: int4-packed uint8 (bits <= 4) or one int8/uint8 byte per code."""
    if spec.bits <= 4:
        return pack_int4(codes)
    c = codes.to(torch.int16)
    if c.numel() and (int(c.min()) < spec.qmin or int(c.max()) > spec.qmax):
        raise ValueError(f"codes out of range [{spec.qmin}, {spec.qmax}] for {spec.bits}-bit storage")
    return c.to(spec.code_dtype)


def unpack_codes(packed: Tensor, shape: tuple[int, ...] | torch.Size, spec: QuantSpec) -> Tensor:
    """Inverse of pack_codes: codes of `shape` in spec.code_dtype, bit-exact."""
    if spec.bits <= 4:
        return unpack_int4(packed, shape, signed=spec.symmetric).to(spec.code_dtype)
    return packed.reshape(tuple(shape)).to(spec.code_dtype)
