"""The Triton per-token e4m3 quantization kernel (diffptq.kernels.fp8_quant_triton) against the torch ops it replaces.

On the CPU the kernel runs under Triton's interpreter (TRITON_INTERPRET=1, in a subprocess). The interpreter's
fp32 -> float8 cast is not the hardware's: it rounds ties away from zero and drops the carry when the mantissa
rounds up (1.9375 -> 1.0). So there the kernel writes the clamped fp32 quotient clamp(x / s, ±448) (out_dtype
float32) and the test asserts it, and the scale, bit for bit; torch's own e4m3 cast of equal values gives equal
codes. The interpreter's tl.fma rounds twice, so there the kernel divides with div_rn; the division it uses on the
GPU (reciprocal and two fma corrections) is checked here in float64 emulation, and on the GPU against torch, with
the e4m3 cast itself (cvt.rn.satfinite, round to nearest even).
"""

import pytest
from interpreter import run_interpreted
import torch

from diffptq.kernels import InferenceConfig
from diffptq.kernels.fp8 import E4M3, act_scale, fp8_support, quantize_e4m3
from diffptq.kernels.fp8_linear import Fp8W4A8Linear
from diffptq.kernels.fp8_quant_triton import triton_available
from diffptq.kernels.fuse import concat_layers
from test_fp8_linear import _quant_linear

needs_fp8_gpu = pytest.mark.skipif(not (fp8_support()[0] and triton_available()),
                                   reason="needs a CUDA GPU with FP8 (sm_89+) and Triton")


