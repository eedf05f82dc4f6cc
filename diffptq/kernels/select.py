"""convert_for_inference: swap a fake-quant model's quantized layers for real low-bit inference modules, in place.

Paths:
  "w4a8" (speed): per-channel QuantLinear -> Fp8W4A8Linear (FP8 GEMM; Fp8W4A8PackedLinear with
    `weight_storage="int4"`: the codes packed, unpacked per call). Needs CUDA sm_89+ with torch._scaled_mm.
    Layers that cannot take the FP8 GEMM (convolutions, grouped weights, shapes not divisible by 16) become
    `InferenceConfig.others`: "dequant" (a plain nn.Linear / nn.Conv2d holding the dequantized weight: W4 numerics
    at dense speed, no activation quantization), "w4" (the int4 memory-path module) or "fake" (left as they are).
  "w4" (memory): every 4-bit QuantLinear / QuantConv2d -> Int4WeightOnlyLinear / Int4WeightOnlyConv2d (weight-only:
    activation quantizers are dropped). Runs on any CUDA GPU.
  "fake": nothing changes.
Where the device does not support a path, the model keeps its fake-quant layers (unless `force`: then the real
modules run anyway, the FP8 GEMM through its fp32 reference, as CPU tests do). One log line says what was chosen
and why.
"""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import nn

from diffptq.kernels.activations import use_sigmoid_form_gelu
from diffptq.kernels.common import replace_module
from diffptq.kernels.fp8 import fp8_support
from diffptq.kernels.fp8_attention_processor import use_fp8_attention
from diffptq.kernels.fp8_linear import (
    ACT_KERNELS,
    Fp8W4A8Conv1x1,
    Fp8W4A8Linear,
    fp8_conv1x1_unsupported_reason,
    fp8_unsupported_reason,
)
from diffptq.kernels.fp8_packed import Fp8W4A8PackedLinear
from diffptq.kernels.fuse import fuse_attention_projections
from diffptq.kernels.graphs import GraphedDenoiser
from diffptq.kernels.int4_weight_only import (
    MATMULS,
    Int4WeightOnly,
    int4_module_from_layer,
    int4_unsupported_reason,
    set_int4_matmul,
)
from diffptq.quant.act import DynamicActQuantizer
from diffptq.quant.layers import QuantLayer, QuantLinear, quant_layers

log = logging.getLogger(__name__)
PATHS = ("w4a8", "w4", "fake")
OTHERS = ("dequant", "w4", "fake")
WEIGHT_STORAGES = ("e4m3", "int4")


@dataclass
class InferenceConfig:
    """Options of convert_for_inference.

    act_mode (w4a8): "token" (dynamic per-token e4m3 scales), "tensor" (dynamic per tensor), "static" (from each
      layer's calibrated activation quantizer) or "auto" (the default: static where the layer has a static /
      time-conditioned quantizer, as the fake-quant model was calibrated and evaluated, token elsewhere; static
      scales skip the per-token amax pass: PixArt on an H200, CUDA graphs, 1.00× / 1.11× of BF16 at batch 1 / 4
      against 0.98× / 0.96× per token).
    others (w4a8): what layers that cannot take the FP8 GEMM become: "dequant" | "w4" | "fake".
    scale_dtype (w4): group scales' dtype, float16 (default) or float32; None: fp16 unless out of fp16's range.
    use_fast_accum (w4a8): FP8 tensor-core fast accumulation. fuse_qkv: one GEMM for q/k/v (k/v in cross-attention).
    sigmoid_gelu: tanh-approximated GELU blocks compute x · σ(2v) (the same function, cheaper once compiled; see
      diffptq.kernels.activations).
    act_kernel (w4a8): per-token activation quantization as torch ops ("torch") or one Triton kernel ("triton", same
      values; CUDA only, torch ops elsewhere). See Fp8W4A8Linear.
    force: use the real modules even where the device does not support them (the FP8 GEMM then runs its reference).
    fp8_attention: self-attention on FP8 operands (diffptq.kernels.fp8_attention: the Triton kernel on CUDA sm_89+,
      its torch reference elsewhere); an approximation whose image cost benchmarks/fp8_attention_quality.py measures.
    conv1x1 (w4a8): quantized 1×1 convolutions (stride 1, no padding: the UNet's proj_in / proj_out and shortcuts)
      take the FP8 GEMM too, over channels (Fp8W4A8Conv1x1); off: they follow `others`.
    int4_matmul (w4): memory-path Linear layers multiply by "dequant" (dequantize, then GEMM) or "triton" (one
      kernel dequantizing in registers, on CUDA inputs; diffptq.kernels.int4_gemm_triton).
    weight_storage (w4a8): the Linear layers' codes as "e4m3" (one byte per weight, Fp8W4A8Linear) or packed "int4"
      (half a byte, unpacked to e4m3 every call: Fp8W4A8PackedLinear; the same outputs, the memory of the W4 path).
    cuda_graphs: also wrap the model in a GraphedDenoiser (diffptq.kernels.graphs: one CUDA graph replayed per call
      at batches 1-4, where steps are launch-bound), returned as `Conversion.graphed`: put it where the model was
      (`pipe.transformer = conv.graphed`), or call graph_denoiser(pipe) after converting.
    """

    act_mode: str = "auto"
    others: str = "dequant"
    scale_dtype: torch.dtype | None = torch.float16
    use_fast_accum: bool = True
    fuse_qkv: bool = True
    sigmoid_gelu: bool = True
    force: bool = False
    act_kernel: str = "torch"
    cuda_graphs: bool = False
    fp8_attention: bool = False
    int4_matmul: str = "dequant"
    conv1x1: bool = False
    weight_storage: str = "e4m3"

    def __post_init__(self) -> None:
        if self.act_mode not in ("token", "tensor", "static", "auto"):
            raise ValueError(f"InferenceConfig.act_mode must be token|tensor|static|auto, got {self.act_mode!r}")
        if self.others not in OTHERS:
            raise ValueError(f"InferenceConfig.others must be one of {OTHERS}, got {self.others!r}")
        if self.act_kernel not in ACT_KERNELS:
            raise ValueError(f"InferenceConfig.act_kernel must be one of {ACT_KERNELS}, got {self.act_kernel!r}")
        if self.weight_storage not in WEIGHT_STORAGES:
            raise ValueError(f"InferenceConfig.weight_storage must be one of {WEIGHT_STORAGES}, "
                             f"got {self.weight_storage!r}")
        for name in ("cuda_graphs", "fp8_attention", "conv1x1"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"InferenceConfig.{name} must be True or False, got {getattr(self, name)!r}")
        if self.int4_matmul not in MATMULS:
            raise ValueError(f"InferenceConfig.int4_matmul must be one of {MATMULS}, got {self.int4_matmul!r}")


