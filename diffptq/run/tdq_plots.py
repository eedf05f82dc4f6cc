"""Figures of evaluate_compare: each method's activation scale vs λ against the per-step optimum, and per-step error.

x axis: λ = log-SNR of the step's timestep on the training schedule (high λ = clean). The per-step optimum is the
MSE-optimal per-tensor scale of the float model's input to that layer at that step of an eval trajectory (all
prompts of the step pooled); methods were calibrated on the quantized stream of the calibration sampler, whose own
per-condition optima are drawn as black crosses.
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from diffptq.models import family_of
from diffptq.quant.quantizer import QuantSpec, fit_rows
from diffptq.tdq.quantizer import TdqActQuantizer
from diffptq.tdq.schedule import log_snr_at, ConditionFn

COLOURS = {"static": "tab:gray", "timestep": "tab:blue", "logsnr": "tab:red"}
MARKERS = "os^vDP*X"


def pick_layers(names: Sequence[str], n: int) -> list[str]:
    """n names spread evenly over ``names`` (first and last included)."""
    if n >= len(names):
        return list(names)
    return [names[round(i * (len(names) - 1) / max(n - 1, 1))] for i in range(n)]


class _StepSampler:
    """Forward pre-hooks that keep a random subsample of each named layer's input per timestep."""

    def __init__(self, denoiser, names: Sequence[str], max_samples: int):
        self.max_samples, self.t = max_samples, 0.0
        self.kept: dict[str, dict[float, list[Tensor]]] = defaultdict(lambda: defaultdict(list))
        self.handles = [denoiser.get_submodule(n).register_forward_pre_hook(self._hook(n)) for n in names]

    def _hook(self, name: str):
        def fn(module, args):
            flat = args[0].detach().reshape(-1).float()
            idx = torch.randint(flat.numel(), (min(self.max_samples, flat.numel()),), device=flat.device)
            self.kept[name][self.t].append(torch.cat([flat[idx], flat.min()[None], flat.max()[None]]).cpu())
        return fn

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


@torch.no_grad()
def optimal_scales_per_step(fp_pipe, refs: Sequence, names: Sequence[str], spec: QuantSpec, device, dtype,
                            max_samples: int = 1 << 14) -> dict[str, list[tuple[str, float, float]]]:
    """{layer: [(sampler label, λ, optimal scale)]} over every step of every ``tdq_compare.Reference``."""
    denoiser = family_of(fp_pipe).denoiser(fp_pipe)
    out: dict[str, list[tuple[str, float, float]]] = defaultdict(list)
    for ref in refs:
        sampler = _StepSampler(denoiser, names, max_samples)
        try:
            for record, inputs in zip(ref.records.records, ref.records.batches(device, dtype), strict=True):
                sampler.t = record.timestep
                denoiser(**inputs, return_dict=False)
        finally:
            sampler.remove()
        for name, by_t in sampler.kept.items():
            for t, xs in by_t.items():
                scale, _ = fit_rows(torch.cat(xs).reshape(1, -1), spec)
                out[name].append((ref.sampler.label, float(log_snr_at(fp_pipe.scheduler, t)), float(scale)))
    return out


@torch.no_grad()
def method_curve(q: TdqActQuantizer, scheduler, t_grid: Tensor) -> Tensor:
    """The quantizer's scale at each timestep of t_grid (T,) → (T,) float32 CPU."""
    c = ConditionFn.from_config(q.condition, scheduler)(t_grid)
    if q.cond_range is not None:
        c = c.clamp(*q.cond_range)
    p = next(q.scale_fn.parameters())
    return q.scale_fn(c.to(p.device)).reshape(-1).float().cpu()


def calibration_points(q: TdqActQuantizer, scheduler) -> tuple[Tensor, Tensor] | None:
    """(λ, optimal scale) of the calibration's per-condition optima, from a timestep or logsnr quantizer's fit."""
    if q.fit is None or q.condition["kind"] == "static":
        return None
    lo, hi = q.condition["bounds"]
    raw = lo + (q.fit.conds.double() + 1) / 2 * (hi - lo)
    lam = raw if q.condition["kind"] == "logsnr" else log_snr_at(scheduler, raw)
    return lam.float(), q.fit.opt_scales


def _save(fig, path: str | Path, title: str) -> Path:
    """Give `fig` its title (when one is given) and write it as a PNG at 100 dpi; returns the path."""
    if title:
        fig.suptitle(title)
    path = Path(path)
    fig.savefig(path, dpi=100)
    return path


def plot_scales(quantizers: dict[str, dict[str, TdqActQuantizer]], optima: dict[str, list[tuple[str, float, float]]],
                scheduler, path: str | Path, title: str = "") -> Path:
    """One panel per layer: scale vs λ for each method (lines), per-step optima (markers), calibration optima (x).

    quantizers: {layer: {condition: quantizer}}; scheduler: gives the training schedule (λ of a timestep).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n_train = int(scheduler.config.num_train_timesteps)
    t_grid = torch.linspace(0, n_train - 1, 400, dtype=torch.float64)
    lam_grid = log_snr_at(scheduler, t_grid).float()
    names = list(quantizers)
    fig = Figure(figsize=(4.2 * len(names), 3.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(names), squeeze=False)[0]
    for ax, name in zip(axes, names, strict=True):
        labels = sorted({s for s, _, _ in optima.get(name, [])})
        for i, label in enumerate(labels):
            pts = [(lam, s) for s2, lam, s in optima[name] if s2 == label]
            ax.scatter(*zip(*pts, strict=True), s=12, marker=MARKERS[i % len(MARKERS)], alpha=0.6, label=label)
        for cond, q in quantizers[name].items():
            ax.plot(lam_grid, method_curve(q, scheduler, t_grid), color=COLOURS.get(cond), label=cond)
        calib = next((calibration_points(q, scheduler) for q in quantizers[name].values()
                      if calibration_points(q, scheduler) is not None), None)
        if calib is not None:
            ax.scatter(calib[0], calib[1], marker="x", color="black", s=30, label="calib optimum")
        ax.set_yscale("log")
        ax.set_xlabel("λ = log-SNR")
        ax.set_title(name.replace("transformer_blocks", "blk"), fontsize=8)
    axes[0].set_ylabel("activation scale")
    axes[-1].legend(fontsize=6)
    return _save(fig, path, title)


def plot_step_errors(per_step: dict[tuple[str, str], list[tuple[float, float]]], scheduler, path: str | Path,
                     title: str = "") -> Path:
    """act_mse per eval step vs λ: one panel per eval sampler, one line per condition.

    per_step: {(condition, sampler label): [(timestep, act_mse of one record)]} (records of a step are averaged).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    samplers = list(dict.fromkeys(label for _, label in per_step))
    fig = Figure(figsize=(4.0 * len(samplers), 3.4), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(samplers), squeeze=False, sharey=True)[0]
    for ax, label in zip(axes, samplers, strict=True):
        for (cond, lab), values in per_step.items():
            if lab != label:
                continue
            by_t: dict[float, list[float]] = defaultdict(list)
            for t, v in values:
                by_t[t].append(v)
            ts = sorted(by_t)
            lam = log_snr_at(scheduler, torch.tensor(ts, dtype=torch.float64)).float()
            ax.plot(lam, [sum(by_t[t]) / len(by_t[t]) for t in ts], marker=".", color=COLOURS.get(cond), label=cond)
        ax.set_yscale("log")
        ax.set_title(label)
        ax.set_xlabel("λ = log-SNR")
    axes[0].set_ylabel("act_mse (relative)")
    axes[-1].legend(fontsize=7)
    return _save(fig, path, title)
