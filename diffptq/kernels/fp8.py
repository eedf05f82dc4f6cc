"""FP8 (e4m3) numerics of the W4A8 speed path: activation scales, quantization, the scaled GEMM and its reference.

One definition serves the CUDA kernel and the CPU reference:
  activations x (M, K) get one fp32 scale per row, s_a (M, 1) = amax · (1/448) ("token": amax over the row; "tensor":
    over the whole tensor; a static scale is given), and x8 = e4m3(clamp(x / s_a, -448, 448)), rounded to nearest
    even. Relative error of a normal e4m3 value ≤ 2^-4 (3 mantissa bits); below 2^-6 (subnormal) the absolute
    error ≤ 2^-10 in units of s_a.
  weights are e4m3 tensors (N, K) holding integers q − z; every integer of magnitude ≤ 16 is exact in e4m3, so int4
    codes (signed −8..7, or unsigned 0..15 minus an integer zero) convert without loss; s_w (1, N) fp32 per channel.
  y[m, n] = s_a[m] · s_w[n] · Σ_k x8[m, k] · w8[n, k] + bias[n]: products exact, fp32 accumulation, one rounding to
    the output dtype (bf16). torch._scaled_mm computes this with row-wise scales on FP8 tensor cores (sm_89+);
    `scaled_mm_reference` computes the same in fp32 on any device, up to the order of accumulation.
"""
from __future__ import annotations

import torch
from torch import Tensor

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0
E4M3_EXACT_INT = 16  # every integer in [-16, 16] is exactly representable in e4m3
ACT_MODES = ("token", "tensor", "static")
_AMAX_FLOOR = 1e-12  # an all-zero row gets a tiny scale: x / s_a stays 0, never nan
# scales multiply by the fp32-rounded 1 / 448: what CUDA's division by a scalar computes, written out so that the
# CPU, CUDA, inductor and the Triton kernel (fp8_quant_triton) all round the scale alike
E4M3_INV_MAX = 1.0 / E4M3_MAX


def fp8_support(device: str | torch.device | None = None) -> tuple[bool, str]:
    """(supported, reason): whether `device` runs torch._scaled_mm on FP8 tensor cores (CUDA sm_89 or newer)."""
    if not torch.cuda.is_available():
        return False, "CUDA is not available"
    dev = torch.device(device) if device is not None else torch.device("cuda", torch.cuda.current_device())
    if dev.type != "cuda":
        return False, f"the model runs on {dev}, not on a CUDA device"
    if getattr(torch.version, "hip", None):
        return False, "ROCm uses the e4m3fnuz format, which this path does not target"
    if not hasattr(torch, "_scaled_mm"):
        return False, f"torch {torch.__version__} has no torch._scaled_mm"
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(index)
    name = torch.cuda.get_device_name(index)
    if (major, minor) < (8, 9):
        return False, f"{name} is sm_{major}{minor}; FP8 tensor cores need sm_89 or newer"
    return True, f"{name} (sm_{major}{minor}) has FP8 tensor cores"


def act_scale(x2d: Tensor, mode: str) -> Tensor:
    """Dynamic activation scale (M, 1) fp32 of x2d (M, K): "token" (per row) or "tensor" (one value, expanded)."""
    if mode == "token":
        amax = torch.linalg.vector_norm(x2d, ord=float("inf"), dim=-1, keepdim=True, dtype=torch.float32)
    elif mode == "tensor":
        amax = torch.linalg.vector_norm(x2d, ord=float("inf"), dtype=torch.float32).reshape(1, 1)
        amax = amax.expand(x2d.shape[0], 1).contiguous()
    else:
        raise ValueError(f"dynamic activation scale mode must be 'token' or 'tensor', got {mode!r}")
    return amax.clamp_min(_AMAX_FLOOR) * E4M3_INV_MAX


def quantize_e4m3(x2d: Tensor, scale: Tensor) -> Tensor:
    """e4m3 codes (M, K) of x2d / scale, clamped to ±448 (a plain cast would not saturate everywhere).

    scale: fp32, (M, 1) or one value (0-d or (1, 1)). The quotient is rounded to e4m3 once, from fp32: a 0-d scale
    alone would leave a bf16 x2d's quotient in bf16 (a 0-d tensor does not promote), rounding it twice.
    """
    if scale.dim() == 0:
        scale = scale.reshape(1, 1)
    return (x2d / scale).clamp_(-E4M3_MAX, E4M3_MAX).to(E4M3)


def codes_to_e4m3(codes: Tensor, zero: Tensor) -> Tensor:
    """Integer weight codes (N, K) minus their integer zero point (N, 1) as an exact e4m3 tensor (N, K).

    Raises ValueError if some |q − z| > 16 (not exact in e4m3: only grids of ≤ 4 bits, or 5-bit symmetric, fit).
    """
    k = codes.float() - zero.float()
    if k.numel() and int(k.abs().max()) > E4M3_EXACT_INT:
        raise ValueError(f"codes minus zero reach {int(k.abs().max())}; e4m3 holds integers up to 16 exactly")
    w8 = k.to(E4M3)
    if not torch.equal(w8.float(), k):  # non-integer zero points would land here
        raise ValueError("codes minus zero are not integers exactly representable in e4m3")
    return w8


def scaled_mm_reference(x8: Tensor, scale_a: Tensor, w8: Tensor, scale_b: Tensor, bias: Tensor | None,
                        out_dtype: torch.dtype) -> Tensor:
    """What torch._scaled_mm(x8, w8.t(), scale_a, scale_b, bias, out_dtype) computes, in fp32 on any device.

    x8 (M, K) e4m3, scale_a (M, 1) fp32, w8 (N, K) e4m3, scale_b (1, N) fp32, bias (N,) or None. Returns (M, N).
    """
    acc = x8.float() @ w8.float().t()
    y = acc * scale_a * scale_b
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)


def fp8_scaled_mm(x8: Tensor, scale_a: Tensor, w8: Tensor, scale_b: Tensor, bias: Tensor | None,
                  out_dtype: torch.dtype = torch.bfloat16, use_fast_accum: bool = True,
                  backend: str = "auto") -> Tensor:
    """The W4A8 GEMM: torch._scaled_mm with row-wise scales on CUDA, `scaled_mm_reference` elsewhere.

    backend: "auto" (kernel on CUDA tensors), "kernel" or "reference". On the kernel path the bias is passed in
    `out_dtype` (bf16: the only output type row-wise scaling supports on every sm_89+ build).
    """
    if backend == "reference" or (backend == "auto" and not x8.is_cuda):
        return scaled_mm_reference(x8, scale_a, w8, scale_b, bias, out_dtype)
    b = bias.to(out_dtype) if bias is not None else None
    return torch._scaled_mm(x8, w8.t(), scale_a=scale_a, scale_b=scale_b, bias=b, out_dtype=out_dtype,
                            use_fast_accum=use_fast_accum)
