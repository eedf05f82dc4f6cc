"""The sigmoid form of the tanh-approximated GELU: the same function, and the block swap that leaves the model's
output and parameters unchanged."""
import copy

import torch
import torch.nn.functional as F

from diffptq.kernels import InferenceConfig, convert_for_inference
from diffptq.kernels.activations import SigmoidFormGELU, gelu_tanh_sigmoid_form, use_sigmoid_form_gelu


def _tanh_gelu_float64(x):
    """½ x (1 + tanh(√(2/π)(x + 0.044715 x³))) in float64, written independently of the module."""
    x = x.double()
    return 0.5 * x * (1.0 + torch.tanh((2.0 / torch.pi) ** 0.5 * (x + 0.044715 * x**3)))


def test_sigmoid_form_equals_the_tanh_gelu_within_fp32_rounding():
    x = torch.cat([torch.linspace(-5, 30, 200_001), torch.tensor([-0.0, 0.0, 1e-30, 60.0, 1e4])])
    ours = gelu_tanh_sigmoid_form(x)
    ref = _tanh_gelu_float64(x)  # well conditioned for x ≥ -5 (1 + tanh v ≥ 1e-8)
    assert ours.dtype == torch.float32
    err = (ours.double() - ref).abs()
    assert float((err / ref.abs().clamp_min(1e-3)).max()) < 5e-6  # a few fp32 ulps (absolute near zero)
    assert float((F.gelu(x, approximate="tanh").double() - ref).abs().max()) < 1e-4  # torch's fp32 tanh GELU


def test_far_negative_tail_is_a_tiny_non_positive_value_never_nan():
    # there 1 + tanh v cancels (the tanh form rounds to -0); the sigmoid form underflows gracefully
    x = torch.tensor([-5.0, -9.0, -30.0, -60.0, -1e4, -torch.finfo(torch.float32).max])
    ours = gelu_tanh_sigmoid_form(x)
    assert torch.isfinite(ours).all() and bool((ours <= 0).all()) and float(ours.abs().max()) < 1e-5


def test_bf16_input_gives_the_bf16_rounding_of_the_same_values():
    x = torch.randn(4096, generator=torch.Generator().manual_seed(0)).mul(2).clamp(-5, 5).to(torch.bfloat16)
    ours = gelu_tanh_sigmoid_form(x)
    assert ours.dtype == torch.bfloat16
    ref = _tanh_gelu_float64(x.float()).to(torch.bfloat16)
    differ = ours != ref
    # a bf16 rounding can only flip where the fp32 values straddle a tie: one ulp, at most a handful of values
    assert int(differ.sum()) <= 4
    ulp = torch.finfo(torch.bfloat16).eps * ref[differ].float().abs()
    assert bool(((ours[differ].float() - ref[differ].float()).abs() <= ulp * 1.01).all())


def test_swapping_dit_gelu_blocks_keeps_output_and_parameters(tiny):
    _, _, den, inputs = tiny()
    swapped = copy.deepcopy(den)
    n = use_sigmoid_form_gelu(swapped)
    assert n == len(den.transformer_blocks) and n > 0
    assert all(isinstance(b.ff.net[0], SigmoidFormGELU) for b in swapped.transformer_blocks)
    sd_a, sd_b = den.state_dict(), swapped.state_dict()
    assert sd_a.keys() == sd_b.keys() and all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)
    with torch.no_grad():
        a, b = den(**inputs).sample, swapped(**inputs).sample
    assert float((a - b).abs().max()) <= 1e-4 * float(a.abs().max())
    assert use_sigmoid_form_gelu(swapped) == 0  # nothing left to swap


def test_the_unet_has_no_tanh_gelu_blocks(tiny):
    _, _, den, _ = tiny("tiny-unet")
    assert use_sigmoid_form_gelu(den) == 0  # SD's feed-forward is GEGLU (exact GELU)


def test_conversion_swaps_gelu_unless_told_not_to(tiny):
    _, _, den, _ = tiny()
    blocks = len(den.transformer_blocks)
    other = copy.deepcopy(den)
    assert convert_for_inference(den, "w4a8", config=InferenceConfig(force=True)).sigmoid_gelu == blocks
    kept = convert_for_inference(other, "w4a8", config=InferenceConfig(force=True, sigmoid_gelu=False))
    assert kept.sigmoid_gelu == 0 and not any(isinstance(m, SigmoidFormGELU) for m in other.modules())
