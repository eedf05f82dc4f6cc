"""Generated images on disk, and how far two sets of them differ.

One safetensors file per set: tensor `images`, uint8 (N,3,H,W) (what a PNG holds, what the metrics see), with its
prompts and per-image seeds as JSON in the metadata, so a file says what it shows. benchmark_final --save_images
writes one per variant (`images/<method>[_wXaY].safetensors`); benchmarks/multi_gpu_compare.py reads them to check
that a run sharded over N processes makes the images of a one-process run.
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from diffptq.errors import DiffptqError

FORMAT = "diffptq-images/1"


class ImageStoreError(DiffptqError, ValueError):
    """An image file that is missing, unreadable or not one of ours."""


@dataclass
class StoredImages:
    """images: uint8 (N,3,H,W); prompts, seeds: one per image; info: whatever else the writer recorded."""

    images: torch.Tensor
    prompts: list[str]
    seeds: list[int]
    info: dict[str, Any] = field(default_factory=dict)


def save_images(path: str | os.PathLike, images: torch.Tensor, prompts: Sequence[str], seeds: Sequence[int],
                info: dict[str, Any] | None = None) -> Path:
    """Write uint8 `images` (N,3,H,W) with their N prompts and seeds (and JSON-able `info`) to `path`, atomically."""
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(f"images must be uint8 (N,C,H,W), got {images.dtype} {tuple(images.shape)}")
    if not len(images) == len(prompts) == len(seeds):
        raise ValueError(f"{len(images)} images, {len(prompts)} prompts and {len(seeds)} seeds")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": FORMAT, "prompts": json.dumps(list(prompts)), "seeds": json.dumps([int(s) for s in seeds]),
            "info": json.dumps(info or {}, default=str)}
    tmp = path.with_name(path.name + ".tmp")
    save_file({"images": images.detach().cpu().contiguous()}, str(tmp), metadata=meta)
    os.replace(tmp, path)
    return path


def load_images(path: str | os.PathLike) -> StoredImages:
    """The images, prompts, seeds and info of a file written by save_images."""
    path = Path(path)
    if not path.is_file():
        raise ImageStoreError(f"image file not found: {path} (benchmark_final.py writes them with --save_images)")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT or "images" not in f.keys():
                raise ImageStoreError(f"{path} is not a diffptq image file (format {meta.get('format')!r})")
            images = f.get_tensor("images")
    except (SafetensorError, OSError) as err:
        raise ImageStoreError(f"{path} is not a readable image file: {err}") from None
    return StoredImages(images, json.loads(meta["prompts"]), json.loads(meta["seeds"]), json.loads(meta["info"]))


def image_difference(a: torch.Tensor, b: torch.Tensor, chunk: int = 64) -> dict[str, float]:
    """How far uint8 image sets a and b (N,3,H,W, same shape) differ, in 8-bit levels.

    max_abs / mean_abs: over all values; frac_pixels_differ: fraction of pixels (N·H·W positions) where any channel
    differs; psnr_db: 10·log10(255² / MSE), inf when equal. Computed `chunk` images at a time (bounded memory)."""
    if a.shape != b.shape or a.ndim != 4:
        raise ValueError(f"image sets of shapes {tuple(a.shape)} and {tuple(b.shape)}: need the same (N,C,H,W)")
    max_abs, abs_sum, sq_sum, differ = 0, 0.0, 0.0, 0
    for start in range(0, len(a), chunk):
        d = (a[start:start + chunk].to(torch.int16) - b[start:start + chunk].to(torch.int16)).abs()
        if d.numel():
            max_abs = max(max_abs, int(d.max()))
        abs_sum += float(d.sum(dtype=torch.float64))
        sq_sum += float(d.double().square().sum())
        differ += int(d.amax(dim=1).ne(0).sum())
    values, pixels = a.numel(), a.shape[0] * a.shape[2] * a.shape[3]
    mse = sq_sum / max(1, values)
    return {"max_abs": float(max_abs), "mean_abs": abs_sum / max(1, values),
            "frac_pixels_differ": differ / max(1, pixels),
            "psnr_db": math.inf if mse == 0 else 10 * math.log10(255**2 / mse)}
