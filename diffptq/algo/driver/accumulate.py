"""H (and G) of a wave's layers over the calibration records: one pass per stream, one accumulator per distinct
matmul input (layers with the same input and equal activation quantizers share it), inputs checked for NaN/Inf."""
from __future__ import annotations

from functools import partial

import torch
from torch import Tensor, nn

from diffptq.algo.damping import any_nonfinite
from diffptq.algo.driver.passes import UnitRunner, grab
from diffptq.algo.driver.plan import BlockPlan
from diffptq.algo.driver.timing import PhaseTimer
from diffptq.algo.heldout import Grams
from diffptq.algo.hessian import GramAccumulator
from diffptq.errors import NonFiniteActivationError
from diffptq.quant.act import same_quantization
from diffptq.quant.layers import QuantLayer


def same_matmul_input(a: QuantLayer, b: QuantLayer) -> bool:
    """True if two Linear layers given the same tensor see the same matmul input: no activation quantizers, or
    equal deterministic ones (static with equal scale/zero, or dynamic per token with equal grids)."""
    if not (isinstance(a, nn.Linear) and isinstance(b, nn.Linear)):
        return False
    qa, qb = a.act_quant, b.act_quant
    if qa is None or qb is None:
        return qa is None and qb is None
    return qa.enabled == qb.enabled and same_quantization(qa, qb)


def share_leaders(plan: BlockPlan, layers: dict[str, QuantLayer]) -> dict[str, str]:
    """layer → the first layer of its group with the same matmul input (itself when none matches): these share
    one fake-quantized input in quantized passes and one H/G accumulator."""
    leader: dict[str, str] = {}
    for names in plan.groups:
        reps: list[str] = []
        for n in names:
            lead = next((r for r in reps if plan.exact and same_matmul_input(layers[r], layers[n])), None)
            if lead is None:
                reps.append(n)
            leader[n] = lead or n
    return leader


def _accumulate(timer: PhaseTimer, acc: dict, acc_f: dict, leader: dict, x_fp: dict, bad: dict, name: str,
                mod: QuantLayer, x: Tensor) -> None:
    if leader[name] != name:
        return  # same matmul input as its leader, which was accumulated already
    xq = mod.quant_input(x)
    flag = any_nonfinite(xq)
    bad[name] = flag if name not in bad else bad[name] | flag
    with timer("accumulate"):
        acc[name].update(xq, x_fp.get(name))
        if name in acc_f:
            acc_f[name].update(x_fp[name])


@torch.no_grad()
def accumulate_wave(runner: UnitRunner, k: int, plan: BlockPlan, w: int, records: list[int], cross: bool,
                    float_gram: bool = False) -> dict[str, Grams]:
    """leader → Grams of the layers of wave w of unit k over `records`: H = X̃ᵀX̃/n (in, in) float32 of the
    quantized stream's matmul input X̃, with `cross` (Qronos, held-out records) also G = X̃ᵀX/n with the float
    stream's input X, with `float_gram` (held-out records) also F = XᵀX/n. Passes stop before the wave's last
    layer, but with `cross` the first wave's float pass runs the whole unit and keeps its output in
    runner.cache.next_fp. Raises NonFiniteActivationError on NaN/Inf inputs."""
    names = plan.wave_layers(w)
    layers = {n: runner.layers[n] for n in names}
    leader = runner.leaders[k]
    cross = cross or float_gram
    acc = {n: GramAccumulator(m if isinstance(m, nn.Conv2d) else None, cross=cross)
           for n, m in layers.items() if leader[n] == n}
    acc_f = {n: GramAccumulator(a.module) for n, a in acc.items()} if float_gram else {}
    stop = max(names, key=plan.order.index)
    keep_fp = cross and w == 0  # the first float pass runs the whole block: its output is the next float state
    bad: dict[str, Tensor] = {}
    for i, loaded in runner.records(k, records, ("fp", "q") if cross else ("q",)):
        x_fp: dict[str, Tensor] = {}
        if cross:
            out = runner.block_pass(k, loaded.states["fp"], loaded.ctx, False, layers, partial(grab, x_fp),
                                    None if keep_fp else stop)
            if keep_fp:
                runner.cache.next_fp[i] = runner.cache.store_state(out, loaded.origin)
        runner.block_pass(k, loaded.states["q"], loaded.ctx, True, layers,
                          partial(_accumulate, runner.timer, acc, acc_f, leader, x_fp, bad), stop)
    if bad:
        flags = torch.stack([bad[n] for n in names if n in bad]).tolist()
        for n, f in zip([n for n in names if n in bad], flags):
            if f:
                raise NonFiniteActivationError(
                    f"NaN/Inf in the input of layer {n} (block {runner.units[k].block}) during calibration: check "
                    "the model weights and the calibration data (dtype overflow? try --dtype fp32 or bf16)")
    out = {}
    for n, a in acc.items():  # finish() divides in place: no copies of the (in, in) matrices
        rows = a.n
        out[n] = Grams(*a.finish(), rows, acc_f[n].finish()[0] if acc_f else None)
    return out
