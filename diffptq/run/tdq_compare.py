"""evaluate_compare: FP vs static vs timestep-TDQ vs log-SNR-TDQ, calibrated on one sampler, evaluated on several.

Definitions (README of LogSnr-DiT / LogSnr-Unet):
* Eval trajectories: the FP pipeline's own denoiser inputs along each eval sampler's trajectories (same prompts and
  seeds for every method), recorded once and replayed through each quantized denoiser with its condition hook.
* ``act_mse``: for each quantized layer, Σ‖Q(x) − x‖² / Σ‖x‖² over its inputs x (as the quantized model computes
  them) on the replayed eval trajectories; the mean over layers. Relative, so layers of any magnitude count alike.
* ``eps_mse``: mean over elements of (ε̂ − ε)², the quantized vs the float denoiser output on the same inputs.
* Image metrics vs the FP image of the same prompt and seed (``eval.metrics``): psnr, ssim, lpips (when its weights
  are present), and ``prompt_acc`` from the bundled evaluator on bundled models.
* ``novel_steps``: share of the eval sampler's timesteps that the calibration never saw (there the conditionings
  differ in how they interpolate or extrapolate).
"""
from __future__ import annotations

import argparse
import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from diffptq.cli import Run
from diffptq.data.calib import CalibrationSet, collect_calibration
from diffptq.data.prompts import evaluation_prompts
from diffptq.eval.report import save_image_grid, write_csv, write_markdown
from diffptq.models import family_of
from diffptq.models.schedulers import check_steps
from diffptq.quant.layers import quant_layers
from diffptq.run import tdq
from diffptq.run.benchmark_report import load_bundled_evaluator
from diffptq.run.tdq_flags import EvalSampler, parse_samplers
from diffptq.tdq.inference import HOOK_ATTR

log = logging.getLogger(__name__)
METRIC_COLUMNS = ("condition", "scheduler", "steps", "abits", "wbits", "act_mse", "eps_mse", "psnr", "ssim", "lpips",
                  "prompt_acc", "novel_steps", "weight_method", "calib_scheduler", "calib_steps", "dtype",
                  "n_prompts")


@dataclass
class Reference:
    """The FP pipeline on one eval sampler: recorded denoiser inputs, FP outputs (CPU float32) and FP images."""

    sampler: EvalSampler
    records: CalibrationSet
    outputs: list[Tensor]
    images: Tensor | None


@torch.no_grad()
def generate_images(pipe, prompts: Sequence[str], steps: int, guidance: float | None, batch_size: int,
                    seed: int) -> Tensor:
    """Images (N,3,H,W) float32 in [0,1] on the CPU; batch b uses a CPU generator seeded seed + b, as
    ``data.calib.collect_calibration`` does, so images and recorded trajectories start from the same noise."""
    kwargs = family_of(pipe).call_kwargs(pipe)
    if guidance is not None:
        kwargs["guidance_scale"] = guidance
    out = []
    for b, start in enumerate(range(0, len(prompts), batch_size)):
        gen = torch.Generator("cpu").manual_seed(seed + b)
        res = pipe(list(prompts[start:start + batch_size]), num_inference_steps=steps, generator=gen,
                   output_type="pt", **kwargs)
        out.append(res.images.float().cpu().clamp(0, 1))
    return torch.cat(out)


@torch.no_grad()
def fp_reference(pipe, sampler: EvalSampler, prompts: Sequence[str], guidance: float | None, batch_size: int,
                 seed: int, device, dtype, images: bool = True) -> Reference:
    """Record the FP pipeline's trajectories on ``sampler`` and its outputs (and images) there."""
    tdq.switch_scheduler(pipe, sampler.scheduler)
    family = family_of(pipe)
    records = collect_calibration(pipe, list(prompts), sampler.steps, guidance, batch_size, seed, progress=False)
    denoiser = family.denoiser(pipe)
    outputs = [denoiser(**inputs, return_dict=False)[0].float().cpu() for inputs in records.batches(device, dtype)]
    imgs = generate_images(pipe, prompts, sampler.steps, guidance, batch_size, seed) if images else None
    return Reference(sampler, records, outputs, imgs)


