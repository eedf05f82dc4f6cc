"""Quantize a PixArt-alpha or SD 1.5 denoiser block by block with RTN, GPTQ-Sequential or Qronos.

Example: python qronos_diffusion/quantize_qronos_4blocks.py --model bundled-dit --method qronos --wbits 4 --abits 8
W4A4: --abits 4. At 4 activation bits and below the defaults (--act_quant auto --rotate auto) give per-token
activations behind an online Hadamard rotation of every quantized layer's input (saved in the checkpoint); above,
static per-tensor activations and no rotation. Give --act_quant / --rotate to choose otherwise.
Writes into --out_dir: the checkpoint (--save_path, default <out_dir>/checkpoint.safetensors), layers.csv/.md,
summary.csv/.md and config.json.
"""
from __future__ import annotations

from argparse import RawDescriptionHelpFormatter
from pathlib import Path

from diffptq.cli import (
    ArgumentParser,
    add_blocks_arg,
    add_calib_args,
    add_common_args,
    add_rotation_args,
    add_weight_args,
    calib_config,
    check_rotation_flags,
    file_sha256,
    finish_run,
    run_main,
    sequential_config,
    start_run,
)
from diffptq.config import check_calibration_fits


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=RawDescriptionHelpFormatter)
    add_common_args(p, "pixart")
    add_weight_args(p)
    add_calib_args(p)
    add_rotation_args(p)
    add_blocks_arg(p, "4")
    p.add_argument("--save_path", default=None, help="checkpoint file (safetensors; a .pt name is accepted)")
    args = p.parse_args(argv)
    check_rotation_flags(args)
    calib = calib_config(args)  # every value checked before anything heavy is imported
    check_calibration_fits(sequential_config(args), calib.n_calib, calib.batch_size)
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    save_path = args.save_path
    run = start_run(args, "quantize_qronos_4blocks", {"--save_path": save_path})
    from diffptq.run.quantize import quantize_script  # heavy: torch, diffusers

    save_path = Path(save_path) if save_path else run.out_dir / "checkpoint.safetensors"
    summary_md = quantize_script(args, run, save_path)
    finish_run(run, checkpoint=str(save_path), checkpoint_sha256=file_sha256(save_path))
    print(summary_md)
    print(f"checkpoint: {save_path}\nresults: {run.out_dir}")


if __name__ == "__main__":
    run_main(main)
