"""QuantLinear / QuantConv2d and swap_modules(): put quantized layers into a model in place.

A quant layer is still an nn.Linear / nn.Conv2d (same parameter names, isinstance checks keep working). It keeps
the float weight (the float stream and calibration need it), an optional input activation quantizer `act_quant`,
and, once quantized, integer codes with their scale and zero as buffers:
  weight_codes (out, in·k·k) int8/uint8, weight_scale / weight_zero (out, n_groups) float32 — saved in state dicts;
  weight_q: the dequantized weight in the layer's shape and dtype (derived, not saved; rebuilt on load).
forward = act_quant(x), then the layer op with weight_q (if quantized and `quant_weight`) else the float weight.

Optional online rotation (`set_rotation`, diffptq.quant.rotation): the layer then holds the rotated float weight
W R (R orthonormal over the input channels) and a forward pre-hook, run before any other, turns its input x into
Rᵀx. Everything that sees the layer's input through the module (activation quantizer, hooks that record H and G,
rel_out_err) thus sees the rotated input its weights act on, and codes are those of W R: y = (W R)(Rᵀx) = W x.
Linear rotates the last dimension, Conv2d the channel dimension (per pixel, which commutes with the convolution).

Optional outlier handling of a QuantLinear (diffptq.quant.outliers): smoothing (`set_smoothing`: input x / s, weight
W·diag(s), applied after any rotation) and a low-rank high-precision branch (`set_lowrank`: the float weight becomes
the residual R = W − up @ down, and forward adds (x @ downᵀ) @ upᵀ on the unquantized input). Float mode still
computes W x exactly; quantized, only R is quantized.
"""
from __future__ import annotations

import fnmatch
import logging
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffptq.config.checks import check_choice
from diffptq.config.sequential import ACT_KINDS
from diffptq.quant.act import ActQuantizer, DynamicActQuantizer, StaticActQuantizer
from diffptq.quant.quantizer import QuantSpec, check_group_size, dequantize
from diffptq.quant.rotation import ROTATIONS, Rotation, make_rotation

log = logging.getLogger(__name__)
_CODE_BUFFERS = ("weight_codes", "weight_scale", "weight_zero")
_OUTLIER_BUFFERS = ("input_scale", "lowrank_up", "lowrank_down")


