"""The checks every configuration value goes through: one function per kind of value, one-line messages.

Each returns the value (converted where a text is given) or raises ConfigError whose message names the flag, so the
same check serves a command-line flag (diffptq.cli wraps it for argparse) and a dataclass field (`__post_init__`).
No torch here: flags are checked before any heavy import.
"""
from __future__ import annotations

import math
from collections.abc import Iterable

from diffptq.errors import ConfigError

FLOAT_BITS = 16  # a bit width of 16 (or 32) means "not quantized": float activations
MAX_SEED = 2**63 - 1  # torch.Generator takes seeds up to 2^64 - 1; runs add offsets to the seed


def _number(value, what: str, kind=float):
    if isinstance(value, bool):
        raise ConfigError(f"{what}: expected a number, got {value!r}")
    if isinstance(value, str):
        try:
            return kind(value.strip())
        except ValueError:
            noun = "an integer" if kind is int else "a number"
            raise ConfigError(f"{what}: expected {noun}, got {value!r}") from None
    if kind is int and not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
        raise ConfigError(f"{what}: expected an integer, got {value!r}")
    return kind(value)


def check_int(value, what: str, lo: int | None = None, hi: int | None = None) -> int:
    """An integer in [lo, hi] (either bound may be None)."""
    v = _number(value, what, int)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        if hi is None:
            raise ConfigError(f"{what}: must be >= {lo}, got {v}")
        if lo is None:
            raise ConfigError(f"{what}: must be <= {hi}, got {v}")
        raise ConfigError(f"{what}: must lie in {lo}..{hi}, got {v}")
    return v


def check_positive_int(value, what: str) -> int:
    return check_int(value, what, lo=1)


def check_float(value, what: str, lo: float | None = None, hi: float | None = None, lo_open: bool = False) -> float:
    """A finite float in [lo, hi] ((lo, hi] with lo_open)."""
    v = _number(value, what, float)
    if not math.isfinite(v):
        raise ConfigError(f"{what}: must be a finite number, got {v}")
    if lo is not None and (v <= lo if lo_open else v < lo):
        raise ConfigError(f"{what}: must be {'>' if lo_open else '>='} {lo:g}, got {v:g}")
    if hi is not None and v > hi:
        raise ConfigError(f"{what}: must be <= {hi:g}, got {v:g}")
    return v


def check_seed(value, what: str = "--seed") -> int:
    return check_int(value, what, 0, MAX_SEED)


def check_bits(value, what: str = "bits", allow_float: bool = True) -> int:
    """A bit width 2..8, or (allow_float) 16 / 32 meaning float (not quantized), returned as 16."""
    v = _number(value, what, int)
    if allow_float and v in (16, 32):
        return FLOAT_BITS
    if not 2 <= v <= 8:
        extra = " (or 16 for float)" if allow_float else ""
        raise ConfigError(f"{what}: bits must lie in 2..8{extra}, got {v}")
    return v


def check_choice(value, what: str, choices: Iterable) -> str:
    choices = tuple(choices)
    if value not in choices:
        raise ConfigError(f"{what}: expected one of {', '.join(map(str, choices))}, got {value!r}")
    return value


def check_optional_guidance(value, what: str = "--guidance_scale") -> float | None:
    """None (the model's own), or a finite guidance scale >= 0 (below 1: no classifier-free guidance)."""
    return None if value is None else check_float(value, what, lo=0.0)
