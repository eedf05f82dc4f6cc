"""torch.compile of a converted denoiser with the inductor settings the speed benchmark measured best for its path.

    convert_for_inference(pipe.transformer, "w4")
    compile_denoiser(pipe, "w4")      # the whole denoiser, compiled at its first call
    graph_denoiser(pipe)              # optional, for batches 1-4: CUDA graphs over the compiled calls

The whole denoiser is compiled as one module (nn.Module.compile, in place), which CUDA graphs over the denoiser
need: per-block compilation would leave the Python between blocks outside the graph. On the quantized paths
("w4", "w4a8") inductor's combo kernels are switched on: the small per-layer kernels of a graph (the int4
dequantizations, the activation quantizations and their scale arithmetic) run as a few combined launches instead of
one kernel each. PixArt-XL-2, H200, CUDA graphs, against BF16 + compile at batch 1 / 4: W4 0.82× / 0.93× → 0.94× /
0.99×, W4A8 with static scales 1.00× / 1.11× → 1.09× / 1.19× (BF16 itself does not gain from them);
benchmarks/results/inference_speed_cuda_graphs_combo_packed_pixart_h200.md. The setting is inductor's, process-wide,
and read when a graph compiles (at the model's first call), so it is set here and left on.
"""
from __future__ import annotations

import logging
from typing import Any

from torch import nn

log = logging.getLogger(__name__)
PATHS = ("fake", "w4a8", "w4")
COMBO_KERNEL_PATHS = ("w4", "w4a8")  # where inductor's combo kernels were measured faster


def compile_denoiser(pipe_or_denoiser: Any, path: str = "w4a8", mode: str = "default") -> nn.Module:
    """Compile a pipeline's denoiser (pipe.transformer / pipe.unet) or a denoiser module in place; returns it.

    path: the inference path the denoiser was converted to ("fake", "w4a8", "w4"); it picks the inductor settings.
    mode: torch.compile's mode; "reduce-overhead" records CUDA graphs itself: don't combine it with graph_denoiser.
    Refuses a GraphedDenoiser (compile first, then wrap: the graphs capture whatever the denoiser is)."""
    from diffptq.kernels.graphs import GraphedDenoiser

    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    denoiser = pipe_or_denoiser
    if not isinstance(denoiser, nn.Module):
        from diffptq.models.families import family_of

        denoiser = family_of(pipe_or_denoiser).denoiser(pipe_or_denoiser)
    if isinstance(denoiser, GraphedDenoiser):
        raise ValueError("compile_denoiser: the denoiser is already wrapped in CUDA graphs; compile it first, then "
                         "call graph_denoiser")
    if path in COMBO_KERNEL_PATHS:
        from torch._inductor import config as inductor_config

        inductor_config.combo_kernels = True
    denoiser.compile(mode=mode)
    log.info("compile_denoiser: %s compiled whole (mode %s%s); compilation runs at its first call",
             type(denoiser).__name__, mode, ", inductor combo kernels on" if path in COMBO_KERNEL_PATHS else "")
    return denoiser
