"""The mains of the LogSnr-DiT/ and LogSnr-Unet/ scripts; the folder picks the model family. Their flags:
run.tdq_flags (light: a bad flag is reported before torch is imported); the work imports torch and diffusers."""
from __future__ import annotations

from pathlib import Path

from diffptq.cli import file_sha256, finish_run, start_run
from diffptq.run.tdq_flags import parse_calibrate_args, parse_compare_args


def calibrate_main(family: str, doc: str, argv=None) -> None:
    """calibrate_snr.py: TDQ activation scales (+ weights by --weight_method) → checkpoint, tables, config."""
    args = parse_calibrate_args(family, doc, argv)
    run = start_run(args, "calibrate_snr", {"--save_path": args.save_path})
    from diffptq.run import tdq  # heavy: torch, diffusers

    pipe = tdq.load_model(args, run)
    cfg, seq = tdq.tdq_configs(pipe, args, args.condition, args.wbits, args.abits)
    res = tdq.calibrate(pipe, cfg, seq, args, run)
    save_path = Path(args.save_path) if args.save_path else run.out_dir / "checkpoint.safetensors"
    tdq.save_checkpoint(save_path, pipe, cfg, seq, args)
    tdq.write_tables(res, cfg, seq, args, run.out_dir)
    finish_run(run, checkpoint=str(save_path), checkpoint_sha256=file_sha256(save_path))
    print((run.out_dir / "summary.md").read_text())
    print(f"checkpoint: {save_path}\nresults: {run.out_dir}")


def compare_main(family: str, doc: str, argv=None) -> None:
    """evaluate_compare.py: FP vs static / timestep-TDQ / log-SNR-TDQ across samplers → metrics.csv, plots, grids."""
    args = parse_compare_args(family, doc, argv)
    run = start_run(args, "evaluate_compare")
    from diffptq.run import tdq_compare  # heavy: torch, diffusers, metrics

    rows = tdq_compare.compare(args, run)
    tdq_compare.write_results(rows, run.out_dir)
    finish_run(run)
    print((run.out_dir / "act_mse.md").read_text())
    print(f"results: {run.out_dir}")


