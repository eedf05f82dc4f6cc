"""torchao: `quantize_(model, config, filter_fn)` on the block layers' nn.Linear modules (torchao's configs take
Linear layers; the UNet's Conv2d stay in float).

- `int8da_int4w`: Int8DynamicActivationIntxWeightConfig with int4 weights, symmetric, per group (32, or the largest
  power of two down to 16 that divides the width), int8 per-token dynamic activations; runs on the CPU too.
- `int4wo`: Int4WeightOnlyConfig, tinygemm packing (tile_packed_to_4d: the kernel in torch's CUDA build, bf16
  weights; groups 128 down to 32, powers of two only: the packing pads each row to a multiple of 1024 inputs, which
  the group must divide). Its default plain packing needs the separate mslk kernels.
Both scale activations at run time (or keep them in float): no calibration pass.
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

import torch
from torch import nn

from diffptq.peers.common import block_layers, fitting_group, layer_note
from diffptq.peers.registry import Peer, PeerFailed

SPEED = {"int8da_int4w": "real int8 x int4 kernels: torchao's CPU (KleidiAI / lowbit) packing or ExecuTorch export",
         "int4wo": "real kernel: tinygemm on CUDA (torch.compile for best speed)"}


def _config(kind: str, group: int):
    from torchao.quantization import Int4WeightOnlyConfig, Int8DynamicActivationIntxWeightConfig
    from torchao.quantization.granularity import PerGroup

    if kind == "int8da_int4w":
        return Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerGroup(group))
    return Int4WeightOnlyConfig(group_size=group, int4_packing_format="tile_packed_to_4d")


def layer_group(kind: str, width: int, preferred: int) -> int | None:
    """The group size `kind` uses for a Linear of `width` inputs (None: none fits, the layer stays in float)."""
    if kind == "int8da_int4w":
        return fitting_group(width, preferred, smallest=16)
    return fitting_group(width, preferred, smallest=32, whole_row=False)


def quantize(peer: Peer, denoiser: nn.Module, calib_inputs: Iterable[dict], device: torch.device | str) -> str:
    """quantize_ with the peer's config on each block Linear layer (grouped by the group size that fits it); the
    calibration inputs are not used (dynamic / weight-only). Returns the row's note."""
    kind, preferred = peer.settings["config"], peer.settings["group"]
    if kind == "int4wo":
        dtype = next(denoiser.parameters()).dtype
        if dtype != torch.bfloat16:
            raise PeerFailed(f"{peer.name}: the tinygemm int4 kernel takes bf16 weights, the model is {dtype} "
                             "(run with --dtype bf16)")
    from torchao.quantization import quantize_

    layers = block_layers(denoiser)
    by_group: dict[int, set[str]] = defaultdict(set)
    unfit = 0
    for name, module in layers.items():
        if isinstance(module, nn.Linear):
            group = layer_group(kind, module.in_features, preferred)
            if group is None:
                unfit += 1
            else:
                by_group[group].add(name)
    for group, names in sorted(by_group.items()):
        quantize_(denoiser, _config(kind, group), filter_fn=lambda m, fqn, names=names: fqn in names)
    done = sum(len(n) for n in by_group.values())
    convs = sum(not isinstance(m, nn.Linear) for m in layers.values())
    groups = ",".join(str(g) for g in sorted(by_group))
    return layer_note(peer, done, len(layers), {"Conv2d (torchao quantizes nn.Linear)": convs,
                                                "layers whose width fits no group": unfit},
                      f"groups {groups or '-'}; no calibration (dynamic or weight-only); {SPEED[kind]}")
