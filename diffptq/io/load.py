"""load_quantized: a ready diffusers pipeline from a diffptq checkpoint (base model + quantized layers)."""
from __future__ import annotations

from pathlib import Path

import torch

from diffptq.io.checkpoint import apply_checkpoint, check_base, read_checkpoint
from diffptq.models.families import family_of
from diffptq.models.load import load_pipeline


def load_quantized(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                   base_model: str | None = None, act_builder=None):
    """Load the checkpoint at `path` onto its recorded base model (or `base_model` when given: a hub id, directory
    or project model name). Raises CheckpointError if the base model differs from the one it was made for."""
    meta, tensors = read_checkpoint(path)
    if act_builder is None and any(e.get("act_kind") == "tdq" for e in meta["layers"]):
        from diffptq.tdq.checkpoint import build_tdq_act as act_builder
    pipe = load_pipeline(base_model or meta["base"]["source"], dtype=dtype, device="cpu")
    family = family_of(pipe)
    denoiser = family.denoiser(pipe)
    check_base(meta, denoiser, family.name, path)
    layers = apply_checkpoint(denoiser, meta, tensors, act_builder)
    for layer in layers.values():
        layer.drop_float_weight()
    pipe.to(device)
    if any(e.get("act_kind") == "tdq" for e in meta["layers"]):
        from diffptq.tdq.inference import attach_tdq

        attach_tdq(pipe)  # per-step TDQ scales inside the pipeline's own sampling loop
    pipe.diffptq_checkpoint = meta
    return pipe
