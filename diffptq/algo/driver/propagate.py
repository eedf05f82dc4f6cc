"""Propagation: both streams through a finished unit to the next unit's input, each layer's relative output error on
the held-out records measured on the way; and the whole denoiser's output error."""
from __future__ import annotations

import math
from collections import defaultdict
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffptq.algo.driver.passes import UnitRunner, grab
from diffptq.data.calib import CalibrationSet
from diffptq.models.units import State
from diffptq.quant.layers import QuantLayer, float_mode


def layer_matmul(layer: QuantLayer, x: Tensor, w: Tensor) -> Tensor:
    """The layer's matmul without bias: x (…, in) or (N, C, H, W) with weight w in the layer's shape."""
    if isinstance(layer, nn.Conv2d):
        return layer._conv_forward(x, w, None)
    return F.linear(x, w)


def add_layer_error(x_fp: dict, num: dict, den: dict, name: str, mod: QuantLayer, x: Tensor) -> None:
    """A quantized pass's hook: adds ‖X̃Ŵᵀ − XWᵀ‖² to num[name] and ‖XWᵀ‖² to den[name], X the layer's input in
    the float pass (x_fp[name]), X̃ its input here (x) as the matmul sees it (after its activation quantizer)."""
    ref = layer_matmul(mod, x_fp[name], mod.weight).float()
    out = layer_matmul(mod, mod.quant_input(x), mod.current_weight()).float()
    if mod.lowrank_up is not None:  # the high-precision branch is part of the layer's output in both streams
        ref, out = ref + mod.branch(x_fp[name]).float(), out + mod.branch(x).float()
    e, r = (out - ref).pow(2).sum(), ref.pow(2).sum()
    num[name] = num[name] + e if name in num else e
    den[name] = den[name] + r if name in den else r


@torch.no_grad()
def propagate_unit(runner: UnitRunner, k: int, measure: dict[str, QuantLayer] | None, held: set[int],
                   fp_records: set[int], one_stream: bool) -> dict[str, float]:
    """Run unit k on every record: the quantized stream (its quantization on), and the float stream on `fp_records`
    (taken from runner.cache.next_fp where computed ahead); the results replace the cached states. With
    `one_stream` (before the first selected unit: both streams are the same tensors) one float pass serves both.
    Returns rel_out_err = ‖X̃Ŵᵀ − XWᵀ‖/‖XWᵀ‖ per layer of `measure`, over the `held` records."""
    cache = runner.cache
    n = len(cache.q)
    num: dict[str, Tensor] = {}
    den: dict[str, Tensor] = {}
    new_fp: list[State | None] = [None] * n
    new_q: list[State | None] = [None] * n

    def streams(i):
        if one_stream:
            return ("q",)
        return ("q", "fp") if (i in fp_records and i not in cache.next_fp) else ("q",)
    for i, loaded in runner.records(k, range(n), streams):
        if one_stream:  # before the first selected block: one float stream (these blocks have no quant layers)
            out = runner.block_pass(k, loaded.states["q"], loaded.ctx, False)
            new_q[i] = new_fp[i] = cache.store_state(out, loaded.origin)
        else:
            x_fp: dict[str, Tensor] = {}
            if i in cache.next_fp:
                new_fp[i] = cache.next_fp.pop(i)
            elif "fp" in loaded.states:
                out = runner.block_pass(k, loaded.states["fp"], loaded.ctx, False, measure,
                                        partial(grab, x_fp) if i in held else None)
                new_fp[i] = cache.store_state(out, loaded.origin)
            err = partial(add_layer_error, x_fp, num, den) if i in held else None
            out = runner.block_pass(k, loaded.states["q"], loaded.ctx, True, measure, err)
            new_q[i] = cache.store_state(out, loaded.origin)
        cache.release(i, new_fp[i], new_q[i])
    cache.advance(new_fp, new_q)
    if not (measure and num):
        return {}
    names = list(num)
    vals = torch.stack([torch.stack([num[m], den[m]]) for m in names]).tolist()
    return {m: math.sqrt(a / max(b, 1e-30)) for m, (a, b) in zip(names, vals)}


@torch.no_grad()
def denoiser_output_error(denoiser: nn.Module, calib: CalibrationSet, device: torch.device | str = "cpu",
                          dtype: torch.dtype | None = None) -> dict[int, float]:
    """Relative error ‖ε̂ − ε‖/‖ε‖ of the quantized denoiser vs its float mode, per sampling step (mean over
    records of that step)."""
    per_step: dict[int, list[float]] = defaultdict(list)
    for record, inputs in zip(calib.records, calib.batches(device, dtype)):
        with float_mode(denoiser):
            ref = denoiser(**inputs, return_dict=False)[0].float()
        out = denoiser(**inputs, return_dict=False)[0].float()
        per_step[record.step].append(float((out - ref).norm() / ref.norm().clamp_min(1e-30)))
    return {s: sum(v) / len(v) for s, v in sorted(per_step.items())}
