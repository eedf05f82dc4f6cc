"""The TDQ scale MLP: condition c → Fourier features → MLP → positive activation step size(s).

scale(c) = unit · softplus(z(c)), z = Linear(act(...Linear(Fourier(c))...)). The last layer starts with zero weight and
bias softplus⁻¹(init_scale / unit), so before training the MLP returns ``init_scale`` (the static calibrated scale)
exactly, for every c. ``unit`` is a fixed buffer, by default the initial scale itself (``relative=True``): then
z works in multiples of the static scale, Adam's step sizes mean the same thing for a layer whose activations are
1e-3 or 1e2, and the bias is softplus⁻¹(1) for all. ``relative=False`` takes unit = 1, i.e. bias = softplus⁻¹(scale).

Plugs into an activation quantizer that holds ``scale_fn: nn.Module`` mapping a condition (1,) → scale (1,): with
n_out = 1 the output has the input's leading shape, () or (B,) → (B,). With n_out = L (one head per layer, a shared
trunk) the output is (B, L); ``split()`` turns it into L standalone n_out = 1 MLPs, one per quantizer.
Keep it in float32 even in a half-precision model: it runs once per sampling step, and a half bias would move the
initial scale by ~1e-3 relative.
"""
from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .fourier import FourierFeatures

_ACTIVATIONS = {"relu": nn.ReLU, "silu": nn.SiLU}


def softplus_inverse(y: Tensor) -> Tensor:
    """softplus⁻¹(y) = log(expm1(y)) for y > 0, stable for small and large y (float64 inside)."""
    y64 = y.double()
    out = y64 + torch.log(-torch.expm1(-y64))
    return out.to(y.dtype)


class ScaleMLP(nn.Module):
    """c: () or (B,) → scales: (B,) if n_out == 1 else (B, n_out); positive, in the units of the activations.

    init_scale: float or (n_out,) positive static scale(s); n_out = its length.
    n_freqs: Fourier frequencies (features 2F+1); hidden: width; depth: number of hidden layers (≥ 1);
    act: 'silu' | 'relu'; relative: unit = init_scale (True) or 1 (False), see module doc.
    """

    def __init__(
        self,
        init_scale: float | Sequence[float] | Tensor,
        n_freqs: int = 3,
        hidden: int = 32,
        depth: int = 2,
        act: str = "silu",
        relative: bool = True,
    ):
        super().__init__()
        init = torch.as_tensor(init_scale, dtype=torch.float32).detach().reshape(-1).cpu()
        if init.numel() == 0 or not bool((init > 0).all()) or not bool(init.isfinite().all()):
            raise ValueError(f"init_scale must be finite and positive, got {init.tolist()}")
        if depth < 1:
            raise ValueError("depth must be >= 1")
        self.n_out = init.numel()
        self._config = {"n_freqs": n_freqs, "hidden": hidden, "depth": depth, "act": act, "relative": relative}
        self.fourier = FourierFeatures(n_freqs)
        layers: list[nn.Module] = []
        width = self.fourier.out_dim
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), _ACTIVATIONS[act]()]
            width = hidden
        self.trunk = nn.Sequential(*layers)
        self.head = nn.Linear(width, self.n_out)
        self.register_buffer("unit", init.clone() if relative else torch.ones_like(init))
        self.reset_to(init)

    def config(self) -> dict:
        """JSON-able constructor arguments (with n_out); ``from_config`` + ``load_state_dict`` rebuild the MLP."""
        return {"n_out": self.n_out, **self._config}

    @classmethod
    def from_config(cls, config: dict) -> ScaleMLP:
        """An MLP of the recorded shape, initialised to scale 1: load its state dict next."""
        cfg = dict(config)
        return cls([1.0] * int(cfg.pop("n_out")), **cfg)

    @torch.no_grad()
    def reset_to(self, scale: float | Sequence[float] | Tensor) -> None:
        """Make the MLP output ``scale`` (float or (n_out,)) for every condition: head weight 0, bias softplus⁻¹."""
        scale = torch.as_tensor(scale, dtype=torch.float32).reshape(-1).expand(self.n_out).to(self.unit)
        self.head.weight.zero_()
        self.head.bias.copy_(softplus_inverse((scale / self.unit).double()).to(self.head.bias))

    def _pre(self, c: Tensor) -> Tensor:
        p = self.head.weight
        return self.head(self.trunk(self.fourier(c.to(p.device, p.dtype))))

    def log_scale(self, c: Tensor) -> Tensor:
        """log of the scales, (B, n_out) always: the quantity ``fit.train_scale_mlp`` regresses."""
        return F.softplus(self._pre(c)).log() + self.unit.log()

    def forward(self, c: Tensor) -> Tensor:
        s = F.softplus(self._pre(c)) * self.unit
        return s.squeeze(-1) if self.n_out == 1 else s

    def split(self) -> list[ScaleMLP]:
        """One standalone n_out = 1 copy per output (same values), to hand each quantizer its own ``scale_fn``."""
        outs = []
        for i in range(self.n_out):
            m = copy.deepcopy(self)
            m.n_out = 1
            m._config = dict(self._config)
            m.head = nn.Linear(self.head.in_features, 1).to(self.head.weight)
            with torch.no_grad():
                m.head.weight.copy_(self.head.weight[i : i + 1])
                m.head.bias.copy_(self.head.bias[i : i + 1])
            m.unit = self.unit[i : i + 1].clone()
            outs.append(m)
        return outs

    def extra_repr(self) -> str:
        return f"n_out={self.n_out}, unit[0]={float(self.unit[0]):.4g}"
