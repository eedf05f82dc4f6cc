"""What the sequential driver is asked to do (SequentialConfig) and what it reports (LayerReport, SequentialResult)."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from diffptq.data.calib import CalibRecord
from diffptq.quant.layers import QuantLayer
from diffptq.quant.quantizer import QuantSpec

METHODS = ("rtn", "gptq", "qronos")
GRANULARITIES = ("unit", "block")


@dataclass
class SequentialConfig:
    """What to quantize and how.

    method: rtn | gptq | qronos. weight: the weight grid. act: the activation grid (None: weights only).
    act_kind: static (per tensor, calibrated) | dynamic (per token). damp: relative to mean(diag H), or "adaptive".
    blocks: indices into family.blocks() (None: all). granularity: "unit" (a block's ResNets, transformer blocks and
    resamplers are quantized one after the other, each re-run from its own cached input: far fewer re-computed
    layers per wave on the UNet; PixArt's blocks are units already) or "block" (each block is one unit).
    skip: layer-name glob patterns (within the denoiser) kept float.
    holdout_every: every n-th calibration record is held out from H and used for rel_out_err (0: none held out).
    act_factory(name, module) -> ActQuantizer | None builds the activation quantizers instead of `act`/`act_kind`
    (e.g. time-conditioned TDQ quantizers); any quantizer with start_calibration/finish_calibration is calibrated
    block by block on the quantized stream. before_record(record) runs before each pass over a calibration record
    (e.g. to set the record's timestep condition on time-conditioned quantizers).
    drop_float_weights: once a block is done, replace its quantized layers' float weights by the dequantized ones
    (frees their memory; float_mode then runs the quantized weights). The codes of finished blocks still add up on
    the device (1 byte per weight): with offload_done too, device memory is flat in the number of blocks.
    offload_done: once a block is done (quantized, propagated, float weights dropped if asked), move its parameters
    and buffers (weights, dequantized weights, codes, norms, ...) to the driver's `storage`: later blocks read the
    cached streams only, so the compute device holds just the blocks still to come, and its memory falls block by
    block. Left in place: blocks that are not selected (also those run in between), activation quantizers (a few
    numbers each; time-conditioned ones cache scales outside their buffers) and tensors shared with modules outside
    the block. Before run() returns (also when on_block stops it or something raises), every offloaded block moves
    back to the compute device: the returned model is the one offload_done=False gives, tensor for tensor. Moving
    back happens after the calibration caches are freed and takes the memory the finished model holds at the end of
    a run without offload_done: with drop_float_weights the float model's size plus the codes, which stays below
    the first block's peak (the whole float model plus one block's calibration working set) unless that working set
    is smaller than the codes (full-size PixArt-XL-2, bf16: 1.86 GiB allocated at the end vs 3.19 GiB in block 0);
    without drop_float_weights also a dequantized copy of each quantized weight. SequentialResult.peak_vram_bytes
    includes the move back. Nothing moves when `storage` is the compute device.
    offload_pending: the selected units after the first wait on `storage` from the start and each moves to the
    compute device just before its turn: with offload_done, the device holds one unit's weights (plus the float
    prologue/epilogue and the units not selected) instead of all those still to come. Moved back like offload_done's.
    rotate / rotate_seed / rotate_conv: an online input rotation of the swapped layers (as in
    diffptq.quant.layers.QuantConfig), set at the swap, so H, G, the activation quantizers and rel_out_err all see
    the rotated inputs.
    """

    method: str = "gptq"
    weight: QuantSpec = field(default_factory=lambda: QuantSpec(4))
    act: QuantSpec | None = None
    act_kind: str = "static"
    damp: float | str = 0.01
    act_order: bool = False
    block_size: int = 128
    blocks: list[int] | None = None
    granularity: str = "unit"
    skip: tuple[str, ...] = ()
    holdout_every: int = 5
    act_factory: Callable | None = None
    before_record: Callable[[CalibRecord], None] | None = None
    drop_float_weights: bool = False
    offload_done: bool = False
    offload_pending: bool = False
    rotate: str | None = None
    rotate_seed: int = 0
    rotate_conv: bool = False

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {', '.join(GRANULARITIES)}, got {self.granularity!r}")


@dataclass
class LayerReport:
    """One quantized layer: `rel_out_err` on held-out records (nan when none are held out)."""

    block: int
    layer: str
    method: str
    wbits: int
    abits: int | None
    damp: float
    rel_out_err: float
    fell_back: bool = False
    reason: str = ""


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