@torch.no_grad()
def replay_errors(pipe, ref: Reference, device, dtype) -> tuple[float, float, list[tuple[float, float]]]:
    """(act_mse, eps_mse, [(timestep, act_mse of that record)]) of a quantized pipeline on the FP trajectories."""
    denoiser = family_of(pipe).denoiser(pipe)
    layers = {n: m for n, m in quant_layers(denoiser) if m.act_quant is not None}
    err: dict[str, float] = defaultdict(float)
    energy: dict[str, float] = defaultdict(float)
    rec_err: dict[str, float] = {}

    def hook(name):
        def fn(module, args):
            x = args[0].float()
            e, s = float((module.act_quant(args[0]).float() - x).pow(2).sum()), float(x.pow(2).sum())
            err[name] += e
            energy[name] += s
            rec_err[name] = rec_err.get(name, 0.0) + e / max(s, 1e-30)
        return fn

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in layers.items()]
    hook_handle = getattr(pipe, HOOK_ATTR, None)
    if hook_handle is not None:
        hook_handle.reset()
    sq, count, per_record = 0.0, 0, []
    try:
        for record, inputs, ref_out in zip(ref.records.records, ref.records.batches(device, dtype), ref.outputs,
                                           strict=True):
            rec_err.clear()
            out = denoiser(**inputs, return_dict=False)[0].float().cpu()
            sq += float((out - ref_out).pow(2).sum())
            count += out.numel()
            per_record.append((record.timestep, sum(rec_err.values()) / max(len(rec_err), 1)))
    finally:
        for h in handles:
            h.remove()
    act = [err[n] / max(energy[n], 1e-30) for n in layers if n in energy]
    return sum(act) / max(len(act), 1), sq / max(count, 1), per_record


def novel_share(ref: Reference, calib: CalibrationSet) -> float:
    """Share of the eval timesteps absent from the calibration's timesteps."""
    seen = {round(t, 4) for t in calib.timesteps()}
    steps = {round(t, 4) for t in ref.records.timesteps()}
    return sum(t not in seen for t in steps) / max(len(steps), 1)


def image_scorer(evaluator):
    """ImageMetrics for paired psnr/ssim/lpips (+ prompt_acc with an evaluator); FID/CLIP need more images."""
    from diffptq.eval.metrics import ImageMetrics, MetricOptions

    return ImageMetrics(MetricOptions(metrics=("lpips", "psnr", "ssim"), evaluator=evaluator))


def method_row(args: argparse.Namespace, run: Run, condition: str, wbits: int | None, abits: int | None,
               ref: Reference, calib: CalibrationSet, **values) -> dict:
    return {"condition": condition, "scheduler": ref.sampler.scheduler, "steps": ref.sampler.steps, "abits": abits,
            "wbits": wbits, "weight_method": args.method if wbits else None, "calib_scheduler": args.scheduler,
            "calib_steps": args.calib_steps, "dtype": run.dtype_name, "n_prompts": args.n_prompts,
            "novel_steps": novel_share(ref, calib), **values}


def score_images(scorer, images: Tensor | None, ref: Reference, prompts: Sequence[str], evaluator) -> dict:
    if images is None:
        return {}
    m = scorer(images, ref.images, list(prompts))
    out = {k: m.get(k) for k in ("psnr", "ssim", "lpips")}
    out["prompt_acc"] = m.get("prompt_acc") if evaluator is not None else None
    return out


def pivot_rows(rows: list[dict], metric: str) -> tuple[list[dict], list[str]]:
    """One row per (wbits, abits, sampler), one column per condition: a table of ``metric``."""
    conds = list(dict.fromkeys(r["condition"] for r in rows))
    table: dict[tuple, dict] = {}
    for r in rows:
        if r["condition"] == "fp":
            continue
        key = (r["wbits"], r["abits"], f"{r['scheduler']}-{r['steps']}")
        row = table.setdefault(key, {"wbits": key[0], "abits": key[1], "sampler": key[2],
                                     "novel_steps": r["novel_steps"]})
        row[r["condition"]] = r.get(metric)
    cols = ["wbits", "abits", "sampler", "novel_steps", *[c for c in conds if c != "fp"]]
    return list(table.values()), cols


def write_results(rows: list[dict], out_dir: Path) -> None:
    """metrics.csv/.md (all rows) and one pivot table per error metric (act_mse.md, eps_mse.md, ...)."""
    write_csv(rows, out_dir / "metrics.csv", METRIC_COLUMNS)
    write_markdown(rows, out_dir / "metrics.md", METRIC_COLUMNS, title="evaluate_compare")
    for metric in ("act_mse", "eps_mse", "psnr", "prompt_acc"):
        if any(r.get(metric) is not None for r in rows if r["condition"] != "fp"):
            table, cols = pivot_rows(rows, metric)
            write_markdown(table, out_dir / f"{metric}.md", cols, title=f"{metric} by condition")


