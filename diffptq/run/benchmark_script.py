"""benchmark_final.py after its flags: the run (one output folder for all processes under accelerate), the
benchmark itself (diffptq.run.benchmark) and its tables, grid and plots (diffptq.run.benchmark_report)."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from diffptq.cli import Run, calib_config, resolve_dtype, sequential_config, start_run
from diffptq.cli.parser import parse_bits, parse_methods
from diffptq.eval.metrics import MetricOptions
from diffptq.peers import parse_peers
from diffptq.run import benchmark as bench
from diffptq.run.benchmark_report import load_bundled_evaluator, write_outputs


def shared_run(args: argparse.Namespace):
    """(Run, accelerate state or None): one output folder for all processes when launched with accelerate."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return start_run(args, "benchmark_final"), None
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list

    state = PartialState(cpu=args.device == "cpu" or not torch.cuda.is_available())  # cpu: gloo, else nccl
    run = start_run(args, "benchmark_final") if state.is_main_process else None
    out_dir = Path(broadcast_object_list([str(run.out_dir) if run else None])[0])
    return run or Run(out_dir, state.device, resolve_dtype(args.dtype, state.device), args, "benchmark_final"), state


def benchmark_script(args: argparse.Namespace, run: Run, state) -> tuple[dict[str, Path], list[Path]] | None:
    """Every variant's images and metrics; on the main process the outputs' paths and the saved checkpoints (None
    on the others)."""
    is_main = state is None or state.is_main_process
    cfg = bench.BenchmarkConfig(
        model=args.model,
        variants=bench.variants(parse_methods(args.methods), parse_bits(args.bits), parse_peers(args.peers)),
        n_images=args.n_images,
        prompts_file=args.prompts, seed=args.seed, num_inference_steps=args.num_inference_steps,
        scheduler=args.scheduler, guidance_scale=args.guidance_scale, batch_size=args.batch_size,
        checkpoints=args.checkpoints, save_checkpoints=args.save_checkpoints, save_images=args.save_images,
        latency_repeats=args.latency_repeats, quant=sequential_config(args, method="rtn", wbits=4, abits=8),
        blocks=args.blocks, calib=calib_config(args))
    options = MetricOptions(
        fid_weights=args.fid_weights, clip_model=args.clip_model, lpips_weights=args.lpips_weights,
        ref_dir=args.ref_dir, device=str(run.device), batch_size=args.batch_size,
        evaluator=load_bundled_evaluator(args.model, args.evaluator, run.device) if is_main else None)
    result = bench.run_benchmark(cfg, run.out_dir, run.device, run.dtype, options, state)
    if not is_main:
        return None
    title = f"benchmark_final: {args.model}, {args.n_images} images, {args.num_inference_steps} steps"
    paths = write_outputs(result.rows, result.grid, result.prompts[:cfg.grid_columns], run.out_dir, title)
    saved = sorted((run.out_dir / "checkpoints").glob("*.safetensors")) if args.save_checkpoints else []
    return paths, saved
