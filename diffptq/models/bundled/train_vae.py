"""Train the bundled AutoencoderKL (64x64x3 <-> 16x16x4) on freshly drawn scenes: L1 + MSE reconstruction and a
small KL term; afterwards `scaling_factor` is set to 1 / std of the latents, as SD does."""
from __future__ import annotations

import torch
from diffusers import AutoencoderKL

from diffptq.models.build import VAESpec, build_vae
from diffptq.models.bundled.dataset import render, sample_scenes
from diffptq.models.bundled.specs import TrainConfig
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

KL_WEIGHT = 1e-6  # per image, on the KL summed over latent elements (as the LDM autoencoders)


@torch.no_grad()
def latent_std(vae: AutoencoderKL, device: torch.device, n: int = 2048, seed: int = 7) -> float:
    """Std of the unscaled posterior means over `n` scenes."""
    images = render(sample_scenes(n, seed), device)
    lat = torch.cat([vae.encode(x * 2 - 1).latent_dist.mean for x in images.split(256)])
    return float(lat.std())


@torch.no_grad()
def reconstruct(vae: AutoencoderKL, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """Images (N,3,H,W) in [0,1] through encode (posterior mean) and decode, back in [0,1]."""
    outs = []
    for x in images.split(batch):
        z = vae.encode(x * 2 - 1).latent_dist.mean
        outs.append(((vae.decode(z).sample + 1) / 2).clamp(0, 1))
    return torch.cat(outs)


def train_vae(spec: VAESpec, cfg: TrainConfig) -> tuple[AutoencoderKL, dict]:
    """Train for cfg.minutes / cfg.max_steps; returns the EMA autoencoder (scaling_factor set) and metrics."""
    device = torch.device(cfg.device)
    torch.manual_seed(cfg.seed)
    vae = build_vae(spec).to(device).train()
    log(f"vae: {count_params(vae) / 1e6:.3f}M parameters")
    opt = make_optimizer(vae.parameters(), cfg, device)
    ema = EMA([vae], cfg.ema_decay)
    budget, step = Budget(cfg), 0
    while not budget.done(step):
        x = render(sample_scenes(cfg.batch_size, seed=cfg.seed * 1_000_003 + step), device) * 2 - 1
        set_lr(opt, lr_at(cfg, step, budget.progress(step)))
        with autocast(device):
            post = vae.encode(x).latent_dist
            rec = vae.decode(post.sample()).sample.float()
        err = rec - x
        kl = post.kl().float().mean()
        loss = err.abs().mean() + (err * err).mean() + KL_WEIGHT * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), cfg.grad_clip)
        opt.step()
        ema.update()
        step += 1
        if step % cfg.log_every == 0:
            log(f"vae step {step} loss {loss.item():.4f} l1 {err.abs().mean().item():.4f} kl {kl.item():.1f} "
                f"{step / budget.elapsed():.1f} it/s")
    ema.copy_to_model()
    vae.eval()
    std = latent_std(vae, device)
    vae.register_to_config(scaling_factor=1.0 / std)
    images = render(sample_scenes(1024, seed=11), device)
    mse = float(((reconstruct(vae, images) - images) ** 2).mean())
    metrics = {"steps": step, "minutes": round(budget.elapsed() / 60, 2), "latent_std": std,
               "recon_psnr_db": round(-10 * torch.log10(torch.tensor(mse)).item(), 2), "params": count_params(vae)}
    log(f"vae done: {metrics}")
    return vae, metrics
