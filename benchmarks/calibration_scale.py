"""Calibration at full scale: RTN / GPTQ / Qronos W4A8 on full-size random-weight PixArt-XL-2 or the SD 1.5 UNet.

Runs the same sequential driver as the scripts over `--n_prompts` prompts × `--steps` calibration steps with CFG
(random text embeddings of the real shape), and reports wall time split into phases (collect, forward, H/G
accumulation, solve), seconds and passes per block, peak VRAM (cumulative after each block: flat in the number of
blocks?) and VRAM allocated after each block, peak host memory, and the FP16 inference peak of the same batch.
--drop_float_weights --offload_done keep only the blocks still to come on the GPU (finished ones wait on --storage
and come back at the end; the peak of that move back is recorded too); --offload_pending also keeps those still to
come on --storage until their turn, so the GPU holds one block's weights at a time. One JSON per method goes to --out,
rewritten after every block ("partial": true until the method ends), so a run stopped by --max_seconds or killed
still leaves numbers; merge them into markdown with --report. --granularity unit (default) quantizes the UNet's
ResNets / transformer blocks / resamplers one after the other; block re-runs whole blocks per wave (for comparison).

  python benchmarks/calibration_scale.py --family pixart --methods rtn,gptq,qronos --out results/calib_scale
  # VRAM flat in the number of blocks: finished blocks wait in host memory until the end
  python benchmarks/calibration_scale.py --family pixart --methods qronos --dtype bf16 --drop_float_weights \\
      --offload_done --out results/calib_scale_offload
  python benchmarks/calibration_scale.py --report results/calib_scale \\
      --markdown benchmarks/results/calibration_scale_<model>_<card>.md     (naming: benchmarks/README.md)
  # CPU profile on a mid-size PixArt (the full-size config with fewer, narrower blocks and fewer tokens):
  python benchmarks/calibration_scale.py --device cpu --dtype fp32 --num_layers 2 --heads 4 --head_dim 32 \\
      --sample_size 32 --n_prompts 4 --steps 5 --batch 2
"""
from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from diffptq.algo.driver import SequentialConfig, SequentialQuantizer
from diffptq.cli import damp_value
from diffptq.config import Damping
from diffptq.data.calib import collect_calibration
from diffptq.models.families import family_of
from diffptq.models.fullsize import PIXART_512, full_size_pipeline, random_text_embeddings
from diffptq.quant.quantizer import QuantSpec
from diffptq.run.quantize import parse_blocks, peak_host_bytes

GiB = 2**30
START = time.perf_counter()


def _gib(nbytes: int | None) -> float | None:
    return nbytes / GiB if nbytes is not None else None


def build_pipeline(args, dtype: torch.dtype):
    """The full-size pipeline, or with --heads/--head_dim/--sample_size a mid-size PixArt built the same way."""
    if args.heads is None and args.head_dim is None and args.sample_size is None:
        return full_size_pipeline(args.family, dtype, args.device, seed=0, num_layers=args.num_layers)
    if args.family != "pixart":
        raise SystemExit("--heads/--head_dim/--sample_size shrink PixArt only")
    from diffusers import DPMSolverMultistepScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel

    from diffptq.models.build import VAESpec, build_vae

    heads, head_dim = args.heads or PIXART_512["num_attention_heads"], args.head_dim or PIXART_512["attention_head_dim"]
    cfg = {**PIXART_512, "num_attention_heads": heads, "attention_head_dim": head_dim,
           "cross_attention_dim": heads * head_dim, "sample_size": args.sample_size or PIXART_512["sample_size"],
           **({"num_layers": args.num_layers} if args.num_layers else {})}
    torch.manual_seed(0)
    with torch.device(args.device):
        vae = build_vae(VAESpec(channels=(8, 8, 8, 8), norm_groups=4))
        pipe = PixArtAlphaPipeline(tokenizer=None, text_encoder=None, vae=vae,
                                   transformer=PixArtTransformer2DModel(**cfg),
                                   scheduler=DPMSolverMultistepScheduler()).to(dtype=dtype)
    pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def inference_peak(pipe, calib, device) -> float | None:
    """Peak VRAM (GiB) of one denoiser forward at the calibration batch, model weights included."""
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


