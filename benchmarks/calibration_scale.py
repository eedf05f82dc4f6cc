"""Calibration at full scale: RTN / GPTQ / Qronos W4A8 on full-size random-weight PixArt-XL-2 or the SD 1.5 UNet.

Runs the same sequential driver as the scripts over `--n_prompts` prompts × `--steps` calibration steps with CFG
(random text embeddings of the real shape), and reports wall time split into phases (collect, per-block forward,
H/G accumulation, solve), peak VRAM, peak host memory, the FP16 inference peak of the same batch, and the
cumulative peak VRAM after 4, 8, 16, ... blocks. One JSON per method goes to --out (merge with --report).

  python benchmarks/calibration_scale.py --family pixart --methods rtn,gptq,qronos --out results/calib_scale
  python benchmarks/calibration_scale.py --report results/calib_scale --markdown benchmarks/results/x.md
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import time
from pathlib import Path

import torch

from diffptq.algo.sequential import SequentialConfig, quantize_sequential
from diffptq.cli import damp_value
from diffptq.data.calib import collect_calibration
from diffptq.models.families import family_of
from diffptq.models.fullsize import full_size_pipeline, random_text_embeddings
from diffptq.quant.quantizer import QuantSpec
from diffptq.run.quantize import peak_host_bytes

GiB = 2**30


def _gib(nbytes: int | None) -> float | None:
    return nbytes / GiB if nbytes is not None else None


def inference_peak(pipe, calib, device) -> float | None:
    """Peak VRAM (GiB) of one FP16 denoiser forward at the calibration batch, model weights included."""
    if device.type != "cuda":
        return None
    den = family_of(pipe).denoiser(pipe)
    inputs = next(calib.batches(device))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        den(**inputs, return_dict=False)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / GiB


def run_method(args, method: str) -> dict:
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    pipe = full_size_pipeline(args.family, dtype, args.device, seed=0, num_layers=args.num_layers)
    emb = random_text_embeddings(args.family, args.n_prompts, dtype, args.device)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    t0 = time.perf_counter()
    calib = collect_calibration(pipe, None, args.steps, batch_size=args.batch, prompt_embeds=emb, progress=False)
    sync()
    collect_s = time.perf_counter() - t0
    fp_peak = inference_peak(pipe, calib, device)
    fam = family_of(pipe)
    cfg = SequentialConfig(method=method, weight=QuantSpec(4), act=QuantSpec(8, symmetric=False),
                           damp=args.damp, holdout_every=args.holdout_every)
    t0 = time.perf_counter()
    res = quantize_sequential(fam.denoiser(pipe), fam, calib, cfg, device, dtype, progress=True)
    total = time.perf_counter() - t0
    n_blocks = len(fam.blocks(fam.denoiser(pipe)))
    marks = [m for m in (4, 8, 16, 28, n_blocks) if m <= n_blocks] if cuda else []
    return {
        "family": args.family, "method": method, "n_prompts": args.n_prompts, "steps": args.steps,
        "batch": args.batch * 2, "records": len(calib), "collect_s": collect_s, "quantize_s": total,
        "phases": res.timings, "peak_vram_gib": _gib(res.peak_vram_bytes), "fp16_inference_peak_gib": fp_peak,
        "peak_vram_after_blocks_gib": {m: res.block_peak_vram[m - 1] / GiB for m in sorted(set(marks))},
        "peak_host_gib": peak_host_bytes() / GiB, "n_layers": len(res.layers),
        "mean_rel_out_err": sum(r.rel_out_err for r in res.layers) / len(res.layers),
        "n_fallback": sum(r.fell_back for r in res.layers),
        "gpu": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
        "date": dt.date.today().isoformat(),
    }


def report(folder: Path) -> str:
    rows = [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]
    if not rows:
        raise SystemExit(f"no results in {folder}")
    r0 = rows[0]
    lines = [f"# Calibration at full scale: {r0['family']}",
             "", f"Card: {r0['gpu']}; torch {r0['torch']}; {r0['date']}. Full-size architecture, random weights, "
             f"W4A8 (weights symmetric per channel, activations static per tensor), {r0['n_prompts']} prompts × "
             f"{r0['steps']} steps with CFG (denoiser batch {r0['batch']}, {r0['records']} records; every 5th "
             "held out for rel_out_err), all blocks. Times in seconds.", "",
             "| method | collect | forward | accumulate H/G | solve | quantize total | peak VRAM GiB | FP16 inference "
             "peak GiB | peak host GiB | mean rel_out_err |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        p = r["phases"]
        lines.append(f"| {r['method']} | {r['collect_s']:.1f} | {p.get('forward', 0):.1f} | "
                     f"{p.get('accumulate', 0):.1f} | {p.get('solve', 0):.1f} | {r['quantize_s']:.1f} | "
                     f"{r['peak_vram_gib']:.2f} | {r['fp16_inference_peak_gib']:.2f} | {r['peak_host_gib']:.1f} | "
                     f"{r['mean_rel_out_err']:.4f} |")
    lines += ["", "Peak VRAM (GiB, cumulative) after quantizing the first N blocks:", "",
              "| method | " + " | ".join(f"N={m}" for m in r0["peak_vram_after_blocks_gib"]) + " |",
              "| --- |" + " --- |" * len(r0["peak_vram_after_blocks_gib"])]
    for r in rows:
        lines.append(f"| {r['method']} | " + " | ".join(f"{v:.2f}" for v in r["peak_vram_after_blocks_gib"].values())
                     + " |")
    by = {r["method"]: r["quantize_s"] for r in rows}
    if "gptq" in by and "qronos" in by:
        lines += ["", f"GPTQ / Qronos time ratio: {by['gptq'] / by['qronos']:.2f} (goal ≤ 0.7)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", default="pixart", choices=["pixart", "sd"])
    p.add_argument("--methods", default="rtn,gptq,qronos")
    p.add_argument("--n_prompts", type=int, default=64)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch", type=int, default=8, help="prompts per denoiser call (×2 with CFG)")
    p.add_argument("--damp", type=damp_value, default=0.01)
    p.add_argument("--holdout_every", type=int, default=5)
    p.add_argument("--dtype", default="fp16", choices=["fp16", "bf16", "fp32"])
    p.add_argument("--device", default="cuda")
    p.add_argument("--num_layers", type=int, default=None, help="fewer PixArt blocks (smoke tests)")
    p.add_argument("--out", default="results/calibration_scale")
    p.add_argument("--report", default=None, help="merge the JSON files of this folder into markdown and exit")
    p.add_argument("--markdown", default=None)
    args = p.parse_args()
    if args.report:
        text = report(Path(args.report))
        if args.markdown:
            Path(args.markdown).write_text(text)
        print(text)
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for method in args.methods.split(","):
        result = run_method(args, method)
        (out / f"{args.family}_{method}.json").write_text(json.dumps(result, indent=2))
        print(json.dumps(result), flush=True)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
