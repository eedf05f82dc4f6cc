"""Quantize a PixArt-alpha or SD 1.5 denoiser block by block with RTN, GPTQ-Sequential or Qronos.

Example: python qronos_diffusion/quantize_qronos_4blocks.py --model bundled-dit --method qronos --wbits 4 --abits 8
W4A4: --abits 4 --act_quant dynamic --rotate hadamard (per-token 4-bit activations behind an online Hadamard
rotation of every quantized layer's input; the rotation is saved in the checkpoint).
Writes into --out_dir: the checkpoint (--save_path, default <out_dir>/checkpoint.safetensors), layers.csv/.md,
summary.csv/.md and config.json.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from diffptq.cli import (
    add_common_args,
    add_quant_args,
    calib_config,
    file_sha256,
    finish_run,
    rotation_kwargs,
    run_main,
    sequential_config,
    start_run,
)
from diffptq.errors import DiffptqError
from diffptq.eval.report import write_csv, write_markdown
from diffptq.io.checkpoint import save_quantized
from diffptq.models import family_of, load_pipeline
from diffptq.models.schedulers import set_scheduler
from diffptq.run.quantize import LAYER_COLUMNS, SUMMARY_COLUMNS, parse_blocks, quantize_pipeline

log = logging.getLogger("quantize")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p, "pixart")
    add_quant_args(p)
    p.add_argument("--blocks", default="4", help="'4' = the first four blocks (default), 'all', '0-7' or '0-3,8'")
    p.add_argument("--save_path", default=None, help="checkpoint file (safetensors; a .pt name is accepted)")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    rotation = rotation_kwargs(args)
    run = start_run(args, "quantize_qronos_4blocks")
    pipe = load_pipeline(args.model, dtype=run.dtype, device=run.device)
    set_scheduler(pipe, args.scheduler)
    family = family_of(pipe)
    try:
        blocks = parse_blocks(args.blocks, len(family.blocks(family.denoiser(pipe))))
        cfg = sequential_config(args, blocks)
    except ValueError as err:
        raise DiffptqError(str(err)) from None
    calib_cfg = calib_config(args)
    q = quantize_pipeline(pipe, cfg, calib_cfg, run.device, run.dtype, **rotation)
    save_path = Path(args.save_path) if args.save_path else run.out_dir / "checkpoint.safetensors"
    quant_meta = {"method": cfg.method, "wbits": cfg.weight.bits, "abits": cfg.act.bits if cfg.act else None,
                  "act_quant": cfg.act_kind, "group_size": cfg.weight.group_size, "damp": cfg.damp,
                  "act_order": cfg.act_order, "rotate": q.rotate, "rotate_seed": args.rotate_seed, "blocks": blocks,
                  "n_calib": args.n_calib, "calib_steps": args.calib_steps, "seed": args.seed}
    save_quantized(save_path, family.denoiser(pipe), {"source": args.model, "family": family.name,
                                                      "pipeline_class": type(pipe).__name__}, quant_meta)
    layers = q.layer_rows()
    summary = [q.summary_row(cfg, args.blocks)]
    write_csv(layers, run.out_dir / "layers.csv", LAYER_COLUMNS)
    write_markdown(layers, run.out_dir / "layers.md", LAYER_COLUMNS, title="Per-layer results")
    write_csv(summary, run.out_dir / "summary.csv", SUMMARY_COLUMNS)
    write_markdown(summary, run.out_dir / "summary.md", SUMMARY_COLUMNS, title="Summary")
    finish_run(run, checkpoint=str(save_path), checkpoint_sha256=file_sha256(save_path))
    print((run.out_dir / "summary.md").read_text())
    print(f"checkpoint: {save_path}\nresults: {run.out_dir}")


if __name__ == "__main__":
    run_main(main)
