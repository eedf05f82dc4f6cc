"""Plumbing of the sequential driver: cached block states in pinned host memory, their prefetch onto the compute
device, and phase timing that does not synchronize the device.

- PinnedPool: page-locked host buffers reused from block to block (allocating pinned memory is slow); a state's
  buffers are handed back once its record has been read for the last time.
- Prefetcher: copies record i+1's tensors host→device on a side CUDA stream while record i computes; the compute
  stream waits on an event before using them, and record_stream keeps the allocator from reusing them early.
  Before each copy the side stream waits for the compute stream's earlier work, so a buffer written device→host
  (non_blocking, on the compute stream) is complete before it is read back.
- PhaseTimer: CUDA events around each phase, resolved by flush() (one synchronize), perf_counter on the CPU.
"""
from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor


class PinnedPool:
    """Free lists of pinned host tensors by (shape, dtype)."""

    def __init__(self) -> None:
        self._free: dict[tuple, list[Tensor]] = defaultdict(list)

    def take(self, shape: torch.Size | tuple[int, ...], dtype: torch.dtype) -> Tensor:
        free = self._free.get((tuple(shape), dtype))
        if free:
            return free.pop()
        return torch.empty(tuple(shape), dtype=dtype, pin_memory=True)

    def give(self, tensors: Iterable[Tensor]) -> None:
        for t in tensors:
            self._free[(tuple(t.shape), t.dtype)].append(t)

    def clear(self) -> None:
        self._free.clear()


@dataclass
class Loaded:
    """One record's tensors on the device. `origin` maps id(device tensor) → its host source (unchanged copies
    need no copy back)."""

    states: dict[str, tuple[Tensor, list[Tensor]]]
    ctx: dict
    origin: dict[int, Tensor] = field(default_factory=dict)
    event: torch.cuda.Event | None = None


class Prefetcher:
    """Moves records to `device`, one record ahead on CUDA: `for i, loaded in prefetcher(indices, fetch)`.

    fetch(i) -> (states {stream name: (h, skips)}, ctx dict), tensors on the host or already on the device; a tensor
    shared by two streams is moved once. Counts the bytes it copies in `h2d_bytes`.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(device) if self.cuda else None
        self.h2d_bytes = 0

    def _move(self, i: int, fetch: Callable[[int], tuple[dict, dict]]) -> Loaded:
        states, ctx = fetch(i)
        moved: dict[int, Tensor] = {}
        origin: dict[int, Tensor] = {}

        def mv(t):
            if not isinstance(t, Tensor) or t.device == self.device:
                return t
            if id(t) not in moved:
                dev = t.to(self.device, non_blocking=True)
                moved[id(t)] = dev
                origin[id(dev)] = t
                self.h2d_bytes += t.numel() * t.element_size()
            return moved[id(t)]

        if self.cuda:
            main = torch.cuda.current_stream(self.device)
            with torch.cuda.stream(self.copy_stream):
                self.copy_stream.wait_stream(main)
                out = Loaded({s: (mv(h), [mv(x) for x in skips]) for s, (h, skips) in states.items()},
                             {k: mv(v) for k, v in ctx.items()}, origin)
                out.event = self.copy_stream.record_event()
            return out
        return Loaded({s: (mv(h), [mv(x) for x in skips]) for s, (h, skips) in states.items()},
                      {k: mv(v) for k, v in ctx.items()}, origin)

    def __call__(self, indices: Iterable[int], fetch: Callable[[int], tuple[dict, dict]]
                 ) -> Iterator[tuple[int, Loaded]]:
        indices = list(indices)
        if not indices:
            return
        nxt = self._move(indices[0], fetch)
        for j, i in enumerate(indices):
            cur = nxt
            if j + 1 < len(indices):
                nxt = self._move(indices[j + 1], fetch)
            if cur.event is not None:
                main = torch.cuda.current_stream(self.device)
                main.wait_event(cur.event)
                for t in _tensors(cur):
                    t.record_stream(main)
            yield i, cur


def _tensors(loaded: Loaded) -> Iterator[Tensor]:
    for h, skips in loaded.states.values():
        yield h
        yield from skips
    yield from (v for v in loaded.ctx.values() if isinstance(v, Tensor))


class PhaseTimer:
    """Seconds per phase: `with timer("solve"): ...`; `totals` resolves pending CUDA events (synchronizes)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self._totals: dict[str, float] = defaultdict(float)
        self._pending: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []

    @contextmanager
    def __call__(self, phase: str):
        if not self.cuda:
            t0 = time.perf_counter()
            try:
                yield
            finally:
                self._totals[phase] += time.perf_counter() - t0
            return
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        try:
            yield
        finally:
            end.record()
            self._pending.append((phase, start, end))

    def flush(self) -> None:
        if self._pending:
            torch.cuda.synchronize()
            for phase, start, end in self._pending:
                self._totals[phase] += start.elapsed_time(end) / 1000.0
            self._pending.clear()

    @property
    def totals(self) -> dict[str, float]:
        self.flush()
        return self._totals
