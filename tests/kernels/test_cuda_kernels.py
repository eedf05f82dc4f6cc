"""GPU-only: torch._scaled_mm against the fp32 reference, compiled against eager, automatic path choice.

Skipped without CUDA (FP8 tests also without an sm_89+ GPU). Tolerances: the kernel rounds its fp32 result once to
bf16 (relative error ≤ 2^-9, so 2^-8 leaves room) and sums K products in another order (absolute slack 2e-3 of the
output's range, far below what a wrong scale or layout would give); with fast accumulation the tensor cores also
keep fewer accumulator bits, so that case is checked on the relative norm (1%).
"""
import copy

import pytest
import torch
from torch import nn

from diffptq.algo.rtn import rtn_quantize_ex
from diffptq.data.calib import move_inputs
from diffptq.kernels import Fp8W4A8Linear, InferenceConfig, Int4WeightOnly, convert_for_inference, fp8_support
from diffptq.kernels.fp8 import E4M3, act_scale, fp8_scaled_mm, quantize_e4m3, scaled_mm_reference
from diffptq.kernels.int4 import dequantize_int4_rows
from diffptq.quant.layers import QuantLinear, quant_layers
from diffptq.quant.quantizer import QuantSpec

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
needs_fp8 = pytest.mark.skipif(not fp8_support()[0], reason=f"needs FP8 tensor cores: {fp8_support()[1]}")


def _operands(m, k, n, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(m, k, generator=g).mul(3).to("cuda", torch.bfloat16)
    x[:, 3] *= 30
    w8 = torch.randint(-8, 8, (n, k), generator=g).float().to(E4M3).cuda()
    sw = (torch.rand(1, n, generator=g) * 0.02 + 1e-3).cuda()
    bias = torch.randn(n, generator=g).to("cuda", torch.bfloat16)
    sa = act_scale(x, "token")
    return quantize_e4m3(x, sa), sa, w8, sw, bias


@needs_fp8
@pytest.mark.parametrize("m,k,n", [(1, 64, 48), (37, 1152, 1152), (1024, 1152, 4608), (256, 4608, 1152)])
@pytest.mark.parametrize("fast", [False, True])
def test_scaled_mm_matches_the_reference(m, k, n, fast):
    x8, sa, w8, sw, bias = _operands(m, k, n)
    got = fp8_scaled_mm(x8, sa, w8, sw, bias, torch.bfloat16, use_fast_accum=fast, backend="kernel").float()
    want = scaled_mm_reference(x8, sa, w8, sw, bias, torch.float32)
    scale = float(want.abs().max())
    if fast:
        assert float((got - want).norm() / want.norm()) < 1e-2
    else:
        assert ((got - want).abs() <= 2.0**-8 * want.abs() + 2e-3 * scale).all()


@needs_fp8
def test_module_on_gpu_matches_its_reference_backend_eager_and_compiled():
    layer = QuantLinear(nn.Linear(1152, 4608).cuda(), None, QuantSpec(4))
    res = rtn_quantize_ex(layer.weight.detach(), QuantSpec(4))
    layer.set_quantized_weight(res.codes, res.scale, res.zero)
    mod = Fp8W4A8Linear.from_quant_linear(layer, use_fast_accum=False).to(torch.bfloat16)
    ref = copy.deepcopy(mod)
    ref.backend = "reference"
    x = torch.randn(4, 256, 1152, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        y, y_ref = mod(x).float(), ref(x).float()
        assert ((y - y_ref).abs() <= 2.0**-7 * y_ref.abs() + 1e-3 * y_ref.abs().max()).all()
        y_c = torch.compile(mod)(x).float()
    # inductor may divide by the scale with a different fp32 rounding: rare one-step e4m3 differences
    assert float((y_c - y).norm() / y.norm()) < 1e-2


@needs_fp8
def test_w4a8_is_chosen_automatically_on_an_fp8_gpu(tiny):
    _, _, den, inputs = tiny(act=QuantSpec(8))
    den = den.to("cuda", torch.bfloat16)
    inputs = move_inputs(inputs, "cuda", torch.bfloat16)
    forced = copy.deepcopy(den)
    result = convert_for_inference(den, "w4a8")
    assert result.path == "w4a8" and set(result.counts()) == {"Fp8W4A8Linear"}
    convert_for_inference(forced, "w4a8", config=InferenceConfig(force=True))
    for m in forced.modules():
        if isinstance(m, Fp8W4A8Linear):
            m.backend = "reference"
    with torch.no_grad():
        a, b = den(**inputs).sample.float(), forced(**inputs).sample.float()
    assert float((a - b).norm() / b.norm()) < 3e-2


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_int4_path_on_gpu_is_exact_eager_and_compiled(tiny, dtype):
    _, _, den, inputs = tiny("tiny-unet", weight=QuantSpec(4, group_size=8))
    den = den.to("cuda", dtype)
    layers = dict(quant_layers(den))
    result = convert_for_inference(den, "w4", config=InferenceConfig(fuse_qkv=False))
    assert result.path == "w4" and len(result.modules) == len(layers)
    compiled = torch.compile(dequantize_int4_rows, dynamic=False)
    for i, (name, layer) in enumerate(layers.items()):
        mod = den.get_submodule(name)
        assert isinstance(mod, Int4WeightOnly)
        want = (layer.weight_scale.half().float().repeat_interleave(mod.group_size, 1)
                * (layer.weight_codes.float() - layer.weight_zero.float().repeat_interleave(mod.group_size, 1)))
        assert torch.equal(mod.weight_matrix(dtype), want.to(dtype)), name
        if i < 3:  # inductor's fused dequantization kernel: the same bits (a few shapes: each one compiles)
            assert torch.equal(compiled(mod.packed, mod.scale, mod.zero, mod.signed, dtype), want.to(dtype)), name
