"""Load a diffptq checkpoint straight into inference modules.

Memory path: a checkpoint's int4 codes are already packed (diffptq.quant.quantizer.pack_int4 of the row-major codes),
which is the Int4WeightOnly layout viewed as (out, cols / 2): the bytes are used as they are, no weight is ever
dequantized or materialised in floating point. The base model's float weight of each loaded layer is released
when its module is replaced. Load the base model on the CPU, apply this, then move it to the GPU: the GPU never
holds the float weights of quantized layers.
Speed path: the checkpoint goes through apply_checkpoint (fake-quant layers), then convert_for_inference.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from diffptq.errors import CheckpointError
from diffptq.io.checkpoint import apply_checkpoint, check_base, read_checkpoint
from diffptq.kernels.common import replace_module
from diffptq.kernels.int4_weight_only import Int4WeightOnlyConv2d, Int4WeightOnlyLinear, choose_scale_dtype
from diffptq.kernels.select import Conversion, InferenceConfig, convert_for_inference, finish_model, with_graphs
from diffptq.quant.quantizer import QuantSpec

log = logging.getLogger(__name__)


def _int4_module(entry: dict, module: nn.Module, tensors: dict, scale_dtype: torch.dtype | None) -> nn.Module:
    name, shape = entry["name"], entry["weight_shape"]
    spec = QuantSpec(**entry["weight_spec"])
    if spec.bits > 4:
        raise CheckpointError(f"layer {name}: {spec.bits}-bit weights; the int4 memory path needs ≤ 4 bits")
    out = shape[0]
    cols = 1
    for d in shape[1:]:
        cols *= d
    if cols % 2:
        raise CheckpointError(f"layer {name}: {cols} columns per row; int4 rows need an even number")
    zero = tensors.get(f"{name}.zero")  # a format that skips zeros of symmetric grids reads the same
    try:
        packed = tensors[f"{name}.codes"].reshape(out, cols // 2)
        scale = tensors[f"{name}.scale"].reshape(out, -1)
        if zero is None and not spec.symmetric:
            raise KeyError(f"{name}.zero")
    except (KeyError, RuntimeError) as err:
        raise CheckpointError(f"layer {name}: checkpoint tensors are missing or malformed ({err})") from None
    scale = scale.to(scale_dtype or choose_scale_dtype(scale))
    zero = zero.round().to(torch.uint8) if zero is not None and (not spec.symmetric or bool(zero.any())) else None
    if entry["kind"] == "linear":
        return Int4WeightOnlyLinear(packed, scale, zero, spec.symmetric, cols, module.bias)
    return Int4WeightOnlyConv2d(packed, scale, zero, spec.symmetric, tuple(shape), module.bias, module.stride,
                                module.padding, module.dilation)


@torch.no_grad()
def load_int4_checkpoint(denoiser: nn.Module, checkpoint: str | Path | tuple[dict, dict],
                         scale_dtype: torch.dtype | None = torch.float16, check: bool = True) -> dict[str, nn.Module]:
    """Put Int4WeightOnly modules built from a checkpoint's packed codes into `denoiser` (in place).

    checkpoint: a path, or (metadata, tensors) as read_checkpoint returns them. check: refuse a checkpoint made for
    another base model. Activation quantizers in the checkpoint are ignored (weight-only path). Returns {name: module}.
    """
    meta, tensors = read_checkpoint(checkpoint) if isinstance(checkpoint, (str, Path)) else checkpoint
    if check:
        from diffptq.models.families import family_of

        check_base(meta, denoiser, family_of(denoiser).name, checkpoint if isinstance(checkpoint, (str, Path)) else "")
    loaded = {}
    for entry in meta["layers"]:
        name = entry["name"]
        try:
            module = denoiser.get_submodule(name)
        except AttributeError:
            raise CheckpointError(f"layer {name} of the checkpoint does not exist in the base model") from None
        if list(module.weight.shape) != list(entry["weight_shape"]):
            raise CheckpointError(f"layer {name}: checkpoint weight shape {entry['weight_shape']} vs base model "
                                  f"{list(module.weight.shape)}")
        new = _int4_module(entry, module, tensors, scale_dtype)
        replace_module(denoiser, name, new.to(module.weight.device))
        loaded[name] = new
    log.info("load_int4_checkpoint: %d layers loaded as packed int4 (%d with activation quantizers ignored)",
             len(loaded), sum(e.get("act_kind") is not None for e in meta["layers"]))
    return loaded


def load_for_inference(denoiser: nn.Module, checkpoint: str | Path, path: str = "w4",
                       device: str | torch.device | None = None, config: InferenceConfig | None = None,
                       act_builder=None) -> Conversion:
    """Load `checkpoint` into `denoiser` for inference on `device`: the memory path straight from packed codes
    ("w4", when the device supports it), else fake-quant layers converted by convert_for_inference.
    config.cuda_graphs: the result's `graphed` is the denoiser in a GraphedDenoiser, to run in its place."""
    meta, tensors = read_checkpoint(checkpoint)
    from diffptq.models.families import family_of

    check_base(meta, denoiser, family_of(denoiser).name, checkpoint)
    dev = torch.device(device) if device is not None else next(denoiser.parameters()).device
    cfg = config or InferenceConfig()
    if path == "w4" and (cfg.force or (dev.type == "cuda" and torch.cuda.is_available())):
        loaded = load_int4_checkpoint(denoiser, (meta, tensors), cfg.scale_dtype, check=False)
        result = Conversion("w4", "packed int4 loaded from the checkpoint",
                            {n: type(m).__name__ for n, m in loaded.items()})
        finish_model(denoiser, cfg, result)
        return with_graphs(denoiser, cfg, result)
    apply_checkpoint(denoiser, meta, tensors, act_builder)
    return convert_for_inference(denoiser, path, dev, cfg)
