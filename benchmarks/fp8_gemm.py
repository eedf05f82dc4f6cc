"""FP8 GEMMs of the W4A8 speed path on full-size layer shapes (GPU): row-wise against tensor-wise scaling.

torch._scaled_mm takes row-wise scales (activations (M, 1), weights (1, N): what Fp8W4A8Linear passes, the weight's
per-channel scale folded into the GEMM) or one scale per operand (tensor-wise). The two may run different kernels
(cuBLASLt for tensor-wise; a CUTLASS or a newer cuBLASLt kernel for row-wise, depending on the build), so this
measures, per shape (tokens M × output N × input K, random e4m3 activations and int4 weight codes as e4m3), the median
time of one call replayed from a CUDA graph (no host cost per call; triton.testing.do_bench, L2 flushed), and its
ratio to the bf16 GEMM of the same shape in the same process (>1: faster):

- `bf16`: F.linear with the dequantized bf16 weight (cuBLAS): the reference;
- `fp8 row-wise`: _scaled_mm with per-token and per-channel scales (the GEMM of Fp8W4A8Linear);
- `fp8 tensor-wise`: _scaled_mm with one scale per operand (no per-channel weight scale: not the layer's output);
- `fp8 tensor-wise + channel scale`: the same, then the output times the per-channel scales (compiled: the extra
  pass over the output a tensor-wise layer would need when nothing after it takes the multiply);
- `quantize + fp8 row-wise (token)` / `(static)`: the activation quantization (per token / one static scale) and the
  row-wise GEMM, compiled together: what the model runs per layer;
- `quantize + fp8 tensor-wise + channel scale (static)`: static quantization, tensor-wise GEMM, channel scales.

Every output is checked against its fp32 reference (`rel_err`, relative Frobenius error).
Default shapes: PixArt-XL-2's block layers at 1024, 4096 and 16384 tokens (batch 1, 4, 16 of 512 px images).

  python benchmarks/fp8_gemm.py --out benchmarks/results/fp8_gemm_scaling_pixart_shapes_h200.md
Writes --out (markdown: card, versions, commit, command, the table) and the CSV beside it.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from diffptq.cli import ArgumentParser, run_main

sys.path.append(str(Path(__file__).resolve().parent))  # kernel_bench beside this file, however it is loaded
from kernel_bench import add_gemm_size_flags, graph_replay, int_list, run_jobs, timed_rows  # noqa: E402

COLUMNS = ("M", "N", "K", "row", "us", "vs_bf16", "rel_err")
NO_CHANNEL_SCALES = "fp8 tensor-wise"
EXPLANATION = ("Median µs of one call replayed from a CUDA graph (triton.testing.do_bench, L2 flushed); `vs_bf16`: "
               "the bf16 GEMM's time at the same shape over the row's (>1: faster), same process; `rel_err`: relative "
               "Frobenius error against the row's fp32 reference. Rows: see benchmarks/fp8_gemm.py.")


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_gemm_size_flags(p, "comma list of NxK weight shapes (both multiples of 16)")
    p.add_argument("--out", default="results/fp8_gemm.md", help="markdown file; the CSV goes beside it")
    args = p.parse_args(argv)
    args.tokens = int_list(p, args.tokens, "--tokens")
    for n, k in args.shapes:
        if n % 16 or k % 16:
            p.error(f"argument --shapes: {n}x{k}: torch._scaled_mm needs both dimensions divisible by 16")
    return args


def measure_shape(M: int, N: int, K: int) -> list[dict]:
    """Every row at one shape (see the module docstring)."""
    import torch
    import torch.nn.functional as F

    from diffptq.kernels.fp8 import E4M3, act_scale, quantize_e4m3

    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(M, K, generator=g, device="cuda", dtype=torch.bfloat16)
    w8 = torch.randint(-8, 8, (N, K), generator=g, device="cuda").to(torch.float16).to(E4M3)
    sw = (torch.rand(1, N, generator=g, device="cuda") * 0.02 + 1e-3).float()
    w = (w8.float() * sw.t()).to(torch.bfloat16)
    sa_row = act_scale(x, "token")
    sa_static = act_scale(x, "tensor")[:1].reshape(())  # one scale for the whole tensor, as a calibrated one
    one = torch.ones((), device="cuda")
    sa_static_rows = sa_static.reshape(1, 1).expand(M, 1).contiguous()  # the same scale as row-wise scales
    x8_row, x8_static = quantize_e4m3(x, sa_row), quantize_e4m3(x, sa_static)

    def row_mm(a8, sa):
        return torch._scaled_mm(a8, w8.t(), scale_a=sa, scale_b=sw, out_dtype=torch.bfloat16, use_fast_accum=True)

    def tensor_mm(a8):
        return torch._scaled_mm(a8, w8.t(), scale_a=sa_static, scale_b=one, out_dtype=torch.bfloat16,
                                use_fast_accum=True)

    torch.compiler.reset()  # a fresh compilation per shape
    scaled = torch.compile(lambda a8: tensor_mm(a8) * sw, dynamic=False)
    def quantize_token_mm(a):
        sa = act_scale(a, "token")
        return row_mm(quantize_e4m3(a, sa), sa)

    token = torch.compile(quantize_token_mm, dynamic=False)
    static_row = torch.compile(lambda a: row_mm(quantize_e4m3(a, sa_static), sa_static_rows), dynamic=False)
    static_tensor = torch.compile(lambda a: tensor_mm(quantize_e4m3(a, sa_static)) * sw, dynamic=False)
    calls = {"bf16": lambda: F.linear(x, w),
             "fp8 row-wise": lambda: row_mm(x8_row, sa_row),
             NO_CHANNEL_SCALES: lambda: tensor_mm(x8_static),
             "fp8 tensor-wise + channel scale": lambda: scaled(x8_static),
             "quantize + fp8 row-wise (token)": lambda: token(x),
             "quantize + fp8 row-wise (static)": lambda: static_row(x),
             "quantize + fp8 tensor-wise + channel scale (static)": lambda: static_tensor(x)}
    x_row, x_static = x8_row.float() * sa_row, x8_static.float() * sa_static
    refs = {"bf16": x.float() @ w.float().t(), NO_CHANNEL_SCALES: x_static @ w8.float().t()}
    refs["fp8 row-wise"] = refs["quantize + fp8 row-wise (token)"] = x_row @ (w8.float() * sw.t()).t()
    for name in calls:
        refs.setdefault(name, x_static @ (w8.float() * sw.t()).t())

    def check(name: str, y) -> dict:
        return {"rel_err": float((y.float() - refs[name]).norm() / refs[name].norm())}

    return timed_rows({name: graph_replay(fn) for name, fn in calls.items()}, {"M": M, "N": N, "K": K}, "bf16",
                      check, "vs_bf16")


def main(argv=None) -> None:
    args = parse_args(argv)
    jobs = [lambda M=M, s=s: measure_shape(M, *s) for M in args.tokens for s in args.shapes]
    run_jobs("benchmarks/fp8_gemm.py", "FP8 GEMMs: row-wise against tensor-wise scaling on full-size layer shapes",
             EXPLANATION, COLUMNS, args.out, jobs, argv)


if __name__ == "__main__":
    run_main(main)
