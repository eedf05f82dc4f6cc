"""Online Hadamard rotation: orthonormal R for any width, exact layer round trip, hooks see Rᵀx, config plumbing."""
import pytest
import torch
from torch import nn

from diffptq.quant.layers import QuantConfig, QuantConv2d, QuantLinear, float_mode, rotate_layers, swap_modules
from diffptq.quant.quantizer import QuantSpec, fit_weight_params, quantize_codes
from diffptq.quant.rotation import HadamardRotation, hadamard_matrix, make_rotation

SIZES = [1, 2, 5, 7, 32, 96, 160, 640, 1152]


@pytest.mark.parametrize("size", SIZES)
def test_rotation_is_orthonormal_and_mixes_every_channel(size):
    rot = HadamardRotation(size, seed=3)
    R = rot.matrix()
    torch.testing.assert_close(R.T @ R, torch.eye(size, dtype=torch.float64), rtol=0, atol=1e-12)
    if size > 1 and size & (size - 1) == 0:  # a power of two: a signed Hadamard matrix, all entries ±1/√n
        torch.testing.assert_close(R.abs(), torch.full_like(R, size ** -0.5))
    if size > 1:
        assert bool((R != 0).all())  # Q ⊗ H_p: every output channel mixes every input channel


@pytest.mark.parametrize("size", [5, 96, 160])
def test_rotate_matches_the_dense_matrix_and_unrotate_inverts(size):
    rot = HadamardRotation(size, seed=1)
    R = rot.matrix().float()
    x = torch.randn(3, 4, size)
    torch.testing.assert_close(rot.rotate(x), x @ R, rtol=0, atol=1e-5)  # rows: (Rᵀx)ᵀ = xᵀR
    torch.testing.assert_close(rot.unrotate(rot.rotate(x)), x, rtol=0, atol=1e-5)
    conv_in = torch.randn(2, size, 3, 5)
    torch.testing.assert_close(rot.rotate(conv_in, 1), torch.einsum("nchw,cd->ndhw", conv_in, R), rtol=0, atol=1e-5)


def test_sylvester_hadamard_and_seeds():
    h = hadamard_matrix(8)
    torch.testing.assert_close(h @ h.T, 8 * torch.eye(8, dtype=torch.float64))
    with pytest.raises(ValueError, match="power-of-two"):
        hadamard_matrix(12)
    assert torch.equal(HadamardRotation(96, 4).matrix(), HadamardRotation(96, 4).matrix())
    assert not torch.equal(HadamardRotation(96, 4).matrix(), HadamardRotation(96, 5).matrix())
    assert make_rotation("hadamard", 96, 4) is make_rotation("hadamard", 96, 4)  # one shared instance
    with pytest.raises(ValueError, match="unknown rotation"):
        make_rotation("givens", 96)


def test_rotate_input_reuses_the_output_for_the_same_unmodified_input():
    rot = HadamardRotation(160, 0)
    x = torch.randn(2, 160)
    a = rot.rotate_input(x)
    assert rot.rotate_input(x) is a
    x.mul_(2)  # modified in place: recomputed
    b = rot.rotate_input(x)
    assert b is not a
    torch.testing.assert_close(b, 2 * a)


@pytest.mark.parametrize("conv", [False, True])
def test_rotated_layer_without_quantization_equals_the_float_layer(conv):
    float_layer = nn.Conv2d(96, 16, 3, padding=1) if conv else nn.Linear(160, 24)
    x = torch.randn(2, 96, 6, 6) if conv else torch.randn(3, 5, 160)
    ref = float_layer(x)
    layer = (QuantConv2d if conv else QuantLinear)(float_layer)
    rotate_layers({"l": layer}, "hadamard", conv=True)
    assert layer.rotation is not None and layer.weight is not float_layer.weight
    torch.testing.assert_close(layer(x), ref, rtol=0, atol=1e-5)
    layer.set_rotation(None)  # removing the rotation restores the float weight and the plain input
    torch.testing.assert_close(layer.weight, float_layer.weight, rtol=0, atol=1e-6)
    torch.testing.assert_close(layer(x), ref, rtol=0, atol=1e-5)


def test_hooks_see_the_rotated_input_and_codes_are_those_of_w_r():
    lin = nn.Linear(96, 8)
    layer = QuantLinear(lin, weight_spec=QuantSpec(4))
    seen = []
    layer.register_forward_pre_hook(lambda m, a: seen.append(a[0]))  # registered before the rotation
    rotate_layers({"l": layer}, "hadamard")
    layer.register_forward_pre_hook(lambda m, a: seen.append(a[0]))  # and after it
    x = torch.randn(4, 96)
    rot = make_rotation("hadamard", 96)
    layer(x)
    for got in seen:
        torch.testing.assert_close(got, rot.rotate(x))
    W = layer.weight_matrix()
    torch.testing.assert_close(W, rot.rotate(lin.weight.detach(), 1))
    s, z = fit_weight_params(W, layer.weight_spec)
    layer.set_quantized_weight(quantize_codes(W, s, z, layer.weight_spec), s, z)
    with float_mode(layer):
        torch.testing.assert_close(layer(x), lin(x), rtol=0, atol=1e-5)
    torch.testing.assert_close(layer(x), torch.nn.functional.linear(rot.rotate(x), layer.weight_q, lin.bias))
    with pytest.raises(ValueError, match="rotate before quantizing"):
        rotate_layers({"l": QuantLinear(nn.Linear(96, 8))} | {"q": layer}, "hadamard", seed=1)


def test_swap_modules_rotates_linears_and_convs_only_when_asked():
    model = nn.Sequential(nn.Linear(160, 32), nn.Conv2d(32, 8, 1))
    swapped = swap_modules(model, QuantConfig(weight=QuantSpec(4), rotate="hadamard"))
    assert swapped["0"].rotation is make_rotation("hadamard", 160) and swapped["1"].rotation is None
    model = nn.Sequential(nn.Linear(160, 32), nn.Conv2d(32, 8, 1))
    swapped = swap_modules(model, QuantConfig(weight=QuantSpec(4), rotate="hadamard", rotate_conv=True))
    assert swapped["1"].rotation is make_rotation("hadamard", 32)
    with pytest.raises(ValueError, match="rotate"):
        QuantConfig(rotate="givens")
