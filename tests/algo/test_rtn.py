import pytest
import torch

from diffptq.algo.rtn import install_layer_codes, rtn_layer_codes, rtn_quantize, rtn_quantize_ex
from diffptq.quant.act import DynamicActQuantizer, StaticActQuantizer
from diffptq.quant.layers import QuantConv2d, QuantLinear
from diffptq.quant.quantizer import QuantSpec


def test_rtn_is_round_to_nearest_per_channel():
    W = torch.randn(8, 20)
    s = W.abs().amax(1, keepdim=True) / 7
    ref = torch.clamp(torch.round(W / s), -8, 7) * s
    torch.testing.assert_close(rtn_quantize(W, QuantSpec(4)), ref, rtol=0, atol=1e-6)


def test_rtn_result_record():
    W = torch.randn(8, 3, 2, 2, dtype=torch.bfloat16)
    res = rtn_quantize_ex(W, QuantSpec(4, symmetric=False, group_size=4))
    assert res.weight.shape == W.shape and res.weight.dtype == torch.bfloat16
    assert res.codes.shape == (8, 12) and res.codes.dtype == torch.uint8 and res.scale.shape == (8, 3)
    assert res.summary()["method"] == "rtn" and not res.fell_back


def _small_model() -> torch.nn.Module:
    """Two Linears (inputs 8 and 6) and a Conv2d (3·2·2 = 12 weight columns)."""
    return torch.nn.ModuleDict({"fc1": torch.nn.Linear(8, 6), "conv": torch.nn.Conv2d(3, 4, 2),
                                "fc2": torch.nn.Linear(6, 5, bias=False)})


def _spec_for(cols: int) -> QuantSpec:
    return QuantSpec(4, symmetric=False, group_size=4) if cols % 4 == 0 else QuantSpec(4)


def test_rtn_layer_codes_are_rtn_of_each_layer_on_its_own_grid():
    model, names = _small_model(), ["fc1", "conv", "fc2"]
    codes = rtn_layer_codes(model, names, _spec_for)
    assert list(codes) == names
    for name in names:
        w = model[name].weight
        spec, c, scale, zero = codes[name]
        assert spec == _spec_for(w[0].numel())
        assert c.shape == (w.shape[0], w[0].numel()) and c.dtype == spec.code_dtype and c.device.type == "cpu"
        assert int(c.min()) >= spec.qmin and int(c.max()) <= spec.qmax
        ref = rtn_quantize_ex(w, spec)
        assert torch.equal(c, ref.codes) and torch.equal(scale, ref.scale) and torch.equal(zero, ref.zero)
    assert codes["fc1"].scale.shape == (6, 2) and codes["fc2"].scale.shape == (5, 1)  # groups of 4 / per channel


def test_installed_codes_are_the_layers_weights_and_outputs():
    model = _small_model()
    codes = rtn_layer_codes(model, ["fc1", "conv"], _spec_for)
    ref = {}
    for name, (_, c, scale, zero) in codes.items():  # scale·(codes − zero), groups expanded by hand
        cols = c.shape[1]
        s, z = scale.repeat_interleave(cols // scale.shape[1], 1), zero.repeat_interleave(cols // zero.shape[1], 1)
        ref[name] = (s * (c.float() - z)).reshape(model[name].weight.shape)
    x, img = torch.randn(3, 8), torch.randn(2, 3, 5, 5)
    want_fc1 = torch.nn.functional.linear(x, ref["fc1"], model["fc1"].bias)
    want_conv = torch.nn.functional.conv2d(img, ref["conv"], model["conv"].bias)
    layers = install_layer_codes(model, codes)
    assert set(layers) == {"fc1", "conv"} and isinstance(model["fc1"], QuantLinear)
    assert isinstance(model["conv"], QuantConv2d) and type(model["fc2"]) is torch.nn.Linear  # not in codes
    for name, layer in layers.items():
        assert layer.weight_spec == codes[name].spec and layer.act_quant is None
        torch.testing.assert_close(layer.current_weight(), ref[name], rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(model["fc1"](x), want_fc1)
        torch.testing.assert_close(model["conv"](img), want_conv)


def test_installed_layers_get_the_activation_quantizer_asked_for():
    model = _small_model()
    codes = rtn_layer_codes(model, ["fc1", "fc2"], _spec_for)
    install_layer_codes(model, {"fc1": codes["fc1"]}, QuantSpec(8), "dynamic")
    install_layer_codes(model, {"fc2": codes["fc2"]}, QuantSpec(8, symmetric=False), "static")
    assert isinstance(model["fc1"].act_quant, DynamicActQuantizer)
    assert isinstance(model["fc2"].act_quant, StaticActQuantizer)


def test_installing_codes_for_a_missing_layer_is_an_error():
    model = _small_model()
    codes = rtn_layer_codes(model, ["fc1"], _spec_for)
    with pytest.raises(ValueError, match="fc3"):
        install_layer_codes(model, {"fc3": codes["fc1"]})
