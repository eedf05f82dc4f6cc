"""Calibrating a unit's activation quantizers on the quantized stream, before its weights are quantized."""
from __future__ import annotations

import torch

from diffptq.algo.driver.passes import UnitRunner
from diffptq.algo.driver.plan import BlockPlan
from diffptq.quant.act import needs_calibration
from diffptq.quant.layers import QuantLayer


@torch.no_grad()
def calibrate_activations(runner: UnitRunner, k: int, layers: dict[str, QuantLayer], plan: BlockPlan | None,
                          records: list[int]) -> None:
    """Calibrate the activation quantizers of `layers` that calibrate (start_calibration / finish_calibration) on
    the quantized stream of `records`, one pass each (the unit's weights still float). With an exact plan a pass
    stops right after the last such layer."""
    static = {n: m.act_quant for n, m in layers.items() if needs_calibration(m.act_quant)}
    if not static:
        return
    for aq in static.values():
        aq.start_calibration()
    stop = None
    if plan is not None and plan.exact and set(static) <= set(plan.order):
        stop = max(static, key=plan.order.index)  # nothing after the last calibrated layer matters
    for _, loaded in runner.records(k, records, ("q",)):
        runner.block_pass(k, loaded.states["q"], loaded.ctx, True, stop_after=stop, stop_post=True, kind="calibrate")
    for aq in static.values():
        aq.finish_calibration()
