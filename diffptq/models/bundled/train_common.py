"""Training helpers shared by the bundled trainers: schedule, EMA, wall-clock budget, mixed precision, logging."""
from __future__ import annotations

import contextlib
import math
import time

import torch
from torch import nn

from diffptq.models.bundled.specs import TrainConfig


class Budget:
    """Progress of a run in [0, 1]: the larger of steps done / max_steps and wall clock used / minutes."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def progress(self, step: int) -> float:
        return max(step / self.cfg.max_steps, self.elapsed() / (60.0 * self.cfg.minutes))

    def done(self, step: int) -> bool:
        return self.progress(step) >= 1.0


def lr_at(cfg: TrainConfig, step: int, progress: float) -> float:
    """Linear warm-up over cfg.warmup steps, then cosine from cfg.lr to cfg.lr * final_lr_fraction."""
    warm = min(1.0, (step + 1) / max(1, cfg.warmup))
    cosine = cfg.final_lr_fraction + (1 - cfg.final_lr_fraction) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return cfg.lr * warm * cosine


class EMA:
    """Exponential moving average of the float parameters of `modules`; the decay ramps up as 1 - 1/(step+10)
    until it reaches `decay`, so early averages are not dominated by the initialisation."""

    def __init__(self, modules: list[nn.Module], decay: float):
        self.params = [p for m in modules for p in m.parameters()]
        self.shadow = [p.detach().clone().float() for p in self.params]
        self.decay = decay
        self.step = 0

    @torch.no_grad()
    def update(self) -> None:
        self.step += 1
        d = min(self.decay, 1.0 - 1.0 / (self.step + 10))
        torch._foreach_lerp_(self.shadow, [p.detach().float() for p in self.params], 1.0 - d)

    @torch.no_grad()
    def copy_to_model(self) -> None:
        for p, s in zip(self.params, self.shadow):
            p.copy_(s.to(p.dtype))


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA; nothing on the CPU (debug runs)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def make_optimizer(params, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    return torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.99), weight_decay=cfg.weight_decay,
                             fused=device.type == "cuda")


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for group in opt.param_groups:
        group["lr"] = lr


def log(msg: str) -> None:
    print(msg, flush=True)


def count_params(*modules: nn.Module) -> int:
    return sum(p.numel() for m in modules for p in m.parameters())
