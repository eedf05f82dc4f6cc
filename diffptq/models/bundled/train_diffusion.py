"""Train a bundled text-to-image pipeline (`dit`, `dit-deep`: PixArtAlphaPipeline, `unet`: StableDiffusionPipeline) from
scratch on the procedural scenes, denoiser and text encoder jointly, with a trained (frozen) VAE.

Data: a pool of `cfg.pool_size` scenes is drawn (numpy, in worker processes), rendered and encoded to latents once
at the start (on the GPU: seconds); each step draws a random batch from it. Objective: epsilon prediction with
min-SNR-5 weighting on the pipeline scheduler's own noise schedule; captions are replaced by the empty prompt with
probability `cfg.caption_dropout` (for classifier-free guidance). The text is encoded exactly as the pipeline does
(PixArt: T5 with attention mask, mask passed to the transformer; SD: CLIP without mask).
"""
from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from diffusers import AutoencoderKL, DiffusionPipeline

from diffptq.models.build import build_pixart_pipeline, build_sd_pipeline
from diffptq.models.bundled.dataset import SceneBatch, render, sample_scenes
from diffptq.models.bundled.scenes import vocabulary
from diffptq.models.bundled.specs import BUNDLED, TrainConfig
from diffptq.models.bundled.train_common import (
    EMA,
    Budget,
    autocast,
    count_params,
    log,
    lr_at,
    make_optimizer,
    set_lr,
)

MIN_SNR_GAMMA = 5.0
POOL_CHUNK = 20_000


def build_untrained(which: str, vae: AutoencoderKL, seed: int) -> DiffusionPipeline:
    """A random-weight pipeline of the bundled size with the trained `vae` in place."""
    if which not in BUNDLED:
        raise ValueError(f"which must be one of {', '.join(BUNDLED)}, got {which!r}")
    kind, spec = BUNDLED[which]
    build = build_pixart_pipeline if kind == "pixart" else build_sd_pipeline
    pipe = build(spec(), vocabulary(), seed)
    pipe.vae = vae
    pipe.register_modules(vae=vae)
    return pipe


def denoiser(pipe: DiffusionPipeline) -> torch.nn.Module:
    return pipe.transformer if hasattr(pipe, "transformer") else pipe.unet


def load_matching(dst: torch.nn.Module, src: torch.nn.Module) -> list[str]:
    """Copy every entry of src's state dict into dst where name and shape agree (e.g. the transformer blocks of a
    DiT of another patch size); returns the names of dst's entries left as they were."""
    theirs, ours = src.state_dict(), dst.state_dict()
    same = {k: v for k, v in theirs.items() if k in ours and ours[k].shape == v.shape}
    dst.load_state_dict(same, strict=False)
    return sorted(k for k in ours if k not in same)


@dataclass
class Pool:
    """latents: (N,4,32,32) scaled by the VAE's scaling_factor; ids, mask: (N, L) token ids and attention mask."""

    latents: torch.Tensor
    ids: torch.Tensor
    mask: torch.Tensor


_TOKENIZER = None  # set in the parent before the worker processes fork


def _chunk(args: tuple[int, int]) -> tuple[SceneBatch, list[str], np.ndarray, np.ndarray]:
    n, seed = args
    batch = sample_scenes(n, seed)
    captions = batch.captions()
    return (batch, captions, *word_ids(_TOKENIZER, captions))


