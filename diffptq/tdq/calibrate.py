"""TDQ calibration: a time-conditioned activation quantizer that calibrates itself on the sequential driver's stream.

``TdqActQuantizer`` is the one code path for the three conditions static | timestep | logsnr (``schedule``): the
driver's ``before_record`` hands every quantizer the normalised condition c of the record's timestep
(``set_condition``); while calibrating, forward records a subsample of its input under that c and returns x unchanged;
``finish_calibration`` runs ``fit.fit_tdq`` (per-condition MSE-optimal scales → ScaleMLP initialised at the static
scale) and installs the MLP; on an asymmetric grid also a second MLP for the zero point's offset (``OffsetZero``).
``static`` has one condition (c = 0) and so one scale: the static baseline is the same fit with a constant condition.

``calibrate_tdq_pipeline`` runs it all through the block-by-block driver (``algo.driver``): activation
quantizers fitted per block on the quantized stream, optionally refined end to end on the block's output error
(``refine_steps``), then the block's weights quantized (RTN | GPTQ | Qronos) with H seen through them. It leaves the
condition hook (``inference.attach_tdq``) on the pipeline, so ``pipe(...)`` runs with per-step scales.
"""
from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor, nn

from diffptq.algo.driver import SequentialConfig, SequentialQuantizer, denoiser_output_error
from diffptq.algo.driver.passes import quant_mode
from diffptq.data.calib import CalibrationSet, CalibRecord, collect_calibration
from diffptq.data.prompts import load_prompts
from diffptq.models.families import family_of
from diffptq.quant.act import TimeConditionedActQuantizer
from diffptq.quant.layers import QuantLayer
from diffptq.quant.quantizer import QuantSpec

from .fit import TdqFit, TdqFitConfig, collect_samples, evaluate_scales, fit_tdq, predict_scales, train_scale_mlp
from .scale_mlp import ScaleMLP
from .schedule import ConditionFn, ConditionKind, make_condition_fn

CONDITIONS: tuple[ConditionKind, ...] = ("static", "timestep", "logsnr")
_CACHE_LIMIT = 4096


class OffsetZero(nn.Module):
    """Zero point of an asymmetric grid from the condition: z(c) = clamp(round(p(c) / s(c)), qmin, qmax).

    p(c) > 0 (``offset_fn``, a ScaleMLP) is the magnitude of the clipping floor −s·z, in activation units. It starts
    at the best constant p of ``fit.fit_zero_rule``'s ``offset`` rule and is trained on the per-condition optima's
    s_c·z_c, so the floor can move with the condition independently of the scale (DiT blocks: the adaLN shift
    moves the inputs' offset with t). Floors below s/4 round to z = 0 (non-negative inputs).
    """

    def __init__(self, spec: QuantSpec, offset_fn: ScaleMLP):
        super().__init__()
        self.spec = spec
        self.offset_fn = offset_fn

    def forward(self, c: Tensor, scale: Tensor) -> Tensor:
        """c, scale: (1,) or (B,) → zero points, float32 integers of scale's shape."""
        p = self.offset_fn(c.reshape(-1)).reshape(scale.shape).float()
        return torch.round(p / scale.float()).clamp(self.spec.qmin, self.spec.qmax)


