"""FP8 self-attention against torch's bf16 attention on full-size shapes (GPU): where the FP8 path's time goes.

Per shape (batch × heads × tokens × head size; the batch counts CFG's two halves) and per row, the median time of one
attention (triton.testing.do_bench) and its ratio to torch's scaled_dot_product_attention in bf16 of the same shape,
measured in the same process (>1: faster):

- `sdpa bf16`: F.scaled_dot_product_attention (flash / cuDNN), what the bf16 and W4A8 rows of inference_speed.py run;
- `fp8 eager`: diffptq.kernels.fp8_attention.run_kernel as is: the Q/K/V quantization as eager torch ops, then the
  kernel; `fp8 compiled`: the same under torch.compile (the quantization fused by inductor), what a compiled model
  runs; `fp8 quantize only (compiled)`: that quantization alone;
- `kernel MxWxS`: the kernel alone on precomputed codes, with BLOCK_M = M queries per program, W warps and S
  pipeline stages (the default first).

Each row's output is checked against fp8_attention_reference (`rel_err`, relative Frobenius error; the sdpa row's
is the FP8 numerics' own error against exact attention). Default shapes: PixArt-XL-2 at 512 px (16 heads of 72,
1024 tokens) and SD 1.5's four self-attention sizes (8 heads; 4096 × 40, 1024 × 80, 256 × 160, 64 × 160), batch 2 and
8 (one and four images with CFG).

  python benchmarks/fp8_attention_speed.py --out benchmarks/results/fp8_attention_speed_pixart_sd_h200.md
Writes --out (markdown: card, versions, commit, command, the table) and the CSV beside it.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from diffptq.cli import ArgumentParser, run_main

sys.path.append(str(Path(__file__).resolve().parent))  # kernel_bench beside this file, however it is loaded
from kernel_bench import int_list, run_jobs, sizes, timed_rows  # noqa: E402

SHAPES = "16x1024x72,8x4096x40,8x1024x80,8x256x160,8x64x160"  # heads x tokens x head size
TILES = "64x4x3,128x8x3,128x4x3,64x4x2,128x8x2"  # BLOCK_M x warps x stages
COLUMNS = ("B", "H", "L", "D", "row", "us", "vs_sdpa", "rel_err")
EXPLANATION = ("Median µs of one attention (triton.testing.do_bench); `vs_sdpa`: torch's bf16 attention's time at the "
               "same shape over the row's (>1: faster), same process; `rel_err`: relative Frobenius error against the "
               "FP8 numerics' reference. Rows: see benchmarks/fp8_attention_speed.py.")


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", default="2,8", help="comma list of attention batches (CFG's two halves counted)")
    p.add_argument("--shapes", type=lambda t: sizes(t, "--shapes", 3), default=SHAPES,
                   help="comma list of HEADSxTOKENSxHEADSIZE")
    p.add_argument("--tiles", type=lambda t: sizes(t, "--tiles", 3), default=TILES,
                   help="kernel launches to time: BLOCK_MxWARPSxSTAGES ('' for the default only)")
    p.add_argument("--out", default="results/fp8_attention_speed.md", help="markdown file; the CSV goes beside it")
    args = p.parse_args(argv)
    args.batches = int_list(p, args.batches, "--batches")
    for block_m, _, _ in args.tiles:
        if block_m < 16 or block_m & (block_m - 1):
            p.error(f"argument --tiles: BLOCK_M {block_m} is not a power of two ≥ 16")
    return args


def measure_shape(B: int, H: int, L: int, D: int, tiles: list[tuple[int, int, int]]) -> list[dict]:
    """Every row at one shape (see the module docstring)."""
    import torch
    import torch.nn.functional as F

    from diffptq.kernels import fp8_attention as fa

    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(B, H, L, D, generator=g, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    ref = fa.fp8_attention_reference(q, k, v).float()
    q8, k8, v8, s_q, s_k, s_v = fa.quantize_qkv(q, k, v)
    vt8 = v8.transpose(-1, -2).contiguous()
    torch.compiler.reset()
    compiled = torch.compile(fa.run_kernel, dynamic=False)
    quantize = torch.compile(fa.quantize_qkv, dynamic=False)
    rows = {"sdpa bf16": lambda: F.scaled_dot_product_attention(q, k, v),
            "fp8 eager": lambda: fa.run_kernel(q, k, v),
            "fp8 compiled": lambda: compiled(q, k, v),
            "fp8 quantize only (compiled)": lambda: quantize(q, k, v)}
    default = fa.KERNEL_TILES
    launches = [(default["block_m"], default["num_warps"], default["num_stages"])]
    launches += [t for t in tiles if t not in launches]
    for block_m, warps, stages in launches:
        rows[f"kernel {block_m}x{warps}x{stages}"] = lambda m=block_m, w=warps, s=stages: fa.fp8_attention_codes(
            q8, k8, vt8, s_q, s_k, s_v, torch.bfloat16, m, w, s)

    def check(name: str, y) -> dict:
        if name.startswith("fp8 quantize"):
            return {}
        return {"rel_err": float((y.float() - ref).norm() / ref.norm())}

    return timed_rows(rows, {"B": B, "H": H, "L": L, "D": D}, "sdpa bf16", check, "vs_sdpa")


def _fp8_missing() -> str | None:
    import torch

    from diffptq.kernels.fp8 import fp8_support

    ok, why = fp8_support(torch.device("cuda"))
    return None if ok else f"FP8 tensor cores: {why}"


def main(argv=None) -> None:
    args = parse_args(argv)
    jobs = [lambda B=B, s=s: measure_shape(B, *s, args.tiles) for B in args.batches for s in args.shapes]
    run_jobs("benchmarks/fp8_attention_speed.py", "FP8 self-attention against bf16 attention on full-size shapes",
             EXPLANATION, COLUMNS, args.out, jobs, argv, _fp8_missing)


if __name__ == "__main__":
    run_main(main)
