"""The TDQ calibration job shared by LogSnr-DiT and LogSnr-Unet: flags, prompts, calibrate, checkpoint, tables.

``LogSnr-*/calibrate_snr.py`` is: parse (``add_tdq_args``) → ``load_model`` → ``calibrate`` → ``save_checkpoint`` →
``write_tables``. ``evaluate_compare.py`` reuses the same pieces (see ``run.tdq_compare``).
Bundled models get scene captions as prompts (their own vocabulary; calibration and evaluation draw disjoint seeds)
and the guidance scale they were trained to sample with; other models use the everyday captions (or --prompts).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from torch import nn

from diffptq.cli import Run, bits_value, damp_value, positive_int
from diffptq.config import CalibConfig
from diffptq.data.calib import CalibrationSet, calibration_set
from diffptq.errors import DiffptqError
from diffptq.eval.report import write_csv, write_markdown
from diffptq.io.checkpoint import save_quantized
from diffptq.models import family_of, load_pipeline
from diffptq.models.load import BUNDLED_MODELS
from diffptq.models.schedulers import set_scheduler
from diffptq.run.quantize import parse_blocks
from diffptq.tdq.calibrate import CONDITIONS, TdqCalibration, TdqConfig, calibrate_tdq_pipeline
from diffptq.tdq.fit import TdqFitConfig

FIT_COLUMNS = ("n_conditions", "static_scale", "log_rmse_static", "log_rmse_mlp", "mse_ratio_static", "mse_ratio_mlp")
LAYER_COLUMNS = ("block", "layer", "method", "wbits", "abits", "rel_out_err", *FIT_COLUMNS)
SUMMARY_COLUMNS = ("condition", "weight_method", "wbits", "abits", "scheduler", "calib_steps", "n_calib", "n_layers",
                   "mean_log_rmse_static", "mean_log_rmse_mlp", "mean_mse_ratio_static", "mean_mse_ratio_mlp",
                   "mean_rel_out_err", "final_denoiser_err", "collect_time_s", "calib_time_s")


def add_tdq_args(parser: argparse.ArgumentParser, compare: bool = False) -> None:
    """Quantization, calibration and TDQ-fit flags. compare=True: --conditions/--wbits/--abits take lists."""
    if compare:
        parser.add_argument("--conditions", nargs="+", default=list(CONDITIONS), choices=CONDITIONS,
                            help="TDQ conditions to compare (default: all three)")
        parser.add_argument("--wbits", nargs="+", type=bits_value, default=[8, 4], help="weight bits (default: 8 4)")
        parser.add_argument("--abits", nargs="+", type=bits_value, default=[8], help="activation bits (default: 8)")
    else:
        parser.add_argument("--condition", default="logsnr", choices=CONDITIONS,
                            help="what the activation scales follow: static (one scale), timestep or logsnr")
        parser.add_argument("--wbits", type=bits_value, default=8, help="weight bits 2..8 (default: %(default)s)")
        parser.add_argument("--abits", type=bits_value, default=8, help="activation bits 2..8 (default: %(default)s)")
    parser.add_argument("--weight_method", default="rtn", choices=["rtn", "gptq", "qronos"],
                        help="weight quantization (default: %(default)s)")
    parser.add_argument("--group_size", type=positive_int, default=None, help="weight group size (default: per row)")
    parser.add_argument("--damp", type=damp_value, default=0.01, help="GPTQ/Qronos damping, or 'adaptive'")
    parser.add_argument("--act_order", action="store_true", help="GPTQ/Qronos columns by decreasing diag(H)")
    parser.add_argument("--blocks", default="all", help="blocks to quantize: all (default), N first, 0-7, 0-3,8")
    parser.add_argument("--n_calib", type=positive_int, default=16 if compare else 32, help="calibration prompts")
    parser.add_argument("--calib_steps", type=positive_int, default=20 if compare else 10,
                        help="sampling steps per calibration trajectory (on --scheduler)")
    parser.add_argument("--calib_batch_size", type=positive_int, default=8, help="prompts per calibration batch")
    parser.add_argument("--prompts", default=None, help="prompt file (default: bundled captions / scene captions)")
    parser.add_argument("--guidance_scale", type=float, default=None, help="CFG scale (default: the model's)")
    parser.add_argument("--act_symmetric", action="store_true", help="symmetric activation grid (default: "
                        "asymmetric, zero point by the fitted rule)")
    parser.add_argument("--max_per_condition", type=positive_int, default=1 << 14,
                        help="activation samples kept per layer and condition (default: %(default)s)")
    parser.add_argument("--mlp_steps", type=positive_int, default=300, help="Adam steps of each scale MLP")
    parser.add_argument("--n_freqs", type=positive_int, default=3, help="Fourier frequencies of the MLP input")
    parser.add_argument("--hidden", type=positive_int, default=32, help="scale MLP width")
    parser.add_argument("--extrapolate", default="clamp", choices=["clamp", "mlp"],
                        help="beyond the calibrated conditions: hold the nearest calibrated scale (clamp, default) "
                             "or evaluate the MLP (mlp)")
    parser.add_argument("--refine_steps", type=int, default=0,
                        help="end-to-end refinement steps per block on block output error (default: 0, off)")


def is_bundled(model: str) -> bool:
    return model in BUNDLED_MODELS


def load_model(args: argparse.Namespace, run: Run, scheduler: str | None = None):
    """The float pipeline of --model on the run's device/dtype, every module in eval mode, scheduler set."""
    pipe = load_pipeline(args.model, dtype=run.dtype, device=run.device)
    for module in pipe.components.values():
        if isinstance(module, nn.Module):
            module.eval()  # no dropout: pipelines built in code start in training mode
    switch_scheduler(pipe, scheduler or args.scheduler)
    return pipe


