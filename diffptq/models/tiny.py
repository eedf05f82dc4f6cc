"""Tiny random-weight pipelines (`tiny-dit`, `tiny-unet`) for fast unit tests of every code path."""
from __future__ import annotations

from diffusers import DiffusionPipeline

from diffptq.models.build import DiTSpec, UNetSpec, build_pixart_pipeline, build_sd_pipeline
from diffptq.models.tokenizers import everyday_vocabulary

TINY_MODELS = ("tiny-dit", "tiny-unet")


def build_tiny_pipeline(name: str, seed: int = 0) -> DiffusionPipeline:
    """`tiny-dit`: 2 PixArt blocks, 16 px images; `tiny-unet`: 2-resolution UNet with attention, 16 px images."""
    vocabulary = everyday_vocabulary()
    if name == "tiny-dit":
        return build_pixart_pipeline(DiTSpec(), vocabulary, seed)
    if name == "tiny-unet":
        return build_sd_pipeline(UNetSpec(), vocabulary, seed)
    raise ValueError(f"unknown tiny model {name!r}; choose one of {TINY_MODELS}")
