"""Host memory of the sequential driver: cached unit states in pinned host memory, their prefetch onto the compute
device, and module tensors moved off the compute device and back.

- PinnedPool: page-locked host buffers reused from unit to unit (pinning memory is slow); a state's buffers are
  handed back once its record has been read for the last time, and buffers left unused for a unit are released.
- Prefetcher: copies record i+1's tensors host→device on a side CUDA stream while record i computes; the compute
  stream waits on an event before using them, and record_stream keeps the allocator from reusing them early.
  Before each copy the side stream waits for the compute stream's earlier work, so a buffer written device→host
  (non_blocking, on the compute stream) is complete before it is read back.
- move_module_tensors: a module's parameters and buffers moved (to another device), aliases kept aliased.
"""
from __future__ import annotations

import math
import mmap
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn


class PinnedPool:
    """Page-locked host buffers for cached states, reused across shapes and released when no longer needed.

    Each buffer is a flat byte tensor; take(shape, dtype) returns a view of the smallest free buffer that holds the
    tensor without wasting more than half of it, else of a new one; give() hands tensors the pool made back (others
    are ignored); trim() releases the free buffers neither taken nor given back since the last trim (e.g. those of a
    resolution no longer produced), so free memory does not pile up by shape, while the buffers one unit's states
    gave back serve the next unit's (pinning them again would cost more than the copies). Buffers of at least
    `register_min` bytes are ordinary memory page-locked with cudaHostRegister, page by page: torch's pinned
    allocator rounds every block up to a power of two (up to 2× the host memory of the caches) and keeps freed
    blocks. Smaller ones come from torch's pinned allocator (all of them with DIFFPTQ_PINNED=torch).
    `pinned=False`: ordinary memory throughout.
    """

    PAGE = 4096

    def __init__(self, pinned: bool = True, register_min: int = 1 << 20) -> None:
        self.pinned = pinned
        register = pinned and os.environ.get("DIFFPTQ_PINNED", "register") != "torch" and _can_register()
        self.register_min = register_min if register else None
        self._free: list[_Buffer] = []
        self._live: dict[int, _Buffer] = {}  # data_ptr of a taken view → its buffer
        self._generation = 0

    @property
    def free_bytes(self) -> int:
        return sum(b.nbytes for b in self._free)

    @property
    def live_bytes(self) -> int:
        return sum(b.nbytes for b in self._live.values())

    def take(self, shape: torch.Size | tuple[int, ...], dtype: torch.dtype) -> Tensor:
        shape = tuple(shape)
        need = math.prod(shape) * dtype.itemsize
        if not need:
            return torch.empty(shape, dtype=dtype)
        fits = [b for b in self._free if need <= b.nbytes <= 2 * need]
        buf = min(fits, key=lambda b: b.nbytes) if fits else self._new(need)
        if fits:
            self._free.remove(buf)
        buf.used = self._generation
        view = buf.data[:need].view(dtype).view(shape)
        self._live[view.data_ptr()] = buf
        return view

    def give(self, tensors: Iterable[Tensor]) -> None:
        for t in tensors:
            buf = self._live.pop(t.data_ptr(), None) if t.numel() else None
            if buf is not None:
                buf.used = self._generation  # in use until now: kept for the next unit's states of the same size
                self._free.append(buf)

    def trim(self) -> int:
        """Release the free buffers neither taken nor given back since the last trim; returns the bytes released.
        Synchronizes the device first when it unregisters memory (a copy may still read it)."""
        old = [b for b in self._free if b.used < self._generation]
        self._free = [b for b in self._free if b.used == self._generation]
        self._generation += 1
        self._release(old)
        return sum(b.nbytes for b in old)

    def clear(self) -> None:
        """Release every buffer; views still held elsewhere stay valid (as ordinary memory)."""
        self._release(self._free + list(self._live.values()))
        self._free, self._live = [], {}

    def _new(self, nbytes: int) -> "_Buffer":
        if self.register_min is None or nbytes < self.register_min:
            return _Buffer(torch.empty(max(nbytes, 1), dtype=torch.uint8, pin_memory=self.pinned), False)
        # an anonymous mapping of whole pages: page-aligned (its first byte is the storage's, so is_pinned() sees the
        # registration), shared with no other allocation, returned to the system when dropped
        size = (nbytes + self.PAGE - 1) // self.PAGE * self.PAGE
        data = torch.frombuffer(mmap.mmap(-1, size), dtype=torch.uint8)
        _cuda_check(torch.cuda.cudart().cudaHostRegister(data.data_ptr(), size, 0), "cudaHostRegister")
        return _Buffer(data, True)

    @staticmethod
    def _release(bufs: list["_Buffer"]) -> None:
        registered = [b for b in bufs if b.registered]
        if registered:
            torch.cuda.synchronize()
            for b in registered:
                _cuda_check(torch.cuda.cudart().cudaHostUnregister(b.data.data_ptr()), "cudaHostUnregister")
                b.registered = False


