"""convert_for_inference on tiny pipelines: fake-quant fallback on the CPU, and the forced real-module paths."""
import copy
import logging

import pytest
import torch
from torch import nn

from diffptq.kernels import Fp8W4A8Linear, InferenceConfig, Int4WeightOnly, convert_for_inference
from diffptq.quant.layers import QuantLayer, quant_layers, set_quant_enabled
from diffptq.quant.quantizer import QuantSpec


def _rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU fallback")
@pytest.mark.parametrize("path", ["w4a8", "w4"])
def test_without_a_gpu_the_fake_quant_layers_stay(tiny, caplog, path):
    _, _, den, _ = tiny()
    before = dict(quant_layers(den))
    with caplog.at_level(logging.WARNING, logger="diffptq.kernels.select"):
        result = convert_for_inference(den, path)
    assert result.path == "fake" and not result.modules
    assert dict(quant_layers(den)) == before
    assert f"{path} unavailable" in caplog.text and "keeping" in caplog.text


def test_forced_w4a8_uses_fp8_modules_and_fuses_attention(tiny, caplog):
    _, _, den, inputs = tiny(act=QuantSpec(8))
    with torch.no_grad():
        fake = den(**inputs).sample
        set_quant_enabled(den, acts=False)
        w4 = den(**inputs).sample
    with caplog.at_level(logging.INFO, logger="diffptq.kernels.select"):
        result = convert_for_inference(den, "w4a8", config=InferenceConfig(force=True))
    assert result.path == "w4a8" and not result.kept
    assert set(result.counts()) == {"Fp8W4A8Linear"} and result.fused_attention == 4  # 2 blocks × (self, cross)
    assert not any(isinstance(m, QuantLayer) for m in den.modules())
    block = den.transformer_blocks[0]
    assert isinstance(block.attn1.to_qkv, Fp8W4A8Linear) and not hasattr(block.attn1, "to_q")
    assert isinstance(block.attn2.to_kv, Fp8W4A8Linear) and isinstance(block.attn2.to_q, Fp8W4A8Linear)
    assert "w4a8 path" in caplog.text and "Fp8W4A8Linear" in caplog.text
    with torch.no_grad():
        out = den(**inputs).sample
    assert torch.isfinite(out).all()
    # e4m3 per-token activations and bf16 GEMM outputs vs the int8 fake-quant model: same weights, close outputs
    assert _rel(out, w4) < 0.1 and _rel(out, fake) < 0.1


def test_fusing_qkv_changes_nothing_but_the_gemm_shape(tiny):
    _, _, den, inputs = tiny()
    den2 = copy.deepcopy(den)
    convert_for_inference(den, "w4a8", config=InferenceConfig(force=True, fuse_qkv=False))
    convert_for_inference(den2, "w4a8", config=InferenceConfig(force=True, fuse_qkv=True))
    with torch.no_grad():
        a, b = den(**inputs).sample, den2(**inputs).sample
    assert _rel(b, a) < 1e-2  # equal dot products; only fp32 blocking and bf16 ties of the output may differ


def test_forced_w4_on_the_unet_equals_the_weight_only_fake_quant_model(tiny):
    _, _, den, inputs = tiny("tiny-unet", weight=QuantSpec(4, group_size=8), act=QuantSpec(8))
    layers = dict(quant_layers(den))
    result = convert_for_inference(den, "w4", config=InferenceConfig(force=True, fuse_qkv=False))
    assert set(result.counts()) == {"Int4WeightOnlyLinear", "Int4WeightOnlyConv2d"}
    assert len(result.modules) == len(layers) and not result.kept
    for name, layer in layers.items():  # the reference: same codes, fp16-rounded scales, activations off
        layer.set_quantized_weight(layer.weight_codes, layer.weight_scale.half().float(), layer.weight_zero)
        layer.act_quant.enabled = False
        parent, _, child = name.rpartition(".")
        new = den.get_submodule(name)
        assert isinstance(new, Int4WeightOnly)
        setattr(den.get_submodule(parent), child, layer)
        with torch.no_grad():
            ref_part = layer.weight_q
        assert torch.equal(new.dequantized_weight(ref_part.dtype), ref_part), name
        setattr(den.get_submodule(parent), child, new)
    with torch.no_grad():
        out = den(**inputs).sample
        for name, layer in layers.items():
            parent, _, child = name.rpartition(".")
            setattr(den.get_submodule(parent), child, layer)
        ref = den(**inputs).sample
    assert torch.equal(out, ref)


def test_w4a8_on_the_unet_takes_dense_or_int4_convolutions(tiny):
    _, _, den, inputs = tiny("tiny-unet", weight=QuantSpec(4))
    result = convert_for_inference(den, "w4a8", config=InferenceConfig(force=True))
    counts = result.counts()
    assert counts["Fp8W4A8Linear"] > 0 and counts["Conv2d"] > 0
    assert all(type(den.get_submodule(n)) is nn.Conv2d for n, k in result.modules.items() if k == "Conv2d")
    _, _, den2, _ = tiny("tiny-unet", weight=QuantSpec(4))
    counts2 = convert_for_inference(den2, "w4a8", config=InferenceConfig(force=True, others="w4")).counts()
    assert counts2["Int4WeightOnlyConv2d"] == counts["Conv2d"]
    with torch.no_grad():
        assert _rel(den2(**inputs).sample, den(**inputs).sample) < 1e-2


def test_auto_act_mode_follows_each_layers_quantizer(tiny):
    pipe, fam, den, inputs = tiny(act=QuantSpec(8))  # dynamic per token -> "token"
    convert_for_inference(den, "w4a8", config=InferenceConfig(force=True, act_mode="auto", fuse_qkv=False))
    assert {m.act_mode for m in den.modules() if isinstance(m, Fp8W4A8Linear)} == {"token"}
    with pytest.raises(ValueError, match="act_mode"):
        InferenceConfig(act_mode="per_row")
    with pytest.raises(ValueError, match="path"):
        convert_for_inference(den, "int8")


@pytest.mark.parametrize("path", ["w4a8", "w4"])
def test_rotated_layers_stay_fake_quant(tiny, path):
    """The kernel modules take no input rotation: a layer with one is kept as it is (with its rotation), the others
    are converted."""
    from diffptq.quant.rotation import make_rotation

    _, _, den, inputs = tiny()
    layers = dict(quant_layers(den))
    name, layer = next((n, m) for n, m in layers.items() if isinstance(m, nn.Linear))
    layer.set_rotation(make_rotation("hadamard", layer.weight.shape[1], 0))  # as a checkpoint loader sets it
    result = convert_for_inference(den, path, config=InferenceConfig(force=True))
    assert "rotation" in result.kept[name]
    assert dict(quant_layers(den)) == {name: layer} and layer.rotation is not None
    with torch.no_grad():
        assert torch.isfinite(den(**inputs).sample).all()
