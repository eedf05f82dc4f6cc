"""Per-block statistics of a run: passes, bytes moved, seconds, phases, groups and waves, VRAM."""
from __future__ import annotations

import time
from collections import Counter

import torch

from diffptq.algo.driver.plan import BlockPlan
from diffptq.algo.driver.timing import PhaseTimer


class BlockStats:
    """`blocks`: block → its units' numbers summed (SequentialResult.block_stats); `peak_vram`: block → the run's
    peak allocated VRAM up to and including the block (SequentialResult.block_peak_vram, CUDA only)."""

    def __init__(self, device: torch.device, timer: PhaseTimer):
        self.device, self.timer = device, timer
        self.cuda = device.type == "cuda"
        self.blocks: dict[int, dict] = {}
        self.peak_vram: dict[int, int] = {}
        self._peak = 0  # before the current unit
        self._t0 = 0.0
        self._before: dict[str, float] = {}

    def start_unit(self) -> None:
        self._t0, self._before = time.perf_counter(), dict(self.timer.totals)
        if self.cuda:
            self._peak = max(self._peak, torch.cuda.max_memory_allocated(self.device))
            torch.cuda.reset_peak_memory_stats(self.device)

    def finish_unit(self, block: int, plan: BlockPlan | None, passes: Counter, moved: dict[str, int]) -> None:
        """Add the unit just run to `block`'s numbers. passes: (kind, whole unit run) → count; moved: bytes by key
        (h2d_bytes, d2h_bytes, offload_bytes)."""
        phases = self.timer.totals  # synchronizes
        unit_peak = torch.cuda.max_memory_allocated(self.device) if self.cuda else 0
        if self.cuda:
            self.peak_vram[block] = max(self._peak, unit_peak, self.peak_vram.get(block, 0))
        stats = self.blocks.setdefault(block, {
            "units": 0, "seconds": 0.0, "phases": {}, "record_passes": {}, "h2d_bytes": 0, "d2h_bytes": 0,
            "offload_bytes": 0, "groups": 0, "waves": 0, "peak_vram_bytes": None, "allocated_bytes": None})
        stats["units"] += 1
        stats["seconds"] += time.perf_counter() - self._t0
        for p, v in phases.items():
            stats["phases"][p] = stats["phases"].get(p, 0.0) + v - self._before.get(p, 0.0)
        for (kind, full), c in passes.items():
            key = f"{kind}{'' if full else '_early_exit'}"
            stats["record_passes"][key] = stats["record_passes"].get(key, 0) + c
        stats["record_passes"] = dict(sorted(stats["record_passes"].items()))
        for key, n in moved.items():
            stats[key] += n
        stats["groups"] += len(plan.groups) if plan else 0
        stats["waves"] += len(plan.waves) if plan else 0
        if self.cuda:
            stats["peak_vram_bytes"] = max(stats["peak_vram_bytes"] or 0, unit_peak)  # this block's peak
            stats["allocated_bytes"] = torch.cuda.memory_allocated(self.device)  # after it (model, caches)
        self._peak = self.peak_vram.get(block, 0)
