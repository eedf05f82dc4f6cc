"""Smoothing and the low-rank high-precision branch (quant.outliers, QuantLinear.set_smoothing / set_lowrank, the
driver's --smooth / --lowrank): exact in float mode, better than plain GPTQ on a layer with outlier channels, and
saved and loaded by checkpoints."""
import pytest
import torch
from torch import nn

from diffptq.algo.gptq import gptq_quantize_ex
from diffptq.algo.hessian import gram_from_inputs
from diffptq.config import QuantSpec
from diffptq.quant.act import DynamicActQuantizer
from diffptq.quant.layers import QuantLinear, float_mode
from diffptq.quant.outliers import lowrank_split, smoothing_scales

W4, A4 = QuantSpec(4), QuantSpec(4, symmetric=False)


def _inputs(n=512, width=64, outliers=(3, 17, 40), seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, width, generator=g)
    x[:, list(outliers)] *= 40.0  # a few input channels carry most of the range, as in diffusion FFN inputs
    return x


def test_lowrank_split_is_the_best_rank_r_approximation():
    g = torch.Generator().manual_seed(1)
    W = torch.randn(32, 48, generator=g)
    R, up, down = lowrank_split(W, 4)
    torch.testing.assert_close(R + up @ down, W, rtol=1e-5, atol=1e-5)
    s = torch.linalg.svdvals(W.double())
    assert torch.linalg.matrix_norm(R.double()) ** 2 == pytest.approx(float((s[4:] ** 2).sum()), rel=1e-6)


def test_smoothing_and_branch_keep_the_float_output():
    torch.manual_seed(0)
    lin = nn.Linear(64, 24)
    x = _inputs()
    ref = lin(x)
    layer = QuantLinear(nn.Linear(64, 24), DynamicActQuantizer(A4), W4)
    layer.load_state_dict(lin.state_dict(), strict=False)
    s = smoothing_scales(x.abs().amax(0), [layer.weight], 0.5)
    assert float(s[3]) > 5 * float(s[0])  # the outlier channels are scaled down the most
    layer.set_smoothing(s)
    _, up, down = lowrank_split(layer.weight.detach(), 8)
    layer.set_lowrank(up, down)
    with float_mode(layer):
        torch.testing.assert_close(layer(x), ref, rtol=1e-4, atol=1e-3)


def _quantized_error(layer: QuantLinear, x: torch.Tensor, ref: torch.Tensor) -> float:
    xs = x if layer.input_scale is None else x / layer.input_scale
    H, _ = gram_from_inputs(layer.quant_input(xs))
    res = gptq_quantize_ex(layer.weight_matrix(), H, W4)
    layer.set_quantized_weight(res.codes, res.scale, res.zero)
    with torch.no_grad():
        return float((layer(x) - ref).norm() / ref.norm())


def test_the_branch_beats_plain_gptq_on_a_layer_with_outlier_channels():
    torch.manual_seed(0)
    lin = nn.Linear(64, 48)
    x_cal, x_eval = _inputs(seed=0), _inputs(seed=1)
    with torch.no_grad():
        ref = lin(x_eval)

    def fresh():
        layer = QuantLinear(nn.Linear(64, 48), DynamicActQuantizer(A4), W4)
        layer.load_state_dict(lin.state_dict(), strict=False)
        return layer
    plain = _quantized_error(fresh(), x_eval, ref)
    layer = fresh()
    layer.set_smoothing(smoothing_scales(x_cal.abs().amax(0), [layer.weight], 0.5))
    _, up, down = lowrank_split(layer.weight.detach(), 8)
    layer.set_lowrank(up, down)
    handled = _quantized_error(layer, x_eval, ref)
    assert handled < 0.7 * plain, (handled, plain)


