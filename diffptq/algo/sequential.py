"""Block-by-block (sequential) quantization of a diffusion denoiser with cached, paired block inputs.

Data flow, for a model family's blocks 0..K-1 (PixArt transformer blocks; UNet down/mid/up blocks):
1. The float prologue runs once per calibration record; both streams start from its output. Each record's state
   `(h, skips)` is cached per stream on `storage` (the CPU by default): `h` the hidden tensor, `skips` the UNet skip
   tensors that up blocks consume (so up blocks see the skips of their own stream). The context (timestep
   embedding, text states) is float and shared by both streams.
2. For each selected block: calibrate its static activation quantizers on the quantized stream; find its layer
   groups (layers fed by the same tensor, e.g. q/k/v, in forward order); for each group, run the block on the
   cached inputs (float stream X for Qronos, quantized stream X̃ as the matmul sees it, paired per record),
   accumulate H = X̃ᵀX̃/n (and G = X̃ᵀX/n), stop the block early after the group's last layer, and quantize the
   group's weights; later groups so see the quantized earlier layers.
3. Propagate both streams through the block (float stream in float mode, quantized stream with quantization on),
   measuring each layer's rel_out_err = ‖X̃Ŵᵀ − XWᵀ‖/‖XWᵀ‖ on the held-out records.
Only one record's activations are on the compute device at a time; the caches stay on `storage`.
"""
from __future__ import annotations

import logging
import math
import time
from collections import defaultdict
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from diffptq.algo.gptq import gptq_quantize_ex
from diffptq.algo.hessian import GramAccumulator
from diffptq.algo.qronos import qronos_quantize_ex
from diffptq.algo.rtn import QuantResult, rtn_quantize_ex
from diffptq.data.calib import CalibrationSet, CalibRecord
from diffptq.errors import DiffptqError
from diffptq.models.families import ModelFamily
from diffptq.quant.layers import QuantConfig, QuantLayer, float_mode, set_quant_enabled, swap_modules
from diffptq.quant.quantizer import QuantSpec

log = logging.getLogger(__name__)
METHODS = ("rtn", "gptq", "qronos")


class NonFiniteActivationError(DiffptqError, RuntimeError):
    """NaN/Inf reached a layer's input during calibration."""


@dataclass
class SequentialConfig:
    """What to quantize and how.

    method: rtn | gptq | qronos. weight: the weight grid. act: the activation grid (None: weights only).
    act_kind: static (per tensor, calibrated) | dynamic (per token). damp: relative to mean(diag H), or "adaptive".
    blocks: indices into family.blocks() (None: all). skip: layer-name glob patterns (within the denoiser) kept float.
    holdout_every: every n-th calibration record is held out from H and used for rel_out_err (0: none held out).
    act_factory(name, module) -> ActQuantizer | None builds the activation quantizers instead of `act`/`act_kind`
    (e.g. time-conditioned TDQ quantizers); any quantizer with start_calibration/finish_calibration is calibrated
    block by block on the quantized stream. before_record(record) runs before each pass over a calibration record
    (e.g. to set the record's timestep condition on time-conditioned quantizers).
    """

    method: str = "gptq"
    weight: QuantSpec = field(default_factory=lambda: QuantSpec(4))
    act: QuantSpec | None = None
    act_kind: str = "static"
    damp: float | str = 0.01
    act_order: bool = False
    block_size: int = 128
    blocks: list[int] | None = None
    skip: tuple[str, ...] = ()
    holdout_every: int = 5
    act_factory: Callable | None = None
    before_record: Callable[[CalibRecord], None] | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")


@dataclass
class LayerReport:
    """One quantized layer: `rel_out_err` on held-out records (nan when none are held out)."""

    block: int
    layer: str
    method: str
    wbits: int
    abits: int | None
    damp: float
    rel_out_err: float
    fell_back: bool = False
    reason: str = ""


@dataclass
class SequentialResult:
    layers: list[LayerReport]
    timings: dict[str, float]
    block_quant_calls: dict[int, int]
    peak_vram_bytes: int | None
    quant_layers: dict[str, QuantLayer]
    block_peak_vram: dict[int, int] = field(default_factory=dict)  # cumulative peak after each block (CUDA)


class _Stop(Exception):
    """Raised inside a block once the layers of interest have run (early exit)."""


@dataclass
class _Timer:
    device: torch.device
    totals: dict[str, float] = field(default_factory=lambda: defaultdict(float))

    @contextmanager
    def __call__(self, phase: str):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.totals[phase] += time.perf_counter() - t0


