"""W4 memory path on the CPU: packed int4 modules against the fake-quant layers, and their size."""
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from diffptq.algo.rtn import rtn_quantize_ex
from diffptq.eval.hardware import module_bytes
from diffptq.kernels.int4 import dequantize_int4_rows, pack_int4_rows, unpack_int4_rows
from diffptq.kernels.int4_weight_only import (
    Int4WeightOnlyConv2d,
    Int4WeightOnlyLinear,
    choose_scale_dtype,
    int4_module_from_layer,
    int4_unsupported_reason,
)
from diffptq.quant.layers import QuantConv2d, QuantLinear
from diffptq.quant.quantizer import QuantSpec, dequantize, pack_int4


def _quantized(layer, spec):
    res = rtn_quantize_ex(layer.weight.detach(), spec)
    layer.set_quantized_weight(res.codes, res.scale, res.zero)
    return layer


def _fp16_scaled_twin(layer, cls):
    """The fake-quant layer with the same codes and its scales rounded to fp16 (the memory path's storage)."""
    twin = cls(layer, None, layer.weight_spec)
    twin.set_quantized_weight(layer.weight_codes, layer.weight_scale.half().float(), layer.weight_zero)
    return twin


@pytest.mark.parametrize("signed", [True, False])
def test_row_packing_is_the_checkpoint_packing(signed):
    codes = torch.randint(-8, 8, (6, 20), dtype=torch.int8) if signed else torch.randint(0, 16, (6, 20),
                                                                                         dtype=torch.uint8)
    packed = pack_int4_rows(codes)
    assert packed.shape == (6, 10) and torch.equal(packed.reshape(-1), pack_int4(codes))
    assert torch.equal(unpack_int4_rows(packed, signed), codes.to(torch.int8))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("symmetric", [True, False])
def test_dequantized_weight_is_bitwise_the_fake_quant_weight(dtype, symmetric):
    spec = QuantSpec(4, symmetric=symmetric, group_size=32)
    layer = _quantized(QuantLinear(nn.Linear(128, 24), None, spec), spec)
    s16 = layer.weight_scale.half()
    w = dequantize_int4_rows(pack_int4_rows(layer.weight_codes), s16, layer.weight_zero.to(torch.uint8),
                             symmetric, dtype)
    assert torch.equal(w, dequantize(layer.weight_codes, s16.float(), layer.weight_zero).to(dtype))


@pytest.mark.parametrize("symmetric", [True, False])
def test_linear_output_equals_fake_quant_with_fp16_scales(symmetric):
    spec = QuantSpec(4, symmetric=symmetric, group_size=128)
    layer = _quantized(QuantLinear(nn.Linear(256, 40), None, spec), spec)
    mod = Int4WeightOnlyLinear.from_quant_layer(layer)
    assert (mod.zero is None) == symmetric and mod.scale.dtype == torch.float16 and mod.group_size == 128
    twin = _fp16_scaled_twin(layer, QuantLinear)
    x = torch.randn(3, 7, 256)
    with torch.no_grad():
        assert torch.equal(mod(x), twin(x))
        # the fp16 cast of each scale is the only difference from the fp32-scale fake-quant layer: ≤ 2^-11 relative
        w16, w32 = mod.dequantized_weight(), layer.weight_q
        assert ((w16 - w32).abs() <= 2.0**-11 * w32.abs()).all()
        exact = Int4WeightOnlyLinear.from_quant_layer(layer, scale_dtype=torch.float32)
        assert torch.equal(exact(x), layer(x))


def test_conv_output_equals_fake_quant_with_fp16_scales():
    spec = QuantSpec(4, group_size=96)  # 32 channels · 3 · 3 = 288 columns, 3 groups per row
    conv = nn.Conv2d(32, 16, 3, padding=1, stride=2)
    layer = _quantized(QuantConv2d(conv, None, spec), spec)
    mod = int4_module_from_layer(layer)
    assert isinstance(mod, Int4WeightOnlyConv2d)
    x = torch.randn(2, 32, 9, 9)
    with torch.no_grad():
        assert torch.equal(mod(x), _fp16_scaled_twin(layer, QuantConv2d)(x))


def test_pixart_sized_layer_is_about_4_25_bits_per_weight_in_memory_and_on_disk(tmp_path):
    spec = QuantSpec(4, group_size=128)
    layer = _quantized(QuantLinear(nn.Linear(1152, 4608), None, spec), spec)
    mod = Int4WeightOnlyLinear.from_quant_layer(layer)
    numel = 4608 * 1152
    bias_bytes = 4608 * 4
    assert mod.bits_per_weight() == pytest.approx(4.125)
    assert 8 * (module_bytes(mod) - bias_bytes) / numel == pytest.approx(4.125)
    path = tmp_path / "layer.safetensors"
    save_file({k: v.contiguous() for k, v in mod.state_dict().items() if k != "bias"}, str(path))
    assert 8 * path.stat().st_size / numel <= 4.25
    asym = QuantSpec(4, symmetric=False, group_size=128)
    mod_asym = Int4WeightOnlyLinear.from_quant_layer(_quantized(QuantLinear(nn.Linear(1152, 4608), None, asym), asym))
    assert mod_asym.bits_per_weight() == pytest.approx(4.1875)


def test_scale_dtype_falls_back_to_fp32_outside_fp16_range():
    assert choose_scale_dtype(torch.tensor([[1e-3, 0.2]])) == torch.float16
    assert choose_scale_dtype(torch.tensor([[1e-10, 0.2]])) == torch.float16  # all-zero rows: negligible
    assert choose_scale_dtype(torch.tensor([[1e-6, 0.2]])) == torch.float32


def test_unsupported_layers_and_dtype_casts():
    spec = QuantSpec(8)
    assert "4-bit" in int4_unsupported_reason(_quantized(QuantLinear(nn.Linear(16, 8), None, spec), spec))
    spec4 = QuantSpec(4)
    mod = Int4WeightOnlyLinear.from_quant_layer(_quantized(QuantLinear(nn.Linear(16, 8), None, spec4), spec4))
    mod.to(torch.bfloat16)
    assert mod.scale.dtype == torch.float16 and mod.packed.dtype == torch.uint8 and mod.bias.dtype == torch.bfloat16


def test_traces_into_one_graph():
    spec = QuantSpec(4, symmetric=False, group_size=16)
    mod = Int4WeightOnlyLinear.from_quant_layer(_quantized(QuantLinear(nn.Linear(64, 32), None, spec), spec))
    x = torch.randn(4, 64)
    compiled = torch.compile(mod, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), mod(x), rtol=0, atol=0)
