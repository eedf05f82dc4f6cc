"""Shared helpers of the image metrics: image dtype conversion, batching, weight-file lookup, the skip message."""
from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

import torch

log = logging.getLogger("diffptq.eval.metrics")


def as_float01(images: torch.Tensor) -> torch.Tensor:
    """(N,3,H,W) uint8 in [0,255] or float in [0,1] -> float32 in [0,1] (floats are clamped)."""
    _check_images(images)
    if images.dtype == torch.uint8:
        return images.float() / 255.0
    return images.float().clamp(0.0, 1.0)


def as_uint8(images: torch.Tensor) -> torch.Tensor:
    """(N,3,H,W) uint8 or float in [0,1] -> uint8 in [0,255], rounded to nearest."""
    _check_images(images)
    if images.dtype == torch.uint8:
        return images
    return (images.float().clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)


def _check_images(images: torch.Tensor) -> None:
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"expected images of shape (N, 3, H, W), got {shape}")


def batches(n: int, batch_size: int) -> Iterator[slice]:
    """Slices covering range(n) in steps of `batch_size`."""
    for start in range(0, n, max(1, batch_size)):
        yield slice(start, min(n, start + batch_size))


def torch_hub_checkpoint(filename: str) -> Path:
    """Where torch.hub.load_state_dict_from_url keeps `filename`: $TORCH_HOME/hub/checkpoints/ (~/.cache/torch)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / filename


def resolve_weights(explicit: str | os.PathLike | None, filename: str) -> Path:
    """The weight file to use: `explicit` when given, else `filename` in the torch hub cache (existence unchecked)."""
    return Path(explicit).expanduser() if explicit else torch_hub_checkpoint(filename)


def warn_missing(metric: str, needed: str, how: str) -> None:
    """The one line logged when a metric is skipped for absent weights: which metric, which file, how to provide it."""
    log.warning("%s skipped (value empty): %s not found; %s", metric, needed, how)
