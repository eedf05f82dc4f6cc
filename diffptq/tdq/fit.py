"""Fit TDQ scales from activation samples: per-condition optimal step sizes, then a scale MLP that reproduces them.

Pure tensor functions: the caller collects, for one activation quantizer, samples per condition value c (the
normalised condition of ``schedule.make_condition_fn``) and gets back a trained ``ScaleMLP`` plus fit errors.

Grid and MSE search are those of ``diffptq.quant.quantizer`` (``QuantSpec``, ``fit_rows``, ``fake_quant``): clipping
ratios 1 … ``spec.mse_min_ratio`` in ``spec.mse_steps`` steps (``scale_method="minmax"`` gives min-max scales).

* symmetric: zero = 0; the optimum per condition is ``fit_rows`` on that condition's samples.
* asymmetric: the MLP predicts only the scale, so the zero point is static: fitted once on all conditions pooled,
  then each condition's optimal scale is searched with that zero fixed (``_search_scale_fixed_zero``).
* static baseline: one ``fit_rows`` on the pooled samples, every condition weighted equally (equal-size subsamples).
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from diffptq.quant.quantizer import MIN_SCALE, QuantSpec, fake_quant, fit_rows

from .scale_mlp import ScaleMLP

Samples = Mapping[float, Tensor | Sequence[Tensor]] | Iterable[tuple[float, Tensor | Sequence[Tensor]]]


def collect_samples(samples: Samples, max_per_condition: int = 1 << 16, seed: int = 0) -> tuple[Tensor, list[Tensor]]:
    """Group activation samples by condition and subsample them.

    samples: {c: tensor or list of tensors} or an iterable of (c, tensor-or-list) pairs; any shapes, repeated c merge.
    Returns conds (N,) float32 ascending and, per condition, a flat float32 tensor of at most ``max_per_condition``
    values (uniform without replacement, seeded; the min and max are always kept), on the samples' device.
    """
    items = samples.items() if isinstance(samples, Mapping) else samples
    grouped: dict[float, list[Tensor]] = {}
    for c, x in items:
        parts = [x] if isinstance(x, Tensor) else list(x)
        grouped.setdefault(float(c), []).extend(p.detach().reshape(-1).float() for p in parts)
    if not grouped:
        raise ValueError("no activation samples")
    gen = torch.Generator().manual_seed(seed)
    conds = sorted(grouped)
    xs = []
    for c in conds:
        x = torch.cat(grouped[c])
        if x.numel() == 0:
            raise ValueError(f"condition {c} has no samples")
        if x.numel() > max_per_condition:
            idx = torch.randperm(x.numel(), generator=gen)[: max_per_condition - 2].to(x.device)
            x = torch.cat([x[idx], x.min().reshape(1), x.max().reshape(1)])
        xs.append(x)
    return torch.tensor(conds, dtype=torch.float32), xs


def quant_mse(x: Tensor, scale: float | Tensor, zero: float | Tensor, spec: QuantSpec) -> float:
    """Mean squared fake-quantization error of x (any shape) on the per-tensor grid (scale, zero)."""
    x = x.float()
    s = torch.as_tensor(scale, dtype=torch.float32, device=x.device).reshape(1)
    z = torch.as_tensor(zero, dtype=torch.float32, device=x.device).reshape(1)
    with torch.no_grad():
        return float((fake_quant(x.reshape(1, -1), s, z, spec) - x.reshape(1, -1)).pow(2).mean())


def _search_scale_fixed_zero(x: Tensor, zero: float, spec: QuantSpec) -> float:
    """Best scale for flat x with the integer zero point fixed: the range [xmin, xmax] (widened to hold 0) shrunk by
    the same ratios as ``fit_rows``; the largest scale that keeps both ends on the grid is the ratio-1 candidate."""
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    top = hi / (spec.qmax - zero) if spec.qmax > zero else 0.0
    bottom = lo / (spec.qmin - zero) if zero > spec.qmin else 0.0
    full = max(top, bottom, MIN_SCALE)
    if spec.scale_method == "minmax":
        return full
    best, best_err = full, float("inf")
    for i in range(spec.mse_steps):
        r = 1.0 - (1.0 - spec.mse_min_ratio) * i / max(spec.mse_steps - 1, 1)
        err = quant_mse(x, max(r * full, MIN_SCALE), zero, spec)
        if err < best_err:
            best, best_err = max(r * full, MIN_SCALE), err
    return best


def fit_static_scale(xs: Sequence[Tensor], spec: QuantSpec, seed: int = 0) -> tuple[float, float]:
    """One (scale, zero) for all conditions: ``fit_rows`` on equal-size random subsamples of each flat x."""
    n = min(x.numel() for x in xs)
    gen = torch.Generator().manual_seed(seed)
    pooled = torch.cat([x[torch.randperm(x.numel(), generator=gen)[:n].to(x.device)] for x in xs])
    scale, zero = fit_rows(pooled.reshape(1, -1), spec)
    return float(scale), float(zero)


def fit_condition_scales(xs: Sequence[Tensor], spec: QuantSpec, zero: float = 0.0) -> Tensor:
    """Optimal per-tensor scale of each condition's samples: (N,) float32. ``zero`` is used only when asymmetric."""
    if spec.symmetric:
        return torch.stack([fit_rows(x.reshape(1, -1), spec)[0].reshape(()).cpu() for x in xs])
    return torch.tensor([_search_scale_fixed_zero(x, zero, spec) for x in xs], dtype=torch.float32)


