"""Noise schedule → log-SNR λ(t) = log ᾱ(t) − log(1 − ᾱ(t)), and the normalised TDQ condition.

Timesteps live in the training index space [0, T−1] (T = ``num_train_timesteps``), as diffusers passes them to the
denoiser: DDPM, DDIM and DPMSolver pass integers, Euler passes floats (fractional with Karras sigmas).

* λ at a fractional timestep is interpolated linearly *in λ* between the two integer timesteps around it. Euler's
  ``_sigma_to_t`` interpolates linearly in log σ = −λ/2, so for timesteps made from sigmas (Karras, exponential,
  custom) this recovers the scheduler's σ exactly. Euler's default timesteps interpolate σ itself linearly; the gap
  to log-linear is second order in one step of the table (< 1e-3 in λ for the usual schedules).
* σ² = (1 − ᾱ)/ᾱ ⇒ λ = −2 log σ, so both tables agree by construction.
* DPMSolver with Karras sigmas rounds its timesteps, so λ(t) of the t the denoiser gets can be ~0.1 off its σ
  (SD 1.5 betas, 20 steps); calibration goes through the same map, so the two stay consistent.
* squaredcos_cap_v2: diffusers clips the last beta at 0.999, so λ(T−1) = −19.8 sits far below λ(T−2) = −12.9.
* A zero ᾱ (zero terminal SNR) is replaced by 2**-24, what diffusers' Euler does, so λ stays finite (−16.64).
* Euler with ``timestep_type="continuous"`` and v-prediction passes t = log(σ)/4, so λ = −8 t.

Normalisation (one code path for the three TDQ conditions, see ``make_condition_fn``):
``c = 2 (x − lo) / (hi − lo) − 1``

* ``timestep``: x = t, (lo, hi) = (0, T−1): t = 0 → −1, t = T−1 → +1.
* ``logsnr``: x = λ, (lo, hi) = (λ(T−1), λ(0)) of the *training* schedule (``scheduler.alphas_cumprod``, which
  every diffusers sampler derives from the model's betas, whatever the sampler or step count): the cleanest training
  noise level → +1, the noisiest → −1, so c rises with SNR (and falls with t). E.g. SD 1.5 (scaled_linear
  0.00085..0.012): λ ∈ [−5.364, 7.069]; PixArt-α (linear 1e-4..0.02): λ ∈ [−10.118, 9.210]. The bounds belong to
  the calibration (``ConditionFn.to_config``) and are passed back at inference, so a different sampler or a model
  with another schedule maps λ through the calibration's map.
* ``static``: c = 0.

Out of range, c is extrapolated linearly (not clamped) by default: conditions outside the calibrated range stay
distinguishable to the MLP, and how well it generalises there is measured (``fit.evaluate_scale_fn``), not assumed.
``clip=True`` clips c to [−1, 1] instead. Inside the training schedule, c never leaves [−1, 1].
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

ConditionKind = Literal["static", "timestep", "logsnr"]
ZERO_SNR_ALPHA_BAR = 2.0**-24  # diffusers' Euler stand-in for ᾱ = 0


def _as_float64(x: float | Tensor) -> Tensor:
    """Any scalar or tensor → CPU float64 tensor (same shape)."""
    return torch.as_tensor(x).detach().to("cpu", torch.float64)


def log_snr_from_alphas_cumprod(alphas_cumprod: Tensor, t: float | Tensor | None = None) -> Tensor:
    """λ = log ᾱ − log(1 − ᾱ) of a training schedule, at integer or fractional timesteps.

    alphas_cumprod: (T,) ᾱ at integer timesteps 0..T−1 (any float dtype); ᾱ = 0 is read as 2**-24.
    t: timesteps in [0, T−1], float or tensor of any shape; ``None`` → the whole table.
    Returns float64 CPU, shape of ``t`` (or (T,)). Between integers λ is interpolated linearly; outside [0, T−1]
    it is extrapolated from the end segments.
    """
    acp = _as_float64(alphas_cumprod)
    acp = torch.where(acp > 0, acp, torch.full_like(acp, ZERO_SNR_ALPHA_BAR))
    table = acp.log() - torch.log1p(-acp)
    if t is None:
        return table
    if table.numel() < 2:
        raise ValueError("need at least 2 timesteps in alphas_cumprod")
    t = _as_float64(t)
    i0 = t.floor().clamp(0, table.numel() - 2).long()
    w = t - i0
    return table[i0] + w * (table[i0 + 1] - table[i0])


def log_snr_from_sigma(sigma: float | Tensor) -> Tensor:
    """λ = −2 log σ for Karras/Euler sigmas (σ² = (1 − ᾱ)/ᾱ). Returns float64 CPU, shape of ``sigma``; σ = 0 → +inf."""
    return -2.0 * _as_float64(sigma).log()


def _alphas_cumprod(scheduler: Any) -> Tensor:
    acp = getattr(scheduler, "alphas_cumprod", None)
    if acp is None:
        name = type(scheduler).__name__
        raise TypeError(f"{name} has no alphas_cumprod (flow-matching schedulers are not supported)")
    return acp


def _is_continuous_v(scheduler: Any) -> bool:
    """Euler's EDM-style mode: the denoiser gets t = log(σ)/4 instead of a training index."""
    cfg = getattr(scheduler, "config", {})
    return cfg.get("timestep_type", "discrete") == "continuous" and cfg.get("prediction_type") == "v_prediction"


