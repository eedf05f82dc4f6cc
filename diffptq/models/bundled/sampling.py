"""Sampling and scoring of the bundled pipelines: fixed prompts, fixed seeds, the pipelines' own call."""
from __future__ import annotations

from pathlib import Path

import torch
from diffusers import DiffusionPipeline, PixArtAlphaPipeline, StableDiffusionPipeline

from diffptq.models.bundled.dataset import sample_scenes
from diffptq.models.bundled.evaluator import BundledEvaluator
from diffptq.models.bundled.specs import BUNDLED, SAMPLING, WEIGHTS_DIR, dit_deep_spec

EVAL_PROMPT_SEED = 424_242  # prompts for measuring prompt_acc (no training pool uses this seed)


def eval_prompts(n: int, seed: int = EVAL_PROMPT_SEED) -> list[str]:
    """n captions of random scenes (1-3 objects), the same for every caller."""
    return sample_scenes(n, seed).captions()


def kind_of(pipe: DiffusionPipeline) -> str:
    """The SAMPLING key of a bundled pipeline: 'dit-deep' for the 28-block DiT, 'dit' for other PixArt pipelines,
    'unet' for Stable Diffusion ones."""
    if hasattr(pipe, "transformer"):
        return "dit-deep" if pipe.transformer.config.num_layers == dit_deep_spec().num_layers else "dit"
    return "unet"


def load_bundled(which: str, path: str | Path | None = None, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu") -> DiffusionPipeline:
    """The committed bundled pipeline `which` ('dit' | 'dit-deep' | 'unet'), or the one saved at `path`."""
    path = Path(path) if path is not None else WEIGHTS_DIR / which
    if BUNDLED[which][0] == "pixart":
        pipe = PixArtAlphaPipeline.from_pretrained(path, dtype=dtype, local_files_only=True)
    else:
        pipe = StableDiffusionPipeline.from_pretrained(path, dtype=dtype, local_files_only=True,
                                                       safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


@torch.no_grad()
def generate(pipe: DiffusionPipeline, prompts: list[str], seed: int = 0, batch_size: int = 64,
             **overrides) -> torch.Tensor:
    """Images (N,3,64,64) float32 in [0,1] on the CPU, with SAMPLING's call arguments (overridable).
    Batch j uses a CPU generator seeded seed + j, so results do not depend on the device's RNG."""
    kwargs = {**SAMPLING[kind_of(pipe)], **overrides}
    out = []
    for j, start in enumerate(range(0, len(prompts), batch_size)):
        gen = torch.Generator("cpu").manual_seed(seed + j)
        res = pipe(prompts[start:start + batch_size], generator=gen, output_type="pt", **kwargs)
        out.append(res.images.float().cpu().clamp(0, 1))
    return torch.cat(out)


def prompt_acc(pipe: DiffusionPipeline, evaluator: BundledEvaluator, prompts: list[str], seed: int = 0,
               batch_size: int = 64, **overrides) -> tuple[float, torch.Tensor]:
    """prompt_acc of `pipe` on `prompts` and the images it made."""
    images = generate(pipe, prompts, seed, batch_size, **overrides)
    return evaluator.prompt_accuracy(images, prompts), images
