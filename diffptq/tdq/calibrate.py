"""TDQ calibration of a whole pipeline: ``calibrate_tdq_pipeline`` quantizes a denoiser with ``TdqActQuantizer``s.

It runs the block-by-block driver (``diffptq.algo.driver``): each block's TDQ activation quantizers are fitted on the
quantized stream (the driver's ``before_record`` hands them the condition c of each record's timestep), optionally
refined end to end on the block's output error (``refine_steps``), then the block's weights are quantized (RTN |
GPTQ | Qronos) with H seen through them. It leaves the condition hook (``inference.attach_tdq``) on the pipeline, so
``pipe(...)`` runs with per-step scales. The quantizer itself: ``tdq.quantizer``.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace

import torch
from torch import nn

from diffptq.algo.driver import SequentialQuantizer, denoiser_output_error
from diffptq.algo.driver.passes import quant_mode
from diffptq.config import SequentialConfig, TdqConfig
from diffptq.data.calib import CalibrationSet, CalibRecord
from diffptq.errors import ConfigError
from diffptq.models.families import family_of
from diffptq.quant.layers import QuantLayer

from .inference import attach_tdq
from .quantizer import TdqActQuantizer
from .schedule import ConditionFn, make_condition_fn


def set_record_condition(quantizers: list[TdqActQuantizer], condition_fn: ConditionFn, record: CalibRecord) -> None:
    """The driver's ``before_record``: the record's timestep → c → every quantizer."""
    c = float(condition_fn(record.timestep)[0])
    for q in quantizers:
        q.set_condition(c)


# ---- end-to-end refinement ------------------------------------------------------------------------------------
class TdqSequentialQuantizer(SequentialQuantizer):
    """The sequential driver, plus optional end-to-end refinement of each block's TDQ MLPs after their fit.

    Refinement: ``refine_steps`` Adam steps (lr ``refine_lr``), one calibration record per step (cycling), on
    ‖block_q(x̃) − block(x)‖² / ‖block(x)‖²: the block run on the quantized stream with its activation quantizers on
    (weights still float, as when they were fitted) against the float block on the float stream. The LSQ gradient of
    ``fake_quant`` reaches each MLP's parameters through its predicted scale.
    """

    def __init__(self, *args, refine_steps: int = 0, refine_lr: float = 1e-3, **kwargs):
        super().__init__(*args, **kwargs)
        self.refine_steps, self.refine_lr = refine_steps, refine_lr
        self.refine_loss: dict[int, tuple[float, float]] = {}  # block → (first, last) loss

    def calibrate_acts(self, k: int, layers: dict[str, QuantLayer]) -> None:
        """Fit the block's activation quantizers on every record, held-out ones included: the records are
        batch-major, step-minor, so the driver's every-n-th holdout drops whole sampling steps (e.g. the last one,
        the cleanest) from every trajectory, and TDQ would never see those conditions. Weights still hold them out."""
        train = self.train
        self.train = list(range(len(self.calib)))
        try:
            super().calibrate_acts(k, layers)
        finally:
            self.train = train
        if self.refine_steps > 0:
            quantizers = [m.act_quant for m in layers.values() if isinstance(m.act_quant, TdqActQuantizer)]
            if quantizers:
                with self.timer("refine"):
                    self.refine_block(k, quantizers)

    def refine_block(self, k: int, quantizers: list[TdqActQuantizer]) -> None:
        params = [p for q in quantizers for p in q.scale_fn.parameters()]  # the zero follows the refined scale
        opt = torch.optim.Adam(params, lr=self.refine_lr)
        cache, runner = self.cache, self.runner
        targets = {}
        with torch.no_grad():
            for i in self.train:
                targets[i] = cache.store(runner.block_pass(k, self.fp[i], cache.load_ctx(i), quant=False)[0])
        losses = []
        for step in range(self.refine_steps):
            i = self.train[step % len(self.train)]
            with torch.enable_grad(), quant_mode(self.den):
                ctx = cache.load_ctx(i)  # sets the conditions with grad on: scales stay differentiable
                out = runner.run(k, self.q[i], ctx)[0].float()
                ref = cache.to_dev(targets[i]).float()
                loss = (out - ref).pow(2).sum() / ref.pow(2).sum().clamp_min(1e-30)
                grads = torch.autograd.grad(loss, params, allow_unused=True)  # the MLPs only, not the weights
            for p, g in zip(params, grads, strict=True):
                p.grad = g
            opt.step()
            losses.append(float(loss.detach()))
        for q in quantizers:
            q.clear_cache()
        self.refine_loss[k] = (losses[0], losses[-1])


# ---- the whole calibration ------------------------------------------------------------------------------------
@dataclass
class TdqCalibration:
    """What ``calibrate_tdq_pipeline`` returns; the pipeline itself is quantized in place (hook attached).

    quantizers: {layer name: TdqActQuantizer}; condition_fn: the calibration's t → c; refine_loss: block → (first,
    last). ``layer_rows()`` gives one row per layer (weights report + fit summary).
    """

    result: object  # algo.driver.SequentialResult
    calib: CalibrationSet
    condition_fn: ConditionFn
    quantizers: dict[str, TdqActQuantizer]
    collect_time_s: float | None  # recording ``calib`` (set by the caller that recorded it)
    calib_time_s: float
    final_err_per_step: dict[int, float]
    refine_loss: dict[int, tuple[float, float]]

    def layer_rows(self) -> list[dict]:
        rows = []
        for r in self.result.layers:
            q = self.quantizers.get(r.layer)
            fit = (q.fit_summary or {}) if q is not None else {}
            rows.append({"block": r.block, "layer": r.layer, "method": r.method, "wbits": r.wbits, "abits": r.abits,
                         "rel_out_err": None if math.isnan(r.rel_out_err) else r.rel_out_err, **fit})
        return rows


def calibrate_tdq_pipeline(pipe, cfg: TdqConfig, seq: SequentialConfig, calib: CalibrationSet,
                           device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                           progress: bool = True) -> TdqCalibration:
    """Quantize ``pipe``'s denoiser in place with TDQ activations (see module doc) and attach the condition hook.

    cfg: the TDQ settings; seq: the weights (method, grid, damping, blocks, held-out records) and, in ``seq.act``,
    the activation bits (TDQ sets the grid's symmetry and scale search from cfg). calib: the float pipeline's
    recorded trajectories on the scheduler whose conditions the quantizers learn (diffptq.data.calib; one set may
    serve several calibrations, e.g. the three conditions).
    """
    if seq.act is None:
        raise ConfigError("TDQ quantizes activations: give activation bits 2..8, not float activations")
    family = family_of(pipe)
    denoiser = family.denoiser(pipe)
    condition_fn = make_condition_fn(cfg.condition, pipe.scheduler)
    act_spec = replace(seq.act, symmetric=cfg.act_symmetric, scale_method=cfg.act_scale_method)
    quantizers: dict[str, TdqActQuantizer] = {}

    def act_factory(name: str, module: nn.Module) -> TdqActQuantizer:
        channel_dim = 1 if isinstance(module, nn.Conv2d) else -1
        quantizers[name] = TdqActQuantizer(act_spec, condition_fn.to_config(), cfg.fit, channel_dim,
                                           extrapolate=cfg.extrapolate)
        return quantizers[name]

    def before_record(record: CalibRecord) -> None:
        set_record_condition(list(quantizers.values()), condition_fn, record)

    # refinement targets whole blocks, so the driver runs whole blocks
    seq = replace(seq, act=act_spec, act_factory=act_factory, before_record=before_record, granularity="block")
    t0 = time.perf_counter()
    driver = TdqSequentialQuantizer(denoiser, family, calib, seq, device, dtype, progress=progress,
                                    refine_steps=cfg.refine_steps, refine_lr=cfg.refine_lr)
    result = driver.run()
    calib_s = time.perf_counter() - t0
    attach_tdq(pipe)
    _, held = calib.split(seq.holdout_every)
    final = denoiser_output_error(denoiser, held if len(held) else calib, device, dtype)
    return TdqCalibration(result, calib, condition_fn, quantizers, None, calib_s, final, driver.refine_loss)
