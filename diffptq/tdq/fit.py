"""Fit TDQ scales from activation samples: per-condition optimal step sizes, then a scale MLP that reproduces them.

Pure tensor functions: the caller collects, for one activation quantizer, samples per condition value c (the
normalised condition of ``schedule.make_condition_fn``) and gets back a trained ``ScaleMLP`` plus fit errors.

Grid and MSE search are those of ``diffptq.quant.quantizer`` (``QuantSpec``, ``fit_rows``, ``fake_quant``): clipping
ratios 1 … ``spec.mse_min_ratio`` in ``spec.mse_steps`` steps (``scale_method="minmax"`` gives min-max scales).

* per-condition optimum: ``fit_rows`` on that condition's samples (scale and, if asymmetric, zero point).
* static baseline: one ``fit_rows`` on all conditions pooled, each weighted equally (equal-size subsamples).
* the MLP predicts the scale only; symmetric grids have z = 0. On an asymmetric grid the zero point follows the
  predicted scale by a rule with one static parameter p (``zero_for_scale``):
  ``offset``: z(c) = round(p / s(c)) — the lowest codable value −p stays put, as the floor of GELU/SiLU outputs
  (≈ −0.17 / −0.28) does while their positive range drifts with the noise level;
  ``integer``: z(c) = p — the whole distribution scales with s(c), keeping its shape.
  ``fit_zero_rule`` picks p (and, with ``auto``, the rule) among the per-condition optima's own values (s_c·z_c,
  resp. z_c) by the lowest mean MSE relative to the optimum, at the optimal scales.
  ``TimeConditionedActQuantizer`` is symmetric-only for now; the asymmetric fit is here for when it is not.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from diffptq.config.tdq import TdqFitConfig  # noqa: F401 - the fit's config, used here
from diffptq.quant.quantizer import QuantSpec, fake_quant, fit_rows

from .scale_mlp import ScaleMLP

ZeroRule = Literal["auto", "offset", "integer"]
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


def zero_for_scale(scales: Tensor, spec: QuantSpec, rule: ZeroRule = "offset", param: float = 0.0) -> Tensor:
    """Integer zero points (N,) for conditioned scales (N,) on an asymmetric grid (module doc); zeros if symmetric."""
    if spec.symmetric:
        return torch.zeros_like(scales)
    if rule == "integer":
        return torch.full_like(scales, float(param))
    if rule == "offset":
        return torch.round(param / scales).clamp(spec.qmin, spec.qmax)
    raise ValueError(f"unknown zero rule {rule!r}; expected offset or integer")


def _candidates(values: Tensor, k: int) -> list[float]:
    """The distinct values, or k quantiles of them (bounds the search to k evaluations per condition)."""
    distinct = values.double().unique()
    if distinct.numel() > k:
        distinct = distinct.quantile(torch.linspace(0, 1, k, dtype=torch.float64), interpolation="nearest")
    return distinct.tolist()


def fit_zero_rule(
    xs: Sequence[Tensor],
    scales: Tensor,
    zeros: Tensor,
    spec: QuantSpec,
    rule: ZeroRule = "auto",
    max_candidates: int = 16,
) -> tuple[ZeroRule, float]:
    """(rule, p) of the zero-point rule, from per-condition optimal scales and zeros (N,) (module doc).

    Candidates are the optima's own s_c·z_c (offset) and z_c (integer), at most ``max_candidates`` quantiles of
    each; the one with the lowest mean of MSE / optimal MSE over the conditions wins. Symmetric → ("offset", 0).
    """
    if spec.symmetric:
        return "offset", 0.0
    opt = evaluate_scales(xs, scales, zeros, spec).clamp_min(1e-30)
    rules = ("offset", "integer") if rule == "auto" else (rule,)
    cands = [(r, p) for r in rules for p in _candidates(scales * zeros if r == "offset" else zeros, max_candidates)]

    def cost(cand: tuple[ZeroRule, float]) -> float:
        z = zero_for_scale(scales, spec, *cand)
        return float((evaluate_scales(xs, scales, z, spec) / opt).mean())

    return min(cands, key=cost)


def fit_static_scale(xs: Sequence[Tensor], spec: QuantSpec, seed: int = 0) -> tuple[float, float]:
    """One (scale, zero) for all conditions: ``fit_rows`` on equal-size random subsamples of each flat x."""
    n = min(x.numel() for x in xs)
    gen = torch.Generator().manual_seed(seed)
    pooled = torch.cat([x[torch.randperm(x.numel(), generator=gen)[:n].to(x.device)] for x in xs])
    scale, zero = fit_rows(pooled.reshape(1, -1), spec)
    return float(scale), float(zero)


def fit_condition_scales(xs: Sequence[Tensor], spec: QuantSpec) -> tuple[Tensor, Tensor]:
    """Optimal per-tensor (scale, zero) of each condition's flat samples: two (N,) float32 CPU tensors."""
    params = [fit_rows(x.reshape(1, -1), spec) for x in xs]
    return torch.stack([p[0].reshape(()).cpu() for p in params]), torch.stack([p[1].reshape(()).cpu() for p in params])


