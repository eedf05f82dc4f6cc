"""TdqConfig and TdqFitConfig: log-SNR (or timestep, or static) TDQ activation quantization and its scale fit.

The weights of a TDQ run are a SequentialConfig (its `act` grid gives the activation bits); TdqConfig holds what is
TDQ's own. Method: docs/ALGORITHMS.md (log-SNR TDQ); code: diffptq.tdq.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from diffptq.config.checks import (
    check_choice,
    check_float,
    check_non_negative_int,
    check_positive_int,
    check_seed,
)

CONDITIONS = ("static", "timestep", "logsnr")
EXTRAPOLATIONS = ("clamp", "mlp")  # beyond the calibrated conditions: hold the edge scale, or evaluate the MLP
ZERO_RULES = ("auto", "offset", "integer")
SCALE_METHODS_TDQ = ("mse", "minmax")


@dataclass(frozen=True)
class TdqFitConfig:
    """Sampling, MLP shape and training of one TDQ fit (the grid and MSE search come from the QuantSpec).

    max_per_condition: activation samples kept per layer and condition. n_freqs = 3 (top frequency 2π over
    c ∈ [−1, 1]): with ~10–50 calibrated conditions whose optima carry sampling noise, 4+ frequencies start to
    interpolate that noise (worse on held-out conditions); 2 underfits sharp drifts. steps, lr: Adam on the MLP.
    """

    max_per_condition: int = 1 << 14
    n_freqs: int = 3
    hidden: int = 32
    depth: int = 2
    act: str = "silu"
    steps: int = 300
    lr: float = 1e-2
    seed: int = 0
    zero_rule: str = "auto"

    def __post_init__(self) -> None:
        check_positive_int(self.max_per_condition, "--max_per_condition")
        check_positive_int(self.n_freqs, "--n_freqs")
        check_positive_int(self.hidden, "--hidden")
        check_positive_int(self.depth, "TdqFitConfig.depth")
        check_non_negative_int(self.steps, "--mlp_steps")
        check_float(self.lr, "TdqFitConfig.lr", lo=0.0, lo_open=True)
        check_seed(self.seed)
        check_choice(self.zero_rule, "TdqFitConfig.zero_rule", ZERO_RULES)


@dataclass(frozen=True)
class TdqConfig:
    """One TDQ calibration (besides the weights' SequentialConfig).

    condition: what the activation scales follow (static: one scale; timestep; logsnr). act_symmetric: symmetric
    activation grid (else asymmetric, the zero point from an offset MLP). act_scale_method: ``mse`` (the
    per-condition MSE search) or ``minmax``. fit: the scale MLP's fit. extrapolate: clamp | mlp beyond the calibrated
    conditions (``TdqActQuantizer``). refine_steps: end-to-end refinement steps per block (0: none), at refine_lr.
    """

    condition: str = "logsnr"
    act_symmetric: bool = False
    act_scale_method: str = "mse"
    fit: TdqFitConfig = field(default_factory=TdqFitConfig)
    extrapolate: str = "clamp"
    refine_steps: int = 0
    refine_lr: float = 1e-3

    def __post_init__(self) -> None:
        check_choice(self.condition, "--condition", CONDITIONS)
        check_choice(self.act_scale_method, "act_scale_method", SCALE_METHODS_TDQ)
        check_choice(self.extrapolate, "--extrapolate", EXTRAPOLATIONS)
        check_non_negative_int(self.refine_steps, "--refine_steps")
        check_float(self.refine_lr, "refine_lr", lo=0.0, lo_open=True)
