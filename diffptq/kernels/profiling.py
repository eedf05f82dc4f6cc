"""GPU time of one profiled step split into GEMMs, convolutions, attention, quantize/dequantize and the rest.

Each device kernel is attributed, in this order, by: the innermost `diffptq::…` profiler range around its launch
(the inference modules open them in eager mode, see common.set_profile_scopes; the custom op
diffptq::fp8_quant_rows records its own, compiled too), the aten operator that launched it (aten::_scaled_mm / mm /
addmm -> gemm, convolution -> conv, scaled_dot_product_* -> attention), and finally its
kernel name (cuBLAS / CUTLASS -> gemm, flash / fmha -> attention, and inductor's fused Triton kernels: those
computing an amax or clamp (activation quantization, fused with the op before it) or bit shifts (int4 unpacking) ->
quant/dequant). What matches nothing is "other" (norms, element-wise ops, copies).
"""
from __future__ import annotations

from dataclasses import dataclass

CATEGORIES = ("gemm", "conv", "attention", "quant/dequant", "other")
_SCOPES = {"diffptq::fp8_gemm": "gemm", "diffptq::fp8_quant_act": "quant/dequant",
           "diffptq::int4_dequant": "quant/dequant", "diffptq::fp8_quant_rows": "quant/dequant"}
_OPS = (
    (("aten::_scaled_mm", "aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_int_mm",
      "aten::_weight_int4pack_mm"), "gemm"),
    (("aten::convolution", "aten::_convolution", "aten::cudnn_convolution", "aten::conv2d"), "conv"),
    (("scaled_dot_product", "flash_attention", "efficient_attention", "cudnn_attention"), "attention"),
)
_NAMES = (
    (("fprop", "dgrad", "wgrad", "conv"), "conv"),
    (("flash", "fmha", "attention", "sdpa"), "attention"),
    (("gemm", "cutlass", "xmma", "nvjet", "cublas", "f8f8bf16", "scaled_mm", "gmma"), "gemm"),
)
_TRITON_QUANT = ("amax", "clamp", "bitwise", "shift", "float8")


@dataclass(frozen=True)
class KernelRecord:
    """One device kernel: name, duration in µs, and the names of its CPU launch context, innermost first."""

    name: str
    us: float
    context: tuple[str, ...] = ()


def classify_kernel(rec: KernelRecord) -> str:
    """The category (one of CATEGORIES) of one kernel."""
    for ctx in rec.context:
        if ctx in _SCOPES:
            return _SCOPES[ctx]
    for ctx in rec.context:
        for keys, cat in _OPS:
            if any(ctx == k or (not k.startswith("aten::") and k in ctx) for k in keys):
                return cat
    low = rec.name.lower()
    if low.startswith("triton") and any(k in low for k in _TRITON_QUANT):
        return "quant/dequant"
    for keys, cat in _NAMES:
        if any(k in low for k in keys):
            return cat
    return "other"


def breakdown(records: list[KernelRecord]) -> dict:
    """{'total_ms', 'ms': {category: ms}, 'share': {category: fraction}, 'top': [(name, ms, category)] (10)}."""
    ms = dict.fromkeys(CATEGORIES, 0.0)
    per_name: dict[str, tuple[float, str]] = {}
    for rec in records:
        cat = classify_kernel(rec)
        ms[cat] += rec.us / 1e3
        old = per_name.get(rec.name, (0.0, cat))
        per_name[rec.name] = (old[0] + rec.us / 1e3, cat)
    total = sum(ms.values())
    top = sorted(((n, t, c) for n, (t, c) in per_name.items()), key=lambda r: -r[1])[:10]
    return {"total_ms": total, "ms": ms, "share": {k: (v / total if total else 0.0) for k, v in ms.items()},
            "top": [(n[:120], t, c) for n, t, c in top]}


def kernel_records(events) -> list[KernelRecord]:
    """KernelRecords from a torch.profiler result's `events()`: every CPU event's launched kernels, with the names
    of that event and its CPU ancestors as context."""
    out = []
    for evt in events:
        kernels = getattr(evt, "kernels", None)
        if not kernels:
            continue
        context, node = [], evt
        while node is not None:
            context.append(node.name)
            node = node.cpu_parent
        for k in kernels:
            out.append(KernelRecord(k.name, float(k.duration), tuple(context)))
    return out
