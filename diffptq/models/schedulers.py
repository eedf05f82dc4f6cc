"""Scheduler selection by name, built from the pipeline's own scheduler config (same noise schedule)."""
from __future__ import annotations

import diffusers

from diffptq.models.names import SCHEDULER_NAMES

# name -> (diffusers class name, config overrides)
SCHEDULERS = {
    "ddim": ("DDIMScheduler", {}),
    "ddim-trailing": ("DDIMScheduler", {"timestep_spacing": "trailing"}),
    "ddpm": ("DDPMScheduler", {}),
    "dpm": ("DPMSolverMultistepScheduler", {}),
    "dpm-karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler-karras": ("EulerDiscreteScheduler", {"use_karras_sigmas": True}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
}
assert tuple(SCHEDULERS) == SCHEDULER_NAMES


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
    cls_name, overrides = SCHEDULERS[name]
    cls = getattr(diffusers, cls_name)
    config = {k: v for k, v in base.config.items() if not k.startswith("_")}
    defaults = NO_CLIP_DEFAULT if cls_name in ("DDIMScheduler", "DDPMScheduler") else {}
    pipe.scheduler = cls.from_config({**defaults, **config, **overrides})


def check_steps(pipe, steps: int, what: str) -> None:
    """Raise ConfigError unless `pipe` with its current scheduler samples in `steps` steps: a dry run of the
    scheduler's loop on a tiny latent. diffusers' PixArt pipeline takes the step's second output (the denoised
    sample) when sampling in 1 step, which multistep solvers (DPM-Solver, PNDM) do not give. `what` names the flag and
    its value as the user gave it (e.g. "--calib_steps 1")."""
    import copy

    import torch

    from diffptq.errors import ConfigError

    name = type(pipe.scheduler).__name__
    probe = copy.deepcopy(pipe.scheduler)
    try:
        probe.set_timesteps(steps)
        sample = torch.zeros(1, 1, 2, 2)
        for t in probe.timesteps:
            out = probe.step(torch.zeros_like(sample), t, probe.scale_model_input(sample, t), return_dict=False)
            sample = out[0]
    except Exception as err:  # noqa: BLE001 - any failure of the scheduler's own loop is the user's step count
        raise ConfigError(f"{what}: {name} cannot sample in {steps} step{'s' * (steps != 1)} "
                          f"({type(err).__name__}: {err}); use more steps or another --scheduler") from None
    if steps == 1 and hasattr(pipe, "transformer") and len(out) < 2:
        raise ConfigError(f"{what}: the PixArt pipeline with {name} samples with at least 2 steps (or choose "
                          "--scheduler ddim, ddpm or euler for 1 step)")
