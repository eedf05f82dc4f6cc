"""Phase timing of the sequential driver that does not synchronize the device inside its record loops: CUDA events
around each phase, resolved by flush() (one synchronize); perf_counter on the CPU."""
from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager

import torch


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
