"""The checks every configuration value goes through: one function per kind of value, one-line messages.

Each returns the value (converted where a text is given) or raises ConfigError. `what` names the value in the
message ("--seed: must lie in ..."); argparse types (diffptq.cli.types) pass what="" and argparse adds the flag's
name. The same check thus serves a command-line flag and a dataclass field (`__post_init__`). No torch here: flags
are checked before anything heavy is imported.
"""
from __future__ import annotations

import math
from collections.abc import Iterable

from diffptq.errors import ConfigError

FLOAT_BITS = 16  # a bit width of 16 (or 32) means "not quantized": float activations
MAX_SEED = 2**63 - 1  # torch.Generator takes seeds up to 2^64 - 1; runs add offsets to the seed


def fail(what: str, message: str) -> ConfigError:
    """The error for a bad value: '<what>: <message>' (just the message when `what` is empty)."""
    return ConfigError(f"{what}: {message}" if what else message)


def _number(value, what: str, kind=float):
    noun = "an integer" if kind is int else "a number"
    if isinstance(value, bool):
        raise fail(what, f"expected {noun}, got {value!r}")
    if isinstance(value, str):
        try:
            return kind(value.strip())
        except ValueError:
            raise fail(what, f"expected {noun}, got {value!r}") from None
    if kind is int:
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if not isinstance(value, int):
            raise fail(what, f"expected {noun}, got {value!r}")
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise fail(what, f"expected {noun}, got {value!r}") from None


def check_int(value, what: str = "", lo: int | None = None, hi: int | None = None) -> int:
    """An integer in [lo, hi] (either bound may be None)."""
    v = _number(value, what, int)
    if lo is not None and hi is not None and not lo <= v <= hi:
        raise fail(what, f"must lie in {lo}..{hi}, got {v}")
    if lo is not None and v < lo:
        raise fail(what, f"must be >= {lo}, got {v}")
    if hi is not None and v > hi:
        raise fail(what, f"must be <= {hi}, got {v}")
    return v


def check_positive_int(value, what: str = "") -> int:
    return check_int(value, what, lo=1)


def check_non_negative_int(value, what: str = "") -> int:
    return check_int(value, what, lo=0)


def check_float(value, what: str = "", lo: float | None = None, hi: float | None = None,
                lo_open: bool = False) -> float:
    """A finite float in [lo, hi] ((lo, hi] with lo_open)."""
    v = _number(value, what, float)
    if not math.isfinite(v):
        raise fail(what, f"must be a finite number, got {v}")
    if lo is not None and (v <= lo if lo_open else v < lo):
        raise fail(what, f"must be {'>' if lo_open else '>='} {lo:g}, got {v:g}")
    if hi is not None and v > hi:
        raise fail(what, f"must be <= {hi:g}, got {v:g}")
    return v


def check_seed(value, what: str = "--seed") -> int:
    return check_int(value, what, 0, MAX_SEED)


def check_bits(value, what: str = "", allow_float: bool = True) -> int:
    """A bit width 2..8, or (allow_float) 16 / 32 meaning float (not quantized), returned as 16."""
    v = _number(value, what, int)
    if allow_float and v in (16, 32):
        return FLOAT_BITS
    if not 2 <= v <= 8:
        raise fail(what, f"bits must lie in 2..8{' (or 16 for float)' if allow_float else ''}, got {v}")
    return v


def check_choice(value, what: str, choices: Iterable) -> str:
    choices = tuple(choices)
    if value not in choices:
        raise fail(what, f"expected one of {', '.join(map(str, choices))}, got {value!r}")
    return value


def check_guidance(value, what: str = "--guidance_scale") -> float | None:
    """None (the model's own), or a finite guidance scale >= 0 (below 1: no classifier-free guidance)."""
    return None if value is None else check_float(value, what, lo=0.0)
