"""W4A8 speed path on the CPU: the FP8 reference numerics against the fake-quant QuantLinear.

The weight side must be exact (e4m3 holds every 4-bit integer; the per-channel scale is the GEMM's scale_b). The
activation side differs by design: e4m3 (3 mantissa bits, per-row scale amax / 448) is not the int8 grid, so those
tests bound the error instead of asking for equality.
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from diffptq.algo.rtn import rtn_quantize_ex
from diffptq.kernels.fp8 import E4M3, act_scale, codes_to_e4m3, quantize_e4m3, scaled_mm_reference
from diffptq.kernels.fp8_linear import Fp8W4A8Linear, fp8_unsupported_reason
from diffptq.quant.act import DynamicActQuantizer, StaticActQuantizer, TimeConditionedActQuantizer
from diffptq.quant.layers import QuantLinear
from diffptq.quant.quantizer import QuantSpec, dequantize

W4 = QuantSpec(4)


def _quant_linear(n_in=64, n_out=48, spec=W4, act=None, bias=True):
    layer = QuantLinear(nn.Linear(n_in, n_out, bias=bias), act, spec)
    res = rtn_quantize_ex(layer.weight.detach(), spec)
    layer.set_quantized_weight(res.codes, res.scale, res.zero)
    return layer


def _e4m3_exact_input(rows=8, cols=64):
    """Rows whose per-token e4m3 quantization is lossless: e4m3 values with absmax exactly 448, times 2^e."""
    v = torch.randn(rows, cols).mul(60).clamp(-447, 447).to(E4M3).float()
    v[:, 0] = 448.0
    v[::2, 0] = -448.0
    return v * torch.pow(2.0, torch.randint(-9, -3, (rows, 1)).float())


def test_every_4bit_grid_is_exact_in_e4m3():
    k = torch.arange(-16, 17).float()
    assert torch.equal(k.to(E4M3).float(), k)
    codes = torch.randint(0, 16, (5, 32), dtype=torch.uint8)
    zero = torch.randint(0, 16, (5, 1)).float()
    assert torch.equal(codes_to_e4m3(codes, zero).float(), codes.float() - zero)
    with pytest.raises(ValueError, match="e4m3"):
        codes_to_e4m3(torch.full((1, 16), 40, dtype=torch.int8), torch.zeros(1, 1))


@pytest.mark.parametrize("symmetric", [True, False])
def test_weight_side_is_bitwise_the_fake_quant_weight(symmetric):
    layer = _quant_linear(spec=QuantSpec(4, symmetric=symmetric))
    fp8 = Fp8W4A8Linear.from_quant_linear(layer)
    assert fp8.weight_fp8.dtype == E4M3 and fp8.weight_scale.shape == (1, 48)
    assert torch.equal(fp8.dequantized_weight(), dequantize(layer.weight_codes, layer.weight_scale, layer.weight_zero))


def test_lossless_activations_reproduce_the_w4_output():
    layer = _quant_linear()
    fp8 = Fp8W4A8Linear.from_quant_linear(layer)
    fp8.out_dtype = torch.float32  # the reference path: no bf16 rounding, so only the fp32 sum order differs
    x = _e4m3_exact_input()
    s = act_scale(x, "token")
    assert torch.equal(quantize_e4m3(x, s).float() * s, x)  # the activation quantization is the identity here
    with torch.no_grad():
        want = F.linear(x.double(), layer.weight_q.double(), layer.bias.double())
        torch.testing.assert_close(fp8(x).double(), want, rtol=1e-5, atol=1e-6)


def test_e4m3_activation_error_is_within_its_bound_and_near_int8():
    torch.manual_seed(1)
    layer = _quant_linear(n_in=256, n_out=64, act=DynamicActQuantizer(QuantSpec(8)))
    fp8 = Fp8W4A8Linear.from_quant_linear(layer)
    fp8.out_dtype = torch.float32
    x = torch.randn(32, 256)
    x[:, 7] *= 20  # an outlier channel, as diffusion activations have
    s = act_scale(x, "token")
    err = (quantize_e4m3(x, s).float() * s - x).abs()
    # round to nearest: half an ulp = 2^-4 relative for normal e4m3 values, 2^-10·s absolute in the subnormal range
    bound = torch.maximum(x.abs() * 2.0**-4, s * 2.0**-10) * (1 + 1e-6)
    assert (err <= bound).all()
    with torch.no_grad():
        y_fp8, y_int8 = fp8(x), layer(x)
        layer.act_quant.enabled = False
        y_w4 = layer(x)
    w = layer.weight_q.abs()
    slack = 1e-4 * y_w4.abs().max()  # fp32 summation order
    assert ((y_fp8 - y_w4).abs() <= bound @ w.t() + slack).all()
    int8_err = (x.abs().amax(-1, keepdim=True) / 127 / 2).expand_as(x)  # half an int8 step per element
    assert ((y_fp8 - y_int8).abs() <= (bound + int8_err) @ w.t() + slack).all()
    rel = lambda y: float((y - y_w4).norm() / y_w4.norm())  # noqa: E731
    assert rel(y_fp8) < 0.04 and rel(y_int8) < 0.04  # both a few percent at most on this input


def test_one_scale_rounds_bf16_activations_once_from_fp32():
    torch.manual_seed(3)
    x = torch.randn(64, 256).to(torch.bfloat16)
    s = act_scale(x, "tensor")[:1].reshape(())  # one value, as a calibrated static scale is passed
    want = (x.float() / s).clamp(-448, 448).to(torch.float8_e4m3fn)  # x / s exact in fp32, one rounding to e4m3
    twice = (x.float() / s).to(torch.bfloat16).float().to(torch.float8_e4m3fn)  # through bf16 first
    assert not torch.equal(want.float(), twice.float())  # the input is one where the double rounding shows
    for scale in (s, s.reshape(1, 1), s.reshape(1, 1).expand(64, 1)):
        assert torch.equal(quantize_e4m3(x, scale).float(), want.float())


def test_dynamic_tensor_mode_and_zero_rows():
    x = torch.randn(6, 32)
    x[2] = 0
    s = act_scale(x, "tensor")
    assert s.shape == (6, 1) and torch.allclose(s, x.abs().max() / 448 * torch.ones(6, 1))
    layer = _quant_linear(n_in=32, n_out=16)
    fp8 = Fp8W4A8Linear.from_quant_linear(layer)
    y = fp8(x)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y[2], layer.bias.detach().to(torch.bfloat16).float(), rtol=0, atol=0)


@pytest.mark.parametrize("symmetric", [True, False])
def test_static_mode_takes_the_calibrated_int8_range(symmetric):
    aq = StaticActQuantizer(QuantSpec(8, symmetric=symmetric))
    aq.observe(torch.randn(100) * 3 + 1)
    aq.finish_calibration()
    fp8 = Fp8W4A8Linear.from_quant_linear(_quant_linear(n_in=32, n_out=16, act=aq), act_mode="static")
    x = torch.randn(2, 5, 32)
    scale = fp8.activation_scale(x, x.reshape(-1, 32))
    s, z = float(aq.scale), float(aq.zero)
    span = 128 * s if symmetric else max(z, 255 - z) * s
    assert scale.shape == (10, 1) and torch.allclose(scale, torch.full((10, 1), span / 448))


def test_static_mode_follows_per_sample_time_conditioned_scales():
    aq = TimeConditionedActQuantizer(QuantSpec(8), nn.Linear(1, 1))
    with torch.no_grad():
        aq.scale_fn.weight.fill_(0.01)
        aq.scale_fn.bias.fill_(0.001)
    aq.set_condition(torch.tensor([1.0, 5.0]))
    fp8 = Fp8W4A8Linear.from_quant_linear(_quant_linear(n_in=32, n_out=16, act=aq), act_mode="static")
    x = torch.randn(2, 3, 32)
    scale = fp8.activation_scale(x, x.reshape(-1, 32)).reshape(2, 3)
    assert torch.allclose(scale[0], torch.full((3,), 0.011 * 128 / 448))
    assert torch.allclose(scale[1], torch.full((3,), 0.051 * 128 / 448))


def test_unsupported_layers_are_refused_with_a_reason():
    assert "groups" in fp8_unsupported_reason(_quant_linear(spec=QuantSpec(4, group_size=16)))
    assert "divisible" in fp8_unsupported_reason(_quant_linear(n_in=40))
    assert "4 bits" in fp8_unsupported_reason(_quant_linear(spec=QuantSpec(8)))
    with pytest.raises(ValueError, match="static"):
        Fp8W4A8Linear.from_quant_linear(_quant_linear(act=DynamicActQuantizer(QuantSpec(8))), act_mode="static")


def test_model_dtype_casts_keep_the_storage_formats():
    fp8 = Fp8W4A8Linear.from_quant_linear(_quant_linear())
    fp8.to(torch.bfloat16)
    assert fp8.weight_fp8.dtype == E4M3 and fp8.weight_scale.dtype == torch.float32
    assert fp8.bias.dtype == torch.bfloat16
    y = fp8(torch.randn(3, 64, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and y.shape == (3, 48)


def test_cpu_scaled_mm_agrees_with_the_reference_when_torch_has_it():
    x8 = torch.randn(32, 64).mul(50).to(E4M3)
    w8 = torch.randint(-8, 8, (48, 64)).float().to(E4M3)
    sa, sb, bias = torch.rand(32, 1) + 0.1, torch.rand(1, 48) + 0.1, torch.randn(48)
    try:
        got = torch._scaled_mm(x8, w8.t(), scale_a=sa, scale_b=sb, bias=bias.bfloat16(), out_dtype=torch.bfloat16)
    except (RuntimeError, NotImplementedError) as err:
        pytest.skip(f"no CPU torch._scaled_mm in this torch: {err}")
    want = scaled_mm_reference(x8, sa, w8, sb, bias.bfloat16(), torch.float32)
    # one bf16 rounding of the output (relative 2^-8) on both sides of the comparison
    torch.testing.assert_close(got.float(), want, rtol=2**-7, atol=1e-3 * float(want.abs().max()))


def test_traces_into_one_graph():
    fp8 = Fp8W4A8Linear.from_quant_linear(_quant_linear())
    x = torch.randn(2, 5, 64)
    compiled = torch.compile(fp8, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), fp8(x), rtol=0, atol=0)


@pytest.mark.parametrize("act_mode", ["token", "static"])
def test_compiled_layers_share_one_graph_without_breaks(act_mode):
    """Under torch.compile each W4A8 layer traces whole (no graph break), and layers of one shape share the graph: a
    static scale is a buffer input, not a constant guarded per layer (28 PixArt blocks compile twice, not 28 times)."""
    from torch._dynamo.utils import counters

    def layer(seed):
        torch.manual_seed(seed)
        aq = StaticActQuantizer(QuantSpec(8))
        aq.observe(torch.randn(64) * (seed + 1))
        aq.finish_calibration()
        return Fp8W4A8Linear.from_quant_linear(_quant_linear(act=aq), act_mode=act_mode)

    torch._dynamo.reset()
    counters.clear()
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        for seed in range(3):
            fp8 = layer(seed)
            assert torch.equal(torch.compile(fp8, backend="eager")(x), fp8(x))
    assert sum(counters["graph_break"].values()) == 0 and counters["stats"]["unique_graphs"] == 1
    torch._dynamo.reset()


A8_MSE = QuantSpec(8, symmetric=False, scale_method="mse")


def _static_quantizer(batches):
    aq = StaticActQuantizer(A8_MSE, max_samples=4096)
    aq.start_calibration()
    for b in batches:
        aq.observe(b)
        torch.rand(7)  # other work drawing from the global RNG in between
    aq.finish_calibration()
    return aq


def test_static_qkv_with_equal_scales_fuse_into_one_gemm():
    """q/k/v calibrated on their one input get equal static scales (the MSE sample comes from each quantizer's own
    generator), so one quantization of x and one GEMM serve all three: outputs equal the separate layers'."""
    from diffptq.kernels.fuse import concat_layers

    torch.manual_seed(0)
    batches = [torch.randn(4, 600) * 2 for _ in range(3)]
    quantizers = [_static_quantizer(batches) for _ in range(3)]
    assert all(torch.equal(q.scale, quantizers[0].scale) and torch.equal(q.zero, quantizers[0].zero)
               for q in quantizers)
    layers = [Fp8W4A8Linear.from_quant_linear(_quant_linear(n_in=64, n_out=16, act=q), act_mode="static")
              for q in quantizers]
    fused = concat_layers(layers)
    assert fused is not None and fused.act_mode == "static" and fused.out_features == 48
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), torch.cat([m(x) for m in layers], -1), rtol=0, atol=0)
    other = _static_quantizer([b * 3 for b in batches])  # another range: its layer cannot share the quantization
    layers[2] = Fp8W4A8Linear.from_quant_linear(_quant_linear(n_in=64, n_out=16, act=other), act_mode="static")
    assert concat_layers(layers) is None


