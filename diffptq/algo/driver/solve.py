"""One layer's solve: RTN, GPTQ or Qronos on its weight matrix, the result set on the layer and reported."""
from __future__ import annotations

import logging
import math

from torch import Tensor

from diffptq.algo.driver.config import LayerReport, SequentialConfig
from diffptq.algo.driver.timing import PhaseTimer
from diffptq.algo.gptq import gptq_quantize_ex
from diffptq.algo.qronos import qronos_quantize_ex
from diffptq.algo.rtn import rtn_quantize_ex
from diffptq.quant.layers import QuantLayer

log = logging.getLogger(__name__)


def solve_layer(cfg: SequentialConfig, block: int, name: str, layer: QuantLayer, H: Tensor | None, G: Tensor | None,
                timer: PhaseTimer, consume: bool = False) -> LayerReport:
    """Quantize `layer` by cfg.method from H (GPTQ, Qronos) and G (Qronos), (in, in) float32; with `consume` the
    solver releases H and G (no other layer reads them). Returns its report (rel_out_err nan until measured)."""
    W = layer.weight_matrix()
    with timer("solve"):
        if cfg.method == "rtn":
            res = rtn_quantize_ex(W, cfg.weight)
        elif cfg.method == "gptq":
            res = gptq_quantize_ex(W, H, cfg.weight, cfg.damp, cfg.act_order, cfg.block_size, consume)
        else:
            res = qronos_quantize_ex(W, H, G, cfg.weight, cfg.damp, cfg.act_order, cfg.block_size, consume)
    layer.set_quantized_weight(res.codes, res.scale, res.zero)
    if res.fell_back:
        log.warning("layer %s: fell back to RTN (%s)", name, res.reason)
    abits = cfg.act.bits if cfg.act is not None else None
    return LayerReport(block, name, cfg.method, cfg.weight.bits, abits, res.damp_rel, math.nan, res.fell_back,
                       res.reason)
