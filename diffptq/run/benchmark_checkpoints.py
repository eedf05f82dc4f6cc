"""Checkpoints of the benchmark's variants: find them by their metadata, load one into a float denoiser, save one.

A variant is (method, wbits, abits), abits 16 meaning float activations. Any diffptq checkpoint in the folder counts,
whatever its name, when its metadata `quant` says method/wbits/abits (quantize_qronos_4blocks.py and
benchmark_final.py --save_checkpoints both write these); benchmark_final names its own `<method>_w<W>a<A>.safetensors`.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors import safe_open
from torch import nn

from diffptq.errors import ConfigError
from diffptq.io.checkpoint import apply_checkpoint, check_base, read_checkpoint, save_quantized
from diffptq.models.families import family_of

log = logging.getLogger("diffptq.benchmark")
SUFFIXES = (".safetensors", ".pt")


@dataclass
class VariantCheckpoint:
    path: Path
    meta: dict[str, Any]


def variant_key(quant: dict[str, Any]) -> tuple[str, int, int] | None:
    """(method, wbits, abits) from a checkpoint's `quant` metadata (abits None -> 16); None if incomplete."""
    method, wbits = quant.get("method"), quant.get("wbits")
    if method is None or wbits is None:
        return None
    abits = quant.get("abits")
    return str(method), int(wbits), 16 if abits is None else int(abits)


def _metadata(path: Path) -> dict[str, Any] | None:
    """The diffptq metadata of a safetensors file (tensors not read), or None for any other file."""
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("diffptq")
        return json.loads(raw) if raw else None
    except Exception:  # noqa: BLE001 - any unreadable file is simply not one of ours
        return None


def index_checkpoints(folder: str | Path, denoiser: nn.Module, family: str) -> dict[tuple, VariantCheckpoint]:
    """{(method, wbits, abits): checkpoint} of the diffptq checkpoints in `folder` and `folder`/checkpoints.

    Each is checked against the base model (`denoiser` of `family`): a checkpoint of another model is an error, not
    silently skipped. When two files hold the same variant, the first by name wins (with a warning).
    """
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise ConfigError(f"--checkpoints {root}: not a folder")
    files = sorted(p for d in (root, root / "checkpoints") if d.is_dir() for p in d.iterdir()
                   if p.suffix in SUFFIXES and p.is_file())
    found: dict[tuple, VariantCheckpoint] = {}
    for path in files:
        meta = _metadata(path)
        key = variant_key(meta.get("quant", {})) if meta else None
        if key is None:
            log.info("--checkpoints: %s is not a diffptq checkpoint with method/bits metadata: ignored", path)
            continue
        check_base(meta, denoiser, family, path)
        if key in found:
            log.warning("--checkpoints: %s and %s both hold %s; using the first", found[key].path, path, key)
            continue
        found[key] = VariantCheckpoint(path, meta)
    log.info("--checkpoints %s: %s", root, ", ".join(f"{k[0]} w{k[1]}a{k[2]}" for k in found) or "none found")
    return found


def load_into(denoiser: nn.Module, ckpt: VariantCheckpoint, family: str) -> None:
    """Swap the checkpoint's quantized layers into `denoiser` (a float copy of the base), as load_quantized does."""
    meta, tensors = read_checkpoint(ckpt.path)
    check_base(meta, denoiser, family, ckpt.path)
    act_builder = None
    if any(e.get("act_kind") == "tdq" for e in meta["layers"]):
        from diffptq.tdq.checkpoint import build_tdq_act as act_builder
    for layer in apply_checkpoint(denoiser, meta, tensors, act_builder).values():
        layer.drop_float_weight()


def save_variant(path: Path, denoiser: nn.Module, pipe, model: str, seq_cfg, calib_cfg, calib_time_s: float) -> dict:
    """Save a quantized variant with the metadata that index_checkpoints reads back (and calib_time_s)."""
    from diffptq.run.quantize import quant_metadata

    family = family_of(pipe)
    base = {"source": model, "family": family.name, "pipeline_class": type(pipe).__name__}
    return save_quantized(path, denoiser, base, quant_metadata(seq_cfg, calib_cfg, calib_time_s=calib_time_s))
