"""NVIDIA ModelOpt (`modelopt.torch.quantization`): `mtq.quantize(model, config, forward_loop)` with one of its
preset configs, restricted to our block layers.

The preset's generic `*weight_quantizer` / `*input_quantizer` entries are re-issued per block layer (name patterns
are ModelOpt's own filter mechanism) after a leading `*: disabled`, so the embedders, the final projection and the
preset's model-specific exclusions play no part. Group-wise formats (AWQ int4, NVFP4) quantize Linear layers only,
with the group fitted to the layer's width (a Conv2d kernel is not blocked along its input channels); per-channel
INT8 takes Conv2d too. All ModelOpt formats are fake-quant in PyTorch: real speed comes from a TensorRT export.
"""
from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from diffptq.peers.common import Replay, block_layers, fitting_group, forward_all, layer_note
from diffptq.peers.registry import Peer

GENERIC = ("*weight_quantizer", "*input_quantizer")
SPEED = "fake-quant: real speed needs a TensorRT export"


def _blocked(cfg: Any) -> bool:
    items = cfg if isinstance(cfg, list) else [cfg]
    return any(isinstance(c, dict) and c.get("block_sizes") for c in items)


def _fit_blocks(cfg: Any, width: int) -> Any:
    """`cfg` with its block size along the input (-1) fitted to `width`; None when no block size fits.
    Static blocks (AWQ's groups) may shrink to 16; dynamic ones (NVFP4's 16) are the format's own and must divide."""
    if isinstance(cfg, list):
        fitted = [_fit_blocks(c, width) for c in cfg]
        return None if any(f is None for f in fitted) else fitted
    if not isinstance(cfg, dict) or not cfg.get("block_sizes") or -1 not in cfg["block_sizes"]:
        return cfg
    sizes = dict(cfg["block_sizes"])
    size = sizes[-1]
    group = fitting_group(width, size) if sizes.get("type") == "static" else (size if width % size == 0 else None)
    if group is None:
        return None
    sizes[-1] = group
    return {**cfg, "block_sizes": sizes}


def _layer_entries(name: str, width: int, generic: list[dict]) -> list[dict] | None:
    """The generic entries re-issued for layer `name` of input width `width`; None when a block size cannot fit."""
    out = []
    for entry in generic:
        own = {**copy.deepcopy(entry), "quantizer_name": f"{name}.{entry['quantizer_name'][1:]}"}
        if entry.get("cfg") is not None:
            own["cfg"] = _fit_blocks(entry["cfg"], width)
            if own["cfg"] is None:
                return None
        out.append(own)
    return out


def block_config(preset: dict, layers: dict[str, nn.Module]) -> tuple[dict, dict[str, int]]:
    """(ModelOpt config quantizing only `layers` as `preset` would, {why: count} of block layers left in float)."""
    generic = [e for e in preset["quant_cfg"] if e.get("quantizer_name") in GENERIC and not e.get("parent_class")]
    blocked = any(_blocked(e.get("cfg")) for e in generic)
    entries: list[dict] = [{"quantizer_name": "*", "enable": False}]
    left = {"Conv2d (group-wise format)": 0, "layers whose width fits no group": 0}
    for name, module in layers.items():
        own = None if blocked and not isinstance(module, nn.Linear) else \
            _layer_entries(name, module.weight.shape[1], generic)
        if own is not None:
            entries += own
        elif isinstance(module, nn.Linear):
            left["layers whose width fits no group"] += 1
        else:
            left["Conv2d (group-wise format)"] += 1
    return {"quant_cfg": entries, "algorithm": copy.deepcopy(preset["algorithm"])}, left


def quantize(peer: Peer, denoiser: nn.Module, calib_inputs: Iterable[dict], device: torch.device | str) -> str:
    """mtq.quantize on the block layers with the preset `peer.settings['preset']`, calibrated by a forward loop over
    `calib_inputs`; returns the row's note."""
    preset_name = peer.settings["preset"]
    import modelopt.torch.quantization as mtq

    layers = block_layers(denoiser)
    config, left = block_config(getattr(mtq, preset_name), layers)
    calib = Replay(calib_inputs)
    mtq.quantize(denoiser, config, forward_loop=lambda model: forward_all(model, calib))
    done = len(layers) - sum(left.values())
    return layer_note(peer, done, len(layers), left, f"{preset_name}; {SPEED}")
