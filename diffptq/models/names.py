"""Names a command line checks before loading anything: model families' default models, project models, schedulers.

No torch or diffusers here (diffptq.cli builds its parsers from these). The loaders that give the names meaning:
diffptq.models.load (models), diffptq.models.schedulers (schedulers).
"""
from __future__ import annotations

from pathlib import Path

# everyday captions: the default prompts of models without their own, and the words of the random-weight models
EVERYDAY_CAPTIONS = Path(__file__).with_name("everyday_captions.txt")

DEFAULT_MODELS = {"pixart": "PixArt-alpha/PixArt-XL-2-512x512", "sd": "stable-diffusion-v1-5/stable-diffusion-v1-5"}
BUNDLED_NAMES = ("bundled-dit", "bundled-dit-deep", "bundled-unet")
TINY_NAMES = ("tiny-dit", "tiny-unet")
FULLSIZE_NAMES = ("fullsize-pixart", "fullsize-sd")
PROJECT_MODEL_NAMES = (*BUNDLED_NAMES, *TINY_NAMES, *FULLSIZE_NAMES)
SCHEDULER_NAMES = ("ddim", "ddim-trailing", "ddpm", "dpm", "dpm-karras", "euler", "euler-karras", "pndm")
DEFAULT_CLIP = "openai/clip-vit-large-patch14"  # CLIP score model (diffptq.eval.metrics.clip)


def is_bundled(model: str) -> bool:
    """A model this project trained and ships (it has a bundled evaluator and scene prompts)."""
    return model in BUNDLED_NAMES
