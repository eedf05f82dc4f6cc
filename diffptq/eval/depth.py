"""Error versus depth: how far a quantized denoiser's hidden state is from the float model's after each block.

Both models run the same held-out calibration records through the family's unrolled forward (prologue, block 0 …
block K−1): the float pass with float weights and no activation quantization (`float_mode`), the quantized pass as
quantized. At each depth k, `block_err[k]` = ‖h_q,k − h_fp,k‖ / ‖h_fp,k‖ over all records (a ratio of sums), where
h_k is block k's output: the error the quantized stream has accumulated by then. Per layer, `layer_err` is the
driver's own measure (diffptq.algo.driver.propagate.add_layer_error): ‖X̃Ŵᵀ − XWᵀ‖ / ‖XWᵀ‖ with X the layer's input
in the float pass and X̃ its input in the quantized pass, so for the first quantized block it equals the driver's
rel_out_err of each layer on the same records.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import Tensor, nn

from diffptq.algo.driver.passes import grab
from diffptq.algo.driver.propagate import add_layer_error
from diffptq.data.calib import CalibrationSet
from diffptq.models.families import ModelFamily
from diffptq.quant.layers import float_mode, quant_layers


@dataclass
class DepthErrors:
    """block_err[k]: relative error of block k's output (k = 0 … K−1, family.blocks order); layer_err: relative
    output error of each quantized layer by name; out_err: of the denoiser's output."""

    block_err: list[float]
    layer_err: dict[str, float] = field(default_factory=dict)
    out_err: float = math.nan


def _block_outputs(denoiser: nn.Module, family: ModelFamily, inputs: dict) -> tuple[list[Tensor], Tensor]:
    h, skips, ctx = family.prologue(denoiser, inputs)
    outs = []
    for k in range(len(family.blocks(denoiser))):
        h, skips = family.run_block(denoiser, k, h, skips, ctx)
        outs.append(h.float())
    return outs, family.epilogue(denoiser, h, ctx).float()


def _hooks(denoiser: nn.Module, fn) -> list:
    return [m.register_forward_pre_hook(lambda mod, args, name=n: fn(name, mod, args[0]))
            for n, m in quant_layers(denoiser)]


@torch.no_grad()
def depth_errors(denoiser: nn.Module, family: ModelFamily, records: CalibrationSet, device: torch.device | str = "cpu",
                 dtype: torch.dtype | None = None) -> DepthErrors:
    """DepthErrors of a quantized denoiser (its float weights kept) on `records` (see the module docstring)."""
    n_blocks = len(family.blocks(denoiser))
    num, den = torch.zeros(n_blocks + 1, dtype=torch.float64), torch.zeros(n_blocks + 1, dtype=torch.float64)
    lnum: dict[str, Tensor] = {}
    lden: dict[str, Tensor] = {}
    for inputs in records.batches(device, dtype):
        x_fp: dict[str, Tensor] = {}
        handles = _hooks(denoiser, partial(grab, x_fp))
        try:
            with float_mode(denoiser):
                fp, fp_out = _block_outputs(denoiser, family, inputs)
        finally:
            for h in handles:
                h.remove()
        handles = _hooks(denoiser, partial(add_layer_error, x_fp, lnum, lden))
        try:
            q, q_out = _block_outputs(denoiser, family, inputs)
        finally:
            for h in handles:
                h.remove()
        for k, (a, b) in enumerate(zip([*q, q_out], [*fp, fp_out], strict=True)):
            num[k] += float((a - b).pow(2).sum())
            den[k] += float(b.pow(2).sum())
    rel = (num / den.clamp_min(1e-30)).sqrt().tolist()
    layers = {n: math.sqrt(float(lnum[n]) / max(float(lden[n]), 1e-30)) for n in lnum}
    return DepthErrors(rel[:n_blocks], layers, rel[n_blocks])
