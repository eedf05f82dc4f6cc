"""Sizes and training settings of the bundled models, in one place.

Sizes are chosen so that all committed weights (fp16) stay under 20 MB: the DiT pipeline ~9.1 MB, the UNet pipeline
~10.0 MB, the evaluator ~0.45 MB. `SAMPLING` holds the call arguments the pipelines need to sample well.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from diffptq.models.build import DiTSpec, UNetSpec, VAESpec
from diffptq.models.bundled.scenes import MAX_TOKENS

WEIGHTS_DIR = Path(__file__).with_name("weights")
IMAGE_SIZE = 64  # pixels; latents are 32x32x4


def vae_spec() -> VAESpec:
    """AutoencoderKL, 2x down: 64x64x3 pixels <-> 32x32x4 latents (4x down blurred the small shapes away)."""
    return VAESpec(channels=(32, 64), latent_channels=4, norm_groups=8)


def dit_spec() -> DiTSpec:
    """PixArtTransformer2DModel: 8 blocks, 5 heads x 32 = 160 hidden, patch 4 on 32x32 latents (64 tokens, one
    token per 8x8 pixels); T5 encoder 2 layers x 128."""
    return DiTSpec(num_layers=8, heads=5, head_dim=32, sample_size=32, patch_size=4, text_dim=128, text_layers=2,
                   text_heads=4, max_tokens=MAX_TOKENS, vae=vae_spec())


def dit_deep_spec() -> DiTSpec:
    """PixArtTransformer2DModel as deep as PixArt-XL-2: 28 blocks of bundled-dit's width (5 heads x 32 = 160 hidden,
    patch 4 on 32x32 latents: 64 tokens), so that only depth separates it from bundled-dit; its own T5 encoder
    2 layers x 128. 11.6M denoiser parameters (23 MB in fp16)."""
    return DiTSpec(num_layers=28, heads=5, head_dim=32, sample_size=32, patch_size=4, text_dim=128, text_layers=2,
                   text_heads=4, max_tokens=MAX_TOKENS, vae=vae_spec())


def unet_spec() -> UNetSpec:
    """UNet2DConditionModel: channels (32, 64, 128) at 32x32, 16x16, 8x8 latents, cross-attention at 16x16 and 8x8
    (and the mid block); CLIP encoder 2 layers x 96."""
    return UNetSpec(channels=(32, 64, 128), down_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                    up_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), layers_per_block=1,
                    head_dim=4, norm_groups=16, sample_size=32, text_dim=96, text_layers=2, text_heads=4,
                    max_tokens=MAX_TOKENS, vae=vae_spec())


@dataclass
class TrainConfig:
    """One training run. Stops at `max_steps` or after `minutes` of wall clock, whichever comes first; the
    learning rate warms up linearly for `warmup` steps, then follows a cosine to `final_lr_fraction` of `lr`
    over the run's progress (the larger of step / max_steps and elapsed / minutes)."""

    minutes: float = 7.0
    max_steps: int = 1_000_000
    batch_size: int = 1024
    lr: float = 6e-4
    weight_decay: float = 0.01
    warmup: int = 300
    final_lr_fraction: float = 0.05
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    caption_dropout: float = 0.1
    pool_size: int = 800_000  # diffusion: scenes drawn, rendered and encoded once at the start
    high_noise_fraction: float = 0.0  # diffusion: share of timesteps drawn from the upper half only
    high_noise_weight: float = 1.0  # diffusion: loss weight up to this factor where SNR < 1 (layout, binding)
    seed: int = 0
    compile: bool = False  # diffusion: torch.compile the loss (fewer kernel launches; falls back to eager on error)
    log_every: int = 200
    device: str = "cuda"
    extra: dict = field(default_factory=dict)


# Call arguments for sampling (besides prompt, generator and output_type), per bundled model.
_PIXART_CALL = {"num_inference_steps": 20, "guidance_scale": 4.5, "height": IMAGE_SIZE, "width": IMAGE_SIZE,
                "use_resolution_binning": False, "clean_caption": False, "max_sequence_length": MAX_TOKENS}
SAMPLING = {
    "dit": dict(_PIXART_CALL),
    "dit-deep": dict(_PIXART_CALL),
    "unet": {"num_inference_steps": 20, "guidance_scale": 4.5, "height": IMAGE_SIZE, "width": IMAGE_SIZE},
}
# The bundled text-to-image models: name (as --which and the weights folder) -> (pipeline kind, spec builder).
BUNDLED = {"dit": ("pixart", dit_spec), "dit-deep": ("pixart", dit_deep_spec), "unet": ("sd", unet_spec)}