@dataclass
class Conversion:
    """What convert_for_inference did: the path taken, why, and each converted layer's new module type; `graphed`:
    the model wrapped in a GraphedDenoiser when InferenceConfig.cuda_graphs (else None)."""

    path: str
    reason: str
    modules: dict[str, str] = field(default_factory=dict)
    kept: dict[str, str] = field(default_factory=dict)  # layer name -> why it stayed fake-quant
    fused_attention: int = 0
    sigmoid_gelu: int = 0  # GELU blocks switched to the sigmoid form
    fp8_attention: int = 0  # self-attention modules on FP8 operands
    int4_fused: int = 0  # memory-path Linear layers on the fused int4 kernel
    graphed: GraphedDenoiser | None = None

    def counts(self) -> dict[str, int]:
        return dict(Counter(self.modules.values()))


def path_support(path: str, device: torch.device) -> tuple[bool, str]:
    """(supported, reason) for running `path` on `device`."""
    if path == "fake":
        return True, "fake-quant requested"
    if path == "w4a8":
        return fp8_support(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return False, f"the int4 memory path targets CUDA GPUs; the model runs on {device}"
    return True, f"{torch.cuda.get_device_name(device)}: int4 weights dequantized on the fly"


def _resolve_device(model: nn.Module, device: str | torch.device | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    t = next(iter(model.parameters()), None)
    return t.device if t is not None else torch.device("cpu")


def _dense(layer: QuantLayer) -> nn.Module:
    """A plain nn.Linear / nn.Conv2d holding the layer's dequantized weight (its exact W4 values)."""
    if isinstance(layer, QuantLinear):
        new = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
    else:
        new = nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                        layer.dilation, layer.groups, layer.bias is not None, layer.padding_mode, device="meta")
    new.weight = nn.Parameter(layer.weight_q.detach(), requires_grad=False)
    new.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach(), requires_grad=False)
    return new


def _fp8_act_mode(layer: QuantLinear, act_mode: str) -> str:
    if act_mode != "auto":
        return act_mode
    aq = layer.act_quant
    return "static" if aq is not None and not isinstance(aq, DynamicActQuantizer) else "token"


