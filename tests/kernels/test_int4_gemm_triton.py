"""The fused int4 linear kernel (diffptq.kernels.int4_gemm_triton) against dequantize-then-F.linear: under Triton's
CPU interpreter (a subprocess) and on the GPU, and its switch in the memory-path layers."""
import pytest
from interpreter import run_interpreted
import torch
import torch.nn.functional as F

from diffptq.kernels.int4 import dequantize_int4_rows, pack_int4_rows
from diffptq.kernels.int4_gemm_triton import triton
from diffptq.kernels.int4_weight_only import Int4WeightOnlyLinear, set_int4_matmul

needs_triton = pytest.mark.skipif(triton is None, reason="Triton is not installed")
needs_gpu = pytest.mark.skipif(not (torch.cuda.is_available() and triton is not None), reason="needs CUDA and Triton")


def _layer(N, K, group, signed, zero, bias, scale_dtype=torch.float16, seed=0):
    """(packed, scale, zero, bias) of a random int4 layer: codes in the signed or unsigned 4-bit grid."""
    g = torch.Generator().manual_seed(seed)
    lo, hi = (-8, 8) if signed else (0, 16)
    codes = torch.randint(lo, hi, (N, K), generator=g, dtype=torch.int8 if signed else torch.uint8)
    scale = (torch.rand(N, K // group, generator=g) * 0.02 + 1e-3).to(scale_dtype)
    z = torch.randint(0, 16, (N, K // group), generator=g, dtype=torch.uint8) if zero else None
    b = torch.randn(N, generator=g) if bias else None
    return pack_int4_rows(codes), scale, z, b


CASES = [  # (M, N, K, group, signed, zero, bias): K chunks of 128, 64, 64, 32 and 128 (per-channel, K = 384)
    (5, 48, 128, 128, True, False, True), (70, 130, 256, 64, True, False, False),
    (64, 64, 320, 64, False, True, True), (3, 20, 96, 96, False, True, False), (130, 140, 384, 384, True, True, True)]


@needs_triton
def test_interpreter_kernel_equals_dequantize_then_linear():
    code = """
        import torch
        import torch.nn.functional as F
        from diffptq.kernels.int4 import dequantize_int4_rows
        from diffptq.kernels.int4_gemm_triton import int4_linear_kernel
        from test_int4_gemm_triton import CASES, _layer
        for M, N, K, group, signed, zero, bias in CASES:
            packed, scale, z, b = _layer(N, K, group, signed, zero, bias)
            x = torch.randn(M, K)
            w = dequantize_int4_rows(packed, scale, z, signed, torch.float32)
            y = int4_linear_kernel(x, packed, scale, z, signed, b)
            ref = F.linear(x, w, b)
            assert torch.allclose(y, ref, rtol=1e-5, atol=1e-5), (M, N, K, (y - ref).abs().max())
        print("ok")
    """
    run_interpreted(code)


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M, N, K, group", [(2048, 1152, 1152, 128), (2048, 4608, 1152, 128), (8192, 1152, 4608, 128),
                                            (512, 320, 320, 64), (7, 1280, 5120, 128)])
def test_gpu_kernel_equals_dequantize_then_linear(M, N, K, group, dtype):
    packed, scale, z, b = (t.cuda() if t is not None else None for t in _layer(N, K, group, True, False, True))
    x = torch.randn(M, K, device="cuda", dtype=dtype)
    ref = F.linear(x, dequantize_int4_rows(packed, scale, z, True, dtype), b.to(dtype)).float()
    from diffptq.kernels.int4_gemm_triton import int4_linear

    y = int4_linear(x, packed, scale, z, True, b.to(dtype)).float()
    assert (y - ref).norm() / ref.norm() < 2e-3  # bf16 / fp16 rounding of y, fp32 sums in another order


def test_set_int4_matmul_switches_linear_layers_and_keeps_the_cpu_path():
    packed, scale, z, b = _layer(48, 128, 64, True, False, True)
    layer = Int4WeightOnlyLinear(packed, scale, z, True, 128, b)
    model = torch.nn.Sequential(layer, torch.nn.ReLU())
    x = torch.randn(3, 5, 128)
    before = model(x)
    assert set_int4_matmul(model, "triton") == 1 and layer.matmul == "triton"
    assert torch.equal(model(x), before)  # CPU inputs keep dequantize-then-linear
    assert torch.equal(before, F.relu(F.linear(x, dequantize_int4_rows(packed, scale, z, True, torch.float32), b)))
    with pytest.raises(ValueError, match="matmul must be one of"):
        set_int4_matmul(model, "cutlass")


def test_group_sizes_the_kernel_cannot_chunk_keep_dequantizing():
    """The K chunk is the largest power of two ≤ 128 dividing the group (one scale per row and chunk), at least 16."""
    from diffptq.kernels.int4_gemm_triton import block_k, int4_linear_kernel

    assert [block_k(g) for g in (128, 256, 64, 96, 1152, 48, 24, 40)] == [128, 128, 64, 32, 128, 16, None, None]
    odd = Int4WeightOnlyLinear(*_layer(16, 48, 24, True, False, False)[:3], True, 48)
    fine = Int4WeightOnlyLinear(*_layer(16, 64, 64, True, False, False)[:3], True, 64)
    model = torch.nn.Sequential(odd, fine)
    assert set_int4_matmul(model, "triton") == 1 and odd.matmul == "dequant" and fine.matmul == "triton"
    assert set_int4_matmul(model, "dequant") == 2 and fine.matmul == "dequant"
    if triton is not None:
        with pytest.raises(ValueError, match="group size 24 has no power-of-two divisor"):
            int4_linear_kernel(torch.randn(2, 48), odd.packed, odd.scale, None, True, None)
