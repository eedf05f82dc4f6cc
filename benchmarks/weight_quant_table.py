"""Mean per-layer rel_out_err and final denoiser-output error of RTN / GPTQ / Qronos (fixed 1% and adaptive damping)
at W4A8 and W4A4 on the bundled models, all blocks, through the same path as quantize_qronos_4blocks.py.

  python benchmarks/weight_quant_table.py --models bundled-dit,bundled-unet --out benchmarks/results/weight_quant.md
"""
from __future__ import annotations

import argparse
import datetime as dt
import platform
import statistics
import time

import torch

from diffptq.algo.sequential import SequentialConfig
from diffptq.eval.report import markdown_table
from diffptq.models import load_pipeline
from diffptq.quant.quantizer import QuantSpec
from diffptq.run.quantize import CalibConfig, quantize_pipeline

VARIANTS = [("rtn", 0.01), ("gptq", 0.01), ("gptq", "adaptive"), ("qronos", 0.01), ("qronos", "adaptive")]
COLUMNS = ("model", "bits", "method", "damp", "mean_rel_out_err", "ffn_rel_out_err", "final_denoiser_err",
           "n_fallback", "time_s")


def run(model: str, abits: int, method: str, damp, calib: CalibConfig) -> dict:
    pipe = load_pipeline(model)
    cfg = SequentialConfig(method=method, weight=QuantSpec(4), act=QuantSpec(abits, symmetric=False), damp=damp)
    t0 = time.perf_counter()
    q = quantize_pipeline(pipe, cfg, calib, torch.device("cpu"), torch.float32, progress=False)
    ffn = [r.rel_out_err for r in q.result.layers if ".ff." in r.layer or ".proj_out" in r.layer]
    row = q.summary_row(cfg, "all")
    return {"model": model, "bits": f"w4a{abits}", "method": method, "damp": damp,
            "mean_rel_out_err": row["mean_rel_out_err"], "ffn_rel_out_err": statistics.mean(ffn) if ffn else None,
            "final_denoiser_err": row["final_denoiser_err"], "n_fallback": row["n_fallback"],
            "time_s": time.perf_counter() - t0}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="bundled-dit,bundled-unet")
    p.add_argument("--abits", default="8,4")
    p.add_argument("--n_calib", type=int, default=8)
    p.add_argument("--calib_steps", type=int, default=5)
    p.add_argument("--out", default="benchmarks/results/weight_quant_bundled_cpu.md")
    args = p.parse_args()
    torch.manual_seed(0)
    calib = CalibConfig(n_calib=args.n_calib, calib_steps=args.calib_steps, batch_size=args.n_calib)
    rows = []
    for model in args.models.split(","):
        for abits in (int(b) for b in args.abits.split(",")):
            for method, damp in VARIANTS:
                rows.append(run(model, abits, method, damp, calib))
                print(rows[-1], flush=True)
    head = (f"# Weight quantization on the bundled models (CPU)\n\n{dt.date.today()}, torch {torch.__version__}, "
            f"{platform.processor() or platform.machine()} CPU. All blocks; weights 4-bit symmetric per output "
            f"channel; activations static per-tensor asymmetric; {args.n_calib} calibration prompts × "
            f"{args.calib_steps} steps with CFG, every 5th record held out for the errors. `ffn_rel_out_err`: mean "
            "over the feed-forward layers (PixArt `ff.*`, UNet `ff.*` and `proj_out`). `final_denoiser_err`: "
            "‖ε̂ − ε‖/‖ε‖ of the whole quantized denoiser on held-out records, mean over steps.\n\n")
    with open(args.out, "w") as f:
        f.write(head + markdown_table(rows, COLUMNS))
    print(head + markdown_table(rows, COLUMNS))


if __name__ == "__main__":
    main()
