"""Inference with TDQ quantizers: one call puts the condition hook on a pipeline's denoiser, for any scheduler.

``attach_tdq(pipe)`` finds the denoiser's ``TdqActQuantizer``s, reads the calibration's condition ({kind, bounds,
clamp}, the same for all of them) and registers ``step_hook.attach_condition_hook`` with a condition function that
looks at ``pipe.scheduler`` when called, so swapping the scheduler after attaching (``models.schedulers.set_scheduler``)
is followed. The diffusers pipeline's own sampling loop runs unchanged; scales are computed once per step.
"""
from __future__ import annotations

from torch import Tensor

from diffptq.models.families import family_of

from .quantizer import tdq_quantizers
from .step_hook import ConditionHook, attach_condition_hook
from .schedule import ConditionFn

HOOK_ATTR = "diffptq_tdq_hook"


class SchedulerCondition:
    """t (scalar or (B,)) → normalised condition c (float32 (1,) or (B,)) through the pipeline's current scheduler.

    config: ``ConditionFn.to_config()`` of the calibration: kind and the calibration's normalisation bounds.
    """

    def __init__(self, pipe, config: dict):
        self.pipe = pipe
        self.config = dict(config)

    def condition_fn(self) -> ConditionFn:
        return ConditionFn.from_config(self.config, self.pipe.scheduler)

    def __call__(self, t: float | Tensor) -> Tensor:
        return self.condition_fn()(t)


def condition_config(quantizers: list) -> dict:
    """The one condition config shared by ``quantizers``; ValueError if they disagree or there are none."""
    configs = {repr(sorted(q.condition.items())): q.condition for q in quantizers}
    if len(configs) != 1:
        raise ValueError(f"expected TDQ quantizers with one condition config, got {len(configs)}")
    return next(iter(configs.values()))


def attach_tdq(pipe) -> ConditionHook:
    """(Re)attach the condition hook to ``pipe``'s denoiser; returns the handle (also kept on the pipeline)."""
    detach_tdq(pipe)
    denoiser = family_of(pipe).denoiser(pipe)
    quantizers = tdq_quantizers(denoiser)
    hook = attach_condition_hook(denoiser, quantizers, SchedulerCondition(pipe, condition_config(quantizers)))
    setattr(pipe, HOOK_ATTR, hook)
    return hook


def detach_tdq(pipe) -> None:
    """Remove the hook ``attach_tdq`` put on ``pipe`` (no-op if none)."""
    hook = getattr(pipe, HOOK_ATTR, None)
    if hook is not None:
        hook.remove()
        setattr(pipe, HOOK_ATTR, None)
