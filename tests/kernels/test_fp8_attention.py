"""FP8 attention (diffptq.kernels.fp8_attention): the reference against an independent computation and exact
attention, the Triton kernel under Triton's CPU interpreter (a subprocess) and on the GPU against the reference, the
interpreter's e4m3 rounding against torch's cast, and the processor's plumbing in a diffusers model."""
import math

import pytest
from interpreter import run_interpreted
import torch
import torch.nn.functional as F

from diffptq.kernels.fp8 import E4M3, fp8_support
from diffptq.kernels.fp8_attention import (
    BLOCK_N,
    fp8_attention,
    fp8_attention_reference,
    quantize_qkv,
    triton,
)
from diffptq.kernels.fp8_attention_processor import Fp8SelfAttnProcessor, use_fp8_attention

needs_fp8_gpu = pytest.mark.skipif(not (fp8_support()[0] and triton is not None),
                                   reason="needs a CUDA GPU with FP8 (sm_89+) and Triton")
needs_triton = pytest.mark.skipif(triton is None, reason="Triton is not installed")


def _qkv(B, H, Lq, Lk, D, sharp=1.0, seed=0, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, L, D, generator=g) for L in (Lq, Lk, Lk))
    return (q * sharp).to(device, dtype), (k * sharp).to(device, dtype), v.to(device, dtype)


def test_one_key_block_equals_quantized_softmax_written_out():
    """With at most BLOCK_N keys there is one block: out = (p @ v8) / Σp · s_v with p = e4m3(448 · 2^(t − max t))."""
    q, k, v = _qkv(2, 3, 37, BLOCK_N - 5, 24, sharp=2.0)
    q8, k8, v8, s_q, s_k, s_v = quantize_qkv(q, k, v)
    logits = (q8.double() @ k8.double().transpose(-1, -2)) * s_q.double()[..., None] * s_k.double()[..., None, :]
    t = logits * math.log2(math.e) / math.sqrt(q.shape[-1])
    p = (torch.exp2(t - t.amax(-1, keepdim=True)) * 448).float().to(E4M3).double()
    expect = (p @ v8.double()) / p.sum(-1, keepdim=True) * s_v.double()[..., None, :]
    torch.testing.assert_close(fp8_attention_reference(q, k, v).double(), expect, rtol=1e-5, atol=1e-6)


def test_codes_and_scales_restore_the_inputs_within_e4m3_precision():
    q, k, v = _qkv(1, 2, 50, 70, 40, sharp=3.0)
    q8, k8, v8, s_q, s_k, s_v = quantize_qkv(q, k, v)
    assert s_q.shape == (1, 2, 50) and s_k.shape == (1, 2, 70) and s_v.shape == (1, 2, 40)
    for x, x8, back in ((q, q8, q8.float() * s_q[..., None]), (k, k8, k8.float() * s_k[..., None]),
                        (v, v8, v8.float() * s_v[..., None, :])):
        assert x8.dtype == E4M3 and x8.float().abs().max() == 448  # each token / channel reaches the top code
        normal = x.abs() > 2 ** -6 * x.abs().amax()
        assert ((back - x).abs() <= 2 ** -4 * x.abs() + 1e-7)[normal].all()


@pytest.mark.parametrize("shape", [(2, 3, 130, 100, 72), (1, 2, 64, 64, 32), (1, 1, 33, 1000, 40)])
def test_close_to_exact_attention(shape):
    """e4m3 carries 3 mantissa bits: on unit-variance inputs the output is within 8 % (relative norm) of exact
    attention, against 0.4 % for bf16 inputs: FP8 attention is an approximation whose image cost is measured."""
    q, k, v = _qkv(*shape)
    exact = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    err = (fp8_attention_reference(q, k, v).double() - exact).norm() / exact.norm()
    bf16 = F.scaled_dot_product_attention(q.bfloat16(), k.bfloat16(), v.bfloat16()).double()
    assert err < 0.08 and err > 5 * (bf16 - exact).norm() / exact.norm()


def test_output_dtype_and_shape_errors():
    q, k, v = _qkv(1, 2, 10, 20, 16, dtype=torch.bfloat16)
    assert fp8_attention(q, k, v).dtype == torch.bfloat16 and fp8_attention(q, k, v).shape == q.shape
    with pytest.raises(ValueError, match="one shape"):
        fp8_attention_reference(q, k, v[..., :8])
    with pytest.raises(ValueError, match=r"\(B, H, L, D\)"):
        fp8_attention_reference(q[0], k[0], v[0])
    with pytest.raises(ValueError, match="backend"):
        fp8_attention(q, k, v, backend="fast")


