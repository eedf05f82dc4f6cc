"""Round-to-nearest baseline and QuantResult, the record every weight quantizer returns; RTN codes for the named
layers of a module, and installing such codes into quant layers (no calibration)."""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn

from diffptq.quant.layers import QuantConfig, QuantLayer, swap_modules
from diffptq.quant.quantizer import QuantSpec, dequantize, fit_weight_params, quantize_codes


@dataclass
class QuantResult:
    """One quantized weight.

    weight: dequantized, W's shape and dtype (in float32 exactly scale·(codes − zero)).
    codes: (out, in·k·k) spec.code_dtype; scale, zero: (out, n_groups) float32 (n_groups = 1 per channel).
    delta: absolute damping δ added to diag H; damp_rel: δ / mean(diag H) (nan for RTN).
    retries: Cholesky retries used; fell_back: RTN was used instead of the requested method, `reason` says why.
    """

    weight: Tensor
    codes: Tensor
    scale: Tensor
    zero: Tensor
    method: str
    delta: float = float("nan")
    damp_rel: float = float("nan")
    retries: int = 0
    fell_back: bool = False
    reason: str = ""

    def summary(self) -> dict[str, object]:
        """Scalar fields, for logs and layers.csv."""
        return {k: getattr(self, k) for k in ("method", "delta", "damp_rel", "retries", "fell_back", "reason")}


def rtn_quantize_ex(W: Tensor, spec: QuantSpec) -> QuantResult:
    """Round W (out, ...) to nearest on per-channel / per-group grids fitted with spec.scale_method."""
    W2 = W.detach().reshape(W.shape[0], -1).float()
    scale, zero = fit_weight_params(W2, spec)
    codes = quantize_codes(W2, scale, zero, spec)
    weight = dequantize(codes, scale, zero).reshape(W.shape).to(W.dtype)
    return QuantResult(weight, codes, scale, zero, method="rtn")


def rtn_quantize(W: Tensor, spec: QuantSpec) -> Tensor:
    """Dequantized round-to-nearest weight, W's shape and dtype."""
    return rtn_quantize_ex(W, spec).weight


class LayerCodes(NamedTuple):
    """One layer's RTN grid: codes (out, in·k·k) spec.code_dtype; scale, zero (out, n_groups) float32."""

    spec: QuantSpec
    codes: Tensor
    scale: Tensor
    zero: Tensor


@torch.no_grad()
def rtn_layer_codes(module: nn.Module, names: Iterable[str], spec_for: Callable[[int], QuantSpec],
                    device: torch.device | str = "cpu") -> dict[str, LayerCodes]:
    """{name: LayerCodes}: round-to-nearest codes of each named Linear / Conv2d of `module`, on the grid
    `spec_for(in_features)` (in_features: the weight matrix's columns, in·k·k for a Conv2d). Computed where the
    weight lives (in float32), kept on `device`."""
    out = {}
    for name in names:
        w = module.get_submodule(name).weight.detach()
        spec = spec_for(w[0].numel())
        r = rtn_quantize_ex(w.float(), spec)
        out[name] = LayerCodes(spec, r.codes.to(device), r.scale.to(device), r.zero.to(device))
    return out


def install_layer_codes(module: nn.Module, codes: Mapping[str, LayerCodes], act: QuantSpec | None = None,
                        act_kind: str = "dynamic") -> dict[str, QuantLayer]:
    """Swap the layers named in `codes` for quant layers (swap_modules) holding those codes, each with an `act`
    activation quantizer of `act_kind` ("dynamic": per token, "static": per tensor, calibrated) or none. The layer
    then computes with scale·(codes − zero) in its own dtype. Returns {name: quant layer}; raises ValueError for
    a name that is not a swappable layer (a plain nn.Linear or ungrouped nn.Conv2d)."""
    layers = swap_modules(module, QuantConfig(act=act, act_kind=act_kind, include=tuple(codes)))
    missing = [name for name in codes if name not in layers]
    if missing:
        raise ValueError(f"install_layer_codes: no Linear / Conv2d to quantize at {', '.join(missing)}")
    for name, layer in layers.items():
        spec, c, scale, zero = codes[name]
        layer.weight_spec = spec
        layer.set_quantized_weight(c, scale, zero)
    return layers
