"""One layer's solve: RTN, GPTQ or Qronos on its weight matrix (damping chosen on held-out records with Damping
"adaptive"), the result set on the layer and reported."""
from __future__ import annotations

import logging
import math

from diffptq.algo.driver.config import LayerReport, SequentialConfig
from diffptq.algo.driver.timing import PhaseTimer
from diffptq.algo.heldout import Grams, pooled, select_damping, solve
from diffptq.algo.rtn import rtn_quantize_ex
from diffptq.quant.layers import QuantLayer

log = logging.getLogger(__name__)


def solve_layer(cfg: SequentialConfig, block: int, name: str, layer: QuantLayer, grams: Grams | None,
                timer: PhaseTimer, consume: bool = False, held: Grams | None = None) -> LayerReport:
    """Quantize `layer` by cfg.method from its input statistics (H for GPTQ, H and G for Qronos; None for RTN);
    with `consume` the solver releases them (no other layer reads them). With `held` (Damping "adaptive"), the
    damping is chosen on those held-out statistics (algo.heldout) and the layer solved on all of them pooled.
    Returns its report (rel_out_err nan until measured)."""
    W = layer.weight_matrix()
    heldout_err = math.nan
    with timer("solve"):
        if cfg.method == "rtn":
            res = rtn_quantize_ex(W, cfg.weight)
        elif held is not None:
            chosen, errors = select_damping(cfg.method, W, grams, held, cfg.weight, cfg.damp, cfg.act_order,
                                            cfg.block_size, cfg.correction)
            heldout_err = errors[chosen]
            res = solve(cfg.method, W, pooled(grams, held), cfg.weight, cfg.damp.fixed(chosen), cfg.act_order,
                        cfg.block_size, True, cfg.correction)
        else:
            res = solve(cfg.method, W, grams, cfg.weight, cfg.damp, cfg.act_order, cfg.block_size, consume,
                        cfg.correction)
    layer.set_quantized_weight(res.codes, res.scale, res.zero)
    if res.fell_back:
        log.warning("layer %s: fell back to RTN (%s)", name, res.reason)
    abits = cfg.act.bits if cfg.act is not None else None
    return LayerReport(block, name, cfg.method, cfg.weight.bits, abits, res.damp_rel, math.nan, res.fell_back,
                       res.reason, heldout_err)
