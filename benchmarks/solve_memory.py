"""Peak memory of one GPTQ / Qronos solve, in units of one (in, in) float32 matrix, on the CPU or a CUDA device.

The largest layers of the SD 1.5 UNet (a 3×3 conv over 2560 channels: in = 23040) make the per-layer solve, not the
activations, set the calibration's VRAM peak: each (in, in) float32 matrix is 2.1 GB. This script runs one solve
per fresh process and reads the process's peak resident memory (ru_maxrss) before and after it, with H and G (and
W) already allocated, so the difference is what the solve itself adds. `--device cuda` reads the device's peak
allocated memory instead (torch.cuda.max_memory_allocated over the allocation before the solve): there the linear
algebra kernels (cuSOLVER) add work copies of their own, so the counts differ from the CPU's.

`--consume` passes ownership of H and G to the solver (what the sequential driver does for the last layer that
reads them); run the script from another checkout (PYTHONPATH) to compare with an older solver.

  python benchmarks/solve_memory.py --dim 6144 --out 512 --methods gptq,qronos --consume
  python benchmarks/solve_memory.py --dim 23040 --out 1280 --consume --device cuda   # SD's widest conv
"""
from __future__ import annotations

import argparse
import inspect
import json
import resource
import subprocess
import sys

MiB = 2**20


def _one(method: str, dim: int, out: int, consume: bool, device: str) -> dict:
    import time

    import torch

    from diffptq.algo import gptq_quantize_ex, qronos_quantize_ex
    from diffptq.quant.quantizer import QuantSpec

    torch.set_num_threads(2)
    g = torch.Generator().manual_seed(0)
    spec = QuantSpec(4)
    cuda = device.startswith("cuda")
    gptq_quantize_ex(torch.randn(8, 16, device=device), torch.eye(16, device=device), spec)  # load the kernels first
    x = torch.randn(dim + 64, dim, generator=g).to(device)
    H = x.T @ x / x.shape[0]
    G = (H + 0.01 * torch.randn(dim, dim, generator=g).to(device)) if method == "qronos" else None
    W = torch.randn(out, dim, generator=g).to(device)
    del x
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # bytes (Linux reports KiB)
    fn = gptq_quantize_ex if method == "gptq" else qronos_quantize_ex
    kw = {"consume": True} if consume and "consume" in inspect.signature(fn).parameters else {}
    args = (W, H, spec) if method == "gptq" else (W, H, G, spec)
    t0 = time.perf_counter()
    fn(*args, **kw)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    after = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    matrix = dim * dim * 4
    return {"method": method, "dim": dim, "out": out, "consume": bool(kw), "device": device,
            "gpu": torch.cuda.get_device_name() if cuda else None, "torch": torch.__version__,
            "matrix_mib": matrix / MiB, "extra_peak_mib": (after - before) / MiB,
            "extra_peak_matrices": (after - before) / matrix, "seconds": seconds}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dim", type=int, default=6144, help="input width `in` of the layer")
    p.add_argument("--out", type=int, default=512, help="output channels")
    p.add_argument("--methods", default="gptq,qronos")
    p.add_argument("--consume", action="store_true", help="hand H and G to the solver (when it supports it)")
    p.add_argument("--device", default="cpu", help="cpu (peak resident memory) or cuda (peak allocated memory)")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: run one solve in this process
    args = p.parse_args()
    if args.one:
        print(json.dumps(_one(args.one, args.dim, args.out, args.consume, args.device)))
        return
    for method in args.methods.split(","):
        cmd = [sys.executable, __file__, "--one", method, "--dim", str(args.dim), "--out", str(args.out),
               "--device", args.device]
        res = subprocess.run(cmd + (["--consume"] if args.consume else []), capture_output=True, text=True,
                             check=True)
        print(res.stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
