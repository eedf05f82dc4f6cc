"""Activation quantizers: nn.Modules whose forward returns fake-quantized x (straight-through gradient).

All share `ActQuantizer`: a QuantSpec (no groups), an `enabled` switch (False: identity) and `channel_dim`, the
dimension holding features: -1 for Linear inputs (..., in), 1 for Conv2d inputs (N, C, H, W) (QuantConv2d sets it).
Per-token means one scale per position over the channel dimension (per spatial position for convs).
"""
from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor, nn

from diffptq.quant.quantizer import MIN_SCALE, QuantSpec, fake_quant, fit_rows, params_from_range


class ActQuantizer(nn.Module):
    """Base class: subclasses implement `params(x) -> (scale, zero)` broadcastable to x."""

    def __init__(self, spec: QuantSpec, channel_dim: int = -1):
        super().__init__()
        if spec.group_size is not None:
            raise ValueError(f"activation quantizers take no group_size, got {spec.group_size}")
        self.spec = spec
        self.channel_dim = channel_dim
        self.enabled = True

    def params(self, x: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        if not self.enabled:
            return x
        scale, zero = self.params(x)
        return fake_quant(x, scale, zero, self.spec)

    def extra_repr(self) -> str:
        s = self.spec
        return f"bits={s.bits}, symmetric={s.symmetric}, method={s.scale_method}, enabled={self.enabled}"


class StaticActQuantizer(ActQuantizer):
    """One scale (and zero) per tensor, fitted on observed batches.

    Calibrate: `start_calibration()`, run batches (forward observes and returns x unchanged), `finish_calibration()`;
    or call `observe(x)` directly. min-max uses the exact running range; "mse" searches clipping ratios on a random
    sample of at most `max_samples` observed values (each batch's extremes always kept), drawn by the quantizer's own
    generator (reseeded at start_calibration): quantizers that observe the same tensors get the same scale and zero
    (q/k/v reading one input can then share one fused FP8 GEMM), whatever the global RNG did in between.
    Buffers `scale`, `zero` (shape (1,)) are saved in state dicts; loading them marks the quantizer calibrated.
    """

    def __init__(self, spec: QuantSpec, channel_dim: int = -1, max_samples: int = 1 << 20):
        super().__init__(spec, channel_dim)
        self.max_samples = max_samples
        self.register_buffer("scale", torch.ones(1))
        self.register_buffer("zero", torch.zeros(1))
        self.calibrated = False
        self.calibrating = False
        self._reset_stats()
        self.register_load_state_dict_post_hook(lambda module, keys: setattr(module, "calibrated", True))

    def _reset_stats(self) -> None:
        self._gen: torch.Generator | None = None
        self._min: Tensor | None = None
        self._max: Tensor | None = None
        self._samples: list[Tensor] = []
        self._n_samples = 0

    def start_calibration(self) -> None:
        self._reset_stats()
        self.calibrating = True

    def _generator(self, like: Tensor) -> torch.Generator:
        if self._gen is None or self._gen.device != like.device:
            self._gen = torch.Generator(device=like.device).manual_seed(0)
        return self._gen

    @torch.no_grad()
    def observe(self, x: Tensor) -> None:
        """Update the running range (and the MSE sample) with a batch x of any shape."""
        flat = x.detach().reshape(-1).float()
        if flat.numel() == 0:
            return
        lo, hi = flat.min(), flat.max()
        self._min = lo if self._min is None else torch.minimum(self._min, lo)
        self._max = hi if self._max is None else torch.maximum(self._max, hi)
        if self.spec.scale_method == "mse":
            budget = max(self.max_samples // 16, 1)
            if flat.numel() > budget:
                idx = torch.randint(flat.numel(), (budget,), device=flat.device, generator=self._generator(flat))
                flat = torch.cat([flat[idx], lo.reshape(1), hi.reshape(1)])
            self._samples.append(flat)
            self._n_samples += flat.numel()
            if self._n_samples > self.max_samples:  # thin out uniformly, keeping the global extremes
                allv = torch.cat(self._samples)
                keep = allv[torch.randint(allv.numel(), (self.max_samples // 2,), device=allv.device,
                                          generator=self._generator(allv))]
                self._samples = [keep, self._min.reshape(1), self._max.reshape(1)]
                self._n_samples = sum(t.numel() for t in self._samples)

    @torch.no_grad()
    def finish_calibration(self) -> None:
        """Fit scale/zero from what was observed; raises if nothing was."""
        self.calibrating = False
        if self._min is None:
            raise RuntimeError("StaticActQuantizer.finish_calibration: no batch was observed")
        if self.spec.scale_method == "mse":
            scale, zero = fit_rows(torch.cat(self._samples).reshape(1, -1), self.spec)
        else:
            scale, zero = params_from_range(self._min, self._max, self.spec)
        self.scale.copy_(scale.reshape(1))
        self.zero.copy_(zero.reshape(1))
        self.calibrated = True
        self._reset_stats()

    def params(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if not self.calibrated:
            raise RuntimeError("StaticActQuantizer used before calibration: observe batches, then finish_calibration")
        return self.scale, self.zero

    def forward(self, x: Tensor) -> Tensor:
        if self.calibrating:
            self.observe(x)
            return x
        return super().forward(x)


class DynamicActQuantizer(ActQuantizer):
    """Per-token scale computed on the fly from each position's absmax (symmetric) or min/max over channels."""

    def params(self, x: Tensor) -> tuple[Tensor, Tensor]:
        xd = x.detach()  # keepdim shapes broadcast against x whichever dim holds the channels
        lo, hi = xd.amin(dim=self.channel_dim, keepdim=True), xd.amax(dim=self.channel_dim, keepdim=True)
        return params_from_range(lo, hi, self.spec)


KEEP_BITS = 8  # the bit width of the leading channels a LeadingActQuantizer keeps


class LeadingActQuantizer(ActQuantizer):
    """The first `keep` of `width` input channels on a KEEP_BITS-bit grid, the other channels on `rest`'s grid.

    For inputs rotated into a PCA basis (diffptq.quant.rotation.PcaRotation) those channels are the leading principal
    components, which carry most of the energy. `rest` is a StaticActQuantizer or DynamicActQuantizer; the leading
    channels get a quantizer of the same kind (one more per-tensor scale, or per-token scales of their own), so each
    part is fitted on its own channels only. keep = width quantizes everything at KEEP_BITS bits. `spec` is rest's.
    Static parts calibrate together (start_calibration / finish_calibration); a state dict holds `lead.*` and
    `rest.*`.
    """

    def __init__(self, rest: ActQuantizer, keep: int, width: int):
        if type(rest) not in (StaticActQuantizer, DynamicActQuantizer):
            raise ValueError(f"leading channels at {KEEP_BITS} bits: static or dynamic quantizers, not "
                             f"{type(rest).__name__}")
        if not 0 < keep <= width:
            raise ValueError(f"keep must lie in 1..{width} (the input width), got {keep}")
        super().__init__(rest.spec, rest.channel_dim)
        self.enabled, rest.enabled = rest.enabled, True  # the switch is this one's; the parts always run
        self.rest = rest
        self.lead = type(rest)(replace(rest.spec, bits=KEEP_BITS), rest.channel_dim)
        self.keep, self.width = keep, width

    def __setattr__(self, name: str, value: object) -> None:
        super().__setattr__(name, value)
        if name == "channel_dim" and "rest" in self._modules:  # both parts follow (QuantConv2d sets it)
            self.rest.channel_dim = self.lead.channel_dim = value

    def _parts(self) -> list[ActQuantizer]:
        return [self.lead] if self.keep >= self.width else [self.lead, self.rest]

    def start_calibration(self) -> None:
        for part in self._parts():
            if isinstance(part, StaticActQuantizer):
                part.start_calibration()

    def finish_calibration(self) -> None:
        for part in self._parts():
            if isinstance(part, StaticActQuantizer):
                part.finish_calibration()

    def forward(self, x: Tensor) -> Tensor:
        if not self.enabled:
            return x
        dim = self.channel_dim % x.dim()
        if x.shape[dim] != self.width:
            raise ValueError(f"LeadingActQuantizer for {self.width} channels given {x.shape[dim]}")
        if self.keep >= self.width:
            return self.lead(x)
        return torch.cat([self.lead(x.narrow(dim, 0, self.keep)),
                          self.rest(x.narrow(dim, self.keep, self.width - self.keep))], dim=dim)

    def extra_repr(self) -> str:
        return f"keep={self.keep} of {self.width} at {KEEP_BITS} bits, enabled={self.enabled}"


def keep_leading(aq: ActQuantizer | None, keep: int, width: int) -> ActQuantizer | None:
    """`aq` with its first min(keep, width) channels at KEEP_BITS bits (a LeadingActQuantizer); aq itself when keep is
    0 or there is no quantizer."""
    if aq is None or keep <= 0:
        return aq
    return LeadingActQuantizer(aq, min(keep, width), width)


def needs_calibration(aq: ActQuantizer | None) -> bool:
    """Whether `aq` is fitted on observed batches (start_calibration, forward passes, finish_calibration): static
    quantizers, leading-channel ones with static parts, and any other kind with start_calibration (e.g. TDQ)."""
    if isinstance(aq, LeadingActQuantizer):
        return isinstance(aq.rest, StaticActQuantizer)
    return hasattr(aq, "start_calibration")


def same_quantization(a: ActQuantizer, b: ActQuantizer) -> bool:
    """True if a and b (when on) map every input to the same output: one class, grid and channel dim, and either
    dynamic per token, or static, calibrated (not calibrating), with equal scale and zero, or leading-channel
    quantizers with equal keep and parts. Any other kind (e.g. time-conditioned): False."""
    if type(a) is not type(b) or a.spec != b.spec or a.channel_dim != b.channel_dim:
        return False
    if type(a) is LeadingActQuantizer:
        return (a.keep, a.width) == (b.keep, b.width) and all(
            same_quantization(pa, pb) for pa, pb in zip(a._parts(), b._parts()))
    if type(a) is DynamicActQuantizer:
        return True
    return (type(a) is StaticActQuantizer and a.calibrated and b.calibrated and not a.calibrating
            and not b.calibrating and torch.equal(a.scale, b.scale) and torch.equal(a.zero, b.zero))


class TimeConditionedActQuantizer(ActQuantizer):
    """Per-tensor scale predicted from a condition (timestep, log-SNR, ...), cached per sampling step.

    scale_fn: nn.Module mapping a condition tensor (1,) to a positive scale (1,) (e.g. the TDQ MLP).
    zero_fn: for asymmetric specs (required there), maps (condition, predicted scale), both (1,) or (B,), to integer
    zero points of the same shape (e.g. the TDQ offset model); symmetric specs have zero 0.
    `set_condition(c)` evaluates scale_fn once (in the ambient grad mode) and caches the scale; forward reuses it.
    c may also be a 1-D tensor (B,) of per-sample conditions (mixed-timestep calibration batches): scale_fn runs
    once per distinct value and the scales broadcast over x's first dimension, which must then be B.
    Using the quantizer before any condition is set raises RuntimeError (there is no silent static fallback).
    """

    def __init__(self, spec: QuantSpec, scale_fn: nn.Module, channel_dim: int = -1, zero_fn: nn.Module | None = None):
        if not spec.symmetric and zero_fn is None:
            raise ValueError("TimeConditionedActQuantizer: an asymmetric spec needs zero_fn (symmetric specs do not)")
        super().__init__(spec, channel_dim)
        self.scale_fn = scale_fn
        self.zero_fn = zero_fn
        self._scale: Tensor | None = None
        self._zero: Tensor | None = None
        self._per_sample = False

    def _cond_tensor(self, c: Tensor | float) -> Tensor:
        p = next(self.scale_fn.parameters(), None)
        kw = {"device": p.device, "dtype": p.dtype} if p is not None else {"dtype": torch.float32}
        return torch.as_tensor(c, **kw)

    def set_condition(self, c: float | Tensor) -> None:
        """Compute and cache the scale for condition c (float, or a (B,) tensor of per-sample conditions)."""
        ct = self._cond_tensor(c)
        if ct.numel() == 1:
            self._scale, self._per_sample = self._predict(ct.reshape(1)), False
        else:
            values, inverse = torch.unique(ct.reshape(-1), return_inverse=True)
            scales = torch.cat([self._predict(v.reshape(1)) for v in values])
            self._scale, self._per_sample = scales[inverse], True
        zero_fn = self.zero_fn
        if zero_fn is None:
            self._zero = torch.zeros_like(self._scale)
        else:
            self._zero = zero_fn(ct.reshape(-1), self._scale.detach()).float().reshape(self._scale.shape)

    def _predict(self, c: Tensor) -> Tensor:
        return self.scale_fn(c).reshape(1).float().clamp_min(MIN_SCALE)

    def clear_condition(self) -> None:
        self._scale = None

    def params(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if self._scale is None:
            raise RuntimeError("TimeConditionedActQuantizer: call set_condition(c) before the forward pass")
        scale = self._scale
        if self._per_sample:
            if x.shape[0] != scale.shape[0]:
                raise ValueError(f"{scale.shape[0]} per-sample conditions for a batch of {x.shape[0]}")
            scale = scale.reshape(-1, *([1] * (x.dim() - 1)))
        return scale, self._zero.reshape(scale.shape)
