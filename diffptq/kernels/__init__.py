"""Real low-bit inference: the W4A8 speed path (FP8 GEMMs) and the W4 memory path (packed int4), fake-quant elsewhere.

  convert_for_inference(model, path="w4a8" | "w4" | "fake", device)   fake-quant layers -> inference modules
  load_for_inference / load_int4_checkpoint                          a checkpoint straight into them
  Fp8W4A8Linear, Fp8W4A8PackedLinear, Int4WeightOnlyLinear, ...     the modules
  fp8 (numerics and the reference GEMM), int4 (packing), activations (the tanh GELU in sigmoid form),
  profiling (GPU time breakdown of a step)
  compile_denoiser                                                   torch.compile of the whole denoiser, per path
  graph_denoiser / GraphedDenoiser                                   CUDA graphs over each denoiser call (batch 1-4)
"""
from diffptq.kernels.common import set_profile_scopes
from diffptq.kernels.compiled import compile_denoiser
from diffptq.kernels.fp8 import fp8_scaled_mm, fp8_support, scaled_mm_reference
from diffptq.kernels.fp8_linear import Fp8W4A8Conv1x1, Fp8W4A8Linear
from diffptq.kernels.fp8_packed import Fp8W4A8PackedLinear
from diffptq.kernels.fuse import fuse_attention_projections
from diffptq.kernels.graphs import GraphedDenoiser, graph_denoiser
from diffptq.kernels.int4_weight_only import Int4WeightOnly, Int4WeightOnlyConv2d, Int4WeightOnlyLinear
from diffptq.kernels.loader import load_for_inference, load_int4_checkpoint
from diffptq.kernels.select import Conversion, InferenceConfig, convert_for_inference, is_inference_module

__all__ = [
    "Conversion",
    "Fp8W4A8Conv1x1",
    "Fp8W4A8Linear",
    "Fp8W4A8PackedLinear",
    "GraphedDenoiser",
    "InferenceConfig",
    "Int4WeightOnly",
    "Int4WeightOnlyConv2d",
    "Int4WeightOnlyLinear",
    "compile_denoiser",
    "convert_for_inference",
    "fp8_scaled_mm",
    "fp8_support",
    "fuse_attention_projections",
    "graph_denoiser",
    "is_inference_module",
    "load_for_inference",
    "load_int4_checkpoint",
    "scaled_mm_reference",
    "set_profile_scopes",
]
