"""optimum-quanto: `quantize(model, weights=qint4, activations=..., include=[block layer names])`, then (with
activations) quanto's `Calibration()` context over the calibration inputs, then `freeze(model)`.

qint4 weights are grouped by quanto itself (128, down to 32 in steps of 32 where the width needs it, else per output
channel); qint8 activations are static per-tensor scales recorded by Calibration. Linear and Conv2d layers alike.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from diffptq.peers.common import Replay, block_layers, forward_all, layer_note
from diffptq.peers.registry import Peer

# quanto's accelerated pairs are int8-int8 and fp16/bf16-int4 (its README); int8 activations x int4 weights are not one
SPEED = {"qint8": "int8 activations x int4 weights: no fused quanto kernel, so emulated",
         None: "real speed: quanto's int4 kernels on CUDA sm80+ at group 128 (AWQ GEMM for fp16, tinygemm for bf16)"}


def quantize(peer: Peer, denoiser: nn.Module, calib_inputs: Iterable[dict], device: torch.device | str) -> str:
    """quanto's quantize / Calibration / freeze on the block layers; returns the row's note."""
    from optimum.quanto import Calibration, freeze, qint4, qint8
    from optimum.quanto import quantize as quanto_quantize

    layers = block_layers(denoiser)
    activations = {"qint8": qint8, None: None}[peer.settings["activations"]]
    quanto_quantize(denoiser, weights=qint4, activations=activations, include=list(layers))
    records = 0
    if activations is not None:
        with Calibration():
            records = forward_all(denoiser, Replay(calib_inputs))
    freeze(denoiser)
    done = sum(type(denoiser.get_submodule(n)).__module__.startswith("optimum.quanto") for n in layers)
    calib = f"activation scales from {records} calibration records" if records else "no calibration (weight-only)"
    return layer_note(peer, done, len(layers), tail=f"{calib}; {SPEED[peer.settings['activations']]}")