def word_ids(tokenizer, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """What `tokenize` returns, as int64 arrays, by looking words up directly (the Rust tokenizer takes ~50 us per
    caption single-threaded; this ~3 us). Valid for the word-level tokenizers of build_word_tokenizer, for text
    without unknown words; make_pool checks it against the tokenizer."""
    vocab, length = tokenizer.get_vocab(), tokenizer.model_max_length
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    ids = np.full((len(texts), length), pad, np.int64)
    mask = np.zeros((len(texts), length), np.int64)
    for i, text in enumerate(texts):
        row = (bos + [vocab[w] for w in text.split()])[: length - 1] + [eos]
        ids[i, : len(row)] = row
        mask[i, : len(row)] = 1
    return ids, mask


def tokenize(pipe: DiffusionPipeline, texts: list[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask (N, L) exactly as the pipeline pads them (L = tokenizer.model_max_length)."""
    tok = pipe.tokenizer(texts, padding="max_length", max_length=pipe.tokenizer.model_max_length, truncation=True,
                         add_special_tokens=True, return_tensors="pt")
    return tok.input_ids.to(device), tok.attention_mask.to(device)


@torch.no_grad()
def make_pool(pipe: DiffusionPipeline, n: int, seed: int, device: torch.device) -> Pool:
    """Draw n scenes (chunks of POOL_CHUNK from seeds derived from `seed`), render, encode and tokenize them."""
    global _TOKENIZER
    _TOKENIZER = pipe.tokenizer
    jobs = [(min(POOL_CHUNK, n - i), seed * 1_000_003 + 7_919 * k) for k, i in enumerate(range(0, n, POOL_CHUNK))]
    workers = max(1, min(len(jobs), (os.cpu_count() or 2) // 2))
    vae, sf = pipe.vae, pipe.vae.config.scaling_factor
    latents, ids, masks = [], [], []
    with ProcessPoolExecutor(workers) as ex:
        for k, (batch, captions, i, m) in enumerate(ex.map(_chunk, jobs)):
            if k == 0:  # the direct lookup must give exactly what the pipeline's tokenizer gives
                ref_ids, ref_mask = tokenize(pipe, captions[:256], torch.device("cpu"))
                if not (np.array_equal(ref_ids.numpy(), i[:256]) and np.array_equal(ref_mask.numpy(), m[:256])):
                    raise RuntimeError("word_ids disagrees with the pipeline tokenizer")
            images = render(batch, device)
            with autocast(device):
                lat = torch.cat([vae.encode(x * 2 - 1).latent_dist.mean for x in images.split(1024)])
            latents.append((lat.float() * sf).to(torch.bfloat16 if device.type == "cuda" else torch.float32))
            ids.append(torch.as_tensor(i, device=device))
            masks.append(torch.as_tensor(m, device=device))
    return Pool(torch.cat(latents), torch.cat(ids), torch.cat(masks))


def encode_text(pipe: DiffusionPipeline, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, L, D) text states as the pipeline computes them."""
    if hasattr(pipe, "transformer"):
        return pipe.text_encoder(ids, attention_mask=mask)[0]
    return pipe.text_encoder(ids)[0]


def predict_noise(pipe: DiffusionPipeline, xt: torch.Tensor, t: torch.Tensor, text: torch.Tensor,
                  mask: torch.Tensor) -> torch.Tensor:
    """Epsilon prediction (B,4,h,w) of the pipeline's denoiser (PixArt's learned-variance half dropped)."""
    if hasattr(pipe, "transformer"):
        out = pipe.transformer(xt, encoder_hidden_states=text, encoder_attention_mask=mask, timestep=t,
                               added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
        return out[:, : xt.shape[1]]
    return pipe.unet(xt, t, encoder_hidden_states=text).sample


def sample_timesteps(b: int, n: int, high_fraction: float, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    """(b,) int64 timesteps: uniform on [0, n), except a `high_fraction` share uniform on [n/2, n)."""
    t = torch.randint(0, n, (b,), device=device, generator=gen)
    if high_fraction > 0:
        high = torch.randint(n // 2, n, (b,), device=device, generator=gen)
        t = torch.where(torch.rand(b, device=device, generator=gen) < high_fraction, high, t)
    return t


def train_diffusion(which: str, vae: AutoencoderKL, cfg: TrainConfig,
                    init: DiffusionPipeline | None = None) -> tuple[DiffusionPipeline, dict]:
    """Train for cfg.minutes / cfg.max_steps (from `init`'s weights when given, else from scratch); returns the
    pipeline with EMA weights (float32) and metrics."""
    device = torch.device(cfg.device)
    torch.manual_seed(cfg.seed)
    pipe = build_untrained(which, vae, cfg.seed)
    if init is not None:
        skipped = load_matching(denoiser(pipe), denoiser(init))
        if skipped:
            log(f"{which}: --init weights of other shapes left at their fresh initialisation: {', '.join(skipped)}")
        pipe.text_encoder.load_state_dict(init.text_encoder.state_dict())
    pipe.to(device)
    model, text_encoder = denoiser(pipe), pipe.text_encoder
    for module in text_encoder.modules():  # T5's default dropout 0.1 only slows a short run down
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    if hasattr(text_encoder.config, "dropout_rate"):
        text_encoder.config.dropout_rate = 0.0
    vae.requires_grad_(False).eval()
    model.train()
    text_encoder.train()
    n_model, n_text = count_params(model), count_params(text_encoder)
    log(f"{which}: denoiser {n_model / 1e6:.3f}M, text encoder {n_text / 1e6:.3f}M parameters")
    budget = Budget(cfg)
    pool = make_pool(pipe, cfg.pool_size, cfg.seed, device)
    log(f"{which}: pool of {len(pool.ids)} scenes ready in {budget.elapsed():.1f}s, latent std "
        f"{pool.latents[:4096].float().std():.3f}")
    empty_ids, empty_mask = tokenize(pipe, [""], device)
    alphas = pipe.scheduler.alphas_cumprod.to(device, torch.float32)
    params = list(model.parameters()) + list(text_encoder.parameters())
    opt = make_optimizer(params, cfg, device)
    ema = EMA([model, text_encoder], cfg.ema_decay)
    gen = torch.Generator(device).manual_seed(cfg.seed)
    step, b = 0, cfg.batch_size

    def eager_loss(xt, t, ids, mask, noise, weight):
        with autocast(device):
            pred = predict_noise(pipe, xt, t, encode_text(pipe, ids, mask), mask)
        return (weight * ((pred.float() - noise) ** 2).mean(dim=(1, 2, 3))).mean()

    loss_fn = torch.compile(eager_loss, dynamic=False) if cfg.compile else eager_loss
    good, good_step = [s.clone() for s in ema.shadow], 0
    while not budget.done(step):
        idx = torch.randint(0, len(pool.ids), (b,), device=device, generator=gen)
        x0, ids, mask = pool.latents[idx].float(), pool.ids[idx], pool.mask[idx]
        drop = (torch.rand(b, device=device, generator=gen) < cfg.caption_dropout)[:, None]
        ids, mask = torch.where(drop, empty_ids, ids), torch.where(drop, empty_mask, mask)
        t = sample_timesteps(b, len(alphas), cfg.high_noise_fraction, gen, device)
        noise = torch.randn(x0.shape, device=device, generator=gen)
        a = alphas[t].view(b, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        snr = alphas[t] / (1 - alphas[t])
        weight = snr.clamp(max=MIN_SNR_GAMMA) / snr * (1 / snr).clamp(1.0, cfg.high_noise_weight)
        set_lr(opt, lr_at(cfg, step, budget.progress(step)))
        try:
            loss = loss_fn(xt, t, ids, mask, noise, weight)
        except Exception as err:  # noqa: BLE001 - a compiler failure must not cost the run: fall back to eager
            if loss_fn is eager_loss:
                raise
            log(f"{which}: torch.compile failed ({type(err).__name__}: {str(err)[:200]}); training eagerly")
            loss_fn = eager_loss
            loss = loss_fn(xt, t, ids, mask, noise, weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        ema.update()
        step += 1
        if step % cfg.log_every == 0:
            if not torch.isfinite(loss):  # roll back to the last good weights, at half the learning rate
                log(f"{which} step {step}: loss not finite, restoring the weights of step {good_step}")
                for shadow, saved in zip(ema.shadow, good):
                    shadow.copy_(saved)
                ema.copy_to_model()
                opt = make_optimizer(params, cfg, device)
                cfg.lr /= 2
                continue
            good, good_step = [s.clone() for s in ema.shadow], step
            log(f"{which} step {step} loss {loss.item():.4f} lr {opt.param_groups[0]['lr']:.2e} "
                f"{step / budget.elapsed():.1f} it/s")
    ema.copy_to_model()
    model.eval()
    text_encoder.eval()
    metrics = {"steps": step, "minutes": round(budget.elapsed() / 60, 2), "batch_size": b, "params_denoiser": n_model,
               "params_text_encoder": n_text, "params_vae": count_params(vae)}
    log(f"{which} done: {metrics}")
    return pipe, metrics