def evaluate_scales(xs: Sequence[Tensor], scales: Tensor | Sequence[float], spec: QuantSpec, zero: float = 0.0) -> Tensor:
    """Quantization MSE of each condition's samples at its scale: (N,) float32."""
    return torch.tensor([quant_mse(x, float(s), zero, spec) for x, s in zip(xs, scales, strict=True)])


@torch.no_grad()
def predict_scales(scale_fn: torch.nn.Module, conds: Tensor) -> Tensor:
    """Scales of an n_out = 1 scale function at conds (N,): (N,) float32 CPU."""
    return torch.stack([scale_fn(c.reshape(1)).reshape(()).float().cpu() for c in conds.reshape(-1)])


def evaluate_scale_fn(
    scale_fn: torch.nn.Module, samples: Samples, spec: QuantSpec, zero: float = 0.0, max_per_condition: int = 1 << 16
) -> tuple[Tensor, Tensor]:
    """Quantization MSE of a scale function on (held-out) samples: returns conds (N,) and MSE (N,).

    Use it on conditions that were not calibrated (other samplers, step counts, noise levels beyond the training
    bounds) to measure how the MLP generalises.
    """
    conds, xs = collect_samples(samples, max_per_condition)
    return conds, evaluate_scales(xs, predict_scales(scale_fn, conds), spec, zero)


def train_scale_mlp(mlp: ScaleMLP, conds: Tensor, scales: Tensor, steps: int = 300, lr: float = 1e-2) -> Tensor:
    """Regress the MLP's log-scale onto log(scales): full-batch Adam with cosine-decayed lr (deterministic).

    conds: (N,) normalised conditions; scales: (N,) or (N, n_out) positive targets. Returns the loss per step (steps,).
    """
    p = next(mlp.parameters())
    c = conds.reshape(-1).to(p)
    target = scales.to(p).reshape(c.numel(), -1).log()
    if target.shape[1] != mlp.n_out:
        raise ValueError(f"{target.shape[1]} target columns for an MLP with {mlp.n_out} outputs")
    opt = torch.optim.Adam(mlp.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, 1))
    losses = torch.empty(steps)
    with torch.enable_grad():
        for i in range(steps):
            loss = (mlp.log_scale(c) - target).pow(2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses[i] = loss.detach()
    return losses


@dataclass
class TdqFitConfig:
    """Sampling, MLP shape and training of one TDQ fit (the grid and MSE search come from the QuantSpec)."""

    max_per_condition: int = 1 << 16
    n_freqs: int = 4
    hidden: int = 32
    depth: int = 2
    act: str = "silu"
    steps: int = 300
    lr: float = 1e-2
    seed: int = 0


@dataclass
class TdqFit:
    """Result of ``fit_tdq`` for one quantizer; per-condition tensors are (N,) over ``conds``."""

    mlp: ScaleMLP
    conds: Tensor
    zero: float
    static_scale: float
    opt_scales: Tensor
    mlp_scales: Tensor
    static_mse: Tensor
    opt_mse: Tensor
    mlp_mse: Tensor
    losses: Tensor = field(repr=False)

    def summary(self) -> dict[str, float]:
        """Scalar fit errors for a layers.csv row: log-scale RMSE vs the per-condition optimum, and the
        quantization MSE of the static and MLP scales relative to the optimum (1.0 = optimal), averaged over c."""
        log_opt = self.opt_scales.log()
        return {
            "n_conditions": float(self.conds.numel()),
            "static_scale": self.static_scale,
            "log_rmse_static": float((log_opt - torch.log(torch.tensor(self.static_scale))).pow(2).mean().sqrt()),
            "log_rmse_mlp": float((log_opt - self.mlp_scales.log()).pow(2).mean().sqrt()),
            "mse_ratio_static": float((self.static_mse / self.opt_mse.clamp_min(1e-30)).mean()),
            "mse_ratio_mlp": float((self.mlp_mse / self.opt_mse.clamp_min(1e-30)).mean()),
            "final_loss": float(self.losses[-1]) if self.losses.numel() else 0.0,
        }


def fit_tdq(samples: Samples, spec: QuantSpec, cfg: TdqFitConfig | None = None) -> TdqFit:
    """Static fit → per-condition optimal scales → ScaleMLP initialised at the static scale, trained on log-scale.

    samples: activation samples per normalised condition (see ``collect_samples``), for one quantizer.
    The returned ``mlp`` is the quantizer's ``scale_fn``; with an asymmetric spec, ``zero`` is its static zero point.
    """
    cfg = cfg or TdqFitConfig()
    conds, xs = collect_samples(samples, cfg.max_per_condition, cfg.seed)
    static_scale, zero = fit_static_scale(xs, spec, cfg.seed)
    opt_scales = fit_condition_scales(xs, spec, zero)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        mlp = ScaleMLP(static_scale, cfg.n_freqs, cfg.hidden, cfg.depth, cfg.act)
    losses = train_scale_mlp(mlp, conds, opt_scales, cfg.steps, cfg.lr)
    mlp_scales = predict_scales(mlp, conds)
    return TdqFit(
        mlp=mlp,
        conds=conds,
        zero=zero,
        static_scale=static_scale,
        opt_scales=opt_scales,
        mlp_scales=mlp_scales,
        static_mse=evaluate_scales(xs, [static_scale] * len(xs), spec, zero),
        opt_mse=evaluate_scales(xs, opt_scales, spec, zero),
        mlp_mse=evaluate_scales(xs, mlp_scales, spec, zero),
        losses=losses,
    )
