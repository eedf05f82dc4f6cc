import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from diffptq.quant.act import DynamicActQuantizer, StaticActQuantizer
from diffptq.quant.layers import QuantConfig, QuantConv2d, QuantLinear, float_mode, name_matches, swap_modules
from diffptq.quant.quantizer import QuantSpec, dequantize, fit_weight_params, quantize_codes


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(4, 8)
        self.attn = nn.ModuleDict({"to_q": nn.Linear(8, 8), "to_k": nn.Linear(8, 8)})
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.norm = nn.LayerNorm(8)
        self.proj_out = nn.Linear(8, 4)


def _quantize_layer(layer, spec):
    s, z = fit_weight_params(layer.weight_matrix(), spec)
    layer.set_quantized_weight(quantize_codes(layer.weight_matrix(), s, z, spec), s, z)
    return dequantize(layer.weight_codes, s, z)


def test_swap_replaces_exactly_the_matching_modules(caplog):
    model = _Block()
    cfg = QuantConfig(weight=QuantSpec(4), act=QuantSpec(8), skip=("embed", "proj_out", "re:to_k$"))
    with caplog.at_level(logging.WARNING):
        swapped = swap_modules(model, cfg)
    assert list(swapped) == ["attn.to_q", "conv"]
    assert isinstance(model.attn["to_q"], QuantLinear) and isinstance(model.conv, QuantConv2d)
    for name in ("embed", "proj_out"):
        assert type(getattr(model, name)) is nn.Linear
    assert type(model.attn["to_k"]) is nn.Linear and type(model.dw) is nn.Conv2d
    assert "dw" in caplog.text  # the grouped conv was skipped with a warning
    assert isinstance(model.conv.act_quant, StaticActQuantizer) and model.conv.act_quant.channel_dim == 1
    assert swap_modules(model, cfg) == swapped  # a second swap changes nothing


def test_swap_include_and_dynamic_acts():
    model = _Block()
    swapped = swap_modules(model, QuantConfig(act=QuantSpec(8), act_kind="dynamic", include=("attn.*",)))
    assert list(swapped) == ["attn.to_q", "attn.to_k"]
    assert all(isinstance(m.act_quant, DynamicActQuantizer) for m in swapped.values())


def test_swap_rejects_group_size_that_does_not_divide():
    with pytest.raises(ValueError, match="attn.to_q.*group_size 3.*8"):
        swap_modules(_Block(), QuantConfig(weight=QuantSpec(4, group_size=3), include=("attn.to_q",)))


def test_name_matches_glob_and_regex():
    assert name_matches("blocks.3.ff.net.2", ("blocks.*.ff.*",))
    assert not name_matches("blocks.3.attn1.to_q", ("blocks.*.ff.*",))
    assert name_matches("pos_embed.proj", ("re:embed",))


def test_quant_linear_output_equals_linear_with_dequantized_weight():
    lin = nn.Linear(16, 6)
    q = QuantLinear(lin, weight_spec=QuantSpec(4))
    x = torch.randn(3, 5, 16)
    torch.testing.assert_close(q(x), lin(x))  # before quantization: the float layer
    w_hat = _quantize_layer(q, QuantSpec(4))
    assert torch.equal(q(x), F.linear(x, w_hat, lin.bias))
    with float_mode(q):
        assert torch.equal(q(x), lin(x))
    assert torch.equal(q(x), F.linear(x, w_hat, lin.bias))  # switches restored


def test_quant_linear_applies_act_quant_first():
    lin = nn.Linear(16, 6)
    act = DynamicActQuantizer(QuantSpec(4))
    q = QuantLinear(lin, act_quant=act)
    x = torch.randn(7, 16)
    assert torch.equal(q(x), F.linear(act(x), lin.weight, lin.bias))


def test_quant_conv_output_and_state_dict_roundtrip():
    conv = nn.Conv2d(3, 5, 3, stride=2, padding=1)
    q = QuantConv2d(conv, DynamicActQuantizer(QuantSpec(8)))
    w_hat = _quantize_layer(q, QuantSpec(4, group_size=9))
    assert q.weight_codes.shape == (5, 27) and q.weight_scale.shape == (5, 3)
    x = torch.randn(2, 3, 8, 8)
    ref = F.conv2d(q.act_quant(x), w_hat.reshape(conv.weight.shape), conv.bias, stride=2, padding=1)
    assert torch.equal(q(x), ref)
    fresh = QuantConv2d(nn.Conv2d(3, 5, 3, stride=2, padding=1), DynamicActQuantizer(QuantSpec(8)))
    fresh.load_state_dict(q.state_dict())
    assert torch.equal(fresh.weight_codes, q.weight_codes) and torch.equal(fresh(x), q(x))
    assert "weight_q" not in q.state_dict()
    fresh.act_quant = DynamicActQuantizer(QuantSpec(8))  # attached later (e.g. by a checkpoint loader)
    assert fresh.act_quant.channel_dim == 1 and torch.equal(fresh(x), q(x))


def test_quant_conv_rejects_groups():
    with pytest.raises(ValueError, match="groups=4"):
        QuantConv2d(nn.Conv2d(8, 8, 3, groups=4))


def test_drop_float_weight_keeps_the_quantized_output():
    q = QuantLinear(nn.Linear(8, 4))
    with pytest.raises(RuntimeError, match="not quantized"):
        q.drop_float_weight()
    w_hat = _quantize_layer(q, QuantSpec(3))
    x = torch.randn(2, 8)
    y = q(x)
    q.drop_float_weight()
    assert torch.equal(q.weight.data, w_hat) and torch.equal(q(x), y)
    with float_mode(q):
        assert torch.equal(q(x), y)
