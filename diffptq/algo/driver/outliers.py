"""Outlier handling of a unit's Linear layers, set before its activation quantizers are calibrated and its weights
quantized: the PCA rotation with high-precision leading components (SequentialConfig.rotate "pca", keep;
diffptq.quant.rotation.PcaRotation), then smoothing and the low-rank branch (smooth / lowrank;
diffptq.quant.outliers)."""
from __future__ import annotations

from functools import partial

import torch
from torch import Tensor, nn

from diffptq.algo.driver.config import SequentialConfig
from diffptq.algo.driver.passes import UnitRunner
from diffptq.algo.driver.plan import BlockPlan
from diffptq.algo.hessian import GramAccumulator
from diffptq.errors import NonFiniteActivationError
from diffptq.quant.act import keep_leading
from diffptq.quant.layers import QuantLayer
from diffptq.quant.outliers import branch_rank, lowrank_split, smoothing_scales
from diffptq.quant.rotation import PcaRotation, pca_rotation


def _track_absmax(store: dict, name: str, mod: QuantLayer, x: Tensor) -> None:
    m = x.detach().abs().reshape(-1, x.shape[-1]).amax(dim=0).float()
    store[name] = m if name not in store else torch.maximum(store[name], m)


def _linear_groups(layers: dict[str, QuantLayer], plan: BlockPlan) -> list[list[str]]:
    """The plan's groups (layers fed by one tensor) restricted to Linear layers, empty ones dropped."""
    groups = [[n for n in g if isinstance(layers.get(n), nn.Linear)] for g in plan.groups]
    return [g for g in groups if g]


@torch.no_grad()
def rotate_pca(runner: UnitRunner, k: int, layers: dict[str, QuantLayer], plan: BlockPlan, records: list[int],
               keep: int, seed: int = 0) -> None:
    """Give unit k's Linear layers their PCA rotation: per group of layers fed by the same tensor one PcaRotation
    from that tensor's second moment E[x xᵀ] over the quantized stream of `records` (the unit's weights float, as
    for smoothing; pca_rotation with `keep` and `seed`), shared by the group so that its input stays one tensor.
    With `keep` > 0 each layer's activation quantizer then keeps the first min(keep, width) rotated channels (the
    leading components) at 8 bits."""
    groups = _linear_groups(layers, plan)
    first = {g[0]: layers[g[0]] for g in groups}  # one accumulator per input tensor
    if not first:
        return
    moments = {n: GramAccumulator() for n in first}
    stop = max(first, key=plan.order.index) if plan.exact and set(first) <= set(plan.order) else None
    for _, loaded in runner.records(k, records, ("q",)):
        runner.block_pass(k, loaded.states["q"], loaded.ctx, False, first,
                          lambda name, mod, x: moments[name].update(x), stop_after=stop, kind="outliers")
    for group in groups:
        acc = moments[group[0]]
        if not acc.n:  # the layer did not run on these records: it keeps its input as it is
            continue
        second_moment, _ = acc.finish()
        if not bool(torch.isfinite(second_moment).all()):
            raise NonFiniteActivationError(f"NaN/Inf in the input of layer {group[0]} (block "
                                           f"{runner.units[k].block}) while computing its PCA rotation: check the "
                                           "model weights and the calibration data")
        rotation = PcaRotation(pca_rotation(second_moment, keep, seed))
        for name in group:
            layers[name].set_rotation(rotation)
            layers[name].act_quant = keep_leading(layers[name].act_quant, keep, rotation.size)


@torch.no_grad()
def prepare_outliers(runner: UnitRunner, k: int, layers: dict[str, QuantLayer], plan: BlockPlan,
                     records: list[int], cfg: SequentialConfig) -> None:
    """Give unit k's Linear layers what `cfg` asks for, in this order: the PCA rotation (rotate "pca", keep),
    smoothing (smooth: one s per group of layers fed by the same tensor, from max |x| over the quantized stream of
    `records`, the unit's weights float, after the rotation) and the rank-`lowrank` branch (Conv2d layers too with
    `lowrank_conv`)."""
    if cfg.rotate == "pca":
        rotate_pca(runner, k, layers, plan, records, cfg.keep, cfg.rotate_seed)
    linears = {n: m for n, m in layers.items() if isinstance(m, nn.Linear)}
    if cfg.smooth is not None and linears:
        absmax: dict[str, Tensor] = {}
        for _, loaded in runner.records(k, records, ("q",)):
            runner.block_pass(k, loaded.states["q"], loaded.ctx, False, linears, partial(_track_absmax, absmax),
                              kind="outliers")
        for group in _linear_groups(layers, plan):
            names = [n for n in group if n in absmax]
            if not names:
                continue
            x_max = torch.stack([absmax[n] for n in names]).amax(dim=0)  # the group's one input
            s = smoothing_scales(x_max, [linears[n].weight for n in names], cfg.smooth)
            for n in names:
                linears[n].set_smoothing(s)
    if cfg.lowrank > 0:
        for layer in (layers if cfg.lowrank_conv else linears).values():
            W = layer.weight.detach().float().reshape(layer.weight.shape[0], -1)  # a conv's as (out, in·k·k)
            rank = branch_rank(cfg.lowrank, tuple(W.shape))
            if rank > 0:
                _, up, down = lowrank_split(W, rank)
                layer.set_lowrank(up, down)
