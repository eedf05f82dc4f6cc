"""Fake quantization in one Triton kernel: the values of ``fake_quant`` without its ~8 elementwise kernels.

``fake_quant`` in eager torch runs x.float(), /scale, round, +zero, clamp, −zero, ·scale and .to(dtype) as separate
float32 kernels; on activations these dominate a quantized forward pass. ``fused_fake_quant`` reads x once and writes
x̂ once, with the same float32 operations in the same order, so the result is bit-identical (NaN stays NaN, ±inf
clamps to the grid ends, ties round half to even, the division is correctly rounded).

Parameter layouts it takes (x contiguous float32/float16/bfloat16, scale/zero on x's device):
  per tensor     scale/zero of one element (static and time-conditioned quantizers);
  broadcast run  scale/zero equal to x's shape except for one run of consecutive dims where they are 1: per token
                 (..., 1) over (..., K), per position (N, 1, H, W) over (N, C, H, W), per sample (B, 1, ..., 1).
Anything else (group parameters, element-wise parameters, strided x) returns None and the caller stays eager.
No autograd: the caller takes this path only when no gradient is needed.

Backend choice: the ``DIFFPTQ_FAKEQUANT`` environment variable (auto | eager | triton); auto takes triton for CUDA
tensors when Triton imports (not while torch.compile traces, which fuses the eager ops itself), and falls back to
eager for good (with one warning) if the kernel fails to build or run. triton forces the kernel, also on CPU tensors
under ``TRITON_INTERPRET=1``, and raises instead of falling back.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from diffptq.triton_backend import TritonBackend

X_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BLOCK = 2048  # elements per program (4 warps). H100: per-tensor at copy bandwidth, per-token bf16 ~15% below

try:  # Triton is optional: CPU-only installs fake-quantize eagerly
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

BACKEND = TritonBackend("DIFFPTQ_FAKEQUANT", "Triton fake-quant kernel", lambda: triton is not None)


def fake_quant_backend(x: Tensor) -> str:
    """"triton" or "eager": which path ``fused_fake_quant`` takes for x under ``DIFFPTQ_FAKEQUANT``."""
    return BACKEND.choose(x.is_cuda and not torch.compiler.is_compiling())


def param_layout(x_shape: torch.Size, p_shape: torch.Size) -> tuple[int, int] | None:
    """(span, inner) such that parameter p_flat[(i // (span·inner))·inner + i % inner] belongs to x_flat[i].

    span: the number of x elements along the run of dims where p is 1 (the dims p broadcasts over); inner: the
    number after that run. One-element p gives (numel(x), 1). None when p broadcasts over no dim, over two separate
    runs, has more dims than x, or does not broadcast to x.
    """
    numel_x = math.prod(x_shape)
    if math.prod(p_shape) == 1 and len(p_shape) <= len(x_shape):
        return numel_x, 1
    if len(p_shape) > len(x_shape):
        return None
    p = (1,) * (len(x_shape) - len(p_shape)) + tuple(p_shape)
    kinds = ""  # per dim of x larger than 1: "m" where p matches it, "b" where p broadcasts over it
    sizes = []
    for xs, ps in zip(x_shape, p):
        if xs == 1:
            if ps != 1:
                return None
            continue
        if ps not in (1, xs):
            return None
        kinds += "b" if ps == 1 else "m"
        sizes.append(xs)
    first, last = kinds.find("b"), kinds.rfind("b")
    if first < 0 or "m" in kinds[first:last]:
        return None
    return math.prod(sizes[first:last + 1]), math.prod(sizes[last + 1:])


def fused_fake_quant(x: Tensor, scale: Tensor, zero: Tensor, qmin: int, qmax: int) -> Tensor | None:
    """x̂ = scale · (clamp(round(x / scale) + zero, qmin, qmax) − zero) in float32, returned in x's dtype and shape.

    x: float32/float16/bfloat16, contiguous; scale, zero: float32 (others are converted) in a layout of the module
    docstring, on x's device. Returns None, computing nothing, when the backend is eager, x is empty or the layout
    is not supported. The result carries no gradient.
    """
    if fake_quant_backend(x) != "triton" or x.numel() == 0:
        return None
    if x.dtype not in X_DTYPES or not x.is_contiguous() or scale.device != x.device or zero.device != x.device:
        return None
    if scale.shape != zero.shape:
        shape = torch.broadcast_shapes(scale.shape, zero.shape)
        scale, zero = scale.expand(shape), zero.expand(shape)
    layout = param_layout(x.shape, scale.shape)
    if layout is None:
        return None
    try:
        return _launch(x, scale, zero, qmin, qmax, *layout)
    except Exception as e:  # noqa: BLE001 - any build/launch failure: the eager path is always right
        BACKEND.fall_back(e)
        return None


def _launch(x: Tensor, scale: Tensor, zero: Tensor, qmin: int, qmax: int, span: int, inner: int) -> Tensor:
    n = x.numel()
    s, z = _float32_contiguous(scale), _float32_contiguous(zero)
    mode = 0 if s.numel() == 1 else 1 if inner == 1 else 2
    out = torch.empty_like(x)
    _fake_quant_kernel[(triton.cdiv(n, BLOCK),)](
        x, s, z, out, n, span, inner, float(qmin), float(qmax),
        MODE=mode, WIDE=n + BLOCK >= 2**31, BLOCK=BLOCK, num_warps=4)
    return out


def _float32_contiguous(p: Tensor) -> Tensor:
    # the usual case passes through without a torch call: host time is a large part of a small launch
    return p if p.dtype == torch.float32 and p.is_contiguous() else p.float().contiguous()


if triton is not None:
    @triton.jit
    def round_half_even(t):
        """torch.round's rounding (half to even): exact for finite t; ±inf and NaN pass through. A zero result may
        carry the other sign than torch's; fake-quant adds zero right after, which makes it +0 either way."""
        f = tl.floor(t)
        d = t - f
        odd = (f - 2.0 * tl.floor(f * 0.5)) != 0.0
        return tl.where((d > 0.5) | ((d == 0.5) & odd), f + 1.0, f)

    @triton.jit
    def to_bfloat16_rne(y):
        """float32 -> bfloat16 rounded to nearest even, as torch converts (NaN stays a NaN; its payload, which
        torch's CPU and CUDA conversions disagree on, is 0x7FC0). Done by hand because Triton's interpreter
        truncates in its bfloat16 cast, which would make CPU tests disagree with the GPU."""
        bits = y.to(tl.uint32, bitcast=True)
        bits = (bits + (((bits >> 16) & 1) + 0x7FFF)) >> 16
        bits = tl.where(y != y, 0x7FC0, bits)
        return bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)

    @triton.jit
    def _fake_quant_kernel(X, S, Z, OUT, n, span, inner, qmin, qmax,
                           MODE: tl.constexpr, WIDE: tl.constexpr, BLOCK: tl.constexpr):
        """OUT[i] = fake-quant of X[i] with the parameters of i. MODE 0: one parameter; 1: one per `span`
        consecutive elements (inner == 1); 2: the general (span, inner) layout of ``param_layout``."""
        pid = tl.program_id(0)
        if WIDE:  # offsets past 2^31 need 64-bit index arithmetic
            pid = pid.to(tl.int64)
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        if MODE == 0:
            s = tl.load(S)
            z = tl.load(Z)
        else:
            if MODE == 1:
                p = offs // span
            else:
                p = offs // (span * inner) * inner + offs % inner
            s = tl.load(S + p, mask=mask, other=1.0)
            z = tl.load(Z + p, mask=mask, other=0.0)
        # one float32 rounding per step, in eager's order: div_rn is IEEE division (Triton's `/` is approximate)
        q = round_half_even(tl.math.div_rn(x, s)) + z
        q = tl.clamp(q, qmin, qmax, propagate_nan=tl.PropagateNan.ALL)  # NaN stays NaN, as torch.clamp keeps it
        y = s * (q - z)
        if OUT.dtype.element_ty == tl.bfloat16:
            tl.store(OUT + offs, to_bfloat16_rne(y), mask=mask)
        else:
            tl.store(OUT + offs, y.to(OUT.dtype.element_ty), mask=mask)