def log_snr_table(scheduler: Any) -> Tensor:
    """λ at every training timestep 0..T−1 of a diffusers scheduler: (T,) float64, decreasing in t."""
    return log_snr_from_alphas_cumprod(_alphas_cumprod(scheduler))


def log_snr_bounds(scheduler: Any) -> tuple[float, float]:
    """(λ_min, λ_max) = (λ(T−1), λ(0)) of the scheduler's training schedule: the ``logsnr`` normalisation bounds."""
    table = log_snr_table(scheduler)
    return float(table.min()), float(table.max())


def log_snr_at(scheduler: Any, t: float | Tensor) -> Tensor:
    """λ at the timesteps a pipeline passes to the denoiser (see module doc). Returns float64, shape of ``t``."""
    if _is_continuous_v(scheduler):
        return -8.0 * _as_float64(t)
    return log_snr_from_alphas_cumprod(_alphas_cumprod(scheduler), t)


@dataclass(frozen=True)
class AffineNormalizer:
    """x ∈ [lo, hi] → c = 2 (x − lo)/(hi − lo) − 1 ∈ [−1, 1]; linear beyond unless ``clip``."""

    lo: float
    hi: float
    clip: bool = False

    def __post_init__(self) -> None:
        if not self.hi > self.lo:
            raise ValueError(f"need hi > lo, got lo={self.lo}, hi={self.hi}")

    def __call__(self, x: Tensor) -> Tensor:
        c = 2.0 * (x - self.lo) / (self.hi - self.lo) - 1.0
        return c.clamp(-1.0, 1.0) if self.clip else c


class ConditionFn:
    """t → normalised TDQ condition c, for ``kind`` in static | timestep | logsnr (build with ``make_condition_fn``).

    Call with t: float, int or tensor of shape () or (B,) in the scheduler's timestep units.
    Returns float32 CPU tensor (1,) for a scalar, else (B,).
    """

    def __init__(self, kind: ConditionKind, scheduler: Any = None, normalizer: AffineNormalizer | None = None):
        self.kind = kind
        self.scheduler = scheduler
        self.normalizer = normalizer

    def raw(self, t: float | Tensor) -> Tensor:
        """The unnormalised condition: λ (logsnr), t (timestep) or 0 (static); float64, shape (1,) or (B,)."""
        t = _as_float64(t).reshape(-1)
        if self.kind == "static":
            return torch.zeros_like(t)
        if self.kind == "timestep":
            return t
        return log_snr_at(self.scheduler, t)

    def __call__(self, t: float | Tensor) -> Tensor:
        x = self.raw(t)
        c = x if self.normalizer is None else self.normalizer(x)
        return c.float()

    @property
    def bounds(self) -> tuple[float, float] | None:
        return None if self.normalizer is None else (self.normalizer.lo, self.normalizer.hi)

    def to_config(self) -> dict:
        """JSON-able record to store with a calibration (in checkpoints `clip` is written under its first name,
        "clamp"); rebuild with ``ConditionFn.from_config``."""
        clip = False if self.normalizer is None else self.normalizer.clip
        return {"kind": self.kind, "bounds": None if self.bounds is None else list(self.bounds), "clamp": clip}

    @staticmethod
    def from_config(config: dict, scheduler: Any) -> ConditionFn:
        """The condition of a calibration record (``to_config``) on `scheduler`, with the calibration's bounds."""
        bounds = tuple(config["bounds"]) if config.get("bounds") is not None else None
        return make_condition_fn(config["kind"], scheduler, bounds, config.get("clamp", False))

    def __repr__(self) -> str:
        return f"ConditionFn(kind={self.kind!r}, bounds={self.bounds})"


def make_condition_fn(
    kind: ConditionKind,
    scheduler: Any = None,
    bounds: tuple[float, float] | list[float] | None = None,
    clip: bool = False,
) -> ConditionFn:
    """The TDQ condition for a scheduler: ``fn(t) -> c`` (see ``ConditionFn`` and the module doc).

    kind: ``static`` (c = 0, scheduler unused), ``timestep`` (t/(T−1) → [−1, 1]) or ``logsnr`` (λ(t) → [−1, 1]).
    bounds: (lo, hi) of the raw condition; default from the scheduler's training schedule. Pass the calibration's
        bounds at inference. clip: clip c to [−1, 1] instead of extrapolating linearly.
    """
    if kind == "static":
        return ConditionFn("static")
    if kind not in ("timestep", "logsnr"):
        raise ValueError(f"unknown condition kind {kind!r}; expected static, timestep or logsnr")
    if scheduler is None:
        raise ValueError(f"condition {kind!r} needs the scheduler")
    if bounds is None:
        if kind == "timestep":
            if _is_continuous_v(scheduler):
                raise ValueError("timestep condition needs index timesteps; this Euler scheduler passes log(σ)/4")
            bounds = (0.0, float(scheduler.config.num_train_timesteps - 1))
        else:
            bounds = log_snr_bounds(scheduler)
    return ConditionFn(kind, scheduler, AffineNormalizer(float(bounds[0]), float(bounds[1]), clip))
