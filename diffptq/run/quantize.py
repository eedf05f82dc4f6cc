"""The weight-quantization job: calibrate, quantize block by block, measure, and build the result rows."""
from __future__ import annotations

import math
import resource
import time
from dataclasses import dataclass, field

import torch

from diffptq.algo.driver import SequentialQuantizer, SequentialResult, denoiser_output_error
from diffptq.config import CalibConfig, SequentialConfig
from diffptq.data.calib import CalibrationSet, calibration_set
from diffptq.errors import ConfigError
from diffptq.models.families import family_of

LAYER_COLUMNS = ("block", "layer", "method", "wbits", "abits", "damp", "rel_out_err", "heldout_err")
DAMPING_COLUMNS = ("layer_type", "n_layers", "damp_min", "damp_median", "damp_max", "mean_heldout_err",
                   "mean_rel_out_err")
SUMMARY_COLUMNS = ("method", "wbits", "abits", "act_quant", "rotate", "group_size", "blocks", "n_layers", "n_fallback",
                   "calib_time_s", "collect_time_s", "peak_vram_gb", "peak_host_gb", "mean_rel_out_err",
                   "final_denoiser_err")


@dataclass
class QuantizationRun:
    result: SequentialResult
    calib: CalibrationSet
    collect_time_s: float
    calib_time_s: float
    final_err_per_step: dict[int, float] = field(default_factory=dict)
    rotate: str | None = None

    def layer_rows(self) -> list[dict]:
        return [{"block": r.block, "layer": r.layer, "method": "rtn-fallback" if r.fell_back else r.method,
                 "wbits": r.wbits, "abits": r.abits, "damp": _number(r.damp), "rel_out_err": _number(r.rel_out_err),
                 "heldout_err": _number(r.heldout_err)} for r in self.result.layers]

    def summary_row(self, cfg: SequentialConfig, blocks_text: str) -> dict:
        errs = [r.rel_out_err for r in self.result.layers if not math.isnan(r.rel_out_err)]
        final = list(self.final_err_per_step.values())
        peak = self.result.peak_vram_bytes
        return {
            "method": cfg.method, "wbits": cfg.weight.bits, "abits": cfg.act.bits if cfg.act else None,
            "act_quant": cfg.act_kind if cfg.act else None, "rotate": self.rotate, "group_size": cfg.weight.group_size,
            "blocks": blocks_text, "n_layers": len(self.result.layers),
            "n_fallback": sum(r.fell_back for r in self.result.layers),
            "calib_time_s": self.calib_time_s, "collect_time_s": self.collect_time_s,
            "peak_vram_gb": peak / 2**30 if peak is not None else None,
            "peak_host_gb": peak_host_bytes() / 2**30,
            "mean_rel_out_err": sum(errs) / len(errs) if errs else None,
            "final_denoiser_err": sum(final) / len(final) if final else None,
        }


def _number(x: float) -> float | None:
    return None if math.isnan(x) else x


def layer_type(name: str) -> str:
    """The kind of a denoiser layer, by its name: self-attention q/k/v or out, cross-attention q, k/v (the text
    side) or out, feed-forward, convolution, or other (projections, time embeddings, resamplers)."""
    if ".attn1." in name:
        return "self-attention out" if ".to_out" in name else "self-attention q/k/v"
    if ".attn2." in name:
        if ".to_out" in name:
            return "cross-attention out"
        return "cross-attention q" if name.endswith("to_q") else "cross-attention k/v"
    if ".ff." in name:
        return "feed-forward"
    if name.rsplit(".", 1)[-1].startswith("conv"):
        return "convolution"
    return "other"


