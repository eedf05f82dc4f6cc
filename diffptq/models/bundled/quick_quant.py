"""A quick, self-contained W/A fake-quantization of a denoiser, only to check that the bundled models are not
trivially robust to 4-bit quantization (the project's real quantizers live in diffptq/quant and diffptq/algo).

Weights: symmetric round-to-nearest per output channel. Activations (inputs of every Linear/Conv2d): symmetric
per-tensor, scale from the current tensor's max (dynamic), applied by a forward pre-hook.
"""
from __future__ import annotations

import copy

import torch
from torch import nn


def _round_sym(x: torch.Tensor, bits: int, dims: tuple[int, ...] | None) -> torch.Tensor:
    qmax = 2 ** (bits - 1) - 1
    amax = x.abs().amax(dim=dims, keepdim=True) if dims else x.abs().max()
    scale = amax.clamp(min=1e-8) / qmax
    return (x / scale).round().clamp(-qmax - 1, qmax) * scale


def rtn_fake_quant(model: nn.Module, w_bits: int = 4, a_bits: int | None = 4) -> nn.Module:
    """A copy of `model` with every Linear/Conv2d weight rounded to `w_bits` (per output channel) and, when
    `a_bits` is given, its input rounded to `a_bits` (per tensor) at each call."""
    model = copy.deepcopy(model)
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            with torch.no_grad():
                w = module.weight
                module.weight.copy_(_round_sym(w, w_bits, tuple(range(1, w.ndim))))
            if a_bits is not None:
                module.register_forward_pre_hook(lambda m, args: (_round_sym(args[0], a_bits, None), *args[1:]))
    return model
