"""The quantization grid (QuantSpec) and the Hessian damping rule (Damping): what a layer is quantized to and with.

The math these configure: docs/ALGORITHMS.md (§ grids and damping); the code that uses them: diffptq.quant.quantizer,
diffptq.algo.damping.
"""
from __future__ import annotations

from dataclasses import dataclass

from diffptq.config.checks import check_bits, check_choice, check_float, check_int, fail
from diffptq.errors import ConfigError

SCALE_METHODS = ("minmax", "mse")
DAMP_MODES = ("mean_diag", "lambda_max", "spread", "adaptive")
DAMP_GRID = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)  # the values "adaptive" chooses from, relative to mean diag H


@dataclass(frozen=True)
class QuantSpec:
    """A uniform integer grid.

    bits: 2..8. symmetric: signed codes with zero = 0, else unsigned codes with an integer zero point.
    group_size: None = one scale per output channel (weights) / per tensor or token (activations);
      else one scale per `group_size` contiguous input columns.
    scale_method: "minmax" or "mse" (search over clipping ratios 1 … mse_min_ratio, `mse_steps` candidates,
      minimising Σ|x − x̂|^mse_norm per row).
    """

    bits: int
    symmetric: bool = True
    group_size: int | None = None
    scale_method: str = "minmax"
    mse_steps: int = 80
    mse_min_ratio: float = 0.2
    mse_norm: float = 2.0

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or not isinstance(self.bits, int):
            raise ConfigError(f"QuantSpec.bits must be an integer in 2..8, got {self.bits!r}")
        check_bits(self.bits, "QuantSpec.bits", allow_float=False)
        if self.group_size is not None and (not isinstance(self.group_size, int) or self.group_size <= 0):
            raise ConfigError(f"QuantSpec.group_size must be a positive integer or None, got {self.group_size!r}")
        check_choice(self.scale_method, "QuantSpec.scale_method", SCALE_METHODS)
        check_int(self.mse_steps, "QuantSpec.mse_steps", lo=1)
        check_float(self.mse_min_ratio, "QuantSpec.mse_min_ratio", lo=0.0, hi=1.0, lo_open=True)

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1)) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1

    @property
    def code_dtype(self):
        """Smallest torch dtype holding every code: int8 (signed) or uint8 (unsigned)."""
        import torch

        return torch.int8 if self.symmetric else torch.uint8


@dataclass(frozen=True)
class Damping:
    """How the damping δ added to diag H is chosen; `value` is relative (to mean diag H, or to λ_max for mode
    "lambda_max"). Modes: "mean_diag" (δ = value · mean diag H), "lambda_max", "spread" (a rule on the spread of
    diag H; diffptq.algo.damping) and "adaptive": per layer, the value of `grid` whose solve gives the lowest output
    error on held-out calibration records (a `holdout` share of the prompts, never seen by H), then solved again on
    all records (diffptq.algo.heldout; the sequential driver provides the held-out records; a solver given no
    held-out data uses `value`)."""

    mode: str = "mean_diag"
    value: float = 0.01
    max_retries: int = 4
    factor: float = 10.0
    ref_spread: float = 100.0
    max_boost: float = 10.0
    cond_floor: float = 1e-6
    grid: tuple[float, ...] = DAMP_GRID
    holdout: float = 0.25

    def __post_init__(self) -> None:
        check_choice(self.mode, "Damping.mode", DAMP_MODES)
        check_float(self.value, "Damping.value", lo=0.0, lo_open=True)
        for v in self.grid:
            check_float(v, "Damping.grid", lo=0.0, lo_open=True)
        check_float(self.holdout, "Damping.holdout", lo=0.0, hi=0.5, lo_open=True)

    @property
    def setting(self) -> float | str:
        """As --damp gives it: the number for the mean-diagonal rule, else the mode's name."""
        return self.value if self.mode == "mean_diag" else self.mode

    @property
    def label(self) -> str:
        return f"{self.setting:g}" if self.mode == "mean_diag" else self.mode

    def fixed(self, value: float) -> Damping:
        """The mean-diagonal rule at `value` with this rule's retries: what "adaptive" solves with once it has chosen
        `value` from its grid."""
        return Damping("mean_diag", value, self.max_retries, self.factor)

    @classmethod
    def parse(cls, text: str, what: str = "--damp") -> Damping:
        """--damp: a number > 0 (relative to mean diag H), 'adaptive', 'spread' or 'lambda_max'."""
        text = str(text).strip()
        if text in ("adaptive", "spread"):
            return cls(text)
        if text == "lambda_max":
            return cls("lambda_max", value=1e-6)
        try:
            value = float(text)
        except ValueError:
            raise fail(what, f"expected a number > 0 (relative to mean diag H), 'adaptive', 'spread' or "
                             f"'lambda_max', got {text!r}") from None
        return cls("mean_diag", check_float(value, what, lo=0.0, lo_open=True))


DEFAULT_DAMPING = Damping()  # the one default rule: 1% of mean diag H


def as_damping(damp: float | str | Damping) -> Damping:
    """A Damping from itself, a number (the mean-diagonal rule with that value) or a mode name."""
    if isinstance(damp, Damping):
        return damp
    if isinstance(damp, str):
        if damp in ("adaptive", "spread", "lambda_max"):
            return Damping.parse(damp)
        raise ConfigError(f"damp must be a float, 'adaptive', 'spread', 'lambda_max' or a Damping, got {damp!r}")
    return Damping("mean_diag", check_float(damp, "damp", lo=0.0, lo_open=True))