@dataclass(eq=False)
class _Buffer:
    """A flat byte tensor of the pool; `registered`: page-locked by cudaHostRegister (until released)."""

    data: Tensor
    registered: bool
    used: int = 0

    @property
    def nbytes(self) -> int:
        return self.data.numel()


def _can_register() -> bool:
    return torch.cuda.is_available() and hasattr(torch.cuda.cudart(), "cudaHostRegister")


def _cuda_check(code, what: str) -> None:
    if int(code) != 0:
        raise RuntimeError(f"{what} failed with CUDA error {int(code)}")


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
    shared by two streams is moved once. `skips_moved`: only the last that many skips of each state are moved (None:
    all); the others stay as they are. Counts the bytes it copies in `h2d_bytes`.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(device) if self.cuda else None
        self.h2d_bytes = 0

    def _move(self, i: int, fetch: Callable[[int], tuple[dict, dict]], skips_moved: int | None) -> Loaded:
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

        def mv_state(h, skips):
            first = 0 if skips_moved is None else len(skips) - skips_moved
            return mv(h), [mv(x) if j >= first else x for j, x in enumerate(skips)]

        if self.cuda:
            main = torch.cuda.current_stream(self.device)
            with torch.cuda.stream(self.copy_stream):
                self.copy_stream.wait_stream(main)
                out = Loaded({s: mv_state(*st) for s, st in states.items()}, {k: mv(v) for k, v in ctx.items()},
                             origin)
                out.event = self.copy_stream.record_event()
            return out
        return Loaded({s: mv_state(*st) for s, st in states.items()}, {k: mv(v) for k, v in ctx.items()}, origin)

    def __call__(self, indices: Iterable[int], fetch: Callable[[int], tuple[dict, dict]],
                 skips_moved: int | None = None) -> Iterator[tuple[int, Loaded]]:
        indices = list(indices)
        if not indices:
            return
        nxt = self._move(indices[0], fetch, skips_moved)
        for j, i in enumerate(indices):
            cur = nxt
            if j + 1 < len(indices):
                nxt = self._move(indices[j + 1], fetch, skips_moved)
            if cur.event is not None:
                main = torch.cuda.current_stream(self.device)
                main.wait_event(cur.event)
                for t in _tensors(cur):
                    if t.device == self.device:  # skips left on the host were not copied
                        t.record_stream(main)
            yield i, cur


def _tensors(loaded: Loaded) -> Iterator[Tensor]:
    for h, skips in loaded.states.values():
        yield h
        yield from skips
    yield from (v for v in loaded.ctx.values() if isinstance(v, Tensor))


@torch.no_grad()
def move_module_tensors(module: nn.Module, move: Callable[[Tensor], Tensor],
                        skip: Callable[[nn.Module], bool] | None = None,
                        keep: set[int] | frozenset[int] = frozenset()) -> int:
    """Replace the parameters and buffers of `module` and its submodules by move(t), e.g. `lambda t: t.to("cpu")`;
    returns the bytes copied (move(t) that is not t).

    Parameters stay the same objects (their data and grad are replaced), buffers are replaced. Left in place:
    everything under a submodule for which skip(submodule) is true, and the tensors whose id is in `keep`. Tensors
    that are the same view of the same memory before (a quantized layer's weight and weight_q after
    drop_float_weight) are one tensor after: nothing is copied twice, and once this returns the module keeps no
    reference to the old memory.
    """
    moved: dict[tuple, tuple[Tensor, Tensor]] = {}  # the sources stay alive meanwhile: no address is reused
    nbytes = 0

    def mv(t: Tensor) -> Tensor:
        nonlocal nbytes
        if not t.numel():
            return move(t)
        key = (t.device, t.data_ptr(), t.dtype, tuple(t.shape), t.stride())
        if key not in moved:
            moved[key] = t, move(t)
            nbytes += 0 if moved[key][1] is t else t.numel() * t.element_size()
        return moved[key][1]
    seen: set[int] = set()
    todo = [module]
    while todo:
        m = todo.pop()
        if id(m) in seen or (skip is not None and skip(m)):
            continue
        seen.add(id(m))
        for p in m.parameters(recurse=False):
            if id(p) not in keep:
                p.data = mv(p.data)
                if p.grad is not None:
                    p.grad = mv(p.grad)
        for name, b in list(m.named_buffers(recurse=False)):
            if id(b) not in keep:
                setattr(m, name, mv(b))
        todo.extend(m.children())
    return nbytes
