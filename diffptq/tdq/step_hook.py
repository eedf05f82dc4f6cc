"""Feed the TDQ condition to the quantizers at inference, from the denoiser's own ``timestep`` argument.

A forward pre-hook on the denoiser (PixArtTransformer2DModel, UNet2DConditionModel, any module whose forward has a
``timestep`` parameter) reads the timestep of each call, maps it through a ``ConditionFn`` and calls
``set_condition(c)`` on every registered quantizer. Pipelines stay untouched: no sampling loop is rewritten.

* The timestep is found by name through the forward's signature, so it works as a keyword (PixArt) or positionally
  (the UNet's 2nd argument; PixArt's 2nd positional is ``encoder_hidden_states``, hence no fixed position).
* Cached per step: when a call brings the same timestep values as the previous one (CFG halves run as two calls,
  PNDM's repeated t), nothing is recomputed. ``reset()`` forgets the cache.
* Under classifier-free guidance the (B,) timestep has identical entries: the quantizers get one float. Different
  entries (mixed-timestep calibration batches) are passed on as a (B,) float32 condition tensor.
* Euler passes float timesteps (fractional with Karras sigmas); ``ConditionFn`` interpolates λ in the scheduler's
  own table, consistent with its sigmas (see ``schedule``). Reading the timestep costs one device→host copy per call.
"""
from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from typing import Any, Protocol

import torch
from torch import Tensor, nn

ConditionFnLike = Callable[[Tensor], Tensor]  # t (B,) → normalised condition (B,), e.g. schedule.ConditionFn


class ConditionedQuantizer(Protocol):
    """What the hook needs of a quantizer (e.g. ``diffptq.quant.act.TimeConditionedActQuantizer``)."""

    def set_condition(self, c: float | Tensor) -> None: ...


def find_conditioned_quantizers(module: nn.Module) -> list[nn.Module]:
    """Every submodule (module included) with a callable ``set_condition``, in ``modules()`` order."""
    return [m for m in module.modules() if callable(getattr(m, "set_condition", None))]


def apply_condition(
    quantizers: Iterable[ConditionedQuantizer], condition_fn: ConditionFnLike, timestep: float | Tensor
) -> float | Tensor:
    """Map a timestep (scalar, () or (B,)) to the condition and hand it to every quantizer; returns what they got.

    Identical entries (CFG) → one float; different entries (mixed-timestep batches, e.g. a calibration driver
    that runs blocks directly, bypassing the denoiser's forward and so this module's hook) → a (B,) float32 tensor.
    """
    values = torch.as_tensor(timestep).detach().reshape(-1).to("cpu", torch.float64)
    uniform = bool((values == values[0]).all())
    c = condition_fn(values[:1] if uniform else values)
    cond: float | Tensor = float(c[0]) if uniform else c
    for q in quantizers:
        q.set_condition(cond)
    return cond


def _timestep_position(forward: Any) -> int | None:
    """Index of ``timestep`` among the positional arguments of a bound forward; None if it has no such parameter."""
    try:
        params = list(inspect.signature(forward).parameters.values())
    except (TypeError, ValueError):
        return 1
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    for i, p in enumerate(positional):
        if p.name == "timestep":
            return i
    return 1 if any(p.kind == p.VAR_POSITIONAL for p in params) else None


class ConditionHook:
    """The handle ``attach_condition_hook`` returns: holds the pre-hook, the step cache and counters.

    last_timestep: the last call's timestep as a tuple of floats (one if uniform); last_condition: what the quantizers
    got (float, or a (B,) tensor); n_updates: how many times the quantizers were updated.
    """

    def __init__(self, denoiser: nn.Module, quantizers: Iterable[ConditionedQuantizer], condition_fn: ConditionFnLike):
        self.quantizers = list(quantizers)
        self.condition_fn = condition_fn
        self.position = _timestep_position(denoiser.forward)
        self.last_timestep: tuple[float, ...] | None = None
        self.last_condition: float | Tensor | None = None
        self.n_updates = 0
        self._handle = denoiser.register_forward_pre_hook(self._pre_hook, with_kwargs=True)

    def _timestep(self, args: tuple, kwargs: dict) -> Any:
        if "timestep" in kwargs:
            return kwargs["timestep"]
        if self.position is not None and len(args) > self.position:
            return args[self.position]
        return None

    def _pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        t = self._timestep(args, kwargs)
        if t is None:
            raise ValueError(f"{type(module).__name__} was called without a timestep: cannot set the TDQ condition")
        values = torch.as_tensor(t).detach().reshape(-1).to("cpu", torch.float64)
        if bool((values == values[0]).all()):
            values = values[:1]  # CFG: one timestep, whatever the batch size
        key = tuple(values.tolist())
        if key == self.last_timestep:
            return None
        self.last_condition = apply_condition(self.quantizers, self.condition_fn, values)
        self.last_timestep = key
        self.n_updates += 1
        return None

    def reset(self) -> None:
        """Forget the cached timestep, so the next call sets the condition again."""
        self.last_timestep = None

    def remove(self) -> None:
        """Detach the hook from the denoiser."""
        self._handle.remove()

    def __enter__(self) -> ConditionHook:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def attach_condition_hook(
    denoiser: nn.Module, quantizers: Iterable[ConditionedQuantizer] | nn.Module, condition_fn: ConditionFnLike
) -> ConditionHook:
    """Register the condition pre-hook on ``denoiser``; ``quantizers`` is a list, or a module searched for them.

    Returns the handle (also a context manager); ``detach_condition_hook(handle)`` or ``handle.remove()`` undoes it.
    """
    if isinstance(quantizers, nn.Module):
        quantizers = find_conditioned_quantizers(quantizers)
    return ConditionHook(denoiser, quantizers, condition_fn)


def detach_condition_hook(handle: ConditionHook) -> None:
    """Remove a hook made by ``attach_condition_hook``."""
    handle.remove()
