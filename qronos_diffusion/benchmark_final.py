"""FP vs RTN / GPTQ-Sequential / Qronos: image metrics, latency, memory and size, one row per method × bits.

Example: python qronos_diffusion/benchmark_final.py --model bundled-dit --methods fp,rtn,gptq,qronos --bits w4a8,w4a4
Re-evaluate saved checkpoints: add --save_checkpoints to a first run, then --checkpoints <its out_dir> (each is
evaluated as saved, its rotation included). W4A4: --bits w4a4 --act_quant dynamic --rotate hadamard.
Several processes, each generating a slice of the prompts: accelerate launch --num_processes 2 this_script ... on
GPUs (one per process); on a CPU host accelerate launch --multi_gpu --num_processes 2 (or torchrun --nproc_per_node 2)
this_script ... --device cpu (gloo). Check that N processes make the images of one: run with --save_images on 1 and
on N processes, then python benchmarks/multi_gpu_compare.py --runs DIR_1 DIR_N. Speed at full size with random
weights: --model fullsize-pixart (or fullsize-sd).
Writes into --out_dir: metrics.csv / metrics.md, grid.png (rows: methods, columns: prompts), metrics.png (bar
plots), config.json (written last), checkpoints/ (with --save_checkpoints) and images/ (with --save_images).
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from diffptq.cli import (
    Run,
    add_common_args,
    add_rotation_args,
    damp_value,
    file_sha256,
    finish_run,
    positive_int,
    resolve_dtype,
    rotation_kwargs,
    run_main,
    start_run,
)
from diffptq.eval.metrics import DEFAULT_CLIP, MetricOptions
from diffptq.run import benchmark as bench
from diffptq.run.benchmark_report import load_bundled_evaluator, write_outputs
from diffptq.run.quantize import CalibConfig


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p, "pixart")
    p.add_argument("--methods", default="fp,rtn,gptq,qronos", help="comma list of fp, rtn, gptq, qronos")
    p.add_argument("--bits", default="w4a8,w4a4", help="comma list of wXaY (w4 or w4a16: float activations)")
    p.add_argument("--checkpoints", default=None,
                   help="folder of saved checkpoints (or a previous --out_dir) to evaluate instead of quantizing; "
                        "variants without a checkpoint there are quantized")
    p.add_argument("--save_checkpoints", action="store_true", help="save each quantized variant to checkpoints/")
    p.add_argument("--save_images", action="store_true",
                   help="save each variant's uint8 images, prompts and seeds to images/<method>[_wXaY].safetensors "
                        "(for benchmarks/multi_gpu_compare.py)")
    p.add_argument("--n_images", type=positive_int, default=64, help="images per method (default: %(default)s)")
    p.add_argument("--prompts", default=None,
                   help="evaluation prompt file, one per line (default: the model's evaluation captions for bundled-*, "
                        "else the last everyday captions)")
    p.add_argument("--batch_size", type=positive_int, default=8, help="images per pipeline call")
    p.add_argument("--guidance_scale", type=float, default=None, help="CFG scale (default: the model's)")
    p.add_argument("--latency_repeats", type=positive_int, default=3, help="timed pipeline calls (CUDA only)")
    q = p.add_argument_group("quantization (variants not loaded from --checkpoints)")
    q.add_argument("--blocks", default="all", help="'all' (default), '4' = the first four, '0-7' or '0-3,8'")
    q.add_argument("--act_quant", default="static", choices=["static", "dynamic"])
    q.add_argument("--group_size", type=positive_int, default=None)
    q.add_argument("--act_order", action="store_true")
    q.add_argument("--damp", type=damp_value, default=0.01)
    q.add_argument("--n_calib", type=positive_int, default=32, help="calibration prompts (default: %(default)s)")
    q.add_argument("--calib_steps", type=positive_int, default=10, help="sampling steps per calibration trajectory")
    q.add_argument("--calib_batch_size", type=positive_int, default=8)
    q.add_argument("--calib_prompts", default=None,
                   help="calibration prompt file (default: the model's calibration captions)")
    add_rotation_args(q)
    m = p.add_argument_group("metrics (a metric whose weights are absent is left empty, with one message)")
    m.add_argument("--fid_weights", default=None, help="Inception FID weights (default: the torch-fidelity cache)")
    m.add_argument("--clip_model", default=DEFAULT_CLIP, help="CLIP hub id in the HF cache or a local folder")
    m.add_argument("--lpips_weights", default=None, help="AlexNet weights (default: the torch hub cache)")
    m.add_argument("--ref_dir", default=None, help="real images as FID reference (default: the FP images)")
    m.add_argument("--evaluator", default=None, help="bundled evaluator folder (default: the committed one, bundled-*)")
    return p.parse_args(argv)


def shared_run(args: argparse.Namespace):
    """(Run, accelerate state or None): one output folder for all processes when launched with accelerate."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return start_run(args, "benchmark_final"), None
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list

    state = PartialState(cpu=args.device == "cpu" or not torch.cuda.is_available())  # cpu: gloo, else nccl
    run = start_run(args, "benchmark_final") if state.is_main_process else None
    out_dir = Path(broadcast_object_list([str(run.out_dir) if run else None])[0])
    return Run(out_dir, state.device, resolve_dtype(args.dtype, state.device), args, "benchmark_final"), state


def main(argv=None) -> None:
    args = parse_args(argv)
    rotation = rotation_kwargs(args)
    run, state = shared_run(args)
    is_main = state is None or state.is_main_process
    cfg = bench.BenchmarkConfig(
        model=args.model, variants=bench.variants(bench.parse_methods(args.methods), bench.parse_bits(args.bits)),
        n_images=args.n_images, prompts_file=args.prompts, seed=args.seed,
        num_inference_steps=args.num_inference_steps, scheduler=args.scheduler, guidance_scale=args.guidance_scale,
        batch_size=args.batch_size, checkpoints=args.checkpoints, save_checkpoints=args.save_checkpoints,
        save_images=args.save_images,
        latency_repeats=args.latency_repeats,
        quant=bench.QuantSettings(args.act_quant, args.group_size, args.act_order, args.damp, args.blocks, **rotation),
        calib=CalibConfig(args.n_calib, args.calib_steps, args.calib_batch_size, args.guidance_scale,
                          args.calib_prompts, args.seed))
    options = MetricOptions(
        fid_weights=args.fid_weights, clip_model=args.clip_model, lpips_weights=args.lpips_weights,
        ref_dir=args.ref_dir, device=str(run.device), batch_size=args.batch_size,
        evaluator=load_bundled_evaluator(args.model, args.evaluator, run.device) if is_main else None)
    result = bench.run_benchmark(cfg, run.out_dir, run.device, run.dtype, options, state)
    if not is_main:
        return
    title = f"benchmark_final: {args.model}, {args.n_images} images, {args.num_inference_steps} steps"
    paths = write_outputs(result.rows, result.grid, result.prompts[:cfg.grid_columns], run.out_dir, title)
    saved = sorted((run.out_dir / "checkpoints").glob("*.safetensors")) if args.save_checkpoints else []
    finish_run(run, checkpoints={p.name: file_sha256(p) for p in saved})
    print(paths["md"].read_text())
    print("\n".join(f"{kind}: {path}" for kind, path in paths.items()) + f"\nresults: {run.out_dir}")


if __name__ == "__main__":
    run_main(main)