def save_grids(images: dict[str, dict[str, Tensor]], prompts: Sequence[str], out_dir: Path, tag: str,
               max_cols: int = 8) -> None:
    """One PNG per eval sampler: a row per method (fp first), a column per prompt."""
    for label, by_method in images.items():
        names = [m for m in by_method if by_method[m] is not None]
        if not names:
            continue
        rows = [by_method[m][:max_cols] for m in names]
        save_image_grid(rows, out_dir / f"grid_{tag}_{label}.png", names, [p[:40] for p in prompts[:max_cols]])


def compare(args: argparse.Namespace, run: Run) -> list[dict]:
    """Calibrate every condition × bit setting on --scheduler/--calib_steps, evaluate on every --eval sampler.

    Writes grids and plots into run.out_dir as it goes; returns the metrics rows (the caller writes the tables).
    """
    from diffptq.run import tdq_plots

    fp = tdq.load_model(args, run)
    prompts = evaluation_prompts(args.model, args.n_prompts, args.calib_prompts, tail=True)
    guidance = args.guidance_scale
    samplers = parse_samplers(args.eval)
    # every configuration and sampler checked on the model before the first result is written
    configs = {(c, w, a): tdq.tdq_configs(fp, args, c, w, a) for w in args.wbits for a in args.abits
               for c in args.conditions}
    for s in samplers:
        tdq.switch_scheduler(fp, s.scheduler)
        check_steps(fp, s.steps, f"--eval {s.scheduler}:{s.steps}")
    tdq.switch_scheduler(fp, args.scheduler)
    calib = tdq.record_calibration(fp, args)
    refs = [fp_reference(fp, s, prompts, guidance, args.eval_batch_size, args.seed, run.device, run.dtype,
                         images=not args.no_images) for s in samplers]
    evaluator = load_bundled_evaluator(args.model, None, run.device) if not args.no_images else None
    scorer = image_scorer(evaluator) if not args.no_images else None
    rows = []
    for ref in refs:
        acc = evaluator.prompt_accuracy(ref.images, list(prompts)) if evaluator is not None else None
        rows.append(method_row(args, run, "fp", None, None, ref, calib, act_mse=0.0, eps_mse=0.0, prompt_acc=acc))
    for wbits in args.wbits:
        for abits in args.abits:
            tag = f"w{wbits}a{abits}"
            pipes, images, per_step = {}, defaultdict(dict), {}
            for ref in refs:
                images[ref.sampler.label]["fp"] = ref.images
            for cond in args.conditions:
                pipe = tdq.load_model(args, run)
                tdq.calibrate(pipe, *configs[(cond, wbits, abits)], args, run, calib=calib)
                for ref in refs:
                    tdq.switch_scheduler(pipe, ref.sampler.scheduler)
                    act, eps, steps = replay_errors(pipe, ref, run.device, run.dtype)
                    per_step[(cond, ref.sampler.label)] = steps
                    imgs = None if args.no_images else generate_images(pipe, prompts, ref.sampler.steps, guidance,
                                                                         args.eval_batch_size, args.seed)
                    images[ref.sampler.label][cond] = imgs
                    rows.append(method_row(args, run, cond, wbits, abits, ref, calib, act_mse=act, eps_mse=eps,
                                           **score_images(scorer, imgs, ref, prompts, evaluator)))
                    log.info("%s %s %s: act_mse %.4g eps_mse %.4g", tag, cond, ref.sampler.label, act, eps)
                pipes[cond] = pipe
            if not args.no_images:
                save_grids(images, prompts, run.out_dir, tag)
            tdq_plots.plot_step_errors(per_step, fp.scheduler, run.out_dir / f"act_mse_steps_{tag}.png", tag)
            if args.plot_layers > 0:
                plot_scale_figure(fp, pipes, refs, args, run, tag)
            write_results(rows, run.out_dir)
    return rows


def plot_scale_figure(fp, pipes: dict, refs: list[Reference], args: argparse.Namespace, run: Run, tag: str) -> None:
    """scales_<tag>.png: a few layers' scale vs λ for each method against the per-step optimum."""
    from diffptq.run import tdq_plots

    first = next(iter(pipes.values()))
    names = [n for n, m in quant_layers(family_of(first).denoiser(first)) if m.act_quant is not None]
    names = tdq_plots.pick_layers(names, args.plot_layers)
    quantizers = {n: {c: family_of(p).denoiser(p).get_submodule(n).act_quant for c, p in pipes.items()}
                  for n in names}
    spec = next(iter(quantizers[names[0]].values())).spec
    optima = tdq_plots.optimal_scales_per_step(fp, refs, names, spec, run.device, run.dtype)
    tdq_plots.plot_scales(quantizers, optima, fp.scheduler, run.out_dir / f"scales_{tag}.png", tag)