def test_conv1x1_is_the_fp8_gemm_over_channels_at_every_position():
    """A 1×1 QuantConv2d on the speed path: on inputs whose per-position e4m3 quantization is lossless it gives the
    W4 conv's output (up to the fp32 sum order); other convs are refused with the reason."""
    from diffptq.kernels.fp8_linear import Fp8W4A8Conv1x1, fp8_conv1x1_unsupported_reason
    from diffptq.quant.layers import QuantConv2d

    torch.manual_seed(0)
    conv = QuantConv2d(nn.Conv2d(64, 32, 1), None, W4)
    res = rtn_quantize_ex(conv.weight.detach().reshape(32, -1), W4)
    conv.set_quantized_weight(res.codes, res.scale, res.zero)
    fp8 = Fp8W4A8Conv1x1.from_quant_conv(conv)
    fp8.out_dtype = torch.float32
    x = _e4m3_exact_input(rows=2 * 5 * 3).reshape(2, 5, 3, 64).permute(0, 3, 1, 2)  # (N, C, H, W), rows = positions
    with torch.no_grad():
        want = F.conv2d(x.double(), conv.weight_q.double(), conv.bias.double())
        out = fp8(x)
    assert out.shape == (2, 32, 5, 3)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-6)
    three = QuantConv2d(nn.Conv2d(64, 32, 3, padding=1), None, W4)
    assert "not a 1x1 conv" in fp8_conv1x1_unsupported_reason(three)
    assert fp8_conv1x1_unsupported_reason(_quant_linear()) == "QuantLinear is not a QuantConv2d"
    with pytest.raises(ValueError, match=r"cannot build an Fp8W4A8Conv1x1: kernel \(3, 3\)"):
        Fp8W4A8Conv1x1.from_quant_conv(three)
    with pytest.raises(ValueError, match="cannot build an Fp8W4A8Linear: QuantConv2d is not a QuantLinear"):
        Fp8W4A8Linear.from_quant_linear(conv)


def test_convert_takes_the_unet_1x1_convs_when_asked(tiny):
    from diffptq.kernels import InferenceConfig, convert_for_inference

    from diffptq.kernels.fp8_linear import fp8_conv1x1_unsupported_reason
    from diffptq.quant.layers import quant_layers

    _, _, den, inputs = tiny("tiny-unet")
    expected = {n for n, m in quant_layers(den) if fp8_conv1x1_unsupported_reason(m) is None}
    with torch.no_grad():
        ref = den(**inputs).sample
        conv = convert_for_inference(den, "w4a8", config=InferenceConfig(force=True, conv1x1=True))
        out = den(**inputs).sample
    assert expected and {n for n, t in conv.modules.items() if t == "Fp8W4A8Conv1x1"} == expected
    assert conv.counts()["Conv2d"] > 0  # the 3×3 convolutions follow `others` (dequantized)
    assert (out - ref).norm() / ref.norm() < 0.1