@contextmanager
def _single_thread() -> Iterator[None]:
    """One intra-op thread: the fit's tensors are small, and thread hand-offs cost 10× the work on a busy CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _offset_targets(scales: Tensor, zeros: Tensor) -> Tensor:
    """Per-condition floors p_c = s_c·z_c, at least s_c/4 (positive for the log-space fit, still rounding to 0)."""
    return torch.maximum(scales * zeros, scales / 4)


def fit_tdq_quantizer(samples: dict[float, list[Tensor]], spec: QuantSpec,
                      cfg: TdqFitConfig) -> tuple[TdqFit, list[ScaleMLP]]:
    """``fit.fit_tdq`` for one quantizer, with the zero point's offset learnt alongside the scale (asymmetric grids).

    One ScaleMLP with n_out = 1 (symmetric: the scale) or 2 (scale, offset floor p), initialised at the static scale
    (and the best constant floor of the ``offset`` rule), trained on the per-condition optima (not at all when there
    is a single condition: it already sits on it), then split into standalone heads. Returns the TdqFit (its
    mlp/mlp_scales/mlp_mse/losses those of the trained heads) and the heads [scale] or [scale, offset].
    """
    fit = fit_tdq(samples, spec, replace(cfg, zero_rule="offset", steps=0))
    init, targets = [fit.static_scale], [fit.opt_scales]
    if not spec.symmetric:
        init.append(max(fit.zero_param, fit.static_scale / 4))
        targets.append(_offset_targets(fit.opt_scales, fit.opt_zeros))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        mlp = ScaleMLP(init, cfg.n_freqs, cfg.hidden, cfg.depth, cfg.act)
    steps = cfg.steps if fit.conds.numel() > 1 else 0
    losses = train_scale_mlp(mlp, fit.conds, torch.stack(targets, 1), steps, cfg.lr)
    heads = mlp.split() if mlp.n_out > 1 else [mlp]
    with torch.no_grad():
        scales = predict_scales(heads[0], fit.conds)
        zeros = OffsetZero(spec, heads[1])(fit.conds, scales) if not spec.symmetric else torch.zeros_like(scales)
        _, xs = collect_samples(samples, cfg.max_per_condition, cfg.seed)
        mse = evaluate_scales(xs, scales, zeros, spec)
    return replace(fit, mlp=heads[0], mlp_scales=scales, mlp_mse=mse, losses=losses), heads


class TdqActQuantizer(TimeConditionedActQuantizer):
    """Per-tensor activation quantizer whose scale is a ScaleMLP of the condition, calibrated by the driver.

    condition: ``ConditionFn.to_config()`` of the calibration ({kind, bounds, clamp}), kept for the checkpoint and
    the inference hook. fit_cfg: sample budget, MLP shape and training (``fit.TdqFitConfig``); mlp_config: the MLP
    shape when rebuilding from a checkpoint (``ScaleMLP.config()``), else taken from fit_cfg; offset_mlp_config: the
    same for the zero point's offset MLP (asymmetric grids, ``OffsetZero``). extrapolate: beyond the calibrated
    conditions, ``clamp`` holds the scale of the nearest calibrated one (c clipped to ``cond_range``, set by the fit),
    ``mlp`` evaluates the MLP there (its Fourier features continue periodically: measured to go wild).
    Calibrate: ``start_calibration()``, ``set_condition(c)`` + forward per record (observes, returns x),
    ``finish_calibration()``. Afterwards ``fit`` holds the ``TdqFit`` (per-condition optima, errors).
    At inference the scale of each condition value is cached (outside autograd): one MLP call per step and value.
    """

    checkpoint_kind = "tdq"

    def __init__(self, spec: QuantSpec, condition: dict, fit_cfg: TdqFitConfig | None = None, channel_dim: int = -1,
                 mlp_config: dict | None = None, offset_mlp_config: dict | None = None, extrapolate: str = "clamp",
                 cond_range: list[float] | None = None):
        if extrapolate not in ("clamp", "mlp"):
            raise ValueError(f"extrapolate must be clamp or mlp, got {extrapolate!r}")
        fit_cfg = fit_cfg or TdqFitConfig()
        shape = dict(mlp_config) if mlp_config else {"n_out": 1, "n_freqs": fit_cfg.n_freqs, "hidden": fit_cfg.hidden,
                                                     "depth": fit_cfg.depth, "act": fit_cfg.act, "relative": True}
        zero_fn = None if spec.symmetric else OffsetZero(spec, ScaleMLP.from_config(offset_mlp_config or shape))
        super().__init__(spec, ScaleMLP.from_config(shape), channel_dim, zero_fn)
        self.fit_cfg = fit_cfg
        self.condition = dict(condition)
        self.extrapolate = extrapolate
        self.cond_range = None if cond_range is None else [float(cond_range[0]), float(cond_range[1])]
        self.calibrated = False
        self.calibrating = False
        self.current_condition: float | Tensor | None = None
        self.fit: TdqFit | None = None
        self.fit_summary: dict[str, float] | None = None
        self._samples: dict[float, list[Tensor]] = defaultdict(list)
        self._cache: dict[float, tuple[Tensor, Tensor]] = {}
        self.register_load_state_dict_post_hook(lambda module, keys: module._loaded())

    def _loaded(self) -> None:
        self.calibrated = True
        self._cache.clear()

    # ---- conditions -----------------------------------------------------------------------------------------
    def _cond_tensor(self, c: Tensor | float) -> Tensor:
        ct = super()._cond_tensor(c)
        return ct if self.cond_range is None else ct.clamp(*self.cond_range)

    def set_condition(self, c: float | Tensor) -> None:
        """Remember c (float, or (B,) per-sample); once calibrated, also compute and cache the scale for it."""
        self.current_condition = c
        if self.calibrating or not self.calibrated:
            return  # no trained MLP yet: forward only observes
        if isinstance(c, Tensor) and c.numel() == 1:
            c = float(c)
        if not isinstance(c, float | int) or torch.is_grad_enabled():
            super().set_condition(c)  # per-sample, or a differentiable scale (end-to-end refinement)
            return
        hit = self._cache.get(float(c))
        if hit is None:
            super().set_condition(float(c))
            if len(self._cache) >= _CACHE_LIMIT:
                self._cache.clear()
            self._cache[float(c)] = hit = (self._scale, self._zero)
        self._scale, self._zero = hit
        self._per_sample = False

    def clear_cache(self) -> None:
        """Forget cached scales (call after changing the MLP's parameters)."""
        self._cache.clear()
        if self.current_condition is not None and self.calibrated and not self.calibrating:
            self.set_condition(self.current_condition)

    # ---- calibration ----------------------------------------------------------------------------------------
    def start_calibration(self) -> None:
        self._samples = defaultdict(list)
        self.calibrating = True

    @torch.no_grad()
    def observe(self, x: Tensor) -> None:
        """Keep a random subsample of x (any shape) under the current condition (per sample if c is a (B,) tensor)."""
        c = self.current_condition
        if c is None:
            raise RuntimeError("TdqActQuantizer observed a batch before any condition was set (set_condition)")
        if isinstance(c, Tensor) and c.numel() > 1:
            for v in c.reshape(-1).unique():
                self._keep(float(v), x[(c.reshape(-1) == v).to(x.device)])
        else:
            self._keep(float(c), x)

    def _keep(self, c: float, x: Tensor) -> None:
        flat = x.detach().reshape(-1).float()
        if flat.numel() == 0:
            return
        budget = self.fit_cfg.max_per_condition
        per_call = max(budget // 4, 1)
        if flat.numel() > per_call:
            idx = torch.randint(flat.numel(), (per_call,), device=flat.device)
            flat = torch.cat([flat[idx], flat.min().reshape(1), flat.max().reshape(1)])
        kept = self._samples[c]
        kept.append(flat)
        if sum(t.numel() for t in kept) > 2 * budget:  # thin out uniformly, keeping the extremes
            allv = torch.cat(kept)
            keep = allv[torch.randint(allv.numel(), (budget,), device=allv.device)]
            self._samples[c] = [keep, allv.min().reshape(1), allv.max().reshape(1)]

    def forward(self, x: Tensor) -> Tensor:
        if self.calibrating:
            self.observe(x)
            return x
        return super().forward(x)

    @torch.no_grad()
    def finish_calibration(self) -> None:
        """Fit the scale MLP (and the offset MLP) on what was observed; RuntimeError if nothing was."""
        self.calibrating = False
        if not self._samples:
            raise RuntimeError("TdqActQuantizer.finish_calibration: no batch was observed")
        with _single_thread():
            self._fit(dict(self._samples))
        self.calibrated = True
        self._samples = defaultdict(list)
        self.clear_cache()

    def _fit(self, samples: dict[float, list[Tensor]]) -> None:
        device = next(iter(samples.values()))[0].device
        self.fit, heads = fit_tdq_quantizer(samples, self.spec, self.fit_cfg)
        self.fit_summary = self.fit.summary()
        conds = self.fit.conds
        self.cond_range = [float(conds.min()), float(conds.max())] if self.extrapolate == "clamp" else None
        self.scale_fn = heads[0].to(device)
        if self.zero_fn is not None:
            self.zero_fn.offset_fn = heads[1].to(device)

    # ---- checkpoint -----------------------------------------------------------------------------------------
    def checkpoint_config(self) -> dict:
        """JSON for ``tdq.checkpoint.build_tdq_act``: condition, MLP shapes (scale, offset), calibrated range, fit."""
        return {"condition": self.condition, "mlp": self.scale_fn.config(),
                "offset_mlp": self.zero_fn.offset_fn.config() if self.zero_fn is not None else None,
                "extrapolate": self.extrapolate, "cond_range": self.cond_range,
                "fit": self.fit_summary}

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, condition={self.condition.get('kind')}, calibrated={self.calibrated}"


def tdq_quantizers(module: nn.Module) -> list[TdqActQuantizer]:
    """Every TdqActQuantizer inside ``module``, in ``modules()`` order."""
    return [m for m in module.modules() if isinstance(m, TdqActQuantizer)]


def set_record_condition(quantizers: list[TdqActQuantizer], condition_fn: ConditionFn, record: CalibRecord) -> None:
    """The driver's ``before_record``: the record's timestep → c → every quantizer."""
    c = float(condition_fn(record.timestep)[0])
    for q in quantizers:
        q.set_condition(c)


def sampling_kwargs(pipe) -> dict:
    """Call arguments for sampling ``pipe`` at its own size: the bundled models' ``SAMPLING`` (64 px, no resolution
    binning; without steps and guidance), else ``family.call_kwargs``."""
    from diffptq.models.load import BUNDLED_MODELS

    source = getattr(pipe, "diffptq_source", None)
    if source in BUNDLED_MODELS:
        from diffptq.models.bundled.specs import SAMPLING

        kind = "dit" if source.endswith("dit") else "unet"
        return {k: v for k, v in SAMPLING[kind].items() if k not in ("num_inference_steps", "guidance_scale")}
    return family_of(pipe).call_kwargs(pipe)


def record_trajectories(pipe, prompts: list[str], num_steps: int, guidance_scale: float | None = None,
                        batch_size: int = 8, seed: int = 0, progress: bool = True) -> CalibrationSet:
    """``data.calib.collect_calibration`` on ``pipe`` with its scheduler, CFG and ``sampling_kwargs``."""
    return collect_calibration(pipe, prompts, num_steps, guidance_scale, batch_size, seed, progress=progress,
                               **sampling_kwargs(pipe))


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
class TdqConfig:
    """One TDQ calibration: condition, bits, weight method and the fit.

    act_symmetric: symmetric activation grid (else asymmetric, zero point from the offset MLP). act_scale_method:
    ``mse`` (the per-condition MSE search) or ``minmax``. blocks: driver block indices (None: all). refine_steps: end
    to end refinement steps per block (0: none). extrapolate: clamp | mlp beyond the calibrated conditions
    (``TdqActQuantizer``).
    """

    condition: ConditionKind = "logsnr"
    wbits: int = 8
    abits: int = 8
    weight_method: str = "rtn"
    group_size: int | None = None
    damp: float | str = 0.01
    act_order: bool = False
    act_symmetric: bool = False
    act_scale_method: str = "mse"
    blocks: list[int] | None = None
    holdout_every: int = 5
    fit: TdqFitConfig = field(default_factory=TdqFitConfig)
    extrapolate: str = "clamp"
    refine_steps: int = 0
    refine_lr: float = 1e-3

    def __post_init__(self) -> None:
        if self.condition not in CONDITIONS:
            raise ValueError(f"condition must be one of {', '.join(CONDITIONS)}, got {self.condition!r}")

    def act_spec(self) -> QuantSpec:
        return QuantSpec(self.abits, symmetric=self.act_symmetric, scale_method=self.act_scale_method)

    def sequential_config(self, act_factory: Callable, before_record: Callable) -> SequentialConfig:
        return SequentialConfig(method=self.weight_method, weight=QuantSpec(self.wbits, group_size=self.group_size),
                                act=self.act_spec(), damp=self.damp, act_order=self.act_order, blocks=self.blocks,
                                holdout_every=self.holdout_every, act_factory=act_factory,
                                before_record=before_record, granularity="block")  # refinement targets whole blocks


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
    collect_time_s: float
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


def calibrate_tdq_pipeline(pipe, cfg: TdqConfig, calib: CalibrationSet | None = None, prompts: list[str] | None = None,
                           n_calib: int = 32, calib_steps: int = 10, batch_size: int = 8,
                           guidance_scale: float | None = None, seed: int = 0, device: torch.device | str = "cpu",
                           dtype: torch.dtype = torch.float32, progress: bool = True) -> TdqCalibration:
    """Quantize ``pipe``'s denoiser in place with TDQ activations (see module doc) and attach the condition hook.

    calib: reuse recorded trajectories (e.g. one set for the three conditions); else record ``n_calib`` prompts
    (``prompts`` or the bundled captions) × ``calib_steps`` steps of ``pipe``'s current scheduler, with CFG.
    """
    from .inference import attach_tdq

    family = family_of(pipe)
    denoiser = family.denoiser(pipe)
    t0 = time.perf_counter()
    if calib is None:
        prompts = prompts if prompts is not None else load_prompts(None, n_calib)
        calib = record_trajectories(pipe, prompts, calib_steps, guidance_scale, batch_size, seed, progress)
    collect_s = time.perf_counter() - t0
    condition_fn = make_condition_fn(cfg.condition, pipe.scheduler)
    quantizers: dict[str, TdqActQuantizer] = {}

    def act_factory(name: str, module: nn.Module) -> TdqActQuantizer:
        channel_dim = 1 if isinstance(module, nn.Conv2d) else -1
        quantizers[name] = TdqActQuantizer(cfg.act_spec(), condition_fn.to_config(), cfg.fit, channel_dim,
                                           extrapolate=cfg.extrapolate)
        return quantizers[name]

    def before_record(record: CalibRecord) -> None:
        set_record_condition(list(quantizers.values()), condition_fn, record)

    seq = cfg.sequential_config(act_factory, before_record)
    t0 = time.perf_counter()
    driver = TdqSequentialQuantizer(denoiser, family, calib, seq, device, dtype, progress=progress,
                                    refine_steps=cfg.refine_steps, refine_lr=cfg.refine_lr)
    result = driver.run()
    calib_s = time.perf_counter() - t0
    attach_tdq(pipe)
    _, held = calib.split(cfg.holdout_every)
    final = denoiser_output_error(denoiser, held if len(held) else calib, device, dtype)
    return TdqCalibration(result, calib, condition_fn, quantizers, collect_s, calib_s, final, driver.refine_loss)
