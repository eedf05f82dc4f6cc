"""The tanh-approximated GELU written as x · σ(2v): the same function, cheaper for compiled GPU kernels.

GELU_tanh(x) = ½ x (1 + tanh v), v = √(2/π) (x + 0.044715 x³). Since ½ (1 + tanh v) = σ(2v), it equals x · σ(2v).
Inductor lowers torch.tanh to libdevice's accurate tanhf (a polynomial and a branch) and torch.sigmoid to one exp
and one division, so the sigmoid form makes the GELU fused into the next layer's activation quantization (PixArt's
feed-forward: 16384 × 4608 values per block at batch 16) mostly memory-bound again. Both are computed in fp32;
they differ by a few fp32 ulps, far below the bf16 rounding of the result.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from diffptq.kernels.common import replace_module

_TWO_BETA = 2.0 * math.sqrt(2.0 / math.pi)  # 2v = _TWO_BETA · (x + 0.044715 x³)
_KAPPA = 0.044715


def gelu_tanh_sigmoid_form(x: Tensor) -> Tensor:
    """GELU with the tanh approximation, as x · σ(2v), computed in fp32; same shape and dtype as x."""
    xf = x.float()
    return (xf * torch.sigmoid(_TWO_BETA * xf * (1.0 + _KAPPA * xf * xf))).to(x.dtype)


class SigmoidFormGELU(nn.Module):
    """diffusers' `GELU` block (projection, then tanh-approximated GELU) with the activation in sigmoid form.

    proj: the block's projection module, kept as is (a quantized or inference module). x: (..., in) -> (..., out).
    """

    def __init__(self, proj: nn.Module):
        super().__init__()
        self.proj = proj
        self.approximate = "tanh"

    def forward(self, hidden_states: Tensor) -> Tensor:
        return gelu_tanh_sigmoid_form(self.proj(hidden_states))


def use_sigmoid_form_gelu(model: nn.Module) -> int:
    """Replace every diffusers `GELU` block with approximate="tanh" in `model` (in place) by SigmoidFormGELU.

    Returns how many were replaced (0 when diffusers is not installed or the model has none, e.g. SD's GEGLU).
    """
    try:
        from diffusers.models.activations import GELU
    except ImportError:  # pragma: no cover - diffusers is a dependency; models without it have no such block
        return 0
    names = [n for n, m in model.named_modules() if type(m) is GELU and m.approximate == "tanh"]
    for name in names:
        replace_module(model, name, SigmoidFormGELU(model.get_submodule(name).proj))
    return len(names)
