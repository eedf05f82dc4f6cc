"""Hardware measurements: per-image latency, peak VRAM, model size on disk and in memory; the card's short name.

Latency and VRAM are measured on CUDA only; elsewhere they are None (an empty cell), never 0, and the callable is not
run.

Model size in memory follows one convention that quantized layers can use: a module may list names of its own
parameters/buffers in a `_size_exclude` attribute (tuple or set of str, e.g. `_size_exclude = ("weight",)` for a float
weight that is only a dequantized cache of packed integer buffers); `module_bytes` skips those. Everything else counts
at its stored size, numel · element_size of its dtype (so packed int4 pairs in a uint8 buffer count 1 byte per pair).
"""
from __future__ import annotations

import os
import re
import statistics
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

SIZE_EXCLUDE_ATTR = "_size_exclude"
# words of a CUDA device name that say nothing about which card it is (vendor, line, memory, form factor)
_CARD_NOISE = re.compile(r"nvidia|geforce|tesla|quadro|\d+gb|hbm\d*e?|pcie|sxm\d*|nvl", re.IGNORECASE)


def _cuda_device(device: str | torch.device | None) -> torch.device | None:
    """The CUDA device to measure on, or None when measuring is impossible (no CUDA, or a non-CUDA device given)."""
    if not torch.cuda.is_available():
        return None
    dev = torch.device(device) if device is not None else torch.device("cuda", torch.cuda.current_device())
    return dev if dev.type == "cuda" else None


def measure_latency(
    fn: Callable[[], object],
    images_per_call: int = 1,
    warmup: int = 1,
    repeats: int = 5,
    device: str | torch.device | None = None,
) -> float | None:
    """Median seconds per image of `fn()` (which makes `images_per_call` images), timed with CUDA events.

    `warmup` untimed calls first (allocator, cuDNN autotune, compilation); then `repeats` timed calls. None on CPU.
    """
    dev = _cuda_device(device)
    if dev is None:
        return None
    with torch.cuda.device(dev):
        for _ in range(warmup):
            fn()
        torch.cuda.synchronize(dev)
        seconds = []
        for _ in range(max(1, repeats)):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            seconds.append(start.elapsed_time(end) / 1e3)  # elapsed_time is in ms
    return statistics.median(seconds) / max(1, images_per_call)


def measure_peak_vram(fn: Callable[[], object], device: str | torch.device | None = None) -> int | None:
    """Peak bytes allocated by PyTorch on the CUDA device while `fn()` runs (tensors live before included); None on CPU.

    Uses the caching allocator's `max_memory_allocated` after `reset_peak_memory_stats`: tensors, not the CUDA context.
    """
    dev = _cuda_device(device)
    if dev is None:
        return None
    torch.cuda.synchronize(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    fn()
    torch.cuda.synchronize(dev)
    return int(torch.cuda.max_memory_allocated(dev))


def checkpoint_bytes(path: str | os.PathLike) -> int:
    """Bytes of a saved checkpoint: the file's size, or the sum over all files below a directory (links followed)."""
    root = Path(path)
    if root.is_file():
        return root.stat().st_size
    if not root.is_dir():
        raise FileNotFoundError(f"no checkpoint file or directory at {root}")
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def module_bytes(module: nn.Module) -> int:
    """Bytes of a module's weights in memory: parameters + buffers at numel · element_size of their stored dtype.

    A tensor registered in several modules (tied weights) counts once. Names listed in a submodule's `_size_exclude`
    (its own, unprefixed names) are skipped: the way a quantized layer marks a float dequantized cache so that it is
    not counted next to its packed integers.
    """
    seen: set[int] = set()
    total = 0
    for sub in module.modules():
        excluded = set(getattr(sub, SIZE_EXCLUDE_ATTR, ()))
        tensors = list(sub.named_parameters(recurse=False)) + list(sub.named_buffers(recurse=False))
        for name, tensor in tensors:
            if tensor is None or name in excluded:
                continue
            if id(tensor) in seen:  # tied weights: one object registered in several modules
                continue
            seen.add(id(tensor))
            total += tensor_bytes(tensor)
    return total


def tensor_bytes(tensor: torch.Tensor) -> int:
    """numel · element_size; for a wrapper tensor subclass (torchao's and quanto's quantized weights, whose outer
    dtype is the float one) the bytes of the inner tensors it is made of (`__tensor_flatten__`)."""
    flatten = getattr(tensor, "__tensor_flatten__", None)
    if flatten is None:
        return tensor.numel() * tensor.element_size()
    names, _ = flatten()
    return sum(tensor_bytes(getattr(tensor, name)) for name in names)


def card_name(device: str | torch.device | None = None, count: int = 1) -> str:
    """The short card name of result file names (benchmarks/README.md): 'h200', 'h100', 'rtx4090', 'a100', with 'x2'
    ... for `count` cards of one host; 'cpu' for a CPU device (or no CUDA)."""
    dev = _cuda_device(device) if device is None or torch.device(device).type == "cuda" else None
    if dev is None:
        return "cpu"
    words = re.split(r"[\s_/-]+", torch.cuda.get_device_name(dev))
    name = "".join(w.lower() for w in words if w and not _CARD_NOISE.fullmatch(w)) or "gpu"
    return name + (f"x{count}" if count > 1 else "")
