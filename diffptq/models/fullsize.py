"""Full-size denoisers with random weights, built from the published configs, for GPU speed/memory benchmarks.

PixArt-XL-2-512x512: PixArtTransformer2DModel, 28 blocks, hidden 1152 (16 heads × 72), caption 4096 → 610.9M params.
SD 1.5: UNet2DConditionModel, channels (320, 640, 1280, 1280), cross-attention 768 → 859.5M params.
Speed and memory do not depend on the weight values. Two ways to condition them:
- `full_size_pipeline`: no text encoder; random text embeddings of the real shape (PixArt 120 × 4096, SD 77 × 768,
  `random_text_embeddings`) are passed to the real pipeline as `prompt_embeds`.
- `build_fullsize_pipeline` (project models `fullsize-pixart`, `fullsize-sd` of load_pipeline): a stand-in text stack
  so that the ordinary prompt path works (benchmark_final calibrates and samples from prompts): a word-level
  tokenizer over the everyday captions (T5 style, 120 tokens / CLIP style, 77 tokens) and a ONE-layer random text
  encoder of the real output width (T5EncoderModel d_model 4096 / CLIPTextModel hidden 768), small otherwise. It
  stands in for T5-XXL (4.8B params) / CLIP ViT-L text (123M): its speed and memory are NOT representative; the
  denoiser's and the VAE's shapes are (the VAE is a small random 8× one, so its decode is cheap too).
- `components="full"` (end-to-end latency, benchmarks/pipeline_latency.py): the text encoder and the VAE at their real
  sizes instead, random too: T5 v1.1 XXL's encoder (24 layers, d_model 4096, 64 heads × 64, gated-GELU d_ff 10240;
  4.6B params without the small vocabulary) / CLIP ViT-L/14's text model (12 layers, 768, 3072), and the SD VAE
  (AutoencoderKL 128-256-512-512, 2 ResNets per block: the VAE of SD 1.5 and of PixArt-α). Only the word tokenizer
  and its vocabulary stay small (an embedding lookup). The denoiser's weights are the same as with the stand-ins.
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

from diffptq.models.build import VAESpec, build_clip_encoder, build_t5_encoder, build_vae
from diffptq.models.tokenizers import build_word_tokenizer, everyday_vocabulary

PIXART_512 = dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
                  cross_attention_dim=1152, sample_size=64, patch_size=2, caption_channels=4096)
SD15_UNET = dict(sample_size=64, cross_attention_dim=768)
FULLSIZE_MODELS = {"fullsize-pixart": "pixart", "fullsize-sd": "sd"}
# the real pipelines' defaults: 512 px (the denoisers' sample_size × 8), 20 steps (the scripts' flag), CFG 4.5
FULLSIZE_SAMPLING = {"guidance_scale": 4.5}
COMPONENTS = ("standin", "full")  # text encoder and VAE: small stand-ins, or the real architectures
SMALL_VAE = VAESpec(channels=(8, 8, 8, 8), norm_groups=4)
SD_VAE = VAESpec(channels=(128, 256, 512, 512), norm_groups=32, scaling_factor=0.18215, layers_per_block=2)


def full_size_pipeline(family: str, dtype: torch.dtype = torch.float16, device: str | torch.device = "cuda",
                       seed: int = 0, num_layers: int | None = None, text_encoder: bool = False,
                       components: str = "standin"):
    """A PixArtAlphaPipeline ('pixart') or StableDiffusionPipeline ('sd') with a full-size random denoiser, a small
    random 8× VAE and no text encoder (call it with prompt_embeds), or with `text_encoder` the one-layer stand-in
    text stack of the module docstring. `components="full"`: the real-size text encoder (with `text_encoder`) and
    VAE instead. `num_layers` shortens PixArt for tests. The denoiser's weights depend on `seed` and the device only
    (the text stack and the full-size VAE are drawn after it)."""
    if components not in COMPONENTS:
        raise ValueError(f"components must be one of {', '.join(COMPONENTS)}, got {components!r}")
    torch.manual_seed(seed)
    with torch.device(device):  # initialise on the target device: full-size random init is slow on the CPU
        pipe = _build(family, num_layers, text_encoder, components == "full").to(dtype=dtype)
    pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)  # scheduler tables stay on the CPU
    return pipe


def build_fullsize_pipeline(name: str, dtype: torch.dtype = torch.float16, device: str | torch.device = "cuda",
                            seed: int = 0, num_layers: int | None = None, components: str = "standin"):
    """The project model `name` (`fullsize-pixart` or `fullsize-sd`): full_size_pipeline with a text stack (the
    stand-in, or the real-size one with `components="full"`) and the real pipeline's sampling defaults (512 px,
    CFG 4.5). `num_layers` (PixArt only) is for tests."""
    if name not in FULLSIZE_MODELS:
        raise ValueError(f"unknown full-size model {name!r}; choose one of {', '.join(FULLSIZE_MODELS)}")
    pipe = full_size_pipeline(FULLSIZE_MODELS[name], dtype, device, seed, num_layers, text_encoder=True,
                              components=components)
    pipe.diffptq_sampling = dict(FULLSIZE_SAMPLING)
    return pipe


def _build(family: str, num_layers: int | None, text_encoder: bool = False, full: bool = False):
    vae = build_vae(SMALL_VAE)  # drawn first even when replaced: the denoiser's weights stay those of the stand-ins
    if family == "pixart":
        cfg = {**PIXART_512, **({"num_layers": num_layers} if num_layers else {})}
        den = PixArtTransformer2DModel(**cfg)
        tokenizer, encoder = _text_stack("t5", full) if text_encoder else (None, None)
        vae = build_vae(SD_VAE) if full else vae
        pipe = PixArtAlphaPipeline(tokenizer=tokenizer, text_encoder=encoder, vae=vae, transformer=den,
                                   scheduler=DPMSolverMultistepScheduler())
    elif family == "sd":
        den = UNet2DConditionModel(**SD15_UNET)
        sched = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
        tokenizer, encoder = _text_stack("clip", full) if text_encoder else (None, None)
        vae = build_vae(SD_VAE) if full else vae
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=encoder, tokenizer=tokenizer, unet=den, scheduler=sched,
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    else:
        raise ValueError(f"family must be 'pixart' or 'sd', got {family!r}")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _text_stack(style: str, full: bool = False):
    """(word tokenizer over the everyday captions, random text encoder of the real output width): one layer, or
    with `full` the real encoder's size.

    t5: 120 tokens, T5EncoderModel d_model 4096 (as T5-XXL; 8 heads × 64, d_ff 512 instead of 64 × 64 and 10240).
    clip: 77 tokens, CLIPTextModel hidden 768 (as CLIP ViT-L/14; 12 heads, intermediate 512 instead of 3072)."""
    vocabulary = everyday_vocabulary()
    if style == "t5":
        tok = build_word_tokenizer(vocabulary, "t5", 120)
        if full:
            return tok, build_t5_encoder(tok, width=4096, heads=64, ff=10240, layers=24, head_dim=64,
                                         ff_proj="gated-gelu")
        return tok, build_t5_encoder(tok, width=4096, heads=8, ff=512, layers=1, head_dim=64)
    tok = build_word_tokenizer(vocabulary, "clip", 77)
    if full:
        return tok, build_clip_encoder(tok, width=768, heads=12, ff=3072, layers=12, max_tokens=77)
    return tok, build_clip_encoder(tok, width=768, heads=12, ff=512, layers=1, max_tokens=77)


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
