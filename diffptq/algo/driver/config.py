"""What the sequential driver reports (LayerReport, SequentialResult); what it is asked to do is a SequentialConfig
(diffptq.config, re-exported here)."""
from __future__ import annotations

import math

from dataclasses import dataclass, field

from diffptq.config.sequential import GRANULARITIES, METHODS, SequentialConfig  # noqa: F401 - the driver's config
from diffptq.quant.layers import QuantLayer


@dataclass
class LayerReport:
    """One quantized layer: `rel_out_err` on held-out records (nan when none are held out); `damp`: the damping
    used, relative to mean diag H."""

    block: int
    layer: str
    method: str
    wbits: int
    abits: int | None
    damp: float
    rel_out_err: float
    fell_back: bool = False
    reason: str = ""
    heldout_err: float = math.nan  # with Damping "adaptive": the chosen damping's error on held-out prompts


@dataclass
class SequentialResult:
    """timings: seconds per phase (forward = block passes without the H/G accumulation inside them; accumulate;
    solve). quant_calls: unit name → how often it was quantized (once). block_stats: per block (summed over its
    units), its passes over calibration records by kind, bytes moved (offload_bytes: its weights moved to
    storage), seconds, phases, groups and waves, peak VRAM, memory allocated after it. peak_vram_bytes: the whole
    run's peak (CUDA), moving offloaded blocks back included. stopped_after: the last block processed when
    `on_block` stopped the run early (else None)."""

    layers: list[LayerReport]
    timings: dict[str, float]
    quant_calls: dict[str, int]
    peak_vram_bytes: int | None
    quant_layers: dict[str, QuantLayer]
    block_peak_vram: dict[int, int] = field(default_factory=dict)  # cumulative peak after each block (CUDA)
    block_stats: dict[int, dict] = field(default_factory=dict)
    stopped_after: int | None = None
