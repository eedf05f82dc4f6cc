"""The `main` of LogSnr-DiT/ and LogSnr-Unet/ scripts: one implementation, the folder picks the model family."""
from __future__ import annotations

import argparse
from pathlib import Path

from diffptq.cli import add_common_args, file_sha256, finish_run, start_run
from diffptq.errors import DiffptqError
from diffptq.models import family_of
from diffptq.run import tdq, tdq_compare


def calibrate_main(family: str, doc: str, argv=None) -> None:
    """calibrate_snr.py: TDQ activation scales (+ weights by --weight_method) → checkpoint, tables, config."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p, family)
    tdq.add_tdq_args(p)
    p.add_argument("--save_path", default=None, help="checkpoint file (safetensors; a .pt name is accepted)")
    args = _parse_refusing_rotation(p, argv)
    run = start_run(args, "calibrate_snr")
    pipe = tdq.load_model(args, run)
    fam = family_of(pipe)
    cfg = tdq.tdq_config(args, args.condition, args.wbits, args.abits, len(fam.blocks(fam.denoiser(pipe))))
    res = tdq.calibrate(pipe, cfg, args, run)
    save_path = Path(args.save_path) if args.save_path else run.out_dir / "checkpoint.safetensors"
    tdq.save_checkpoint(save_path, pipe, cfg, args)
    tdq.write_tables(res, cfg, args, run.out_dir)
    finish_run(run, checkpoint=str(save_path), checkpoint_sha256=file_sha256(save_path))
    print((run.out_dir / "summary.md").read_text())
    print(f"checkpoint: {save_path}\nresults: {run.out_dir}")


def compare_main(family: str, doc: str, argv=None) -> None:
    """evaluate_compare.py: FP vs static / timestep-TDQ / log-SNR-TDQ across samplers → metrics.csv, plots, grids."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p, family)
    tdq.add_tdq_args(p, compare=True)
    tdq_compare.add_compare_args(p)
    p.set_defaults(scheduler="ddim")
    args = _parse_refusing_rotation(p, argv)
    run = start_run(args, "evaluate_compare")
    rows = tdq_compare.compare(args, run)
    tdq_compare.write_results(rows, run.out_dir)
    finish_run(run)
    print((run.out_dir / "act_mse.md").read_text())
    print(f"results: {run.out_dir}")


def _parse_refusing_rotation(parser: argparse.ArgumentParser, argv) -> argparse.Namespace:
    """parser.parse_args, with --rotate (the quantization scripts' flag, diffptq.cli.add_rotation_args) refused by
    name rather than as an unknown flag: the TDQ path swaps its layers inside diffptq.tdq, where no rotation is set,
    and fits its per-condition activation scales on unrotated inputs."""
    parser.add_argument("--rotate", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if getattr(args, "rotate", "none") != "none":
        raise DiffptqError(f"--rotate {args.rotate}: the TDQ scripts do not rotate layer inputs (TDQ fits its "
                           "activation scales on unrotated inputs); rotated W4A4 is in "
                           "qronos_diffusion/quantize_qronos_4blocks.py and qronos_diffusion/benchmark_final.py")
    return args
