"""Smoothing and the low-rank branch of a unit's Linear layers (SequentialConfig.smooth / lowrank), set before its
activation quantizers are calibrated and its weights quantized (diffptq.quant.outliers)."""
from __future__ import annotations

from functools import partial

import torch
from torch import Tensor, nn

from diffptq.algo.driver.passes import UnitRunner
from diffptq.algo.driver.plan import BlockPlan
from diffptq.quant.layers import QuantLayer
from diffptq.quant.outliers import lowrank_split, smoothing_scales


def _track_absmax(store: dict, name: str, mod: QuantLayer, x: Tensor) -> None:
    m = x.detach().abs().reshape(-1, x.shape[-1]).amax(dim=0).float()
    store[name] = m if name not in store else torch.maximum(store[name], m)


@torch.no_grad()
def prepare_outliers(runner: UnitRunner, k: int, layers: dict[str, QuantLayer], plan: BlockPlan,
                     records: list[int], smooth: float | None, rank: int) -> None:
    """Give unit k's Linear layers their smoothing (one s per group of layers fed by the same tensor, from max |x|
    over the quantized stream of `records`, the unit's weights float) and then their rank-`rank` branch."""
    linears = {n: m for n, m in layers.items() if isinstance(m, nn.Linear)}
    if smooth is not None and linears:
        absmax: dict[str, Tensor] = {}
        for _, loaded in runner.records(k, records, ("q",)):
            runner.block_pass(k, loaded.states["q"], loaded.ctx, False, linears, partial(_track_absmax, absmax),
                              kind="outliers")
        for group in plan.groups:
            names = [n for n in group if n in linears and n in absmax]
            if not names:
                continue
            x_max = torch.stack([absmax[n] for n in names]).amax(dim=0)  # the group's one input
            s = smoothing_scales(x_max, [linears[n].weight for n in names], smooth)
            for n in names:
                linears[n].set_smoothing(s)
    if rank > 0:
        for layer in linears.values():
            _, up, down = lowrank_split(layer.weight.detach().float(), rank)
            layer.set_lowrank(up, down)