def sweep_check(device: torch.device) -> dict:
    """The GPTQ column sweep on PixArt's layer shapes with each backend: seconds and share of codes that agree."""
    from diffptq.algo import gptq_quantize_ex

    out, before = {}, os.environ.get("DIFFPTQ_SWEEP")
    for rows, cols in ((1152, 1152), (4608, 1152), (1152, 4608)):
        g = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(4 * cols, cols, device=device, generator=g)
        H, W = x.T @ x / x.shape[0], torch.randn(rows, cols, device=device, generator=g)
        res = {}
        for backend in ("eager", "triton"):
            os.environ["DIFFPTQ_SWEEP"] = backend
            try:
                gptq_quantize_ex(W, H, QuantSpec(4))  # warm-up / compile
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                res[backend] = gptq_quantize_ex(W, H, QuantSpec(4))
                torch.cuda.synchronize()
                out[f"{rows}x{cols}_{backend}_s"] = time.perf_counter() - t0
            except Exception as e:  # noqa: BLE001 - report, do not stop the benchmark
                out[f"{rows}x{cols}_{backend}_error"] = f"{type(e).__name__}: {e}"
        if len(res) == 2:
            out[f"{rows}x{cols}_codes_agree"] = float((res["eager"].codes == res["triton"].codes).float().mean())
    if before is None:
        os.environ.pop("DIFFPTQ_SWEEP", None)
    else:
        os.environ["DIFFPTQ_SWEEP"] = before
    return out


def summary(args, method: str, meta: dict, sq: SequentialQuantizer, total_s: float, partial: bool) -> dict:
    """The JSON record of one method (so far, when `partial`)."""
    timings = dict(sq.timer.totals)
    timings["forward"] = timings.get("forward", 0.0) - timings.get("accumulate", 0.0)
    errs = [r.rel_out_err for r in sq.reports if r.rel_out_err == r.rel_out_err]
    peaks = sq.block_peak_vram
    marks = sorted({m for m in (4, 8, 16, 28, len(sq.blocks)) if m - 1 in peaks})
    return {
        **meta, "granularity": sq.cfg.granularity, "units": len(sq.units),
        "method": method, "partial": partial, "blocks_done": len(sq.block_stats),
        "blocks_total": len({sq.units[u].block for u in sq.selected}), "quantize_s": total_s, "phases": timings,
        "peak_vram_gib": _gib(max(peaks.values())) if peaks else None,
        "peak_vram_after_blocks_gib": {m: peaks[m - 1] / GiB for m in marks},
        "allocated_after_blocks_gib": {m: _gib(sq.block_stats[m - 1]["allocated_bytes"]) for m in marks},
        "peak_host_gib": peak_host_bytes() / GiB, "n_layers": len(sq.reports),
        "mean_rel_out_err": sum(errs) / len(errs) if errs else None,
        "n_fallback": sum(r.fell_back for r in sq.reports),
        "per_block": {k: {**v, "peak_vram_gib": _gib(v.get("peak_vram_bytes"))} for k, v in sq.block_stats.items()},
    }


