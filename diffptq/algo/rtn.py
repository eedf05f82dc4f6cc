"""Round-to-nearest baseline and QuantResult, the record every weight quantizer returns."""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

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
