"""Tensor-wise FP8 GEMM scaling: one scale per operand in the GEMM, the per-channel weight scales on its output. The
same products as row-wise scaling with one more rounding of the output (CPU reference; GPU against the reference)."""
import copy

import pytest
import torch
from torch import nn

from diffptq.algo.rtn import rtn_quantize_ex
from diffptq.kernels import Fp8W4A8Linear, InferenceConfig, convert_for_inference
from diffptq.kernels.fp8 import E4M3, fp8_scaled_mm_tensorwise, fp8_support, quantize_e4m3
from diffptq.quant.act import StaticActQuantizer, TimeConditionedActQuantizer
from diffptq.quant.layers import QuantLinear
from diffptq.quant.quantizer import QuantSpec


def _layer(act=None) -> QuantLinear:
    torch.manual_seed(0)
    layer = QuantLinear(nn.Linear(64, 48), act, QuantSpec(4))
    res = rtn_quantize_ex(layer.weight.detach(), QuantSpec(4))
    layer.set_quantized_weight(res.codes, res.scale, res.zero)
    return layer


def _static_layer() -> QuantLinear:
    act = StaticActQuantizer(QuantSpec(8, symmetric=False))
    layer = _layer(act)
    act.observe(torch.randn(32, 64) * 3)
    act.finish_calibration()
    return layer


def test_reference_rounds_the_scaled_sum_then_applies_channel_scales_and_bias():
    g = torch.Generator().manual_seed(1)
    x8 = (torch.randn(8, 32, generator=g) * 50).clamp(-448, 448).to(E4M3)
    w8 = torch.randint(-8, 8, (16, 32), generator=g).float().to(E4M3)
    s_a, s_w, bias = torch.tensor(0.01), torch.rand(1, 16, generator=g) * 0.1, torch.randn(16, generator=g)
    want = ((x8.float() @ w8.float().t() * s_a).to(torch.bfloat16).float() * s_w + bias).to(torch.bfloat16)
    assert torch.equal(fp8_scaled_mm_tensorwise(x8, s_a, w8, s_w, bias), want)


def test_module_output_is_the_row_wise_output_within_one_bf16_rounding():
    layer = _static_layer()
    row = Fp8W4A8Linear.from_quant_linear(layer, "static")
    tensor = Fp8W4A8Linear.from_quant_linear(layer, "static", gemm_scaling="tensor")
    x = torch.randn(5, 7, 64)
    a, b = row(x), tensor(x)
    assert not torch.equal(a, b)
    # each bf16 rounding moves a value by at most 2^-8 of it: the extra one of the product before the bias, and the
    # final rounding of each output
    before_bias = (a - layer.bias.detach()).abs()
    assert ((a - b).abs() <= 2 ** -8 * (before_bias + a.abs() + b.abs()) + 1e-6).all()


@pytest.mark.parametrize("mode,act,message", [
    ("token", None, "act_mode 'token' with no quantizer"),
    ("static", TimeConditionedActQuantizer, "act_mode 'static' with TimeConditionedActQuantizer"),
])
def test_activations_without_one_scale_per_tensor_are_refused(mode, act, message):
    layer = _layer()
    if act is not None:
        layer = copy.deepcopy(layer)
        layer.act_quant = act.__new__(act)  # only its type is read
    with pytest.raises(ValueError, match=f"gemm_scaling 'tensor' needs one activation scale per tensor: {message}"):
        Fp8W4A8Linear.from_quant_linear(layer, mode, gemm_scaling="tensor")
    with pytest.raises(ValueError, match="InferenceConfig.gemm_scaling must be one of"):
        InferenceConfig(gemm_scaling="column")
    with pytest.raises(ValueError, match=r"gemm_scaling must be one of \('row', 'tensor'\), got 'column'"):
        Fp8W4A8Linear.from_quant_linear(_layer(), gemm_scaling="column")


def test_convert_for_inference_scales_per_tensor_where_the_activations_allow(tiny):
    _, _, den, inputs = tiny(act=QuantSpec(8))
    row = copy.deepcopy(den)
    convert_for_inference(row, "w4a8", config=InferenceConfig(force=True, act_mode="tensor"))
    result = convert_for_inference(den, "w4a8", config=InferenceConfig(force=True, act_mode="tensor",
                                                                       gemm_scaling="tensor"))
    mods = [m for m in den.modules() if isinstance(m, Fp8W4A8Linear)]
    assert mods and all(m.gemm_scaling == "tensor" for m in mods) and set(result.counts()) == {"Fp8W4A8Linear"}
    token = copy.deepcopy(tiny(act=QuantSpec(8))[2])  # per-token activations: row-wise scaling stays
    convert_for_inference(token, "w4a8", config=InferenceConfig(force=True, act_mode="token", gemm_scaling="tensor"))
    assert all(m.gemm_scaling == "row" for m in token.modules() if isinstance(m, Fp8W4A8Linear))
    with torch.no_grad():
        a, b = row(**inputs).sample, den(**inputs).sample
    assert (a - b).norm() / a.norm() < 1e-2


@pytest.mark.skipif(not fp8_support()[0], reason=f"needs FP8 tensor cores: {fp8_support()[1]}")
def test_gpu_kernel_matches_the_reference():
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(256, 1152, generator=g, device="cuda") * 3
    s_a = x.abs().amax() / 448
    x8 = quantize_e4m3(x, s_a)
    w8 = torch.randint(-8, 8, (512, 1152), generator=g, device="cuda").float().to(E4M3)
    s_w, bias = torch.rand(1, 512, generator=g, device="cuda") * 0.01, torch.randn(512, device="cuda")
    got = fp8_scaled_mm_tensorwise(x8, s_a, w8, s_w, bias, backend="kernel").float()
    want = fp8_scaled_mm_tensorwise(x8, s_a, w8, s_w, bias, backend="reference").float()
    torch.testing.assert_close(got, want, rtol=2 ** -6, atol=1e-3)