@needs_triton
def test_interpreter_kernel_matches_the_reference_and_rounds_like_torch():
    code = """
        import torch
        import triton, triton.language as tl
        from diffptq.kernels.fp8_attention import _round_e4m3, run_kernel, fp8_attention_reference
        from test_fp8_attention import _qkv

        @triton.jit
        def round_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
            i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
            tl.store(y_ptr + i, _round_e4m3(tl.load(x_ptr + i, mask=i < n)), mask=i < n)

        codes = torch.arange(0, 127, dtype=torch.uint8).view(torch.float8_e4m3fn).float()  # 0 .. 448
        mids = (codes[:-1] + codes[1:]) / 2  # ties: to even
        x = torch.cat([codes, mids, torch.rand(20000) * 448, torch.rand(5000) * 0.02, torch.rand(2000) * 1e-3])
        y = torch.empty_like(x)
        round_kernel[(triton.cdiv(x.numel(), 1024),)](x, y, x.numel(), BLOCK=1024)
        assert torch.equal(y, x.to(torch.float8_e4m3fn).float())
        for shape, sharp in (((2, 3, 130, 100, 72), 1.0), ((1, 2, 64, 200, 32), 3.0), ((1, 1, 5, 7, 40), 1.0)):
            q, k, v = _qkv(*shape, sharp=sharp)
            out, ref = run_kernel(q, k, v), fp8_attention_reference(q, k, v)
            assert torch.allclose(out, ref, rtol=1e-4, atol=1e-5), (shape, (out - ref).abs().max())
        print("ok")
    """
    run_interpreted(code)


@needs_fp8_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(2, 16, 1024, 1024, 72), (2, 8, 4096, 4096, 40), (1, 8, 300, 77, 160)])
def test_gpu_kernel_matches_the_reference(shape, dtype):
    """On the GPU: the kernel's fp8 products and its exp2 differ from the reference's fp32 ones by float rounding,
    which can move a probability to the next e4m3 code; the outputs agree far inside e4m3's precision."""
    q, k, v = _qkv(*shape, dtype=dtype, device="cuda")
    out = fp8_attention(q, k, v, backend="kernel").float()
    ref = fp8_attention_reference(q, k, v).float()
    assert (out - ref).norm() / ref.norm() < 5e-3
    # compiled, the quantization of q, k, v is inductor's (its division may round differently at a code boundary)
    compiled = torch.compile(lambda a, b, c: fp8_attention(a, b, c, backend="kernel"))
    assert (compiled(q, k, v).float() - ref).norm() / ref.norm() < 5e-3


def test_kernel_op_has_a_fake_implementation_for_tracing():
    """torch.compile traces the quantization and sees the kernel as the op diffptq::fp8_attention_codes: its fake
    implementation gives the output's shape and dtype without running anything."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from diffptq.kernels.fp8_attention import fp8_attention_codes

    with FakeTensorMode():
        q8 = torch.empty(2, 3, 130, 72, dtype=torch.float8_e4m3fn)
        k8 = torch.empty(2, 3, 100, 72, dtype=torch.float8_e4m3fn)
        vt8 = torch.empty(2, 3, 72, 100, dtype=torch.float8_e4m3fn)
        out = fp8_attention_codes(q8, k8, vt8, torch.empty(2, 3, 130), torch.empty(2, 3, 100), torch.empty(2, 3, 72),
                                   torch.bfloat16, 64, 4, 3)
    assert out.shape == (2, 3, 130, 72) and out.dtype == torch.bfloat16


def _self_attention_model():
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(0)
    return Attention(query_dim=48, heads=3, dim_head=16).eval()


def test_processor_with_exact_attention_reproduces_diffusers():
    """The processor's plumbing (projections, heads, output projection) with exact attention plugged in is diffusers'
    own processor bit for bit, separate and fused projections alike; with FP8 attention it is close, not equal."""
    attn = _self_attention_model()
    x = torch.randn(2, 20, 48)
    with torch.no_grad():
        stock = attn(x)
        attn.set_processor(Fp8SelfAttnProcessor(attention_fn=F.scaled_dot_product_attention))
        assert torch.equal(attn(x), stock)
        attn.fuse_projections()
        assert torch.equal(attn(x), stock)
        attn.set_processor(Fp8SelfAttnProcessor("reference"))
        fp8 = attn(x)
    assert not torch.equal(fp8, stock) and (fp8 - stock).norm() / stock.norm() < 0.1


def test_use_fp8_attention_switches_self_attention_only():
    from diffptq.models import family_of, load_pipeline

    pipe = load_pipeline("tiny-dit")
    den = family_of(pipe).denoiser(pipe)
    attns = [m for m in den.modules() if type(m).__name__ == "Attention"]
    assert use_fp8_attention(den, "reference") == sum(not a.is_cross_attention for a in attns) > 0
    for a in attns:
        assert isinstance(a.processor, Fp8SelfAttnProcessor) != a.is_cross_attention


def test_inference_config_switches_fp8_attention_and_checks_its_options(tiny):
    from diffptq.kernels import InferenceConfig, convert_for_inference

    _, _, den, inputs = tiny("tiny-dit")
    with torch.no_grad():
        before = den(**inputs).sample
        conv = convert_for_inference(den, "w4a8", config=InferenceConfig(force=True, fp8_attention=True))
        after = den(**inputs).sample
    attns = [m for m in den.modules() if type(m).__name__ == "Attention"]
    assert conv.fp8_attention == sum(isinstance(m.processor, Fp8SelfAttnProcessor) for m in attns) > 0
    assert (after - before).norm() / before.norm() < 0.2
    with pytest.raises(ValueError, match="InferenceConfig.fp8_attention must be True or False"):
        InferenceConfig(fp8_attention="yes")
    with pytest.raises(ValueError, match="InferenceConfig.int4_matmul must be one of"):
        InferenceConfig(int4_matmul="cutlass")