def _convert_layer(layer: QuantLayer, path: str, cfg: InferenceConfig) -> tuple[nn.Module | None, str]:
    """(new module or None to keep the layer, reason when kept)."""
    if getattr(layer, "rotation", None) is not None:  # the kernel modules do not rotate their inputs
        return None, "online input rotation (kept as fake-quant)"
    if getattr(layer, "input_scale", None) is not None or getattr(layer, "lowrank_up", None) is not None:
        return None, "smoothing / low-rank branch (kept as fake-quant)"
    if path == "w4a8":
        reason = fp8_unsupported_reason(layer)
        if reason is None:
            mode = _fp8_act_mode(layer, cfg.act_mode)
            # the FP8 GEMM takes the layer (reason is None): packed storage needs the int4 conditions besides
            packed = cfg.weight_storage == "int4" and int4_unsupported_reason(layer) is None
            cls = Fp8W4A8PackedLinear if packed else Fp8W4A8Linear
            return cls.from_quant_linear(layer, mode, cfg.use_fast_accum, act_kernel=cfg.act_kernel), ""
        if cfg.conv1x1 and fp8_conv1x1_unsupported_reason(layer) is None:
            mode = _fp8_act_mode(layer, cfg.act_mode)
            return Fp8W4A8Conv1x1.from_quant_conv(layer, mode, cfg.use_fast_accum, act_kernel=cfg.act_kernel), ""
        if cfg.others == "dequant":
            return _dense(layer), ""
        if cfg.others == "fake":
            return None, reason
    reason = int4_unsupported_reason(layer)
    if reason is None:
        return int4_module_from_layer(layer, cfg.scale_dtype), ""
    return None, reason


@torch.no_grad()
def convert_for_inference(model: nn.Module, path: str = "w4a8", device: str | torch.device | None = None,
                          config: InferenceConfig | None = None) -> Conversion:
    """Replace the quantized QuantLinear / QuantConv2d layers of `model` by inference modules of `path`, in place.

    device: where the model will run (default: where its parameters are); decides whether the path is supported.
    Returns a Conversion; the model keeps fake-quant layers when the path is unsupported (logged with the reason).
    """
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    cfg = config or InferenceConfig()
    dev = _resolve_device(model, device)
    ok, why = path_support(path, dev)
    layers = [(n, m) for n, m in quant_layers(model) if m.is_quantized]
    if path == "fake" or not (ok or cfg.force):
        result = Conversion("fake", why if path == "fake" else f"{path} unavailable: {why}")
        log.log(logging.INFO if path == "fake" else logging.WARNING,
                "convert_for_inference: keeping %d fake-quant layers (%s)", len(layers), result.reason)
        return with_graphs(model, cfg, result)
    forced = "the FP8 GEMM runs its reference" if path == "w4a8" else "the int4 modules dequantize on the device"
    result = Conversion(path, why if ok else f"forced where unsupported ({why}): {forced}")
    for name, layer in layers:
        new, reason = _convert_layer(layer, path, cfg)
        if new is None:
            result.kept[name] = reason
            continue
        replace_module(model, name, new)
        result.modules[name] = type(new).__name__
    finish_model(model, cfg, result)
    counts = ", ".join(f"{v} {k}" for k, v in sorted(result.counts().items())) or "no layer converted"
    act = f", {cfg.act_mode} e4m3 activations ({cfg.act_kernel})" if path == "w4a8" else ", weight-only"
    log.info("convert_for_inference: %s path on %s (%s): %s%s, %d attention projections fused, %d GELU blocks in "
             "sigmoid form, %d kept fake-quant", path, dev, result.reason, counts, act, result.fused_attention,
             result.sigmoid_gelu, len(result.kept))
    return with_graphs(model, cfg, result)


def finish_model(model: nn.Module, cfg: InferenceConfig, result: Conversion) -> None:
    """The model-level rewrites of a real path, in place: fused attention projections, sigmoid-form GELU, FP8
    self-attention, the fused int4 GEMM."""
    if cfg.fuse_qkv:
        result.fused_attention = fuse_attention_projections(model)
    if cfg.sigmoid_gelu:
        result.sigmoid_gelu = use_sigmoid_form_gelu(model)
    if cfg.fp8_attention:
        result.fp8_attention = use_fp8_attention(model)
    if cfg.int4_matmul != "dequant":
        result.int4_fused = set_int4_matmul(model, cfg.int4_matmul)


def with_graphs(model: nn.Module, cfg: InferenceConfig, result: Conversion) -> Conversion:
    """`result` with `graphed` set to the model in a GraphedDenoiser when cfg.cuda_graphs."""
    if cfg.cuda_graphs:
        result.graphed = GraphedDenoiser(model)
        log.info("convert_for_inference: CUDA graphs on: run Conversion.graphed in place of the model")
    return result


def is_inference_module(m: nn.Module) -> bool:
    """True for the real-kernel modules of this package."""
    return isinstance(m, (Fp8W4A8Linear, Int4WeightOnly))  # Fp8W4A8Conv1x1 is an Fp8W4A8Linear