def evaluate_scales(
    xs: Sequence[Tensor], scales: Tensor | Sequence[float], zeros: Tensor | Sequence[float], spec: QuantSpec
) -> Tensor:
    """Quantization MSE of each condition's samples on its grid (scale, zero): (N,) float32."""
    return torch.tensor([quant_mse(x, float(s), float(z), spec) for x, s, z in zip(xs, scales, zeros, strict=True)])


@torch.no_grad()
def predict_scales(scale_fn: torch.nn.Module, conds: Tensor) -> Tensor:
    """Scales of an n_out = 1 scale function at conds (N,): (N,) float32 CPU."""
    return torch.stack([scale_fn(c.reshape(1)).reshape(()).float().cpu() for c in conds.reshape(-1)])


def evaluate_scale_fn(
    scale_fn: torch.nn.Module,
    samples: Samples,
    spec: QuantSpec,
    zeros_for: Callable[[Tensor], Tensor] | None = None,
    max_per_condition: int = 1 << 16,
) -> tuple[Tensor, Tensor]:
    """Quantization MSE of a scale function on (held-out) samples: returns conds (N,) and MSE (N,).

    Use it on conditions that were not calibrated (other samplers, step counts, noise levels beyond the training
    bounds) to measure how the MLP generalises. zeros_for: scales (N,) → zero points (N,), e.g. ``TdqFit.zeros_for``;
    None → 0 (symmetric).
    """
    conds, xs = collect_samples(samples, max_per_condition)
    scales = predict_scales(scale_fn, conds)
    zeros = torch.zeros_like(scales) if zeros_for is None else zeros_for(scales)
    return conds, evaluate_scales(xs, scales, zeros, spec)


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
class TdqFit:
    """Result of ``fit_tdq`` for one quantizer; per-condition tensors are (N,) over ``conds`` (ascending).

    mlp: the quantizer's ``scale_fn``; zero_rule, zero_param: its zero points (``zeros_for``, asymmetric only).
    static_*: the single-scale baseline. opt_*: per-condition optimum.
    *_mse: quantization MSE per condition of the static, optimal and MLP grids.
    """

    spec: QuantSpec
    mlp: ScaleMLP
    conds: Tensor
    static_scale: float
    static_zero: float
    zero_rule: ZeroRule
    zero_param: float
    opt_scales: Tensor
    opt_zeros: Tensor
    mlp_scales: Tensor
    static_mse: Tensor
    opt_mse: Tensor
    mlp_mse: Tensor
    losses: Tensor = field(repr=False)

    def zeros_for(self, scales: Tensor) -> Tensor:
        """Zero points (N,) for scales (N,) predicted by ``mlp`` (see ``zero_for_scale``)."""
        return zero_for_scale(scales, self.spec, self.zero_rule, self.zero_param)

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
    Deterministic for a given ``cfg.seed`` (subsampling and MLP initialisation; training is full-batch).
    """
    cfg = cfg or TdqFitConfig()
    conds, xs = collect_samples(samples, cfg.max_per_condition, cfg.seed)
    static_scale, static_zero = fit_static_scale(xs, spec, cfg.seed)
    opt_scales, opt_zeros = fit_condition_scales(xs, spec)
    zero_rule, zero_param = fit_zero_rule(xs, opt_scales, opt_zeros, spec, cfg.zero_rule)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        mlp = ScaleMLP(static_scale, cfg.n_freqs, cfg.hidden, cfg.depth, cfg.act)
    losses = train_scale_mlp(mlp, conds, opt_scales, cfg.steps, cfg.lr)
    mlp_scales = predict_scales(mlp, conds)
    mlp_zeros = zero_for_scale(mlp_scales, spec, zero_rule, zero_param)
    n = len(xs)
    return TdqFit(
        spec=spec,
        mlp=mlp,
        conds=conds,
        static_scale=static_scale,
        static_zero=static_zero,
        zero_rule=zero_rule,
        zero_param=zero_param,
        opt_scales=opt_scales,
        opt_zeros=opt_zeros,
        mlp_scales=mlp_scales,
        static_mse=evaluate_scales(xs, [static_scale] * n, [static_zero] * n, spec),
        opt_mse=evaluate_scales(xs, opt_scales, opt_zeros, spec),
        mlp_mse=evaluate_scales(xs, mlp_scales, mlp_zeros, spec),
        losses=losses,
    )