class QuantLayer:
    """Mixin with the quantization state shared by QuantLinear and QuantConv2d."""

    weight: nn.Parameter
    # weight_q is a dequantized cache of the codes (after drop_float_weight it is the weight itself): model-size
    # accounting (diffptq.eval.hardware.module_bytes) must not count it.
    _size_exclude = ("weight_q",)

    def _init_quant(self, act_quant: ActQuantizer | None, weight_spec: QuantSpec | None) -> None:
        self.act_quant = act_quant
        self.weight_spec = weight_spec
        self.quant_weight = True
        for name in (*_CODE_BUFFERS, *_OUTLIER_BUFFERS):
            self.register_buffer(name, None)
        self.register_buffer("weight_q", None, persistent=False)
        self.rotation: Rotation | None = None
        self._rotation_hook = None
        self._smoothing_hook = None

    @property
    def channel_dim(self) -> int:
        """The input dimension holding features: -1 (Linear) or 1 (Conv2d)."""
        return 1 if isinstance(self, nn.Conv2d) else -1

    @torch.no_grad()
    def set_rotation(self, rotation: Rotation | None) -> None:
        """Rotate this layer's input by `rotation` (None: remove a rotation); the float weight becomes W R.

        Call before quantizing: codes already stored are in the basis they were made in and are kept as they are
        (a checkpoint loader sets the rotation, then the codes). The weight becomes a new Parameter, so a module
        that shared the old one (the float layer this one replaced) keeps its weight. A rotation that is an
        nn.Module (PcaRotation) becomes the submodule `rotation`: layers sharing it hold one copy of its matrix.
        """
        if rotation is self.rotation:  # make_rotation shares one instance per (kind, size, seed)
            return
        if rotation is not None and rotation.size != self.weight.shape[1]:
            raise ValueError(f"rotation of size {rotation.size} for a layer with {self.weight.shape[1]} inputs")
        w = self.weight.detach().double()
        if self.rotation is not None:
            w = self.rotation.unrotate(w, 1)
            self._rotation_hook.remove()
            self._rotation_hook = None
        if rotation is not None:
            w = rotation.rotate(w, 1)
            # prepend: hooks registered before or after this one (the driver's H/G recorders) see Rᵀx
            self._rotation_hook = self.register_forward_pre_hook(self._rotate_input, prepend=True)
        self._modules.pop("rotation", None)  # a module-valued rotation is a submodule, any other kind an attribute
        self.rotation = rotation
        self.weight = nn.Parameter(w.to(self.weight.dtype), requires_grad=self.weight.requires_grad)

    def _rotate_input(self, module: nn.Module, args: tuple) -> tuple:
        return (self.rotation.rotate_input(args[0], self.channel_dim), *args[1:])

    @torch.no_grad()
    def set_smoothing(self, s: Tensor) -> None:
        """Smooth this Linear's input: x → x / s (after the rotation, if any), float weight W → W·diag(s), s (in,) > 0.
        Call before the low-rank split and before quantizing."""
        if not isinstance(self, nn.Linear):
            raise ValueError("smoothing is implemented for Linear layers")
        if self.input_scale is not None or self.is_quantized or self.lowrank_up is not None:
            raise ValueError("set_smoothing: the layer is already smoothed, split or quantized")
        s = s.detach().float().to(self.weight.device).reshape(-1)
        if s.numel() != self.weight.shape[1] or not bool((s > 0).all()):
            raise ValueError(f"smoothing factors must be {self.weight.shape[1]} positive values")
        self.input_scale = s
        self.weight = nn.Parameter((self.weight.double() * s.double()).to(self.weight.dtype),
                                   requires_grad=self.weight.requires_grad)
        self._smoothing_hook = self.register_forward_pre_hook(self._smooth_input)  # after the rotation's

    def _smooth_input(self, module: nn.Module, args: tuple) -> tuple:
        return (args[0] / self.input_scale.to(args[0].dtype), *args[1:])

    @torch.no_grad()
    def set_lowrank(self, up: Tensor, down: Tensor) -> None:
        """Keep up @ down (up (out, r), down (r, in·k·k)) as a high-precision branch on the unquantized input; the
        float weight becomes the residual W − up @ down (what gets quantized; a Conv2d's weight as its matrix
        (out, in·k·k), the layout of its codes)."""
        if self.lowrank_up is not None or self.is_quantized:
            raise ValueError("set_lowrank: the layer already has a branch or codes")
        out, cols = self.weight.shape[0], self.weight[0].numel()
        if up.shape[0] != out or down.shape[1] != cols or up.shape[1] != down.shape[0]:
            raise ValueError(f"low-rank factors {tuple(up.shape)} @ {tuple(down.shape)} for a ({out}, {cols}) weight")
        dev, dtype = self.weight.device, self.weight.dtype
        self.lowrank_up, self.lowrank_down = up.detach().to(dev, dtype), down.detach().to(dev, dtype)
        R = self.weight.double().reshape(out, cols) - up.double().to(dev) @ down.double().to(dev)
        self.weight = nn.Parameter(R.reshape(self.weight.shape).to(dtype), requires_grad=self.weight.requires_grad)

    def branch(self, x: Tensor) -> Tensor | None:
        """The low-rank branch's output for the layer's (transformed) input x, or None: (x @ downᵀ) @ upᵀ for a
        Linear; for a Conv2d the convolution with `down` as r filters of the layer's kernel size (its stride,
        padding and dilation), then a 1×1 convolution with `up`, i.e. the convolution with up @ down."""
        if self.lowrank_up is None:
            return None
        up, down = self.lowrank_up.to(x.dtype), self.lowrank_down.to(x.dtype)
        if isinstance(self, nn.Conv2d):
            h = self._conv_forward(x, down.reshape(down.shape[0], *self.weight.shape[1:]), None)
            return F.conv2d(h, up[:, :, None, None])
        return F.linear(F.linear(x, down), up)

    @property
    def is_quantized(self) -> bool:
        return self.weight_codes is not None

    def weight_matrix(self) -> Tensor:
        """The float weight as a float32 matrix (out, in·k·k), a copy safe to modify."""
        return self.weight.detach().reshape(self.weight.shape[0], -1).float().clone()

    @torch.no_grad()
    def set_quantized_weight(self, codes: Tensor, scale: Tensor, zero: Tensor) -> None:
        """Store codes (out, in·k·k), scale and zero (out, n_groups) and rebuild weight_q from them."""
        out, cols = self.weight.shape[0], self.weight[0].numel()
        if tuple(codes.shape) != (out, cols):
            raise ValueError(f"codes of shape {tuple(codes.shape)} for a weight matrix ({out}, {cols})")
        dev = self.weight.device
        self.weight_codes = codes.detach().to(dev)
        self.weight_scale = scale.detach().float().to(dev)
        self.weight_zero = zero.detach().float().to(dev)
        self._rebuild_weight_q()

    def _rebuild_weight_q(self) -> None:
        w = dequantize(self.weight_codes, self.weight_scale, self.weight_zero)
        self.weight_q = w.reshape(self.weight.shape).to(self.weight.dtype)

    @torch.no_grad()
    def drop_float_weight(self) -> None:
        """Replace the float weight by the dequantized one (frees memory; the float stream is lost)."""
        if not self.is_quantized:
            raise RuntimeError("drop_float_weight on a layer that is not quantized yet")
        self.weight.data = self.weight_q
        self.weight_q = self.weight.data

    def current_weight(self) -> Tensor:
        return self.weight_q if (self.quant_weight and self.weight_q is not None) else self.weight

    def quant_input(self, x: Tensor) -> Tensor:
        """The input as the matmul sees it (after act_quant when present): accumulate H and G from this.

        x is the input the forward pass receives, i.e. already rotated when the layer has a rotation."""
        return self.act_quant(x) if self.act_quant is not None else x

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name in _CODE_BUFFERS:  # allocate code buffers a fresh (unquantized) layer does not have yet
            if prefix + name in state_dict and getattr(self, name) is None:
                t = state_dict[prefix + name]
                self._buffers[name] = torch.empty(t.shape, dtype=t.dtype, device=self.weight.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if self.weight_codes is not None:
            self._rebuild_weight_q()


class QuantLinear(QuantLayer, nn.Linear):
    """nn.Linear with fake-quant input and integer weight codes. x: (..., in) -> (..., out)."""

    def __init__(self, linear: nn.Linear, act_quant: ActQuantizer | None = None, weight_spec: QuantSpec | None = None):
        nn.Linear.__init__(self, linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        self.weight = linear.weight
        self.bias = linear.bias
        self._init_quant(act_quant, weight_spec)

    def forward(self, x: Tensor) -> Tensor:
        y = F.linear(self.quant_input(x), self.current_weight(), self.bias)
        extra = self.branch(x)
        return y if extra is None else y + extra


class QuantConv2d(QuantLayer, nn.Conv2d):
    """nn.Conv2d (groups == 1) with fake-quant input and integer weight codes. x: (N, C, H, W).

    Any activation quantizer assigned to `act_quant` gets channel_dim = 1: per token = per spatial position.
    """

    def __init__(self, conv: nn.Conv2d, act_quant: ActQuantizer | None = None, weight_spec: QuantSpec | None = None):
        if conv.groups != 1:
            raise ValueError(f"QuantConv2d supports groups=1 only, got groups={conv.groups} (one H per group needed)")
        nn.Conv2d.__init__(self, conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                           padding=conv.padding, dilation=conv.dilation, groups=1, bias=conv.bias is not None,
                           padding_mode=conv.padding_mode, device="meta")
        self.weight = conv.weight
        self.bias = conv.bias
        self._init_quant(act_quant, weight_spec)

    def __setattr__(self, name: str, value: object) -> None:
        if name == "act_quant" and isinstance(value, ActQuantizer):
            value.channel_dim = 1  # conv inputs (N, C, H, W): channels on dim 1, however the quantizer is attached
        super().__setattr__(name, value)

    def forward(self, x: Tensor) -> Tensor:
        y = self._conv_forward(self.quant_input(x), self.current_weight(), self.bias)
        extra = self.branch(x)
        return y if extra is None else y + extra


@dataclass
class QuantConfig:
    """Which modules swap_modules replaces and what they carry.

    weight: the weight grid, stored on each layer as `weight_spec` (the driver quantizes with it; None: not set).
    act: the input activation grid; None attaches no activation quantizer.
    act_kind: "static" (per tensor, calibrated) or "dynamic" (per token). act_factory(name, module), when given,
      builds the activation quantizer instead (e.g. TimeConditionedActQuantizer with a TDQ MLP); it may return None.
    include / skip: patterns on qualified module names; glob (fnmatch, e.g. "*.attn1.*"), or a regex searched in
      the name when prefixed with "re:". A module is swapped if it matches an include and no skip pattern.
    linear / conv: which module types to swap. Grouped convolutions are skipped with a warning.
    rotate: an online input rotation for every swapped Linear (None, or a data-free kind of
      diffptq.quant.rotation: "hadamard"), built from the layer's input width and `rotate_seed`; see
      QuantLayer.set_rotation. Conv2d layers too when `rotate_conv` (off by default: on the bundled UNet rotating
      them raised the W4A4 error). "pca" needs calibration inputs: the sequential driver sets it after the swap.
    """

    weight: QuantSpec | None = None
    act: QuantSpec | None = None
    act_kind: str = "static"
    act_factory: Callable[[str, nn.Module], ActQuantizer | None] | None = None
    include: tuple[str, ...] = ("*",)
    skip: tuple[str, ...] = ()
    linear: bool = True
    conv: bool = True
    rotate: str | None = None
    rotate_seed: int = 0
    rotate_conv: bool = False

    def __post_init__(self) -> None:
        check_choice(self.act_kind, "QuantConfig.act_kind", ACT_KINDS)
        if self.rotate is not None:
            check_choice(self.rotate, "QuantConfig.rotate", ROTATIONS)
            if self.rotate == "pca":
                raise ValueError("QuantConfig.rotate: the pca rotation depends on the calibration inputs; the "
                                 "sequential driver sets it (SequentialConfig.rotate)")


def name_matches(name: str, patterns: tuple[str, ...] | list[str]) -> bool:
    """True if `name` matches any glob pattern, or any "re:"-prefixed regex (re.search)."""
    for p in patterns:
        if p.startswith("re:"):
            if re.search(p[3:], name):
                return True
        elif fnmatch.fnmatchcase(name, p):
            return True
    return False


def _make_act_quant(name: str, module: nn.Module, config: QuantConfig) -> ActQuantizer | None:
    if config.act_factory is not None:
        return config.act_factory(name, module)
    if config.act is None:
        return None
    cls = StaticActQuantizer if config.act_kind == "static" else DynamicActQuantizer
    return cls(config.act)


def swap_modules(model: nn.Module, config: QuantConfig) -> dict[str, QuantLayer]:
    """Replace matching nn.Linear / nn.Conv2d submodules of `model` in place; returns {qualified name: layer}.

    Layers that are already quant layers are returned as they are (swapping twice is a no-op).
    Raises ValueError naming the layer if config.weight's group_size does not divide its input width.
    """
    swapped: dict[str, QuantLayer] = {}
    for name, module in list(model.named_modules()):
        if not name or not name_matches(name, config.include) or name_matches(name, config.skip):
            continue
        if isinstance(module, QuantLayer):
            swapped[name] = module
            continue
        is_linear = config.linear and type(module) is nn.Linear
        is_conv = config.conv and type(module) is nn.Conv2d
        if not (is_linear or is_conv):
            continue
        if is_conv and module.groups != 1:
            log.warning("swap_modules: skipping %s (grouped Conv2d, groups=%d, not supported)", name, module.groups)
            continue
        if config.weight is not None:
            try:
                check_group_size(module.weight[0].numel(), config.weight.group_size)
            except ValueError as e:
                raise ValueError(f"{name}: {e}") from None
        act = _make_act_quant(name, module, config)
        if act is not None:
            act.to(module.weight.device)
        new = QuantLinear(module, act, config.weight) if is_linear else QuantConv2d(module, act, config.weight)
        if config.rotate is not None:
            rotate_layers({name: new}, config.rotate, config.rotate_seed, config.rotate_conv)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
        swapped[name] = new
    return swapped


def rotate_layers(layers: dict[str, QuantLayer], kind: str, seed: int = 0, conv: bool = False) -> None:
    """Give each not yet quantized QuantLinear (and QuantConv2d when `conv`) the rotation `kind` of its input width
    (one R per width and seed). Raises ValueError naming a layer that is already quantized (its codes were made
    without the rotation)."""
    for name, layer in layers.items():
        if isinstance(layer, QuantConv2d) and not conv:
            continue
        if layer.is_quantized:
            raise ValueError(f"{name}: rotate before quantizing (the layer already holds codes)")
        layer.set_rotation(make_rotation(kind, layer.weight.shape[1], seed))


def quant_layers(model: nn.Module) -> Iterator[tuple[str, QuantLayer]]:
    """(name, layer) for every quant layer in `model`."""
    for name, m in model.named_modules():
        if isinstance(m, QuantLayer):
            yield name, m


def set_quant_enabled(model: nn.Module, weights: bool | None = None, acts: bool | None = None) -> None:
    """Switch quantized weights and/or activation quantizers of every quant layer (None: leave as is)."""
    for _, layer in quant_layers(model):
        if weights is not None:
            layer.quant_weight = weights
        if acts is not None and layer.act_quant is not None:
            layer.act_quant.enabled = acts


@contextmanager
def float_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Run `model` as the float model (float weights, no activation quantization); restores the switches after."""
    saved = [(layer, layer.quant_weight, layer.act_quant.enabled if layer.act_quant is not None else None)
             for _, layer in quant_layers(model)]
    set_quant_enabled(model, weights=False, acts=False)
    try:
        yield model
    finally:
        for layer, w, a in saved:
            layer.quant_weight = w
            if a is not None:
                layer.act_quant.enabled = a
