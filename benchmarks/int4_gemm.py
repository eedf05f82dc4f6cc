"""Int4 weight-only GEMMs on full-size layer shapes (GPU): which kernel the W4 memory path should call.

Per shape (tokens M × output N × input K, groups of `--group` input columns, random signed codes and fp16 scales as
the memory path stores them) and per row, the median time of one y = x Wᵀ in bf16 (triton.testing.do_bench, L2
flushed between runs) and its ratio to the bf16 GEMM of the same shape measured in the same process (>1: faster):

- `bf16`: F.linear with a bf16 weight (cuBLAS): the reference, what BF16 + compile runs;
- `dequant`: dequantize_int4_rows to a bf16 weight, then F.linear, eager (several kernels); `dequant compiled`: the
  same under torch.compile (one dequantization kernel, then cuBLAS: what the compiled memory path runs), and
  `dequant compiled, weight only`: that dequantization kernel alone (its `vs_bf16` compares it with the GEMM);
- `triton (default MxN)`: the fused kernel of diffptq.kernels.int4_gemm_triton with its default tiles (tile_config),
  and `triton MxN` for each other tile of `--tiles`;
- `tinygemm`: torch's int4 weight-only kernel (aten._weight_int4pack_mm, what torchao's int4 weight-only calls) on the
  same codes converted by diffptq.kernels.int4_tinygemm.

Every row's output is checked against F.linear(x, the dequantized weight) (the weight-only row against the weight):
`rel_err` (relative Frobenius error).
Default shapes: PixArt-XL-2's block layers (fused q/k/v 3456×1152, attention out and cross-attention q 1152×1152,
feed-forward 4608×1152 and 1152×4608) at 1024, 4096 and 16384 tokens (batch 1, 4 and 16 of 512 px images).

  python benchmarks/int4_gemm.py --out benchmarks/results/int4_gemm_pixart_shapes_h200.md
Writes --out (markdown: card, versions, commit, command, the table) and the CSV beside it.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from diffptq.cli import ArgumentParser, positive_int, run_main

sys.path.append(str(Path(__file__).resolve().parent))  # kernel_bench beside this file, however it is loaded
from kernel_bench import add_gemm_size_flags, int_list, run_jobs, sizes, timed_rows  # noqa: E402

COLUMNS = ("M", "N", "K", "row", "us", "vs_bf16", "rel_err")
WEIGHT_ONLY = "dequant compiled, weight only"  # the dequantization kernel alone: its output is the weight
EXPLANATION = ("Median µs of one y = x Wᵀ in bf16 (triton.testing.do_bench, L2 flushed); `vs_bf16`: the bf16 GEMM's "
               "time at the same shape over the row's (>1: faster), same process; `rel_err`: relative Frobenius error "
               "against F.linear with the dequantized weight in fp32. Rows: see benchmarks/int4_gemm.py.")


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_gemm_size_flags(p, "comma list of NxK weight shapes")
    p.add_argument("--group", type=positive_int, default=128, help="input columns per scale")
    p.add_argument("--tiles", type=lambda t: sizes(t, "--tiles", 2), default="64x64,128x64,64x128,128x128,128x256",
                   help="extra BLOCK_MxBLOCK_N tiles of the Triton kernel ('' for none)")
    p.add_argument("--out", default="results/int4_gemm.md", help="markdown file; the CSV goes beside it")
    args = p.parse_args(argv)
    args.tokens = int_list(p, args.tokens, "--tokens")
    for _, k in args.shapes:
        if k % args.group:
            p.error(f"argument --shapes: K = {k} is not a multiple of --group {args.group}")
    return args


def _dequant_only(packed, scale):
    import torch

    from diffptq.kernels.int4 import dequantize_int4_rows

    return dequantize_int4_rows(packed, scale, None, True, torch.bfloat16)


def _dequant_linear(x, packed, scale):
    import torch.nn.functional as F

    return F.linear(x, _dequant_only(packed, scale))


def measure_shape(M: int, N: int, K: int, group: int, tiles: list[tuple[int, int]]) -> list[dict]:
    """Every row at one shape (see the module docstring)."""
    import torch
    import torch.nn.functional as F

    from diffptq.kernels.int4 import dequantize_int4_rows, pack_int4_rows
    from diffptq.kernels.int4_gemm_triton import int4_linear_kernel, tile_config
    from diffptq.kernels.int4_tinygemm import (pack_for_cuda, tinygemm_codes, tinygemm_linear,
                                               tinygemm_scales_and_zeros, tinygemm_unsupported_reason)

    g = torch.Generator(device="cuda").manual_seed(0)
    codes = torch.randint(-8, 8, (N, K), generator=g, device="cuda", dtype=torch.int8)
    packed = pack_int4_rows(codes)
    scale = (torch.rand(N, K // group, generator=g, device="cuda") * 0.02 + 1e-3).half()
    x = torch.randn(M, K, generator=g, device="cuda", dtype=torch.bfloat16)
    w = dequantize_int4_rows(packed, scale, None, True, torch.bfloat16)
    ref = F.linear(x.float(), w.float())
    torch.compiler.reset()  # a fresh compilation per shape (dynamo's per-function cache would fill up otherwise)
    compiled_linear = torch.compile(_dequant_linear, dynamic=False)
    compiled_dequant = torch.compile(_dequant_only, dynamic=False)
    rows = {"bf16": lambda: F.linear(x, w),
            "dequant": lambda: _dequant_linear(x, packed, scale),
            "dequant compiled": lambda: compiled_linear(x, packed, scale),
            WEIGHT_ONLY: lambda: compiled_dequant(packed, scale)}
    default = tile_config(M, N)
    rows[f"triton (default {default['BLOCK_M']}x{default['BLOCK_N']})"] = \
        lambda: int4_linear_kernel(x, packed, scale, None, True, None)
    for bm, bn in tiles:
        if (bm, bn) != (default["BLOCK_M"], default["BLOCK_N"]):
            cfg = {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": 8 if bm * bn >= 128 * 128 else 4}
            rows[f"triton {bm}x{bn}"] = lambda cfg=cfg: int4_linear_kernel(x, packed, scale, None, True, None, cfg)
    reason = tinygemm_unsupported_reason(N, K, group)
    if reason is None:
        weight, sz = pack_for_cuda(tinygemm_codes(packed, True)), tinygemm_scales_and_zeros(scale, None, True)
        rows["tinygemm"] = lambda: tinygemm_linear(x, weight, group, sz)

    def check(name: str, y) -> dict:
        expected = w.float() if name == WEIGHT_ONLY else ref
        return {"rel_err": float((y.float() - expected).norm() / expected.norm())}

    out = timed_rows(rows, {"M": M, "N": N, "K": K}, "bf16", check, "vs_bf16")
    if reason is not None:
        out.append({"M": M, "N": N, "K": K, "row": "tinygemm", "note": reason})
    return out


def main(argv=None) -> None:
    args = parse_args(argv)
    jobs = [lambda M=M, s=s: measure_shape(M, *s, args.group, args.tiles) for M in args.tokens for s in args.shapes]
    run_jobs("benchmarks/int4_gemm.py", "Int4 weight-only GEMM kernels on full-size layer shapes", EXPLANATION,
             COLUMNS, args.out, jobs, argv)


if __name__ == "__main__":
    run_main(main)
