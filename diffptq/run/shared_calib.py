"""The pipeline with another denoiser in place of its own, and the calibration set that the benchmark's quantized
variants (ours and the peers') share, collected once from the float model."""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

from torch import nn

from diffptq.models import family_of
from diffptq.quant.layers import quant_layers

log = logging.getLogger("diffptq.benchmark")


@contextlib.contextmanager
def swapped_denoiser(pipe, denoiser: nn.Module) -> Iterator[nn.Module]:
    """Run `pipe` with `denoiser` in place of its own; the original is put back afterwards.

    A denoiser with TDQ activation quantizers (from a TDQ checkpoint) gets the per-step condition hook while in
    place, as diffptq.io.load_quantized gives it.
    """
    attr = family_of(pipe).denoiser_attr
    original = getattr(pipe, attr)
    setattr(pipe, attr, denoiser)
    tdq = any(getattr(layer.act_quant, "checkpoint_kind", None) == "tdq" for _, layer in quant_layers(denoiser))
    if tdq:
        from diffptq.tdq.inference import attach_tdq

        attach_tdq(pipe)
    try:
        yield denoiser
    finally:
        if tdq:
            from diffptq.tdq.inference import detach_tdq

            detach_tdq(pipe)
        setattr(pipe, attr, original)


class SharedCalibration:
    """The calibration set, collected from the float pipeline on first use and shared by all quantized variants."""

    def __init__(self, pipe, calib_cfg, progress: bool) -> None:
        self.pipe, self.cfg, self.progress, self._set = pipe, calib_cfg, progress, None

    def get(self, float_denoiser: nn.Module | None = None):
        """The set; collecting it runs the pipeline with `float_denoiser` (a float copy on the pipeline's device) in
        place of its own when given (the benchmark moves its own off the device while a variant runs)."""
        if self._set is None:
            from diffptq.data.calib import calibration_set

            with contextlib.nullcontext() if float_denoiser is None else swapped_denoiser(self.pipe, float_denoiser):
                self._set, seconds = calibration_set(self.pipe, self.cfg, self.progress)
            log.info("calibration set: %d records in %.1f s", len(self._set), seconds)
        return self._set
