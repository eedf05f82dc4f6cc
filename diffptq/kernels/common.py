"""Helpers shared by the inference modules: buffers that keep their dtype, profiler scopes, module replacement."""
from __future__ import annotations

import contextlib

import torch
from torch import nn

_SCOPES = {"enabled": False}


def set_profile_scopes(enabled: bool) -> None:
    """Turn on/off the `diffptq::…` profiler ranges the inference modules open in eager mode (off by default: a
    range costs ~1 µs of CPU per call). Under torch.compile they are never opened (no graph break)."""
    _SCOPES["enabled"] = bool(enabled)


def profile_scope(name: str) -> contextlib.AbstractContextManager:
    """A torch.profiler range named `name` when scopes are on and the code is not being compiled, else a no-op
    (a plain nullcontext, which torch.compile traces on every version, unlike generator context managers)."""
    # is_compiling() first: under torch.compile the flag is then never read, so no guard (and no recompilation
    # when profiling switches it on)
    if not torch.compiler.is_compiling() and _SCOPES["enabled"]:
        return torch.profiler.record_function(name)
    return contextlib.nullcontext()


class KeepDtypeBuffers(nn.Module):
    """nn.Module whose buffers named in `_keep_dtype` follow device moves but never dtype casts.

    `model.to(torch.bfloat16)` / `.half()` cast every floating tensor, float8 codes and fp16/fp32 scales included;
    these modules hold such tensors as storage formats (e4m3 weights, fp32 scales that torch._scaled_mm requires),
    so a cast would silently change their numerics. Other parameters and buffers (the bias) cast as usual.
    """

    _keep_dtype: tuple[str, ...] = ()

    def _apply(self, fn, recurse=True):
        held = {k: self._buffers[k] for k in self._keep_dtype if self._buffers.get(k) is not None}
        for k in held:
            self._buffers[k] = None
        try:
            super()._apply(fn, recurse)
        finally:
            for k, buf in held.items():
                # the device the module moved to: apply fn to an empty probe and keep only its device
                device = fn(torch.empty(0, dtype=buf.dtype, device=buf.device)).device
                self._buffers[k] = buf.to(device)
        return self


def replace_module(root: nn.Module, name: str, new: nn.Module) -> None:
    """Put `new` at the qualified `name` inside `root` (in place)."""
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)


def frozen_parameter(t: torch.Tensor | None) -> nn.Parameter | None:
    """A detached, non-trainable nn.Parameter of `t` (None passes through): biases of the inference modules."""
    return None if t is None else nn.Parameter(t.detach(), requires_grad=False)