def damping_rows(layer_rows: list[dict]) -> list[dict]:
    """The damping used, summarised by layer type (layer_type): count, min / median / max of `damp`, mean
    held-out and rel_out_err errors."""
    groups: dict[str, list[dict]] = {}
    for r in layer_rows:
        if r["damp"] is not None:
            groups.setdefault(layer_type(r["layer"]), []).append(r)

    def mean(rows, key):
        vals = [r[key] for r in rows if r.get(key) is not None]
        return sum(vals) / len(vals) if vals else None
    out = []
    for kind, rows in groups.items():
        d = sorted(r["damp"] for r in rows)
        out.append({"layer_type": kind, "n_layers": len(rows), "damp_min": d[0], "damp_median": d[len(d) // 2],
                    "damp_max": d[-1], "mean_heldout_err": mean(rows, "heldout_err"),
                    "mean_rel_out_err": mean(rows, "rel_out_err")})
    return out


def peak_host_bytes() -> int:
    """Peak resident memory of this process (Linux ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def parse_blocks(text: str, n_blocks: int) -> list[int]:
    """'4' = the first four blocks; 'all'; a range '0-7'; or a comma list of those ('0-3,8'). Indices checked."""
    text = str(text).strip()
    if text == "all":
        return list(range(n_blocks))
    if text.isdigit():
        n = int(text)
        if not 1 <= n <= n_blocks:
            raise ConfigError(f"--blocks {n}: the model has {n_blocks} blocks (give 1..{n_blocks}, a range or all)")
        return list(range(n))
    out: list[int] = []
    for part in text.split(","):
        lo, sep, hi = part.partition("-")
        if not (lo.strip().isdigit() and (not sep or hi.strip().isdigit())):
            raise ConfigError(f"--blocks {text!r}: expected N, all, a range like 0-7, or a comma list")
        a, b = int(lo), int(hi) if sep else int(lo)
        if a > b or b >= n_blocks:
            raise ConfigError(f"--blocks {text!r}: indices must lie in 0..{n_blocks - 1} with start <= end")
        out.extend(range(a, b + 1))
    return sorted(set(out))


def check_group_size(pipe, blocks: list[int], group_size: int | None) -> None:
    """Raise ConfigError before any work if `group_size` does not divide the input width of a layer to quantize."""
    if group_size is None:
        return
    family = family_of(pipe)
    units = family.blocks(family.denoiser(pipe))
    for k in blocks:
        for name, mod in family.quantizable_layers(units[k][1]):
            width = mod.weight[0].numel()
            if width % group_size:
                raise ConfigError(f"--group_size {group_size} does not divide the input width {width} of layer "
                                  f"{units[k][0]}.{name}; choose a divisor (e.g. 32, 64, 128) or per-channel scales")


def rotation_label(cfg: SequentialConfig) -> str | None:
    """The `rotate` of results and checkpoints: 'hadamard', 'hadamard+conv' with Conv2d inputs, 'pca', 'pca+keep8'
    with leading components at 8 bits, None without."""
    if cfg.rotate is None:
        return None
    return cfg.rotate + ("+conv" if cfg.rotate_conv else "") + (f"+keep{cfg.keep}" if cfg.keep else "")


def quant_metadata(cfg: SequentialConfig, calib_cfg: CalibConfig, **extra) -> dict:
    """The `quant` record of a checkpoint: what made it (benchmark_final's --checkpoints reads method and bits)."""
    return {"method": cfg.method, "wbits": cfg.weight.bits, "abits": cfg.act.bits if cfg.act else None,
            "act_quant": cfg.act_kind if cfg.act else None, "group_size": cfg.weight.group_size,
            "damp": cfg.damp.setting, "act_order": cfg.act_order, "rotate": rotation_label(cfg),
            "rotate_seed": cfg.rotate_seed, "smooth": cfg.smooth, "lowrank": cfg.lowrank,
            "lowrank_conv": cfg.lowrank_conv, "keep": cfg.keep,
            "correction": cfg.correction, "skip": list(cfg.skip),
            "blocks": cfg.blocks, "n_calib": calib_cfg.n_calib, "calib_steps": calib_cfg.calib_steps,
            "seed": calib_cfg.seed, **extra}


def resolve_blocks(pipe, text: str) -> list[int]:
    """--blocks on this pipeline's denoiser (parse_blocks with its block count)."""
    family = family_of(pipe)
    return parse_blocks(text, len(family.blocks(family.denoiser(pipe))))


def quantize_pipeline(pipe, cfg: SequentialConfig, calib_cfg: CalibConfig, device: torch.device,
                      dtype: torch.dtype, progress: bool = True) -> QuantizationRun:
    """Collect calibration data, quantize the denoiser in place, and measure the final denoiser-output error vs
    float over the held-out calibration records (per sampling step). An online input rotation (cfg.rotate) is set
    by the driver at its module swap, so H, G and the activation quantizers see Rᵀx."""
    family = family_of(pipe)
    denoiser = family.denoiser(pipe)
    blocks = cfg.blocks if cfg.blocks is not None else list(range(len(family.blocks(denoiser))))
    check_group_size(pipe, blocks, cfg.weight.group_size)
    calib, collect_s = calibration_set(pipe, calib_cfg, progress)
    t0 = time.perf_counter()
    driver = SequentialQuantizer(denoiser, family, calib, cfg, device, dtype, progress=progress)
    result = driver.run()
    calib_s = time.perf_counter() - t0
    _, held = calib.split(cfg.holdout_every)
    final = denoiser_output_error(denoiser, held if len(held) else calib, device, dtype)
    return QuantizationRun(result, calib, collect_s, calib_s, final, rotation_label(cfg))


def quantize_script(args, run, save_path) -> str:
    """quantize_qronos_4blocks.py after its flags: load, quantize, save the checkpoint, write layers.csv and
    summary.csv (and their markdown); returns the summary's markdown."""
    from diffptq.cli import calib_config, sequential_config
    from diffptq.eval.report import write_csv, write_markdown
    from diffptq.io.checkpoint import save_quantized
    from diffptq.models import load_pipeline
    from diffptq.models.schedulers import check_steps, set_scheduler

    pipe = load_pipeline(args.model, dtype=run.dtype, device=run.device)
    set_scheduler(pipe, args.scheduler)
    check_steps(pipe, args.calib_steps, f"--calib_steps {args.calib_steps}")
    family = family_of(pipe)
    cfg = sequential_config(args, blocks=resolve_blocks(pipe, args.blocks))
    calib_cfg = calib_config(args)
    q = quantize_pipeline(pipe, cfg, calib_cfg, run.device, run.dtype)
    save_quantized(save_path, family.denoiser(pipe), {"source": args.model, "family": family.name,
                                                      "pipeline_class": type(pipe).__name__},
                   quant_metadata(cfg, calib_cfg))
    layers, summary = q.layer_rows(), [q.summary_row(cfg, args.blocks)]
    write_csv(layers, run.out_dir / "layers.csv", LAYER_COLUMNS)
    write_markdown(layers, run.out_dir / "layers.md", LAYER_COLUMNS, title="Per-layer results")
    write_csv(summary, run.out_dir / "summary.csv", SUMMARY_COLUMNS)
    damping = damping_rows(layers)
    write_csv(damping, run.out_dir / "damping.csv", DAMPING_COLUMNS)
    write_markdown(damping, run.out_dir / "damping.md", DAMPING_COLUMNS,
                   title=f"Damping by layer type (--damp {cfg.damp.label})")
    return write_markdown(summary, run.out_dir / "summary.md", SUMMARY_COLUMNS, title="Summary").read_text()
