"""Hardware measurements: per-image latency, peak VRAM, model size on disk and in memory; the card's short name.

Latency and VRAM are measured on CUDA only; elsewhere they are None (an empty cell), never 0, and the callable is not
run. Exceptions, for end-to-end timings that CPU smoke runs check too: `wall_seconds` (one call, wall clock, the CUDA
device synchronized around it) and `CallTimer` (every call of one module method: CUDA events on CUDA, the wall clock
elsewhere).

Model size in memory follows one convention that quantized layers can use: a module may list names of its own
parameters/buffers in a `_size_exclude` attribute (tuple or set of str, e.g. `_size_exclude = ("weight",)` for a float
weight that is only a dequantized cache of packed integer buffers); `module_bytes` skips those. Everything else counts
at its stored size, numel · element_size of its dtype (so packed int4 pairs in a uint8 buffer count 1 byte per pair).
"""
from __future__ import annotations

import functools
import os
import re
import statistics
import time
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


def wall_seconds(fn: Callable[[], object], device: str | torch.device | None = None) -> float:
    """Wall-clock seconds of one call of `fn()`, with the CUDA device (when `device` is one) synchronized before and
    after, so that the GPU work the call queued is counted. Runs on the CPU as well."""
    dev = _cuda_device(device)
    if dev is not None:
        torch.cuda.synchronize(dev)
    start = time.perf_counter()
    fn()
    if dev is not None:
        torch.cuda.synchronize(dev)
    return time.perf_counter() - start


class CallTimer:
    """Times every call of `module.<method>` (e.g. a pipeline's denoiser `forward`, its VAE's `decode`) by putting a
    timing wrapper on the instance; `remove()` (or leaving the `with` block) puts back what was there.

    On a CUDA device each call is bracketed by CUDA events: the span of GPU time from the call's first queued work to
    its last, idle gaps included, without synchronizing inside the call. Elsewhere the wall clock. A method compiled
    as `module.<method> = torch.compile(...)` keeps the events outside the graph; `torch.compile(module)` would trace
    the wrapper instead.
    """

    def __init__(self, module: nn.Module, method: str = "forward", device: str | torch.device | None = None):
        self.module, self.method = module, method
        self._saved = module.__dict__.get(method)  # an instance attribute (a compiled method) to put back
        self._cuda = _cuda_device(device)
        self._spans: list = []
        inner = getattr(module, method)

        @functools.wraps(inner)
        def timed(*args, **kwargs):
            if self._cuda is None:
                start = time.perf_counter()
                out = inner(*args, **kwargs)
                self._spans.append(time.perf_counter() - start)
                return out
            stream = torch.cuda.current_stream(self._cuda)
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record(stream)
            out = inner(*args, **kwargs)
            end.record(stream)
            self._spans.append((begin, end))
            return out

        setattr(module, method, timed)

    def seconds(self) -> list[float]:
        """Seconds of each call since the last `seconds()` (waits for the GPU), then forgets them."""
        spans, self._spans = self._spans, []
        if self._cuda is None:
            return spans
        torch.cuda.synchronize(self._cuda)
        return [begin.elapsed_time(end) / 1e3 for begin, end in spans]

    def remove(self) -> None:
        if self._saved is None:
            delattr(self.module, self.method)
        else:
            setattr(self.module, self.method, self._saved)

    def __enter__(self) -> CallTimer:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


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
