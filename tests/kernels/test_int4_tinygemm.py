"""diffptq.kernels.int4_tinygemm: our packed int4 codes, scales and zero points in tinygemm's layout give the
dequantized layer's output (up to the bf16 rounding of scales and zeros), through torch's CPU tinygemm kernel here
and its CUDA kernel on a GPU."""
import pytest
import torch
import torch.nn.functional as F

from diffptq.kernels.int4 import dequantize_int4_rows, pack_int4_rows
from diffptq.kernels.int4_tinygemm import (inner_k_tiles, pack_for_cpu, pack_for_cuda, tinygemm_codes,
                                           tinygemm_linear, tinygemm_scales_and_zeros, tinygemm_unsupported_reason)


def _layer(N, K, group, signed, zero, seed=0):
    g = torch.Generator().manual_seed(seed)
    lo, hi = (-8, 8) if signed else (0, 16)
    codes = torch.randint(lo, hi, (N, K), generator=g, dtype=torch.int8 if signed else torch.uint8)
    scale = (torch.rand(N, K // group, generator=g) * 0.02 + 1e-3).half()
    z = torch.randint(0, 16, (N, K // group), generator=g, dtype=torch.uint8) if zero else None
    return codes, pack_int4_rows(codes), scale, z


@pytest.mark.parametrize("signed, zero", [(True, False), (False, True), (False, False)])
def test_codes_and_scales_give_the_dequantized_weight(signed, zero):
    """(u − 8) · scale + zero, from the converted tensors in fp32, is s · (q − z) up to bf16 rounding of s and z."""
    codes, packed, scale, z = _layer(24, 256, 64, signed, zero)
    u = tinygemm_codes(packed, signed)
    assert u.dtype == torch.uint8 and int(u.max()) <= 15
    assert torch.equal(u.to(torch.int16), codes.to(torch.int16) + (8 if signed else 0))
    sz = tinygemm_scales_and_zeros(scale, z, signed)
    assert sz.shape == (4, 24, 2) and sz.dtype == torch.bfloat16
    s, zz = sz[..., 0].float().t(), sz[..., 1].float().t()  # (N, G)
    w = ((u.float() - 8).reshape(24, 4, 64) * s[..., None] + zz[..., None]).reshape(24, 256)
    ref = dequantize_int4_rows(packed, scale, z, signed, torch.float32)
    assert torch.allclose(w, ref, rtol=0, atol=float(ref.abs().max()) * 2**-7)


@pytest.mark.parametrize("signed, zero", [(True, False), (False, True)])
def test_cpu_kernel_matches_dequantize_then_linear(signed, zero):
    _, packed, scale, z = _layer(48, 256, 128, signed, zero)
    x = torch.randn(5, 256, dtype=torch.bfloat16)
    y = tinygemm_linear(x, pack_for_cpu(tinygemm_codes(packed, signed)), 128,
                        tinygemm_scales_and_zeros(scale, z, signed))
    ref = F.linear(x.float(), dequantize_int4_rows(packed, scale, z, signed, torch.float32))
    assert y.shape == (5, 48) and (y.float() - ref).norm() / ref.norm() < 1e-2


def test_what_tinygemm_cannot_take_is_named():
    assert tinygemm_unsupported_reason(1152, 1152, 128) is None
    assert "group size 96" in tinygemm_unsupported_reason(1152, 1152, 96)
    assert "multiple of 32" in tinygemm_unsupported_reason(1152, 1136, 32)
    assert [inner_k_tiles(k) for k in (1152, 320, 96)] == [8, 4, 2]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (tinygemm's CUDA kernel)")
@pytest.mark.parametrize("signed, zero", [(True, False), (False, True)])
def test_cuda_kernel_matches_dequantize_then_linear(signed, zero):
    _, packed, scale, z = _layer(1152, 1152, 128, signed, zero)
    x = torch.randn(1024, 1152, dtype=torch.bfloat16, device="cuda")
    weight = pack_for_cuda(tinygemm_codes(packed.cuda(), signed))
    y = tinygemm_linear(x, weight, 128, tinygemm_scales_and_zeros(scale, z, signed).cuda())
    ref = F.linear(x.float(), dequantize_int4_rows(packed, scale, z, signed, torch.float32).cuda())
    assert (y.float() - ref).norm() / ref.norm() < 1e-2
