"""The TDQ calibration job shared by LogSnr-DiT and LogSnr-Unet: configs, calibrate, checkpoint, tables.

``LogSnr-*/calibrate_snr.py`` is: parse (diffptq.cli flag groups) → ``load_model`` → ``tdq_configs`` →
``calibrate`` → ``save_checkpoint`` → ``write_tables``. ``evaluate_compare.py`` reuses the same pieces
(``run.tdq_compare``). Prompts: diffptq.data.prompts (a bundled model's own scenes, else the everyday captions, or
--prompts); guidance: --guidance_scale, else the model's own.
"""
from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

from torch import nn

from diffptq.cli import Run, calib_config, sequential_config, tdq_config
from diffptq.config import SequentialConfig, TdqConfig
from diffptq.data.calib import CalibrationSet, calibration_set
from diffptq.errors import ConfigError
from diffptq.eval.report import write_csv, write_markdown
from diffptq.io.checkpoint import save_quantized
from diffptq.models import family_of, load_pipeline
from diffptq.models.schedulers import check_steps, set_scheduler
from diffptq.run.quantize import check_group_size, resolve_blocks
from diffptq.tdq.calibrate import TdqCalibration, calibrate_tdq_pipeline

FIT_COLUMNS = ("n_conditions", "static_scale", "log_rmse_static", "log_rmse_mlp", "mse_ratio_static", "mse_ratio_mlp")
LAYER_COLUMNS = ("block", "layer", "method", "wbits", "abits", "rel_out_err", *FIT_COLUMNS)
SUMMARY_COLUMNS = ("condition", "weight_method", "wbits", "abits", "scheduler", "calib_steps", "n_calib", "n_layers",
                   "mean_log_rmse_static", "mean_log_rmse_mlp", "mean_mse_ratio_static", "mean_mse_ratio_mlp",
                   "mean_rel_out_err", "final_denoiser_err", "collect_time_s", "calib_time_s")


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


def tdq_configs(pipe, args: argparse.Namespace, condition: str, wbits: int, abits: int
                ) -> tuple[TdqConfig, SequentialConfig]:
    """(TdqConfig, the weights' SequentialConfig) of the flags for one condition and bit setting, checked on the
    pipeline (--blocks indices, --group_size against the layers) before any calibration."""
    seq = sequential_config(args, method=args.method, wbits=wbits, abits=abits)
    if seq.act is None:
        raise ConfigError("--abits 16 leaves no activation to quantize: TDQ needs 2..8")
    blocks = None if args.blocks == "all" else resolve_blocks(pipe, args.blocks)
    family = family_of(pipe)
    check_group_size(pipe, blocks or list(range(len(family.blocks(family.denoiser(pipe))))), seq.weight.group_size)
    return tdq_config(args, condition), replace(seq, blocks=blocks)


def record_calibration(pipe, args: argparse.Namespace, progress: bool = True) -> CalibrationSet:
    """The float pipeline's trajectories on its current scheduler: n_calib prompts × calib_steps steps, with CFG."""
    check_steps(pipe, args.calib_steps, f"--calib_steps {args.calib_steps}")
    return calibration_set(pipe, calib_config(args), progress)[0]


def calibrate(pipe, cfg: TdqConfig, seq: SequentialConfig, args: argparse.Namespace, run: Run,
              calib: CalibrationSet | None = None, progress: bool = True) -> TdqCalibration:
    """Quantize ``pipe`` in place with TDQ (hook attached) on recorded (or given) calibration trajectories."""
    t0 = time.perf_counter()
    own = calib is None
    calib = record_calibration(pipe, args, progress) if own else calib
    collect_s = time.perf_counter() - t0
    res = calibrate_tdq_pipeline(pipe, cfg, seq, calib, device=run.device, dtype=run.dtype, progress=progress)
    res.collect_time_s = collect_s if own else None
    return res


def quant_meta(cfg: TdqConfig, seq: SequentialConfig, args: argparse.Namespace) -> dict:
    """The checkpoint's `quant` record."""
    return {"method": seq.method, "wbits": seq.weight.bits, "abits": seq.act.bits, "act_quant": "tdq",
            "condition": cfg.condition, "act_symmetric": cfg.act_symmetric, "group_size": seq.weight.group_size,
            "damp": seq.damp.setting, "blocks": seq.blocks, "n_calib": args.n_calib, "calib_steps": args.calib_steps,
            "scheduler": args.scheduler, "refine_steps": cfg.refine_steps, "extrapolate": cfg.extrapolate,
            "seed": args.seed}


def save_checkpoint(path: str | Path, pipe, cfg: TdqConfig, seq: SequentialConfig, args: argparse.Namespace) -> dict:
    """Write the TDQ checkpoint (safetensors + JSON); ``io.load.load_quantized`` returns it hooked."""
    family = family_of(pipe)
    base = {"source": args.model, "family": family.name, "pipeline_class": type(pipe).__name__}
    return save_quantized(path, family.denoiser(pipe), base, quant_meta(cfg, seq, args))


def summary_row(res: TdqCalibration, cfg: TdqConfig, seq: SequentialConfig, args: argparse.Namespace) -> dict:
    rows = res.layer_rows()

    def mean(key: str) -> float | None:
        vals = [r[key] for r in rows if r.get(key) is not None]
        return sum(vals) / len(vals) if vals else None

    final = list(res.final_err_per_step.values())
    return {"condition": cfg.condition, "weight_method": seq.method, "wbits": seq.weight.bits,
            "abits": seq.act.bits, "scheduler": args.scheduler, "calib_steps": args.calib_steps,
            "n_calib": args.n_calib, "n_layers": len(rows), "mean_log_rmse_static": mean("log_rmse_static"),
            "mean_log_rmse_mlp": mean("log_rmse_mlp"), "mean_mse_ratio_static": mean("mse_ratio_static"),
            "mean_mse_ratio_mlp": mean("mse_ratio_mlp"), "mean_rel_out_err": mean("rel_out_err"),
            "final_denoiser_err": sum(final) / len(final) if final else None,
            "collect_time_s": res.collect_time_s, "calib_time_s": res.calib_time_s}


def write_tables(res: TdqCalibration, cfg: TdqConfig, seq: SequentialConfig, args: argparse.Namespace,
                 out_dir: Path) -> list[dict]:
    """layers.csv/.md (weights report + TDQ fit per layer) and summary.csv/.md; returns the summary rows."""
    layers, summary = res.layer_rows(), [summary_row(res, cfg, seq, args)]
    write_csv(layers, out_dir / "layers.csv", LAYER_COLUMNS)
    write_markdown(layers, out_dir / "layers.md", LAYER_COLUMNS, title="Per-layer results")
    write_csv(summary, out_dir / "summary.csv", SUMMARY_COLUMNS)
    write_markdown(summary, out_dir / "summary.md", SUMMARY_COLUMNS, title="Summary")
    return summary
