"""The block-by-block (sequential) driver: quantization of a diffusion denoiser with cached, paired block inputs.

Data flow, over a model family's units 0..K-1 in forward order (diffptq.models.units: PixArt's transformer blocks;
the UNet's ResNets, transformer blocks and resamplers, or with granularity "block" its down/mid/up blocks). The
user selects blocks (indices into family.blocks()); a block's units are processed one after the other, and
results (layer reports, block_stats, on_block) are reported per block. Below, "block" means a unit:
1. The float prologue runs once per calibration record; both streams start from its output (cache.py). Each
   record's state `(h, skips)` is cached per stream on `storage` (pinned CPU memory by default, memory.py): `h` the
   hidden tensor, `skips` the UNet skip tensors that up blocks consume (so up blocks see the skips of their own
   stream). The context (timestep embedding, text states) is float and shared by both streams. Only the skips a
   unit reads (the one an up-block ResNet concatenates) are copied to the compute device; the others pass through
   on storage.
2. For each selected block:
   a. plan (plan.py; one record, float mode): group the layers fed by the same tensor (e.g. q/k/v), in forward
      order, and find which layers' inputs depend on which earlier layers (perturb a group's outputs, see which
      later inputs change; blocks of the same class and layer order reuse the first one's answer). Groups go into
      waves: a group's wave comes after the waves of every group it depends on, so all groups of a wave can be
      calibrated from one pass (e.g. attn1 q/k/v and the cross-attention k/v, which read the text states only).
   a'. outlier handling (outliers.py), when asked: the PCA rotation (one R per group, from the second moment of its
      input over the quantized stream, the block's weights float), then smoothing and the low-rank branch.
   b. calibrate the block's static activation quantizers on the quantized stream (activations.py; one pass,
      stopped after the last layer that has one; the weights of the block still float, as before).
   c. per wave: one pass per stream over the calibration records, stopped after the wave's last layer: the float
      stream X (Qronos only) and the quantized stream X̃ as the matmul sees it, paired per record; accumulate
      H = X̃ᵀX̃/n (and G = X̃ᵀX/n) — once for layers with the same input and equal activation quantizers
      (accumulate.py) — then quantize the wave's weights (solve.py). A layer's input depends only on layers of
      earlier waves, so it sees exactly what the one-group-at-a-time order gives it. Qronos's first float pass runs
      the whole block and keeps its output: the float stream of the next block does not depend on anything
      quantized. In quantized passes each layer input is fake-quantized once, in a pre-hook (q/k/v with equal
      quantizers share it; the accumulation reads it): the same tensors as the layers' own quantizers give,
      computed fewer times. The last layer that reads an H/G hands it to the solver (consume), which works on it
      in place: per solve at most two (in, in) float32 matrices are alive (the widest SD 1.5 conv: 23040 inputs,
      1.98 GiB each).
3. Propagate (propagate.py): the quantized stream through the block (quantization on), and the float stream where
   it is still needed (Qronos: every record; GPTQ/RTN: only the held-out records, for
   rel_out_err = ‖X̃Ŵᵀ − XWᵀ‖/‖XWᵀ‖).
4. With offload_done (offload.py), the finished block's weights move to `storage` (they are not needed until the
   run ends: later blocks read the cached streams), and every such block moves back before run() returns.
Only one record's activations (and the next record's inputs, copied ahead on a side stream) are on the compute
device at a time. Nothing inside the record loops waits for the device: finite-checks, error sums and timings are
resolved once per wave or block.

driver.py holds SequentialQuantizer (the loop over units) and quantize_sequential; config.py what it is asked and
what it reports; passes.py one pass of a unit over one record (modes, hooks, early exit); stats.py and timing.py
the per-block statistics and phase timings.
"""
from diffptq.algo.driver.accumulate import NonFiniteActivationError
from diffptq.algo.driver.config import LayerReport, SequentialConfig, SequentialResult
from diffptq.algo.driver.driver import SequentialQuantizer, quantize_sequential
from diffptq.algo.driver.plan import BlockPlan
from diffptq.algo.driver.propagate import denoiser_output_error

__all__ = [
    "BlockPlan",
    "LayerReport",
    "NonFiniteActivationError",
    "SequentialConfig",
    "SequentialQuantizer",
    "SequentialResult",
    "denoiser_output_error",
    "quantize_sequential",
]