def _check_finite(x: Tensor, block: int, layer: str) -> None:
    if not torch.isfinite(x).all():
        raise NonFiniteActivationError(
            f"NaN/Inf in the input of layer {layer} (block {block}) during calibration: check the model weights and "
            "the calibration data (dtype overflow? try --dtype fp32 or bf16)")


def _layer_output(layer: QuantLayer, x: Tensor, w: Tensor) -> Tensor:
    """The layer's matmul without bias: x (…, in) or (N, C, H, W) with weight w in the layer's shape."""
    if isinstance(layer, nn.Conv2d):
        return layer._conv_forward(x, w, None)
    return F.linear(x, w)


class SequentialQuantizer:
    """Runs the block-by-block procedure on one denoiser. Use `quantize_sequential()` unless you need the parts."""

    def __init__(self, denoiser: nn.Module, family: ModelFamily, calib: CalibrationSet, config: SequentialConfig,
                 device: torch.device | str, dtype: torch.dtype = torch.float32, storage: str = "cpu",
                 progress: bool = True):
        self.den, self.family, self.calib, self.cfg = denoiser, family, calib, config
        self.device, self.dtype, self.storage = torch.device(device), dtype, storage
        self.progress = progress
        self.blocks = family.blocks(denoiser)
        n = len(self.blocks)
        self.selected = sorted(set(range(n) if config.blocks is None else config.blocks))
        if not self.selected or self.selected[0] < 0 or self.selected[-1] >= n:
            raise ValueError(f"blocks {config.blocks} out of range: the model has {n} blocks (0..{n - 1})")
        self.timer = _Timer(self.device)
        self.block_quant_calls: dict[int, int] = defaultdict(int)
        self.block_peak_vram: dict[int, int] = {}
        self.reports: list[LayerReport] = []
        self._pin = self.device.type == "cuda" and storage == "cpu"

    # ---- set-up -------------------------------------------------------------------------------------------
    def swap(self) -> dict[str, QuantLayer]:
        include = tuple(f"{self.blocks[k][0]}.*" for k in self.selected)
        qcfg = QuantConfig(weight=self.cfg.weight, act=self.cfg.act, act_kind=self.cfg.act_kind, include=include,
                           skip=self.cfg.skip, act_factory=self.cfg.act_factory)
        self.layers = swap_modules(self.den, qcfg)
        set_quant_enabled(self.den, weights=False, acts=False)
        return self.layers

    def _store(self, t: Tensor) -> Tensor:
        t = t.detach().to(self.storage)
        return t.pin_memory() if self._pin else t

    def _store_state(self, state: tuple[Tensor, list[Tensor]]) -> tuple[Tensor, list[Tensor]]:
        return self._store(state[0]), [self._store(s) for s in state[1]]

    def _to_dev(self, t: Tensor) -> Tensor:
        return t.to(self.device, non_blocking=self._pin)

    @torch.no_grad()
    def init_streams(self) -> None:
        """Float prologue for every record; both streams start equal (shared tensors until they diverge)."""
        self.ctx, self.fp, self.q = [], [], []
        with self.timer("forward"):
            for inputs in self.calib.batches(self.device, self.dtype):
                h, skips, ctx = self.family.prologue(self.den, inputs)
                state = (self._store(h), [self._store(s) for s in skips])
                self.ctx.append({k: self._store(v) if isinstance(v, Tensor) else v for k, v in ctx.items()})
                self.fp.append(state)
                self.q.append(state)
        self.streams_equal = True
        self.held = self.calib.holdout_indices(self.cfg.holdout_every)
        self.train = [i for i in range(len(self.calib)) if i not in set(self.held)]

    def _ctx(self, i: int) -> dict:
        if self.cfg.before_record is not None:
            self.cfg.before_record(self.calib.records[i])
        return {k: self._to_dev(v) if isinstance(v, Tensor) else v for k, v in self.ctx[i].items()}

    def _run(self, k: int, state, ctx) -> tuple[Tensor, list[Tensor]]:
        h, skips = state
        return self.family.run_block(self.den, k, self._to_dev(h), [self._to_dev(s) for s in skips], ctx)

    def _block_layers(self, k: int) -> dict[str, QuantLayer]:
        prefix = self.blocks[k][0] + "."
        return {n: m for n, m in self.layers.items() if n.startswith(prefix)}

    @contextmanager
    def _hooks(self, modules: dict[str, nn.Module], fn):
        handles = [m.register_forward_pre_hook(lambda mod, args, name=name: fn(name, mod, args[0]))
                   for name, m in modules.items()]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    @contextmanager
    def _quant_block(self):
        """The block's layers in quantized mode (weights where quantized, activation quantizers on)."""
        set_quant_enabled(self.den, weights=True, acts=True)
        try:
            yield
        finally:
            set_quant_enabled(self.den, weights=False, acts=False)

    # ---- one block ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def forward_groups(self, k: int, layers: dict[str, QuantLayer]) -> list[list[str]]:
        """Layer names of block k grouped by shared input tensor, in the order the forward pass calls them."""
        calls: list[tuple[str, int]] = []
        seen: set[str] = set()
        alive: list[Tensor] = []  # keep inputs alive: a freed tensor's id can be reused by a later, different one

        def record(name, mod, x):
            if name not in seen:
                seen.add(name)
                alive.append(x)
                calls.append((name, id(x)))
        i = self.train[0]
        with float_mode(self.den), self._hooks(layers, record):
            self._run(k, self.q[i], self._ctx(i))
        groups: list[list[str]] = []
        last_id = None
        for name, xid in calls:
            if groups and xid == last_id:
                groups[-1].append(name)
            else:
                groups.append([name])
            last_id = xid
        missing = set(layers) - seen
        if missing:
            log.warning("block %d: layers never called in the forward pass stay float: %s", k, sorted(missing))
        return groups

    @torch.no_grad()
    def calibrate_acts(self, k: int, layers: dict[str, QuantLayer]) -> None:
        static = [m.act_quant for m in layers.values() if hasattr(m.act_quant, "start_calibration")]
        if not static:
            return
        for aq in static:
            aq.start_calibration()
        with self._quant_block(), self.timer("forward"):
            for i in self.train:
                self._run(k, self.q[i], self._ctx(i))
        for aq in static:
            aq.finish_calibration()

    def _block_pass(self, k: int, state, ctx: dict, quant: bool, modules: dict | None = None, fn=None,
                    stop_after: str | None = None):
        """Run block k on `state` in quantized or float mode, calling fn(name, module, x) before each of `modules`
        and stopping right after `stop_after` was called. Returns the output state, or None when stopped early."""
        def hook(name, mod, x):
            fn(name, mod, x)
            if name == stop_after:
                raise _Stop
        mode = self._quant_block() if quant else float_mode(self.den)
        with mode, self._hooks(modules if fn else {}, hook), self.timer("forward"):
            try:
                return self._run(k, state, ctx)
            except _Stop:
                return None

    @staticmethod
    def _grab(store: dict, name: str, mod: QuantLayer, x: Tensor) -> None:
        store[name] = x

    def _accumulate(self, k: int, acc: dict, x_fp: dict, name: str, mod: QuantLayer, x: Tensor) -> None:
        xq = mod.quant_input(x)
        _check_finite(xq, k, name)
        with self.timer("accumulate"):
            acc[name].update(xq, x_fp.get(name))

    @staticmethod
    def _measure(x_fp: dict, num: dict, den: dict, name: str, mod: QuantLayer, x: Tensor) -> None:
        ref = _layer_output(mod, x_fp[name], mod.weight)
        out = _layer_output(mod, mod.quant_input(x), mod.current_weight())
        num[name] += float((out - ref).float().pow(2).sum())
        den[name] += float(ref.float().pow(2).sum())

    @torch.no_grad()
    def quantize_group(self, k: int, names: list[str]) -> None:
        """Accumulate H (and G) for the layers `names` of block k over the calibration records, then quantize them."""
        layers = {n: self.layers[n] for n in names}
        method, cfg = self.cfg.method, self.cfg
        acc: dict[str, GramAccumulator] = {}
        if method != "rtn":
            cross = method == "qronos"
            acc = {n: GramAccumulator(m if isinstance(m, nn.Conv2d) else None, cross=cross) for n, m in layers.items()}
            for i in self.train:
                ctx, x_fp = self._ctx(i), {}
                if cross:
                    self._block_pass(k, self.fp[i], ctx, False, layers, partial(self._grab, x_fp), names[-1])
                self._block_pass(k, self.q[i], ctx, True, layers, partial(self._accumulate, k, acc, x_fp), names[-1])
        for name, layer in layers.items():
            W = layer.weight_matrix()
            with self.timer("solve"):
                if method == "rtn":
                    res = rtn_quantize_ex(W, cfg.weight)
                elif method == "gptq":
                    res = gptq_quantize_ex(W, acc[name].H, cfg.weight, cfg.damp, cfg.act_order, cfg.block_size)
                else:
                    res = qronos_quantize_ex(W, acc[name].H, acc[name].G, cfg.weight, cfg.damp, cfg.act_order,
                                             cfg.block_size)
            layer.set_quantized_weight(res.codes, res.scale, res.zero)
            self._report(k, name, res)
            acc.pop(name, None)

    def _report(self, k: int, name: str, res: QuantResult) -> None:
        if res.fell_back:
            log.warning("block %d layer %s: fell back to RTN (%s)", k, name, res.reason)
        abits = self.cfg.act.bits if self.cfg.act is not None else None
        self.reports.append(LayerReport(k, name, self.cfg.method, self.cfg.weight.bits, abits, res.damp_rel,
                                        math.nan, res.fell_back, res.reason))

    @torch.no_grad()
    def propagate(self, k: int, measure: dict[str, QuantLayer] | None) -> None:
        """Run both streams through block k; on held-out records measure each layer's rel_out_err."""
        num: dict[str, float] = defaultdict(float)
        den: dict[str, float] = defaultdict(float)
        held = set(self.held) if measure else set()
        new_fp, new_q = [], []
        for i in range(len(self.calib)):
            ctx, x_fp = self._ctx(i), {}
            grab = partial(self._grab, x_fp) if i in held else None
            fp = self._block_pass(k, self.fp[i], ctx, False, measure, grab)
            if self.streams_equal and k not in self.selected:
                q = fp
            else:
                err = partial(self._measure, x_fp, num, den) if i in held else None
                q = self._block_pass(k, self.q[i], ctx, True, measure, err)
            fp_state = self._store_state(fp)
            new_fp.append(fp_state)
            new_q.append(fp_state if q is fp else self._store_state(q))
        self.fp, self.q = new_fp, new_q
        if k in self.selected:
            self.streams_equal = False
        if measure:
            for r in self.reports:
                if r.block == k and r.layer in num:
                    r.rel_out_err = math.sqrt(num[r.layer] / max(den[r.layer], 1e-30))

    def quantize_block(self, k: int) -> None:
        layers = self._block_layers(k)
        self.block_quant_calls[k] += 1
        self.calibrate_acts(k, layers)
        for group in self.forward_groups(k, layers):
            self.quantize_group(k, group)

    # ---- the whole procedure ------------------------------------------------------------------------------
    def run(self) -> SequentialResult:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.swap()
        self.init_streams()
        last = self.selected[-1]
        cuda = self.device.type == "cuda"
        for k in tqdm(range(last + 1), desc=f"{self.cfg.method} blocks", disable=not self.progress):
            if k in self.selected:
                self.quantize_block(k)
                self.propagate(k, self._block_layers(k))
            elif k < last:
                self.propagate(k, None)
            if cuda:
                self.block_peak_vram[k] = torch.cuda.max_memory_allocated(self.device)
        self.fp = self.q = self.ctx = []  # free the caches
        set_quant_enabled(self.den, weights=True, acts=True)
        peak = torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else None
        return SequentialResult(self.reports, dict(self.timer.totals), dict(self.block_quant_calls), peak,
                                self.layers, dict(self.block_peak_vram))


def quantize_sequential(denoiser: nn.Module, family: ModelFamily, calib: CalibrationSet, config: SequentialConfig,
                        device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, storage: str = "cpu",
                        progress: bool = True) -> SequentialResult:
    """Quantize `denoiser` in place, block by block (see the module docstring). The denoiser must be on `device`."""
    return SequentialQuantizer(denoiser, family, calib, config, device, dtype, storage, progress).run()


@torch.no_grad()
def denoiser_output_error(denoiser: nn.Module, calib: CalibrationSet, device: torch.device | str = "cpu",
                          dtype: torch.dtype | None = None) -> dict[int, float]:
    """Relative error ‖ε̂ − ε‖/‖ε‖ of the quantized denoiser vs its float mode, per sampling step (mean over
    records of that step)."""
    per_step: dict[int, list[float]] = defaultdict(list)
    for record, inputs in zip(calib.records, calib.batches(device, dtype)):
        with float_mode(denoiser):
            ref = denoiser(**inputs, return_dict=False)[0].float()
        out = denoiser(**inputs, return_dict=False)[0].float()
        per_step[record.step].append(float((out - ref).norm() / ref.norm().clamp_min(1e-30)))
    return {s: sum(v) / len(v) for s, v in sorted(per_step.items())}
