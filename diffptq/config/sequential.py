"""SequentialConfig: what the block-by-block driver (diffptq.algo.driver) quantizes, and how."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

from diffptq.config.checks import (
    FLOAT_BITS,
    check_choice,
    check_float,
    check_int,
    check_non_negative_int,
    check_positive_int,
    fail,
)
from diffptq.config.quant import Damping, QuantSpec, as_damping
from diffptq.errors import ConfigError

METHODS = ("rtn", "gptq", "qronos")
ACT_KINDS = ("static", "dynamic")
GRANULARITIES = ("unit", "block")
ROTATIONS = ("hadamard", "pca")  # online input rotations (diffptq.quant.rotation)
DEFAULT_ACT = QuantSpec(8, symmetric=False)  # activations: asymmetric 8-bit (the zero point follows the range)
AUTO = "auto"  # the value of --act_quant / --rotate / --lowrank / --correction that leaves it to the recipe of the bits
RECIPE_FIELDS = ("act_kind", "rotate", "lowrank", "correction")
RECIPE_MAX_ABITS = 4  # at or below: the low-bit recipe
RECIPE_LOWRANK = 32  # rank of the low-bit recipe's 16-bit branch
RECIPE_CORRECTION = 0.25  # the share of the upstream error Qronos corrects at low-bit activations
# per-token activations behind a Hadamard rotation, each Linear's leading rank-32 part kept in a 16-bit branch, and
# Qronos correcting a quarter of the upstream error (docs/ALGORITHMS.md §6)
LOW_BIT_RECIPE = {"act_kind": "dynamic", "rotate": "hadamard", "lowrank": RECIPE_LOWRANK,
                  "correction": RECIPE_CORRECTION}
# calibrated per-tensor activations, nothing more; Qronos as published
HIGH_BIT_RECIPE = {"act_kind": "static", "rotate": None, "lowrank": 0, "correction": 1.0}


def recipe(abits: int) -> dict:
    """The activation quantizer, rotation, low-rank branch and Qronos correction of the default recipe at `abits`
    (static per-tensor 4-bit activations collapse; per-token ones behind an online Hadamard rotation keep the picture,
    the rank-32 branch adds 3.5-4.5 dB on bundled-dit, and Qronos loses to GPTQ at A4 unless it corrects only part of
    the upstream error: README, W4A4)."""
    return dict(LOW_BIT_RECIPE if abits <= RECIPE_MAX_ABITS else HIGH_BIT_RECIPE)


@dataclass
class SequentialConfig:
    """What to quantize and how.

    method: rtn | gptq | qronos. weight: the weight grid. act: the activation grid (None: weights only; the default
    is W4A8 with static asymmetric 8-bit activations). act_kind: static (per tensor, calibrated) | dynamic (per
    token). damp: the Hessian damping rule (a Damping; a number or mode name is converted).
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
    the rotated inputs. "pca" is computed per unit instead, from the calibration inputs (the eigenvectors of each
    Linear input's second moment, one R per group of layers fed by the same tensor), before the unit's activation
    quantizers are calibrated; Conv2d layers keep their inputs (rotate_conv needs "hadamard").
    keep: with rotate "pca", the first `keep` rotated channels (the leading components) of each Linear's input are
    quantized at 8 bits, the rest with `act` (clamped to the layer's width; 0: off; nothing to do without `act`).
    smooth: α of per-channel smoothing of each Linear's input (x / s, W·diag(s), one s per group of layers fed by
    the same tensor, from the calibration records' max |x|), before its activation quantizer is calibrated (None:
    off). lowrank: rank of a high-precision branch kept out of each Linear's quantized weight (0: off), at most a
    quarter of the layer's smaller dimension (branch_rank). lowrank_conv: Conv2d layers get the branch too (on their
    weight matrix (out, in·k·k); off by default). diffptq.quant.outliers; Conv2d layers are never smoothed.
    correction: Qronos only, the share (0..1) of the upstream error each layer corrects: its target is
    (1 − c)·X̃W + c·XW (1: the published Qronos, 0: GPTQ's target; docs/ALGORITHMS.md §6).
    auto: the fields of RECIPE_FIELDS that with_bits sets from the activation bits (recipe(abits)); the scripts' flags
    --act_quant, --rotate, --lowrank and --correction put theirs here when left at their default, "auto".
    """

    method: str = "qronos"
    weight: QuantSpec = field(default_factory=lambda: QuantSpec(4))
    act: QuantSpec | None = DEFAULT_ACT
    act_kind: str = "static"
    damp: Damping = field(default_factory=Damping)
    act_order: bool = False
    block_size: int = 128
    blocks: list[int] | None = None
    granularity: str = "unit"
    skip: tuple[str, ...] = ()
    holdout_every: int = 5
    act_factory: Callable | None = None
    before_record: Callable | None = None  # (CalibRecord) -> None
    drop_float_weights: bool = False
    offload_done: bool = False
    offload_pending: bool = False
    rotate: str | None = None
    rotate_seed: int = 0
    rotate_conv: bool = False
    smooth: float | None = None
    lowrank: int = 0
    lowrank_conv: bool = False
    keep: int = 0
    correction: float = 1.0
    auto: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        check_choice(self.method, "method", METHODS)
        check_choice(self.act_kind, "act_kind", ACT_KINDS)
        check_choice(self.granularity, "granularity", GRANULARITIES)
        if not isinstance(self.weight, QuantSpec) or (self.act is not None and not isinstance(self.act, QuantSpec)):
            raise fail("SequentialConfig", "weight and act must be QuantSpec (act may be None)")
        self.damp = as_damping(self.damp)
        check_positive_int(self.block_size, "block_size")
        check_non_negative_int(self.holdout_every, "holdout_every")
        check_non_negative_int(self.rotate_seed, "--rotate_seed")
        if self.blocks is not None:
            self.blocks = [check_int(b, "blocks", lo=0) for b in self.blocks]
        if self.smooth is not None:
            check_float(self.smooth, "--smooth", lo=0.0, hi=1.0, lo_open=True)
        check_non_negative_int(self.lowrank, "--lowrank")
        self.correction = check_float(self.correction, "--correction", lo=0.0, hi=1.0)
        self.auto = tuple(self.auto)
        for name in self.auto:
            check_choice(name, "SequentialConfig.auto", RECIPE_FIELDS)
        check_rotation(self.rotate, self.rotate_conv, self.keep)

    def with_bits(self, wbits: int, abits: int) -> SequentialConfig:
        """This config at `wbits` / `abits` (16: float activations); the grids keep their other settings, and the
        fields in `auto` follow recipe(abits)."""
        if wbits >= FLOAT_BITS:
            raise fail("--wbits", f"{wbits} leaves nothing to quantize; give 2..8")
        act = None if abits >= FLOAT_BITS else replace(self.act or DEFAULT_ACT, bits=abits)
        chosen = {name: value for name, value in recipe(abits).items() if name in self.auto}
        return replace(self, weight=replace(self.weight, bits=wbits), act=act, **chosen)


def check_rotation(rotate: str | None, rotate_conv: bool, keep: int) -> None:
    """ConfigError for rotation settings that mean nothing together (the flags and SequentialConfig share it)."""
    if rotate is not None:
        check_choice(rotate, "--rotate", ROTATIONS)
    check_non_negative_int(keep, "--keep")
    if rotate_conv and rotate != "hadamard":
        raise ConfigError("--rotate_conv rotates Conv2d inputs as well: it needs --rotate hadamard"
                          + (" (the PCA rotation applies to Linear layers only)" if rotate == "pca" else ""))
    if keep and rotate != "pca":
        raise ConfigError(f"--keep {keep} keeps the leading PCA components at 8 bits: it needs --rotate pca")


def check_calibration_fits(cfg: SequentialConfig, n_calib: int, batch_size: int) -> None:
    """ConfigError when the calibration data cannot serve `cfg`: adaptive damping holds out whole prompt batches,
    so it needs at least two (GPTQ and Qronos; RTN uses no damping)."""
    if cfg.damp.mode == "adaptive" and cfg.method != "rtn" and -(-n_calib // batch_size) < 2:
        raise ConfigError(f"--damp adaptive chooses each layer's damping on held-out prompts: give at least two "
                          f"calibration batches (--n_calib {n_calib} is one batch of --calib_batch_size {batch_size})")
