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


# DDIM/DDPM clip the predicted x0 to [-1, 1] by default (a pixel-space convention): wrong for latents. A base config
# that does not say (PixArt's DPM-Solver config) gets clip_sample False; one that does (SD's DDIM config) keeps it.
NO_CLIP_DEFAULT = {"clip_sample": False}


def set_scheduler(pipe, name: str | None) -> None:
    """Replace `pipe.scheduler` by scheduler `name` (one of SCHEDULERS) on the same betas. Every switch starts from
    the pipeline's own scheduler, so an earlier switch's overrides do not leak; None or 'default' restores it.
    DDIM/DDPM built from a config without `clip_sample` do not clip x0 (see NO_CLIP_DEFAULT)."""
    if name is not None and name != "default" and name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")
    if not hasattr(pipe, "diffptq_base_scheduler"):
        pipe.diffptq_base_scheduler = pipe.scheduler
    base = pipe.diffptq_base_scheduler
    if name is None or name == "default":
        pipe.scheduler = base
        return
    cls, overrides = SCHEDULERS[name]
    config = {k: v for k, v in base.config.items() if not k.startswith("_")}
    defaults = NO_CLIP_DEFAULT if cls in (DDIMScheduler, DDPMScheduler) else {}
    pipe.scheduler = cls.from_config({**defaults, **config, **overrides})