def switch_scheduler(pipe, name: str) -> None:
    """``set_scheduler(pipe, name)``; it always starts from the pipeline's own config (no leaked overrides)."""
    set_scheduler(pipe, name)


def tdq_config(args: argparse.Namespace, condition: str, wbits: int, abits: int, n_blocks: int) -> TdqConfig:
    """TdqConfig from the flags (one condition and bit setting)."""
    if abits >= 16:
        raise DiffptqError("--abits 16 leaves no activation to quantize: TDQ needs 2..8")
    if wbits >= 16:
        raise DiffptqError("--wbits 16 leaves nothing to quantize; give 2..8")
    try:
        blocks = None if args.blocks == "all" else parse_blocks(args.blocks, n_blocks)
        fit = TdqFitConfig(max_per_condition=args.max_per_condition, n_freqs=args.n_freqs, hidden=args.hidden,
                           steps=args.mlp_steps, seed=args.seed)
        return TdqConfig(condition=condition, wbits=wbits, abits=abits, weight_method=args.weight_method,
                         group_size=args.group_size, damp=args.damp, act_order=args.act_order,
                         act_symmetric=args.act_symmetric, blocks=blocks, fit=fit, refine_steps=args.refine_steps,
                         extrapolate=args.extrapolate)
    except ValueError as err:
        raise DiffptqError(str(err)) from None


def record_calibration(pipe, args: argparse.Namespace, progress: bool = True) -> CalibrationSet:
    """The float pipeline's trajectories on --scheduler: n_calib prompts × calib_steps steps, with CFG."""
    cfg = CalibConfig(args.n_calib, args.calib_steps, args.calib_batch_size, args.guidance_scale, args.prompts,
                      args.seed)
    return calibration_set(pipe, cfg, progress)[0]


def calibrate(pipe, cfg: TdqConfig, args: argparse.Namespace, run: Run, calib: CalibrationSet | None = None,
              progress: bool = True) -> TdqCalibration:
    """Quantize ``pipe`` in place with TDQ (hook attached) on recorded (or given) calibration trajectories."""
    t0 = time.perf_counter()
    own = calib is None
    calib = record_calibration(pipe, args, progress) if own else calib
    collect_s = time.perf_counter() - t0
    res = calibrate_tdq_pipeline(pipe, cfg, calib=calib, device=run.device, dtype=run.dtype, progress=progress)
    res.collect_time_s = collect_s if own else None
    return res


def quant_meta(cfg: TdqConfig, args: argparse.Namespace) -> dict:
    """The checkpoint's `quant` record."""
    return {"method": cfg.weight_method, "wbits": cfg.wbits, "abits": cfg.abits, "act_quant": "tdq",
            "condition": cfg.condition, "act_symmetric": cfg.act_symmetric, "group_size": cfg.group_size,
            "damp": cfg.damp, "blocks": cfg.blocks, "n_calib": args.n_calib, "calib_steps": args.calib_steps,
            "scheduler": args.scheduler, "refine_steps": cfg.refine_steps, "extrapolate": cfg.extrapolate,
            "seed": args.seed}


def save_checkpoint(path: str | Path, pipe, cfg: TdqConfig, args: argparse.Namespace) -> dict:
    """Write the TDQ checkpoint (safetensors + JSON); ``io.load.load_quantized`` returns it hooked."""
    family = family_of(pipe)
    base = {"source": args.model, "family": family.name, "pipeline_class": type(pipe).__name__}
    return save_quantized(path, family.denoiser(pipe), base, quant_meta(cfg, args))


def summary_row(res: TdqCalibration, cfg: TdqConfig, args: argparse.Namespace) -> dict:
    rows = res.layer_rows()

    def mean(key: str) -> float | None:
        vals = [r[key] for r in rows if r.get(key) is not None]
        return sum(vals) / len(vals) if vals else None

    final = list(res.final_err_per_step.values())
    return {"condition": cfg.condition, "weight_method": cfg.weight_method, "wbits": cfg.wbits, "abits": cfg.abits,
            "scheduler": args.scheduler, "calib_steps": args.calib_steps, "n_calib": args.n_calib,
            "n_layers": len(rows), "mean_log_rmse_static": mean("log_rmse_static"),
            "mean_log_rmse_mlp": mean("log_rmse_mlp"), "mean_mse_ratio_static": mean("mse_ratio_static"),
            "mean_mse_ratio_mlp": mean("mse_ratio_mlp"), "mean_rel_out_err": mean("rel_out_err"),
            "final_denoiser_err": sum(final) / len(final) if final else None,
            "collect_time_s": res.collect_time_s, "calib_time_s": res.calib_time_s}


def write_tables(res: TdqCalibration, cfg: TdqConfig, args: argparse.Namespace, out_dir: Path) -> list[dict]:
    """layers.csv/.md (weights report + TDQ fit per layer) and summary.csv/.md; returns the summary rows."""
    layers, summary = res.layer_rows(), [summary_row(res, cfg, args)]
    write_csv(layers, out_dir / "layers.csv", LAYER_COLUMNS)
    write_markdown(layers, out_dir / "layers.md", LAYER_COLUMNS, title="Per-layer results")
    write_csv(summary, out_dir / "summary.csv", SUMMARY_COLUMNS)
    write_markdown(summary, out_dir / "summary.md", SUMMARY_COLUMNS, title="Summary")
    return summary

