"""Build PixArt-alpha and Stable-Diffusion pipelines of any size from small config dataclasses.

The same builders make the tiny random-weight test models (`tiny-dit`, `tiny-unet`), the bundled trained
models (their trainer starts from these) and the full-size random-weight architectures for GPU benchmarks.
Every pipeline is the real diffusers class: PixArtAlphaPipeline (PixArtTransformer2DModel, T5EncoderModel,
AutoencoderKL, DPMSolverMultistepScheduler) or StableDiffusionPipeline (UNet2DConditionModel, CLIPTextModel,
AutoencoderKL, DDIMScheduler), with word-level tokenizers built locally.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    PixArtAlphaPipeline,
    PixArtTransformer2DModel,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

from diffptq.models.tokenizers import build_word_tokenizer


@dataclass
class VAESpec:
    """AutoencoderKL size: len(channels)-1 downsamplings by 2; `latent_channels` latent channels."""
    channels: tuple[int, ...] = (8, 16)
    latent_channels: int = 4
    norm_groups: int = 4
    scaling_factor: float = 1.0
    layers_per_block: int = 1


@dataclass
class DiTSpec:
    """PixArtTransformer2DModel + T5 text encoder size. `sample_size` is the latent side length."""
    num_layers: int = 2
    heads: int = 2
    head_dim: int = 8
    sample_size: int = 8
    patch_size: int = 2
    text_dim: int = 32
    text_layers: int = 1
    text_heads: int = 4
    max_tokens: int = 16
    vae: VAESpec = field(default_factory=VAESpec)


@dataclass
class UNetSpec:
    """UNet2DConditionModel + CLIP text encoder size. `sample_size` is the latent side length."""
    channels: tuple[int, ...] = (16, 32)
    down_types: tuple[str, ...] = ("CrossAttnDownBlock2D", "DownBlock2D")
    up_types: tuple[str, ...] = ("UpBlock2D", "CrossAttnUpBlock2D")
    layers_per_block: int = 1
    head_dim: int = 8
    norm_groups: int = 8
    sample_size: int = 8
    text_dim: int = 32
    text_layers: int = 1
    text_heads: int = 4
    max_tokens: int = 16
    vae: VAESpec = field(default_factory=VAESpec)


def build_vae(spec: VAESpec) -> AutoencoderKL:
    n = len(spec.channels)
    return AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=spec.channels, latent_channels=spec.latent_channels,
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        layers_per_block=spec.layers_per_block, norm_num_groups=spec.norm_groups, scaling_factor=spec.scaling_factor,
    )


def build_t5_encoder(tokenizer, width: int, heads: int, ff: int, layers: int,
                     head_dim: int | None = None, ff_proj: str = "relu") -> T5EncoderModel:
    """A random T5EncoderModel over `tokenizer`'s ids: output width `width`, `heads` heads of `head_dim` (default
    width // heads), feed-forward `ff_proj` ("relu" as T5, "gated-gelu" as T5 v1.1)."""
    return T5EncoderModel(T5Config(
        vocab_size=len(tokenizer), d_model=width, d_kv=head_dim or width // heads, d_ff=ff, num_layers=layers,
        num_heads=heads, feed_forward_proj=ff_proj,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=0,
    ))


def build_clip_encoder(tokenizer, width: int, heads: int, ff: int, layers: int, max_tokens: int) -> CLIPTextModel:
    """A random CLIPTextModel over `tokenizer`'s ids: output width `width`, `max_tokens` positions."""
    return CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=width, intermediate_size=ff, num_hidden_layers=layers,
        num_attention_heads=heads, max_position_embeddings=max_tokens, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))


def build_pixart_pipeline(spec: DiTSpec, vocabulary: list[str], seed: int = 0) -> PixArtAlphaPipeline:
    """A randomly initialised PixArtAlphaPipeline of size `spec` whose tokenizer knows `vocabulary`."""
    torch.manual_seed(seed)
    tokenizer = build_word_tokenizer(vocabulary, "t5", spec.max_tokens)
    text_encoder = build_t5_encoder(tokenizer, spec.text_dim, spec.text_heads, spec.text_dim * 2, spec.text_layers)
    inner = spec.heads * spec.head_dim
    transformer = PixArtTransformer2DModel(
        num_attention_heads=spec.heads, attention_head_dim=spec.head_dim, in_channels=spec.vae.latent_channels,
        out_channels=2 * spec.vae.latent_channels, num_layers=spec.num_layers, cross_attention_dim=inner,
        sample_size=spec.sample_size, patch_size=spec.patch_size, caption_channels=spec.text_dim,
        norm_num_groups=min(32, inner),
    )
    return PixArtAlphaPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=build_vae(spec.vae), transformer=transformer,
        scheduler=DPMSolverMultistepScheduler(),
    )


def build_sd_pipeline(spec: UNetSpec, vocabulary: list[str], seed: int = 0) -> StableDiffusionPipeline:
    """A randomly initialised StableDiffusionPipeline of size `spec` whose tokenizer knows `vocabulary`."""
    torch.manual_seed(seed)
    tokenizer = build_word_tokenizer(vocabulary, "clip", spec.max_tokens)
    text_encoder = build_clip_encoder(tokenizer, spec.text_dim, spec.text_heads, spec.text_dim * 2, spec.text_layers,
                                      spec.max_tokens)
    unet = UNet2DConditionModel(
        sample_size=spec.sample_size, in_channels=spec.vae.latent_channels, out_channels=spec.vae.latent_channels,
        down_block_types=spec.down_types, up_block_types=spec.up_types, block_out_channels=spec.channels,
        layers_per_block=spec.layers_per_block, cross_attention_dim=spec.text_dim,
        attention_head_dim=spec.head_dim, norm_num_groups=spec.norm_groups,
    )
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    return StableDiffusionPipeline(
        vae=build_vae(spec.vae), text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
