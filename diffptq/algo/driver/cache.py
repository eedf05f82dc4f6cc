"""The paired streams' cache: every calibration record's float and quantized state and its context, on `storage`.

A state is `(h, skips)`: `h` the hidden tensor a unit reads, `skips` the UNet skip tensors that up blocks consume (so
up blocks see the skips of their own stream). The context (timestep embedding, text states) is float and shared by
both streams. With the compute device on CUDA and storage "cpu", tensors are cached in pinned host buffers from a
pool, written without waiting for the device, and the next record is copied to the device while one computes.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import torch
from torch import Tensor

from diffptq.algo.driver.memory import Loaded, PinnedPool, Prefetcher
from diffptq.models.units import State

Pick = tuple[str, ...] | Callable[[int], tuple[str, ...]]  # streams by name ("fp", "q"), or a function of the record


def _flat(state: State | None) -> list[Tensor]:
    return [] if state is None else [state[0], *state[1]]


class StreamCache:
    """Per record i: `fp[i]` and `q[i]` the float and quantized stream's state at the current unit's input (None
    where that stream is not kept), `ctx[i]` the record's context; `next_fp` float states of the next unit computed
    ahead (Qronos's first float pass runs the whole unit). before_record(i) runs before record i is handed out.
    Counts the bytes it copies: `prefetch.h2d_bytes` to the device, `d2h_bytes` to the host."""

    def __init__(self, device: torch.device, storage: str, before_record: Callable[[int], None]):
        self.device, self.storage, self.before_record = device, storage, before_record
        self.pin = device.type == "cuda" and storage == "cpu"
        self.pool = PinnedPool()
        self.prefetch = Prefetcher(device)
        self.d2h_bytes = 0
        self.fp: list[State | None] = []
        self.q: list[State | None] = []
        self.ctx: list[dict] = []
        self.next_fp: dict[int, State] = {}

    def start(self, outputs: Iterable[tuple[Tensor, list[Tensor], dict]]) -> None:
        """Cache the float prologue's (h, skips, ctx) per record; both streams start equal (shared tensors until they
        diverge)."""
        self.ctx, self.fp, self.q = [], [], []
        for h, skips, ctx in outputs:
            state = (self.store(h), [self.store(s) for s in skips])
            self.ctx.append({k: self.store(v) if isinstance(v, Tensor) else v for k, v in ctx.items()})
            self.fp.append(state)
            self.q.append(state)

    def store(self, t: Tensor, origin: dict[int, Tensor] | None = None) -> Tensor:
        """Cache t on `storage` (pinned host buffers from the pool, filled without waiting when computing on CUDA).
        A tensor that is an unchanged device copy of a cached one (`origin`), or a cached one that a unit passed
        through without reading it (a skip left on the host), is not copied again."""
        if origin is not None and id(t) in origin:
            return origin[id(t)]
        if self.pin and t.device.type == "cpu":
            return t
        t = t.detach()
        if not self.pin:
            return t.to(self.storage)
        buf = self.pool.take(t.shape, t.dtype)
        buf.copy_(t, non_blocking=True)
        self.d2h_bytes += t.numel() * t.element_size()
        return buf

    def store_state(self, state: State, origin: dict[int, Tensor] | None = None) -> State:
        return self.store(state[0], origin), [self.store(s, origin) for s in state[1]]

    def to_dev(self, t: Tensor) -> Tensor:
        if t.device != self.device:
            self.prefetch.h2d_bytes += t.numel() * t.element_size()
        return t.to(self.device, non_blocking=self.pin)

    def load_ctx(self, i: int) -> dict:
        """Record i's context on the device, after before_record(i)."""
        self.before_record(i)
        return {k: self.to_dev(v) if isinstance(v, Tensor) else v for k, v in self.ctx[i].items()}

    def records(self, indices: Iterable[int], streams: Pick, skips_moved: int) -> Iterator[tuple[int, Loaded]]:
        """Records `indices` with the states of `streams` ("fp", "q"; or a function of the index) and the context on
        the device (of the states: h and the last `skips_moved` skips), the next record's copied ahead;
        before_record runs before each is yielded."""
        pick = streams if callable(streams) else (lambda i: streams)

        def fetch(i):
            return {s: (self.fp if s == "fp" else self.q)[i] for s in pick(i)}, self.ctx[i]
        for i, loaded in self.prefetch(indices, fetch, skips_moved):
            self.before_record(i)
            yield i, loaded

    def release(self, i: int, fp: State | None, q: State | None) -> None:
        """Hand record i's cached buffers back to the pool, but those its next states `fp` and `q` still hold (the
        copies reading them are queued before any reuse)."""
        if self.pin:
            keep = {id(t) for t in _flat(fp) + _flat(q)}
            old = {id(t): t for t in _flat(self.fp[i]) + _flat(self.q[i])}
            self.pool.give(t for tid, t in old.items() if tid not in keep)

    def advance(self, fp: list[State | None], q: list[State | None]) -> None:
        """The next unit's input states replace the current ones."""
        self.fp, self.q = fp, q
        self.next_fp.clear()
        self.pool.trim()  # free buffers this unit neither took nor gave back (e.g. of another resolution) go

    def clear(self) -> None:
        """Free the caches."""
        self.fp = self.q = self.ctx = []
        self.next_fp.clear()
        self.pool.clear()

    def pop_bytes(self) -> tuple[int, int]:
        """(host→device, device→host) bytes copied since the last call."""
        moved = self.prefetch.h2d_bytes, self.d2h_bytes
        self.prefetch.h2d_bytes = self.d2h_bytes = 0
        return moved