def _inputs(dtype: torch.dtype, M: int, K: int, device: str = "cpu") -> torch.Tensor:
    """Rows over 20 decades (the tiny ones take the 1e-12 amax floor), a row of zeros, one at the dtype's edge."""
    g = torch.Generator().manual_seed(M * 7919 + K)
    x = torch.randn(M, K, generator=g) * torch.logspace(4, -16, M)[:, None]
    if M > 2:
        x[1] = 0
        x[2, : K // 2] = torch.finfo(dtype).max / 2
    return x.to(dtype).to(device)


SHAPES = [(1, 48), (37, 48), (5, 1152), (3, 4608), (2, 16384), (3, 20000)]  # 16384 and up: rows swept in chunks


def test_interpreter_matches_the_torch_quantization_bit_for_bit():
    code = f"""
        import torch
        from diffptq.kernels.fp8 import E4M3, act_scale, quantize_e4m3
        from diffptq.kernels.fp8_quant_triton import fp8_quant_rows, quantize_rows
        from test_fp8_quant_triton import _inputs
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            for M, K in {SHAPES!r}:
                x = _inputs(dtype, M, K)
                s_ref = act_scale(x, "token")
                v, s = quantize_rows(x, torch.float32)
                assert torch.equal(s, s_ref), (dtype, M, K)
                assert torch.equal(v, (x / s_ref).clamp(-448, 448)), (dtype, M, K)
                assert torch.equal(v.to(E4M3).view(torch.uint8), quantize_e4m3(x, s_ref).view(torch.uint8))
        x = _inputs(torch.bfloat16, 40, 96)[:, :64]  # rows of stride 96: read in place
        v, s = quantize_rows(x, torch.float32)
        assert torch.equal(s, act_scale(x, "token")) and torch.equal(v, (x / s).clamp(-448, 448))
        q, s = fp8_quant_rows(_inputs(torch.bfloat16, 6, 64))  # the op runs here; its cast is the interpreter's
        assert q.dtype == E4M3 and q.shape == (6, 64) and s.shape == (6, 1) and s.dtype == torch.float32
        print("ok")
    """
    run_interpreted(code)


def test_the_op_traces_without_graph_breaks_and_its_fake_matches():
    code = """
        import torch
        from diffptq.kernels.fp8_quant_triton import fp8_quant_rows  # registers diffptq::fp8_quant_rows

        def f(x):
            q, s = torch.ops.diffptq.fp8_quant_rows(torch.nn.functional.gelu(x))
            return q.float() * s

        x = torch.randn(6, 64)
        assert torch._dynamo.explain(f)(x).graph_break_count == 0
        res = torch.library.opcheck(torch.ops.diffptq.fp8_quant_rows.default, (x,),
                                    test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))
        assert all(v == "SUCCESS" for v in res.values()), res
        print("ok")
    """
    run_interpreted(code)


def test_kernel_compiles_for_an_h100_with_exact_arithmetic():
    """Without a GPU: the kernel compiles for sm_90 (each output type, one tile or chunks), and its PTX divides by fma
    corrections (fma.rn, no flush to zero, no approximate division) and casts with cvt.rn.satfinite (round to nearest
    even, saturating), the instructions the exactness argument relies on."""
    triton = pytest.importorskip("triton")
    from diffptq.kernels import fp8_quant_triton as fq

    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError as err:
        pytest.skip(f"this Triton has another compile API: {err}")
    args = ("x_ptr", "q_ptr", "s_ptr", "M", "K", "stride_xm", "stride_qm", "amax_floor", "e4m3_max", "inv_max")
    types = ("*bf16", None, "*fp32", "i32", "i32", "i32", "i32", "fp32", "fp32", "fp32")
    for out in ("*fp8e4nv", "*fp32"):
        for block_m, block_k, chunks in ((2, 2048, 1), (1, 8192, 1), (1, 8192, 3)):
            sig = {a: t or out for a, t in zip(args, types)} | dict.fromkeys(
                ("BLOCK_M", "BLOCK_K", "CHUNKS", "DIV_RN"), "constexpr")
            consts = {"BLOCK_M": block_m, "BLOCK_K": block_k, "CHUNKS": chunks, "DIV_RN": False}
            aligned = {(i,): [["tt.divisibility", 16]] for i in (0, 1, 2, 4, 5, 6)}  # as launches specialize
            try:
                src = ASTSource(fn=fq._quant_rows_kernel, signature=sig, constexprs=consts, attrs=aligned)
            except (TypeError, KeyError) as err:
                pytest.skip(f"this Triton has another compile API: {err}")
            ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32)).asm["ptx"]
            assert "fma.rn.f32" in ptx and ".ftz" not in ptx and "div.full" not in ptx and "div.approx" not in ptx
            assert ("cvt.rn.satfinite.e4m3x2.f32" in ptx) == (out == "*fp8e4nv")
            assert "ld.global.v4" in ptx  # 16-byte loads