def run_method(args, method: str, out: Path, shared: dict) -> dict:
    """Quantize a freshly built denoiser with `method`; the calibration set is collected once (kept in `shared`)."""
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    pipe = build_pipeline(args, dtype)  # same seed: the same random weights for every method
    if "calib" not in shared:
        emb = random_text_embeddings(args.family, args.n_prompts, dtype, args.device)
        sync = torch.cuda.synchronize if cuda else (lambda: None)
        sync()
        t0 = time.perf_counter()
        calib = collect_calibration(pipe, None, args.steps, batch_size=args.batch, prompt_embeds=emb, progress=False)
        sync()
        shared["calib"] = calib
        shared["meta"] = {
            "family": args.family, "n_prompts": args.n_prompts, "steps": args.steps, "batch": args.batch * 2,
            "records": len(calib), "collect_s": time.perf_counter() - t0,
            "fp16_inference_peak_gib": inference_peak(pipe, calib, device), "dtype": args.dtype,
            "storage": args.storage, "drop_float_weights": args.drop_float_weights, "offload_done": args.offload_done,
            "offload_pending": args.offload_pending, "granularity": args.granularity,
            "sweep": os.environ.get("DIFFPTQ_SWEEP", "auto"), "num_layers": args.num_layers,
            "gpu": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
            "date": dt.date.today().isoformat(), "command": " ".join(sys.argv)}
    calib, meta = shared["calib"], shared["meta"]
    fam = family_of(pipe)
    den = fam.denoiser(pipe)
    n_blocks = len(fam.blocks(den))
    blocks = parse_blocks(args.blocks, n_blocks) if args.blocks else None
    cfg = SequentialConfig(method=method, weight=QuantSpec(4), act=QuantSpec(8, symmetric=False), damp=args.damp,
                           holdout_every=args.holdout_every, blocks=blocks,
                           drop_float_weights=args.drop_float_weights, offload_done=args.offload_done,
                           offload_pending=args.offload_pending, granularity=args.granularity)
    path = out / f"{args.family}_{method}{'_block_units' if args.granularity == 'block' else ''}.json"
    t_start = time.perf_counter()

    def on_block(k: int, sq: SequentialQuantizer) -> bool:
        rec = summary(args, method, meta, sq, time.perf_counter() - t_start, partial=True)
        path.write_text(json.dumps(rec, indent=2))
        b = sq.block_stats[k]
        print(f"[{method}] block {k}: {b['seconds']:.2f}s passes {b['record_passes']} "
              f"peak {rec['per_block'][k]['peak_vram_gib'] or 0:.2f} GiB", flush=True)
        over = args.max_seconds is not None and time.perf_counter() - START > args.max_seconds
        if over:
            print(f"[{method}] --max_seconds {args.max_seconds} reached after block {k}: stopping", flush=True)
        return over

    sq = SequentialQuantizer(den, fam, calib, cfg, device, dtype, storage=args.storage, progress=False,
                             on_block=on_block)
    res = sq.run()
    rec = summary(args, method, meta, sq, time.perf_counter() - t_start, partial=res.stopped_after is not None)
    if cuda:  # the whole run, moving offloaded blocks back included; what stays on the GPU (pipeline, model)
        rec["peak_vram_with_restore_gib"] = _gib(res.peak_vram_bytes)
        rec["allocated_after_run_gib"] = torch.cuda.memory_allocated(device) / GiB
    path.write_text(json.dumps(rec, indent=2))
    return rec


