"""Scheduler selection by name, built from the pipeline's own scheduler config (same noise schedule)."""
from __future__ import annotations

from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
)

# name -> (class, config overrides)
SCHEDULERS = {
    "ddim": (DDIMScheduler, {}),
    "ddim-trailing": (DDIMScheduler, {"timestep_spacing": "trailing"}),
    "ddpm": (DDPMScheduler, {}),
    "dpm": (DPMSolverMultistepScheduler, {}),
    "dpm-karras": (DPMSolverMultistepScheduler, {"use_karras_sigmas": True}),
    "euler": (EulerDiscreteScheduler, {}),
    "euler-karras": (EulerDiscreteScheduler, {"use_karras_sigmas": True}),
    "pndm": (PNDMScheduler, {"skip_prk_steps": True}),
}


def set_scheduler(pipe, name: str | None) -> None:
    """Replace `pipe.scheduler` by scheduler `name` (one of SCHEDULERS) on the same betas; None keeps it."""
    if name is None or name == "default":
        return
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")
    cls, overrides = SCHEDULERS[name]
    # always start from the pipeline's own scheduler config, so an earlier switch's overrides do not leak
    if not hasattr(pipe, "diffptq_base_scheduler_config"):
        pipe.diffptq_base_scheduler_config = dict(pipe.scheduler.config)
    config = {k: v for k, v in pipe.diffptq_base_scheduler_config.items() if not k.startswith("_")}
    pipe.scheduler = cls.from_config({**config, **overrides})