def test_driver_smooths_and_splits_and_checkpoints_round_trip(tmp_path):
    import diffptq
    from diffptq.algo.driver import SequentialQuantizer
    from diffptq.config import SequentialConfig
    from diffptq.data.calib import collect_calibration
    from diffptq.io.checkpoint import read_checkpoint, save_quantized
    from diffptq.models import family_of, load_pipeline
    from diffptq.quant.layers import quant_layers

    pipe = load_pipeline("tiny-dit")
    fam = family_of(pipe)
    den = fam.denoiser(pipe)
    calib = collect_calibration(pipe, ["a red cat", "a dog"], 2, batch_size=2, progress=False)
    inputs = next(calib.batches())
    with torch.no_grad():
        ref = den(**inputs, return_dict=False)[0]
    cfg = SequentialConfig(method="gptq", act_kind="dynamic", smooth=0.5, lowrank=2, blocks=[0]).with_bits(4, 4)
    SequentialQuantizer(den, fam, calib, cfg, "cpu", progress=False).run()
    layers = dict(quant_layers(den))
    linear = [m for n, m in layers.items() if n.startswith("transformer_blocks.0.")]
    assert linear and all(m.input_scale is not None and m.lowrank_up.shape[1] == 2 for m in linear)
    qkv = [layers[f"transformer_blocks.0.attn1.to_{c}"].input_scale for c in "qkv"]
    assert torch.equal(qkv[0], qkv[1]) and torch.equal(qkv[0], qkv[2])  # one input, one smoothing
    with torch.no_grad(), float_mode(den):
        torch.testing.assert_close(den(**inputs, return_dict=False)[0], ref, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        out = den(**inputs, return_dict=False)[0]
    path = tmp_path / "ckpt.safetensors"
    save_quantized(path, den, {"source": "tiny-dit", "family": "pixart", "pipeline_class": type(pipe).__name__},
                   {"method": "gptq"})
    meta, _ = read_checkpoint(path)
    assert meta["version"] == 3 and {e["lowrank"] for e in meta["layers"]} == {2}
    loaded = diffptq.load_quantized(path)
    with torch.no_grad():
        torch.testing.assert_close(fam.denoiser(loaded)(**inputs, return_dict=False)[0], out, rtol=1e-5,
                                   atol=1e-5)


def test_a_branch_holds_at_most_a_quarter_of_a_layers_rank():
    """--lowrank R asks for rank R; a layer gets min(R, min(out, in) // 4), so a branch never takes a narrow layer
    whole (tiny-dit's 16-wide layers: rank 4 for R = 32; R = 2 stays 2), and what is left is still quantized."""
    from diffptq.algo.driver import SequentialQuantizer
    from diffptq.config import SequentialConfig
    from diffptq.data.calib import collect_calibration
    from diffptq.models import family_of, load_pipeline
    from diffptq.quant.layers import quant_layers
    from diffptq.quant.outliers import branch_rank

    assert [branch_rank(32, s) for s in ((16, 16), (64, 16), (128, 160), (1152, 4608), (3, 8))] == [4, 4, 32, 32, 0]
    assert branch_rank(2, (16, 16)) == 2
    pipe = load_pipeline("tiny-dit")
    fam = family_of(pipe)
    den = fam.denoiser(pipe)
    calib = collect_calibration(pipe, ["a red cat", "a dog"], 2, batch_size=2, progress=False)
    cfg = SequentialConfig(method="rtn", act_kind="dynamic", lowrank=32, blocks=[0]).with_bits(4, 4)
    SequentialQuantizer(den, fam, calib, cfg, "cpu", progress=False).run()
    linear = [m for n, m in quant_layers(den) if n.startswith("transformer_blocks.0.")]
    assert linear and all(m.lowrank_up.shape[1] == min(m.weight.shape) // 4 for m in linear)
    assert all(m.is_quantized and (m.weight_q != m.weight).any() for m in linear)


def test_conv_branch_keeps_the_float_output_and_round_trips(tmp_path):
    """--lowrank_conv: a Conv2d's branch is the convolution with up @ down (its weight matrix (out, in·k·k)), so
    branch + residual conv = the float conv; the driver gives the UNet's convolutions a branch, quantizes the
    residual, and a checkpoint reloads it to the same outputs."""
    import diffptq
    from diffptq.algo.driver import SequentialQuantizer
    from diffptq.config import SequentialConfig
    from diffptq.data.calib import collect_calibration
    from diffptq.io.checkpoint import save_quantized
    from diffptq.models import family_of, load_pipeline
    from diffptq.quant.layers import QuantConv2d, quant_layers
    from diffptq.quant.outliers import lowrank_split

    torch.manual_seed(0)
    conv = QuantConv2d(torch.nn.Conv2d(6, 8, 3, stride=2, padding=1))
    x = torch.randn(2, 6, 9, 9)
    with torch.no_grad():
        ref = conv(x)
        _, up, down = lowrank_split(conv.weight.detach().reshape(8, -1), 3)
        conv.set_lowrank(up, down)
        assert conv.weight.shape == (8, 6, 3, 3) and conv.lowrank_down.shape == (3, 54)
        torch.testing.assert_close(conv(x), ref, rtol=1e-5, atol=1e-5)

    pipe = load_pipeline("tiny-unet")
    fam = family_of(pipe)
    den = fam.denoiser(pipe)
    calib = collect_calibration(pipe, ["a red cat", "a dog"], 2, batch_size=2, progress=False)
    inputs = next(calib.batches())
    cfg = SequentialConfig(method="gptq", lowrank=4, lowrank_conv=True).with_bits(4, 4)
    SequentialQuantizer(den, fam, calib, cfg, "cpu", progress=False).run()
    convs = [m for _, m in quant_layers(den) if isinstance(m, QuantConv2d)]
    assert convs and all(m.lowrank_up is not None and m.is_quantized for m in convs)
    with torch.no_grad():
        out = den(**inputs, return_dict=False)[0]
    path = tmp_path / "unet.safetensors"
    save_quantized(path, den, {"source": "tiny-unet", "family": "sd", "pipeline_class": type(pipe).__name__},
                   {"method": "gptq"})
    with torch.no_grad():
        again = fam.denoiser(diffptq.load_quantized(path))(**inputs, return_dict=False)[0]
    torch.testing.assert_close(again, out, rtol=1e-5, atol=1e-5)
