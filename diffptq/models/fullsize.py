"""Full-size denoisers with random weights, built from the published configs, for GPU speed/memory benchmarks.

PixArt-XL-2-512x512: PixArtTransformer2DModel, 28 blocks, hidden 1152 (16 heads × 72), caption 4096 → 610.9M params.
SD 1.5: UNet2DConditionModel, channels (320, 640, 1280, 1280), cross-attention 768 → 859.5M params.
Speed and memory do not depend on the weight values; random text embeddings of the real shape (PixArt 120 × 4096,
SD 77 × 768) stand in for T5-XXL / CLIP, passed to the real pipeline as `prompt_embeds`.
"""
from __future__ import annotations

import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    PixArtAlphaPipeline,
    PixArtTransformer2DModel,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)

from diffptq.models.build import VAESpec, build_vae

PIXART_512 = dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
                  cross_attention_dim=1152, sample_size=64, patch_size=2, caption_channels=4096)
SD15_UNET = dict(sample_size=64, cross_attention_dim=768)


def full_size_pipeline(family: str, dtype: torch.dtype = torch.float16, device: str = "cuda", seed: int = 0,
                       num_layers: int | None = None):
    """A PixArtAlphaPipeline ('pixart') or StableDiffusionPipeline ('sd') with a full-size random denoiser, a small
    random 8× VAE and no text encoder (call it with prompt_embeds). `num_layers` shortens PixArt for tests."""
    torch.manual_seed(seed)
    with torch.device(device):  # initialise on the target device: full-size random init is slow on the CPU
        pipe = _build(family, num_layers).to(dtype=dtype)
    pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)  # scheduler tables stay on the CPU
    return pipe


def _build(family: str, num_layers: int | None):
    vae = build_vae(VAESpec(channels=(8, 8, 8, 8), norm_groups=4))
    if family == "pixart":
        cfg = {**PIXART_512, **({"num_layers": num_layers} if num_layers else {})}
        den = PixArtTransformer2DModel(**cfg)
        pipe = PixArtAlphaPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=den,
                                   scheduler=DPMSolverMultistepScheduler())
    elif family == "sd":
        den = UNet2DConditionModel(**SD15_UNET)
        sched = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=None, tokenizer=None, unet=den, scheduler=sched,
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    else:
        raise ValueError(f"family must be 'pixart' or 'sd', got {family!r}")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def random_text_embeddings(family: str, n: int, dtype: torch.dtype, device: str, seed: int = 0) -> dict:
    """Pipeline kwargs with random prompt / negative embeddings of the real shape for n prompts."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    tokens, dim = (120, 4096) if family == "pixart" else (77, 768)
    emb = torch.randn(n, tokens, dim, generator=g).to(device, dtype)
    neg = torch.randn(n, tokens, dim, generator=g).to(device, dtype)
    out = {"prompt_embeds": emb, "negative_prompt_embeds": neg}
    if family == "pixart":
        mask = torch.ones(n, tokens, dtype=torch.long, device=device)
        mask[:, 60:] = 0  # realistic: captions shorter than the 120-token budget
        out.update(prompt_attention_mask=mask, negative_prompt_attention_mask=mask.clone(), negative_prompt=None)
    return out
