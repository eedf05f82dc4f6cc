"""Train the bundled evaluation CNN on freshly drawn scenes (blur, noise and brightness augmentations, so that it
also reads slightly soft or noisy generated images), then measure held-out accuracy per attribute."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from diffptq.models.bundled.dataset import render, sample_scenes
from diffptq.models.bundled.evaluator import CELL_HEADS, BundledEvaluator, EvalNet, EvaluatorSpec, attribute_accuracy
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

HELD_OUT_SEED = 10_000_019  # held-out scenes are drawn from seeds no training step uses


def augment(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random Gaussian blur (sigma 0-1.2 px, half of the images), pixel noise (std 0-0.04) and brightness +-6%."""
    n, dev = len(images), images.device
    sigma = torch.rand(n, generator=gen, device=dev) * 1.2 * (torch.rand(n, generator=gen, device=dev) < 0.5)
    x = torch.arange(-2, 3, device=dev, dtype=torch.float32)
    k = torch.exp(-x[None] ** 2 / (2 * sigma[:, None].clamp(min=1e-3) ** 2))
    k = k / k.sum(1, keepdim=True)  # (N, 5) separable kernel per image
    c = images.shape[1]
    flat = images.reshape(1, n * c, *images.shape[2:])
    kx = k.repeat_interleave(c, 0)
    flat = F.conv2d(F.pad(flat, (2, 2, 0, 0), mode="replicate"), kx[:, None, None, :], groups=n * c)
    flat = F.conv2d(F.pad(flat, (0, 0, 2, 2), mode="replicate"), kx[:, None, :, None], groups=n * c)
    out = flat.view_as(images)
    out = out * (1 + 0.06 * (2 * torch.rand(n, 1, 1, 1, generator=gen, device=dev) - 1))
    out = out + torch.randn(out.shape, generator=gen, device=dev) * 0.04 * torch.rand(n, 1, 1, 1, generator=gen,
                                                                                       device=dev)
    return out.clamp(0, 1)


def evaluator_loss(logits: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> torch.Tensor:
    loss = F.cross_entropy(logits["background"].float(), target["background"])
    for key in CELL_HEADS:
        loss = loss + F.cross_entropy(logits[key].float().flatten(0, 1), target[key].flatten(), ignore_index=-1)
    return loss


def held_out_accuracy(evaluator: BundledEvaluator, n: int = 4096, seed: int = HELD_OUT_SEED) -> dict[str, float]:
    """Per-attribute accuracy on `n` fresh scenes drawn from `seed` (clean renders)."""
    batch = sample_scenes(n, seed)
    pred = evaluator.predict(render(batch, evaluator.device))
    return attribute_accuracy(pred, batch.cell_targets())


def train_evaluator(cfg: TrainConfig, spec: EvaluatorSpec | None = None) -> tuple[EvalNet, dict[str, float]]:
    """Train for cfg.minutes / cfg.max_steps on fresh scenes each step; returns the EMA net and held-out metrics."""
    device = torch.device(cfg.device)
    torch.manual_seed(cfg.seed)
    net = EvalNet(spec or EvaluatorSpec()).to(device)
    log(f"evaluator: {count_params(net) / 1e6:.3f}M parameters")
    opt = make_optimizer(net.parameters(), cfg, device)
    ema = EMA([net], cfg.ema_decay)
    gen = torch.Generator(device).manual_seed(cfg.seed)
    budget, step = Budget(cfg), 0
    while not budget.done(step):
        batch = sample_scenes(cfg.batch_size, seed=cfg.seed * 1_000_003 + step)
        images = augment(render(batch, device), gen)
        target = {k: torch.as_tensor(v, device=device) for k, v in batch.cell_targets().items()}
        set_lr(opt, lr_at(cfg, step, budget.progress(step)))
        with autocast(device):
            _, logits = net(images)
        loss = evaluator_loss(logits, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip)
        opt.step()
        ema.update()
        step += 1
        if step % cfg.log_every == 0:
            log(f"evaluator step {step} loss {loss.item():.4f} {step / budget.elapsed():.1f} it/s")
    ema.copy_to_model()
    metrics = held_out_accuracy(BundledEvaluator(net, device), n=4096 if device.type == "cuda" else 512)
    metrics.update(steps=step, minutes=round(budget.elapsed() / 60, 2), params=count_params(net))
    log(f"evaluator held-out accuracy: { {k: round(v, 4) for k, v in metrics.items()} }")
    return net, metrics

