"""Peak memory of one GPTQ / Qronos solve, in units of one (in, in) float32 matrix, measured on the CPU.

The largest layers of the SD 1.5 UNet (a 3×3 conv over 2560 channels: in = 23040) make the per-layer solve, not the
activations, set the calibration's VRAM peak: each (in, in) float32 matrix is 2.1 GB. This script runs one solve
per fresh process and reads the process's peak resident memory (ru_maxrss) before and after it, with H and G (and
W) already allocated, so the difference is what the solve itself adds. The same algorithm on the GPU allocates the
same matrices (the caching allocator aside), so the count carries over.

`--consume` passes ownership of H and G to the solver (what the sequential driver does for the last layer that
reads them); run the script from another checkout (PYTHONPATH) to compare with an older solver.

  python benchmarks/solve_memory.py --dim 6144 --out 512 --methods gptq,qronos --consume
"""
from __future__ import annotations

import argparse
import inspect
import json
import resource
import subprocess
import sys

MiB = 2**20


def _one(method: str, dim: int, out: int, consume: bool) -> dict:
    import torch

    from diffptq.algo import gptq_quantize_ex, qronos_quantize_ex
    from diffptq.quant.quantizer import QuantSpec

    torch.set_num_threads(2)
    g = torch.Generator().manual_seed(0)
    spec = QuantSpec(4)
    gptq_quantize_ex(torch.randn(8, 16), torch.eye(16), spec)  # load the BLAS / LAPACK code paths first
    x = torch.randn(dim + 64, dim, generator=g)
    H = x.T @ x / x.shape[0]
    G = (H + 0.01 * torch.randn(dim, dim, generator=g)) if method == "qronos" else None
    W = torch.randn(out, dim, generator=g)
    del x
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # bytes (Linux reports KiB)
    fn = gptq_quantize_ex if method == "gptq" else qronos_quantize_ex
    kw = {"consume": True} if consume and "consume" in inspect.signature(fn).parameters else {}
    args = (W, H, spec) if method == "gptq" else (W, H, G, spec)
    fn(*args, **kw)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    matrix = dim * dim * 4
    return {"method": method, "dim": dim, "out": out, "consume": bool(kw), "matrix_mib": matrix / MiB,
            "extra_peak_mib": (after - before) / MiB, "extra_peak_matrices": (after - before) / matrix}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dim", type=int, default=6144, help="input width `in` of the layer")
    p.add_argument("--out", type=int, default=512, help="output channels")
    p.add_argument("--methods", default="gptq,qronos")
    p.add_argument("--consume", action="store_true", help="hand H and G to the solver (when it supports it)")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: run one solve in this process
    args = p.parse_args()
    if args.one:
        print(json.dumps(_one(args.one, args.dim, args.out, args.consume)))
        return
    for method in args.methods.split(","):
        cmd = [sys.executable, __file__, "--one", method, "--dim", str(args.dim), "--out", str(args.out)]
        res = subprocess.run(cmd + (["--consume"] if args.consume else []), capture_output=True, text=True,
                             check=True)
        print(res.stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
