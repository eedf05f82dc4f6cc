"""GPU-time breakdown of a profiled step: kernel attribution by scope, operator and name."""
from dataclasses import dataclass, field

import pytest
import torch

from diffptq.kernels.common import profile_scope, set_profile_scopes
from diffptq.kernels.profiling import KernelRecord, breakdown, classify_kernel, kernel_records


@pytest.mark.parametrize("name,context,want", [
    ("vectorized_elementwise_kernel<div>", ("aten::div", "diffptq::fp8_quant_act", "aten::linear"), "quant/dequant"),
    ("sm90_xmma_gemm_e4m3bf16_e4m3f32", ("aten::_scaled_mm", "diffptq::fp8_gemm"), "gemm"),
    ("elementwise_kernel<bitwise>", ("aten::bitwise_and", "diffptq::int4_dequant"), "quant/dequant"),
    ("nvjet_hsh_128x256", ("aten::mm", "aten::linear"), "gemm"),
    ("sm90_xmma_fprop_implicit_gemm", ("aten::cudnn_convolution", "aten::convolution"), "conv"),
    ("flash_fwd_kernel", ("aten::_scaled_dot_product_flash_attention",), "attention"),
    ("triton_red_fused_abs_amax_clamp_div_native_layer_norm_0", ("triton_red_fused_abs_amax",), "quant/dequant"),
    ("triton_poi_fused_bitwise_right_shift_stack_1", (), "quant/dequant"),
    ("triton_per_fused_native_layer_norm_2", ("triton_per_fused",), "other"),
    ("cutlass_80_tensorop_bf16_s16816gemm", ("Torch-Compiled Region",), "gemm"),
    ("fmha_cutlassF_bf16_aligned", (), "attention"),
])
def test_classification(name, context, want):
    assert classify_kernel(KernelRecord(name, 1.0, context)) == want


def test_breakdown_sums_and_ranks():
    recs = [KernelRecord("nvjet_a", 300.0, ("aten::mm",)), KernelRecord("flash_fwd", 200.0),
            KernelRecord("nvjet_a", 100.0, ("aten::mm",)), KernelRecord("layer_norm", 400.0)]
    b = breakdown(recs)
    assert b["total_ms"] == pytest.approx(1.0) and b["ms"]["gemm"] == pytest.approx(0.4)
    assert b["share"]["other"] == pytest.approx(0.4) and b["top"][0][:2] == ("nvjet_a", pytest.approx(0.4))


@dataclass
class _Kernel:
    name: str
    duration: float


@dataclass
class _Event:
    name: str
    cpu_parent: object = None
    kernels: list = field(default_factory=list)


def test_kernel_records_walk_the_launch_context():
    outer = _Event("diffptq::fp8_quant_act")
    op = _Event("aten::clamp_", outer, [_Kernel("clamp_kernel", 5.0)])
    recs = kernel_records([outer, op, _Event("aten::empty")])
    assert recs == [KernelRecord("clamp_kernel", 5.0, ("aten::clamp_", "diffptq::fp8_quant_act"))]
    assert classify_kernel(recs[0]) == "quant/dequant"


def test_scopes_appear_in_a_cpu_profile_only_when_enabled():
    x = torch.randn(8, 8)
    for enabled in (False, True):
        set_profile_scopes(enabled)
        try:
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                with profile_scope("diffptq::fp8_quant_act"):
                    x.abs()
        finally:
            set_profile_scopes(False)
        names = {e.name for e in prof.events()}
        assert ("diffptq::fp8_quant_act" in names) == enabled


def test_switching_scopes_does_not_recompile_compiled_code():
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def f(x):
        with profile_scope("diffptq::fp8_quant_act"):
            return x * 2

    compiled = torch.compile(f, backend=backend, fullgraph=True)
    x = torch.randn(4)
    compiled(x)
    set_profile_scopes(True)
    try:
        compiled(x)
    finally:
        set_profile_scopes(False)
    assert len(graphs) == 1
