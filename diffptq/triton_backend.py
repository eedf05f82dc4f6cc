"""The auto | eager | triton choice of the package's optional Triton kernels (GPTQ sweep, fused fake-quant).

Each kernel has one TritonBackend: its environment variable (or an explicit argument) asks for "auto" (default),
"eager" or "triton". "auto" takes the kernel where the caller says it is usable and Triton imports, and, once the
kernel has failed to build or run, stays eager for good (one warning). "triton" forces the kernel: it raises when
Triton is not installed, and a failing kernel raises instead of falling back.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable

log = logging.getLogger(__name__)
BACKENDS = ("auto", "eager", "triton")


class TritonBackend:
    """Backend choice and fall-back state of one kernel.

    env_var: the variable read when no explicit backend is given; what: the kernel's name in messages;
    available: whether Triton imported (called each time, so tests may patch the module's `triton`).
    `broken` holds the first failure under "auto" (None while the kernel works).
    """

    def __init__(self, env_var: str, what: str, available: Callable[[], bool]):
        self.env_var, self.what, self.available = env_var, what, available
        self.broken: str | None = None

    def requested(self, backend: str | None = None) -> str:
        """The backend asked for (argument, else the environment variable, else "auto"), validated."""
        name = backend or os.environ.get(self.env_var, "auto")
        if name not in BACKENDS:
            raise ValueError(f"{self.what} backend ({self.env_var}) must be one of {BACKENDS}, got {name!r}")
        if name == "triton" and not self.available():
            raise RuntimeError(f"{self.what}: backend 'triton' requested ({self.env_var}) but Triton is not installed")
        return name

    def choose(self, usable: bool, backend: str | None = None) -> str:
        """"triton" or "eager". usable: whether the kernel takes this call's inputs (device, sizes), for "auto"."""
        name = self.requested(backend)
        if name == "auto":
            return "triton" if usable and self.broken is None and self.available() else "eager"
        return name

    def fall_back(self, err: Exception, backend: str | None = None) -> None:
        """Called with the kernel's exception: re-raises it when the kernel was forced, else records it and warns
        once; the caller then takes its eager path."""
        if self.requested(backend) == "triton":
            raise err
        self.broken = f"{type(err).__name__}: {err}"
        log.warning("%s failed (%s); using the eager path from now on", self.what, self.broken)
