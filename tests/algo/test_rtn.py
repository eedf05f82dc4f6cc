import torch

from diffptq.algo.rtn import rtn_quantize, rtn_quantize_ex
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
