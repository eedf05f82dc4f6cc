"""set_scheduler: another sampler on the pipeline's own betas; DDIM/DDPM do not clip latents unless the base says."""
from types import SimpleNamespace

import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

from diffptq.models.schedulers import SCHEDULERS, set_scheduler


def _pipe(scheduler):
    return SimpleNamespace(scheduler=scheduler)


def _ddim_step(scheduler, sample, eps):
    scheduler.set_timesteps(10)
    t = scheduler.timesteps[-2]  # near the clean end: x0 = (x - sqrt(1-a) eps) / sqrt(a) is large where |x| is
    return scheduler.step(eps, t, sample).prev_sample


def test_ddim_from_a_dpm_config_does_not_clip_latents():
    """PixArt's DPM-Solver config has no clip_sample: DDIM built from it must not clip x0 to [-1, 1] (it did, and
    the bundled DiT's DDIM images were wrong)."""
    pipe = _pipe(DPMSolverMultistepScheduler(beta_schedule="linear"))
    for name in ("ddim", "ddim-trailing", "ddpm"):
        set_scheduler(pipe, name)
        assert pipe.scheduler.config.clip_sample is False, name
    set_scheduler(pipe, "ddim")
    g = torch.Generator().manual_seed(0)
    sample, eps = 3.0 * torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    ours = _ddim_step(pipe.scheduler, sample, eps)
    unclipped = _ddim_step(DDIMScheduler.from_config({**pipe.scheduler.config, "clip_sample": False}), sample, eps)
    clipped = _ddim_step(DDIMScheduler.from_config({**pipe.scheduler.config, "clip_sample": True}), sample, eps)
    assert torch.equal(ours, unclipped) and not torch.allclose(ours, clipped)
    assert pipe.scheduler.config.beta_schedule == "linear"  # same betas as the base


@pytest.mark.parametrize("clip", [True, False])
def test_an_explicit_clip_sample_of_the_base_is_kept(clip):
    pipe = _pipe(DDIMScheduler(clip_sample=clip, beta_schedule="scaled_linear"))
    set_scheduler(pipe, "ddim-trailing")
    assert pipe.scheduler.config.clip_sample is clip and pipe.scheduler.config.timestep_spacing == "trailing"
    set_scheduler(pipe, "default")
    assert pipe.scheduler is pipe.diffptq_base_scheduler


def test_unknown_scheduler_names_the_choices():
    with pytest.raises(ValueError, match="ddim"):
        set_scheduler(_pipe(DDIMScheduler()), "heun")
    assert "euler-karras" in SCHEDULERS