def report(folder: Path) -> str:
    rows = [r for r in (json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))) if "method" in r]
    if not rows:
        raise SystemExit(f"no results in {folder}")
    r0 = rows[0]
    options = "".join([", float weights dropped once a block is done" if r0.get("drop_float_weights") else "",
                       f", each finished block moved to {r0['storage']} until the end of the run (offload_done)"
                       if r0.get("offload_done") else "",
                       f", the blocks still to come waiting on {r0['storage']} until their turn (offload_pending)"
                       if r0.get("offload_pending") else ""])
    lines = [f"# Calibration at full scale: {r0['family']}",
             "", f"Card: {r0['gpu']}; torch {r0['torch']}; {r0['date']}. Full-size architecture, random weights, "
             f"W4A8 (weights symmetric per channel, activations static per tensor), {r0['n_prompts']} prompts × "
             f"{r0['steps']} steps with CFG (denoiser batch {r0['batch']}, {r0['records']} records; every 5th "
             f"held out for rel_out_err), {r0['dtype']}, block caches on {r0['storage']}"
             f"{options}. "
             "Times in seconds; forward excludes the H/G accumulation inside the passes.", "",
             "| method | blocks | collect | forward | accumulate H/G | solve | quantize total | s / block | "
             "peak VRAM GiB | FP16 inference peak GiB | ratio | peak host GiB | mean rel_out_err |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        p = r["phases"]
        done = f"{r['blocks_done']}/{r['blocks_total']}" + (" (partial)" if r["partial"] else "")
        r["method"] += " (whole blocks)" if r.get("granularity") == "block" else ""
        err = f"{r['mean_rel_out_err']:.4f}" if r["mean_rel_out_err"] is not None else "-"
        inf = r["fp16_inference_peak_gib"]
        ratio = f"{r['peak_vram_gib'] / inf:.2f}" if inf and r["peak_vram_gib"] else "-"
        lines.append(f"| {r['method']} | {done} | {r['collect_s']:.1f} | {p.get('forward', 0):.1f} | "
                     f"{p.get('accumulate', 0):.1f} | {p.get('solve', 0):.1f} | {r['quantize_s']:.1f} | "
                     f"{r['quantize_s'] / max(r['blocks_done'], 1):.2f} | {r['peak_vram_gib'] or 0:.2f} | "
                     f"{inf or 0:.2f} | {ratio} | {r['peak_host_gib']:.1f} | {err} |")
    marks = sorted({int(m) for r in rows for m in r["peak_vram_after_blocks_gib"]})
    if marks:
        lines += ["", "Peak VRAM (GiB, cumulative) after the first N blocks:", "",
                  "| method | " + " | ".join(f"N={m}" for m in marks) + " |", "| --- |" + " --- |" * len(marks)]
        for r in rows:
            v = r["peak_vram_after_blocks_gib"]
            lines.append(f"| {r['method']} | " + " | ".join(f"{v[str(m)]:.2f}" if str(m) in v else "-"
                                                          for m in marks) + " |")
    alloc = [r for r in rows if r.get("allocated_after_blocks_gib")]  # not in files from before offload_done
    if alloc and marks:
        lines += ["", "VRAM allocated after the first N blocks (GiB; the pipeline with the denoiser blocks still on "
                  "the GPU):", "", "| method | " + " | ".join(f"N={m}" for m in marks) + " |",
                  "| --- |" + " --- |" * len(marks)]
        for r in alloc:
            v = r["allocated_after_blocks_gib"]
            lines.append(f"| {r['method']} | " + " | ".join(f"{v[str(m)]:.2f}" if v.get(str(m)) is not None else "-"
                                                          for m in marks) + " |")
    ends = [r for r in rows if r.get("peak_vram_with_restore_gib") is not None]
    if ends:
        lines += ["", "The whole run (GiB): peak VRAM, moving offloaded blocks back at the end included; VRAM "
                  "allocated once it returns (the pipeline with the quantized denoiser):", ""]
        lines += [f"- {r['method']}: peak {r['peak_vram_with_restore_gib']:.2f}, allocated after "
                  f"{r['allocated_after_run_gib']:.2f}" for r in ends]
    per_block = {r["method"]: r["quantize_s"] / max(r["blocks_done"], 1) for r in rows}
    steady = {r["method"]: _steady_block_seconds(r) for r in rows}
    if r0["family"] == "sd" and "gptq" in per_block and "qronos" in per_block:  # blocks of unequal size
        lines += ["", f"GPTQ / Qronos time: {per_block['gptq'] / per_block['qronos']:.2f} (totals; goal ≤ 0.7)."]
    elif "gptq" in per_block and "qronos" in per_block:
        lines += ["", f"GPTQ / Qronos time per block: {per_block['gptq'] / per_block['qronos']:.2f} from the totals; "
                  f"{steady['gptq'] / steady['qronos']:.2f} from the median block after the first (warm-up, Triton "
                  "compilation) (goal ≤ 0.7)."]
    lines += ["", "Passes over calibration records in block 1, else the first one done (kind: count; early_exit = "
              "stopped after the last layer it needs), bytes copied host→device, seconds:", ""]
    for r in rows:
        b = r["per_block"].get("1") or next(iter(r["per_block"].values()), None)
        if b:
            units = f"{b['units']} units, " if "units" in b else ""
            lines.append(f"- {r['method']}: {units}{b.get('waves', '?')} waves; {b['record_passes']}; "
                         f"{b['h2d_bytes'] / GiB:.2f} GiB, {b['seconds']:.2f} s")
    check = folder / "sweep_check.json"
    if check.exists():
        lines += ["", f"GPTQ column sweep, eager vs Triton (seconds, share of equal codes): {check.read_text()}"]
    return "\n".join(lines) + "\n"


def _steady_block_seconds(result: dict) -> float:
    """Median seconds of the blocks after the first one (the first carries warm-up and kernel compilation)."""
    seconds = [b["seconds"] for b in result.get("per_block", {}).values()]
    rest = seconds[1:] or seconds or [float("nan")]
    return statistics.median(rest)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", default="pixart", choices=["pixart", "sd"])
    p.add_argument("--methods", default="rtn,gptq,qronos")
    p.add_argument("--n_prompts", type=int, default=64)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch", type=int, default=8, help="prompts per denoiser call (×2 with CFG)")
    p.add_argument("--damp", type=damp_value, default=Damping(), help="as the quantization scripts' --damp")
    p.add_argument("--holdout_every", type=int, default=5)
    p.add_argument("--dtype", default="fp16", choices=["fp16", "bf16", "fp32"])
    p.add_argument("--device", default="cuda")
    p.add_argument("--storage", default="cpu", help="where block caches live: cpu (pinned) or the device")
    p.add_argument("--blocks", default=None,
                   help="blocks to quantize: N (the first N), a range 14-27, a list 0-3,8 (default: all)")
    p.add_argument("--granularity", default="unit", choices=["unit", "block"],
                   help="sequential units: the UNet's ResNets / transformer blocks (unit) or whole blocks")
    p.add_argument("--drop_float_weights", action="store_true",
                   help="free each block's float weights once it is quantized (its int8 codes stay on the GPU)")
    p.add_argument("--offload_done", action="store_true",
                   help="move each finished block to --storage until the run ends: with --drop_float_weights, "
                   "VRAM flat in the block count")
    p.add_argument("--offload_pending", action="store_true",
                   help="keep the blocks still to come on --storage, each moved to the GPU just before its turn")
    p.add_argument("--max_seconds", type=float, default=None,
                   help="stop after the block that passes this many seconds since start; JSON marked partial")
    p.add_argument("--check_sweep", action="store_true", help="first time the eager and Triton GPTQ sweeps")
    p.add_argument("--num_layers", type=int, default=None, help="fewer PixArt blocks")
    p.add_argument("--heads", type=int, default=None, help="PixArt attention heads (mid-size CPU profiles)")
    p.add_argument("--head_dim", type=int, default=None, help="PixArt head width (mid-size CPU profiles)")
    p.add_argument("--sample_size", type=int, default=None, help="PixArt latent size (tokens = (size/2)²)")
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
    if args.check_sweep and torch.cuda.is_available():
        check = sweep_check(torch.device(args.device))
        (out / "sweep_check.json").write_text(json.dumps(check, indent=2))
        print(json.dumps(check), flush=True)
    shared: dict = {}
    for method in args.methods.split(","):
        if args.max_seconds is not None and time.perf_counter() - START > args.max_seconds:
            print(f"--max_seconds {args.max_seconds} reached: {method} not run", flush=True)
            break
        result = run_method(args, method, out, shared)
        print(json.dumps({k: v for k, v in result.items() if k != "per_block"}), flush=True)
        gc.collect()  # the quantized pipeline goes before the next one is built
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