def _corrected_quotient(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """The kernel's x / s (fp32): y = RN(1/s), q = RN(x·y), twice q = RN(q + RN(x − s·q)·y). fma emulated in float64
    (the products are exact there; the residual x − s·q is exact in fp32 once q is within 2 ulp)."""
    y = 1.0 / s
    q = x * y
    for _ in range(2):
        r = (x.double() - s.double() * q.double()).float()
        q = (q.double() + r.double() * y.double()).float()
    return torch.where(x == 0, x, q)


def test_the_kernels_division_sequence_is_ieee_division():
    g = torch.Generator().manual_seed(0)
    n = 1 << 22
    s = torch.rand(n, generator=g).add_(1.0) * torch.pow(2.0, torch.randint(-40, 40, (n,), generator=g).float())
    x = (torch.rand(n, generator=g) * 2 - 1) * 448 * s  # |x| ≤ amax = 448 s, as in a row
    mant = torch.arange(1 << 12).float().div_(1 << 12).add_(1.0)  # mantissas near 1 and 2 against all of a grid
    edges = torch.cat([mant[:64], mant[-64:], 2.0 - torch.arange(64).float() * 2.0**-23,
                       1.0 + torch.arange(64).float() * 2.0**-23])
    xe, se = torch.meshgrid(edges * 3.5, edges, indexing="ij")
    x, s = torch.cat([x, xe.reshape(-1), -xe.reshape(-1), torch.tensor([0.0, -0.0])]), torch.cat(
        [s, se.reshape(-1), se.reshape(-1), torch.tensor([1.0, 1.0])])
    want = x / s
    got = _corrected_quotient(x, s)
    assert torch.equal(got, want) and torch.equal(got.signbit(), want.signbit())


def test_act_kernel_option_is_checked_carried_and_falls_back_off_cuda():
    with pytest.raises(ValueError, match="act_kernel"):
        InferenceConfig(act_kernel="cuda")
    layers = [Fp8W4A8Linear.from_quant_linear(_quant_linear(n_out=16), act_kernel="triton") for _ in range(3)]
    fused = concat_layers(layers)
    assert fused.act_kernel == "triton" and "act_kernel=triton" in repr(fused)
    layers[1].act_kernel = "torch"
    assert concat_layers(layers) is None  # one GEMM, one activation quantization: they must agree
    with pytest.raises(ValueError, match="act_kernel"):
        Fp8W4A8Linear.from_quant_linear(_quant_linear(), act_kernel="cuda")
    torch.manual_seed(0)
    layer = _quant_linear()
    x = torch.randn(3, 5, 64)
    with torch.no_grad():  # CPU inputs: the torch ops, whatever the option
        ys = [Fp8W4A8Linear.from_quant_linear(layer, act_kernel=k)(x) for k in ("torch", "triton")]
    assert torch.equal(ys[0], ys[1])


@needs_fp8_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu_kernel_equals_the_torch_quantization(dtype):
    from diffptq.kernels.fp8_quant_triton import fp8_quant_rows, quantize_rows

    for M, K in SHAPES + [(16384, 1152), (1000, 4608)]:
        x = _inputs(dtype, M, K, "cuda")
        s_ref = act_scale(x, "token")
        q, s = fp8_quant_rows(x)
        assert torch.equal(s, s_ref), (M, K)
        assert torch.equal(q.view(torch.uint8), quantize_e4m3(x, s_ref).view(torch.uint8)), (M, K)
        v, _ = quantize_rows(x, torch.float32)  # the quotient too, wherever it is a normal float
        ref = (x / s_ref).clamp(-448, 448)
        normal = ref.abs() >= torch.finfo(torch.float32).tiny
        assert torch.equal(v[normal], ref[normal]) and torch.equal(v.signbit(), ref.signbit()), (M, K)
    # every e4m3 value and every midpoint between neighbours (ties: to even), both signs; 448 first in each row
    # makes the scale exactly 1, so the kernel's cast sees these values as they are
    grid = torch.arange(256, dtype=torch.uint8).view(E4M3).float()
    grid = grid[grid.isfinite() & (grid >= 0)].unique()
    vals = torch.cat([grid, (grid[1:] + grid[:-1]) / 2])
    x = torch.cat([torch.tensor([448.0]), vals, -vals]).cuda().reshape(1, -1)
    q, s = fp8_quant_rows(x)
    assert float(s) == 1.0 and torch.equal(q.view(torch.uint8), x.to(E4M3).view(torch.uint8))


@needs_fp8_gpu
def test_gpu_triton_module_equals_torch_module_eager_and_compiled():
    torch.manual_seed(0)
    layer = _quant_linear(n_in=1152, n_out=4608)
    mods = {k: Fp8W4A8Linear.from_quant_linear(layer, act_kernel=k).cuda().to(torch.bfloat16) for k in ("torch",
                                                                                                        "triton")}
    x = torch.randn(2, 300, 1152, device="cuda", dtype=torch.bfloat16) * 3
    with torch.no_grad():
        y_triton = mods["triton"](x)
        assert torch.equal(mods["torch"](x), y_triton)
        # fullgraph: the custom op traces (no graph break); inductor runs the same kernel and GEMM
        assert torch.equal(torch.compile(mods["triton"], fullgraph=True)(x), y_triton)
