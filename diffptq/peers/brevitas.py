"""Brevitas (AMD/Xilinx): `layerwise_quantize` swaps the block layers for QuantLinear / QuantConv2d (every other
Linear / Conv2d in `name_blacklist`), `calibration_mode` sets the static activation scales, then `gptq_mode` (GPTQ)
or `gpfq_mode` with `Qronos` as the algorithm runs its layer-by-layer loop: one calibration pass per layer, each
stopped at that layer.

Weights: symmetric int per output channel (Int8WeightPerChannelFloat at `wbits`); activations: int per tensor
(Int8ActPerTensorFloat at `abits`). Act order on, Qronos alpha 1e-6: the settings of Brevitas' own examples.
"""
from __future__ import annotations

from collections.abc import Iterable
from functools import partial

import torch
from torch import nn

from diffptq.peers.common import block_layers, forward_all, layer_note, merge_records
from diffptq.peers.registry import Peer

SPEED = "fake-quant: real speed needs a Brevitas export (ONNX QCDQ / QONNX) to an inference runtime"
# Brevitas' GPTQ / Qronos loop runs one calibration pass per layer (129 on bundled-unet), each denoiser call costing
# milliseconds of Python in its quant layers: the records are joined into calls of up to this many samples (the same
# samples, several times fewer calls)
MERGED_BATCH = 128


def _swap_block_layers(denoiser: nn.Module, layers: dict[str, nn.Module], wbits: int, abits: int) -> None:
    """Swap the block layers for Brevitas' quant layers, on the device of the denoiser's weights.

    Brevitas builds each quant layer's own state (scales, zero points, sentinels) on the default device: on a GPU
    model that state would stay on the CPU, so the whole denoiser is moved back to its device (dtypes kept).
    """
    import brevitas.nn as qnn
    from brevitas.graph.quantize import layerwise_quantize
    from brevitas.quant.scaled_int import Int8ActPerTensorFloat, Int8WeightPerChannelFloat

    kwargs = {"weight_quant": Int8WeightPerChannelFloat, "weight_bit_width": wbits, "return_quant_tensor": False}
    if abits < 16:
        kwargs.update(input_quant=Int8ActPerTensorFloat, input_bit_width=abits)
    layer_map = {nn.Linear: (qnn.QuantLinear, kwargs), nn.Conv2d: (qnn.QuantConv2d, kwargs)}
    others = [n for n, m in denoiser.named_modules() if type(m) in (nn.Linear, nn.Conv2d) and n not in layers]
    device = next(denoiser.parameters()).device
    layerwise_quantize(denoiser, compute_layer_map=layer_map, name_blacklist=others)
    denoiser.to(device)


@torch.no_grad()
def _solve(denoiser: nn.Module, calib: list[dict], algorithm: str, device: torch.device | str) -> int:
    """GPTQ or Qronos over every quantized layer, Brevitas' loop; returns the number of layers it solved."""
    from brevitas.graph.gpfq import gpfq_mode
    from brevitas.graph.gptq import gptq_mode
    from brevitas.graph.qronos import Qronos

    buffers = {"device": str(torch.device(device)), "dtype": torch.float32}
    if algorithm == "gptq":
        mode = gptq_mode(denoiser, act_order=True, **buffers)
    else:
        mode = gpfq_mode(denoiser, act_order=True, create_weight_orig=True, algorithm_impl=partial(Qronos, alpha=1e-6),
                         **buffers)
    with mode as algo:
        for _ in range(algo.num_layers):
            forward_all(algo.model, calib)
            algo.update()
        return algo.num_layers


def quantize(peer: Peer, denoiser: nn.Module, calib_inputs: Iterable[dict], device: torch.device | str) -> str:
    """Swap, calibrate activations, then GPTQ / Qronos (`peer.settings['algorithm']`); returns the row's note."""
    from brevitas.graph.calibrate import calibration_mode

    layers = block_layers(denoiser)
    calib = merge_records(calib_inputs, MERGED_BATCH)
    _swap_block_layers(denoiser, layers, peer.wbits, peer.abits)
    if peer.abits < 16:
        with torch.no_grad(), calibration_mode(denoiser):
            forward_all(denoiser, calib)
    solved = _solve(denoiser, calib, peer.settings["algorithm"], device)
    done = sum(type(denoiser.get_submodule(n)).__module__.startswith("brevitas") for n in layers)
    calls = f"{len(calib)} call{'s' * (len(calib) != 1)}"
    return layer_note(peer, done, len(layers), tail=f"{peer.settings['algorithm']} solved {solved} layers "
                      f"(calibration records joined into {calls} of ≤ {MERGED_BATCH} samples); {SPEED}")
