"""SequentialQuantizer: the driver's state and its loop over units (the data flow is in the package docstring)."""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from diffptq.algo.driver.accumulate import accumulate_wave, share_leaders
from diffptq.algo.driver.activations import calibrate_activations
from diffptq.algo.driver.cache import StreamCache
from diffptq.algo.driver.config import LayerReport, SequentialConfig, SequentialResult
from diffptq.algo.driver.offload import Offloader
from diffptq.algo.driver.outliers import prepare_outliers
from diffptq.algo.driver.passes import UnitRunner
from diffptq.algo.driver.plan import BlockPlan, plan_unit
from diffptq.algo.driver.propagate import propagate_unit
from diffptq.algo.driver.solve import solve_layer
from diffptq.algo.driver.stats import BlockStats
from diffptq.algo.heldout import Grams
from diffptq.algo.driver.timing import PhaseTimer
from diffptq.data.calib import CalibrationSet
from diffptq.errors import ConfigError
from diffptq.models.families import ModelFamily
from diffptq.quant.layers import QuantConfig, QuantLayer, set_quant_enabled, swap_modules


class SequentialQuantizer:
    """Runs the block-by-block procedure on one denoiser. Use `quantize_sequential()` unless you need the parts.

    on_block(k, quantizer) runs after each block k of family.blocks() (with offload_done, once its units are on
    storage); returning True stops the run there (the later blocks stay float, their activation quantizers off),
    e.g. for a time budget. Internally `k` indexes `self.units`.

    Its parts: `cache` (StreamCache: the records' cached states and context), `runner` (UnitRunner: one pass of a
    unit over one record), `offloader` and `stats`; a subclass runs its own passes through `runner` and `cache`
    (e.g. TDQ's end-to-end refinement in diffptq.tdq.calibrate).
    """

    def __init__(self, denoiser: nn.Module, family: ModelFamily, calib: CalibrationSet, config: SequentialConfig,
                 device: torch.device | str, dtype: torch.dtype = torch.float32, storage: str = "cpu",
                 progress: bool = True, on_block: Callable[[int, SequentialQuantizer], bool | None] | None = None):
        self.den, self.family, self.calib, self.cfg = denoiser, family, calib, config
        self.device, self.dtype, self.storage = torch.device(device), dtype, storage
        if self.device.type == "cuda" and self.device.index is None:  # compare devices by index below
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.progress = progress
        self.on_block = on_block
        self.blocks = family.blocks(denoiser)
        n = len(self.blocks)
        blocks = sorted(set(range(n) if config.blocks is None else config.blocks))
        if not blocks or blocks[0] < 0 or blocks[-1] >= n:
            raise ValueError(f"blocks {config.blocks} out of range: the model has {n} blocks (0..{n - 1})")
        self.units = family.units(denoiser, fine=config.granularity == "unit")
        chosen = set(blocks)
        self.selected = [u for u, unit in enumerate(self.units) if unit.block in chosen]  # unit indices
        self.timer = PhaseTimer(self.device)
        self.quant_calls: dict[str, int] = defaultdict(int)
        self.reports: list[LayerReport] = []
        self.plans: dict[int, BlockPlan] = {}
        self._deps_by_structure: dict[tuple, dict[str, set[str]]] = {}
        self.leaders: dict[int, dict[str, str]] = {}  # per block: layer → layer whose matmul input it shares
        self.cache = StreamCache(self.device, storage, self._before_record)
        self.runner = UnitRunner(self.units, self.cache, self.timer, self.leaders)
        self.offloader = Offloader(denoiser, self.units, self.device, storage)
        self.stats = BlockStats(self.device, self.timer)

    # the parts' state under the quantizer's names
    fp = property(lambda self: self.cache.fp, doc="Per record, the float stream's state at the current unit.")
    q = property(lambda self: self.cache.q, doc="Per record, the quantized stream's state at the current unit.")
    ctx = property(lambda self: self.cache.ctx, doc="Per record, the context (float, shared by both streams).")
    block_stats = property(lambda self: self.stats.blocks, doc="SequentialResult.block_stats, so far.")
    block_peak_vram = property(lambda self: self.stats.peak_vram, doc="SequentialResult.block_peak_vram, so far.")

    def _before_record(self, i: int) -> None:
        if self.cfg.before_record is not None:
            self.cfg.before_record(self.calib.records[i])

    # ---- set-up -------------------------------------------------------------------------------------------
    def swap(self) -> dict[str, QuantLayer]:
        include = tuple(f"{self.units[k].name}.*" for k in self.selected)
        qcfg = QuantConfig(weight=self.cfg.weight, act=self.cfg.act, act_kind=self.cfg.act_kind, include=include,
                           skip=self.cfg.skip, act_factory=self.cfg.act_factory,
                           rotate=None if self.cfg.rotate == "pca" else self.cfg.rotate,  # pca: per unit, later
                           rotate_seed=self.cfg.rotate_seed, rotate_conv=self.cfg.rotate_conv)
        self.layers = self.runner.layers = swap_modules(self.den, qcfg)
        set_quant_enabled(self.den, weights=False, acts=False)
        return self.layers

    @torch.no_grad()
    def init_streams(self) -> None:
        """Float prologue for every record; both streams start equal (shared tensors until they diverge)."""
        with self.timer("forward"):
            self.cache.start(self.family.prologue(self.den, inputs)
                             for inputs in self.calib.batches(self.device, self.dtype))
        self.streams_equal = True
        self.held = self.calib.holdout_indices(self.cfg.holdout_every)
        self.train = [i for i in range(len(self.calib)) if i not in set(self.held)]
        # adaptive damping: whole prompt batches of the training records held out to choose each layer's damping
        self.damp_held, self.damp_train = [], self.train
        if self.cfg.damp.mode == "adaptive" and self.cfg.method != "rtn":
            prompts_out = set(self.calib.prompt_holdout(self.cfg.damp.holdout))
            self.damp_held = [i for i in self.train if i in prompts_out]
            self.damp_train = [i for i in self.train if i not in prompts_out]
            if not (self.damp_held and self.damp_train):
                raise ConfigError("--damp adaptive chooses each layer's damping on held-out prompts: give at least "
                                  "two calibration batches (--n_calib larger than --calib_batch_size)")
        # the float stream is needed for Qronos's G everywhere, else only for rel_out_err on held-out records
        # (and by subclasses that refine against it, e.g. TDQ's end-to-end refinement)
        every = self.cfg.method == "qronos" or getattr(self, "refine_steps", 0) > 0
        self.fp_records = set(range(len(self.calib))) if every else set(self.held) | set(self.damp_held)

    # ---- one block ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def plan_block(self, k: int, layers: dict[str, QuantLayer]) -> BlockPlan:
        """Groups and waves of block k's layers (see the package docstring), from float passes on one record."""
        return plan_unit(self.runner, k, layers, self.train[0] if self.train else 0, self._deps_by_structure)

    @torch.no_grad()
    def forward_groups(self, k: int, layers: dict[str, QuantLayer]) -> list[list[str]]:
        """Layer names of block k grouped by shared input tensor, in the order the forward pass calls them."""
        return self.plan_block(k, layers).groups

    @torch.no_grad()
    def calibrate_acts(self, k: int, layers: dict[str, QuantLayer]) -> None:
        """Calibrate block k's activation quantizers on the quantized stream of the training records."""
        calibrate_activations(self.runner, k, layers, self.plans.get(k), self.train)

    @torch.no_grad()
    def quantize_wave(self, k: int, plan: BlockPlan, w: int) -> None:
        """Accumulate H (and G) for the layers of wave w of block k over the training records, then quantize them."""
        names = plan.wave_layers(w)
        if self.cfg.method == "rtn":
            for name in names:
                self._solve(k, name, self.layers[name], None, None)
            return
        leader = self.leaders[k]
        grams = accumulate_wave(self.runner, k, plan, w, self.damp_train, cross=self.cfg.method == "qronos")
        held = (accumulate_wave(self.runner, k, plan, w, self.damp_held, cross=True, float_gram=True)
                if self.damp_held else {})
        last_use = {leader[n]: n for n in names}
        for name in names:  # the last layer of a shared H/G gives them up: at most two (in, in) matrices alive
            own = last_use[leader[name]] == name
            lead = leader[name]
            self._solve(k, name, self.layers[name], grams.pop(lead) if own else grams[lead], consume=own,
                        held=held.pop(lead) if own and held else held.get(lead))

    def _solve(self, k: int, name: str, layer: QuantLayer, grams: Grams | None, consume: bool = False,
               held: Grams | None = None) -> None:
        """Quantize one layer; with `consume` its statistics are released by the solver (no other layer reads
        them); `held`: held-out statistics for the adaptive damping."""
        self.reports.append(solve_layer(self.cfg, self.units[k].block, name, layer, grams, self.timer, consume, held))

    @torch.no_grad()
    def propagate(self, k: int, measure: dict[str, QuantLayer] | None) -> None:
        """Run the streams through block k; on held-out records measure each layer's rel_out_err."""
        errs = propagate_unit(self.runner, k, measure, set(self.held) if measure else set(), self.fp_records,
                              one_stream=self.streams_equal and k not in self.selected)
        if k in self.selected:
            self.streams_equal = False
        for r in self.reports:
            if r.block == self.units[k].block and r.layer in errs:
                r.rel_out_err = errs[r.layer]

    def quantize_block(self, k: int) -> None:
        layers = self.runner.layers_of(k)
        self.quant_calls[self.units[k].name] += 1
        plan = self.plans[k] = self.plan_block(k, layers)
        if self.cfg.rotate == "pca" or self.cfg.smooth is not None or self.cfg.lowrank:
            prepare_outliers(self.runner, k, layers, plan, self.train, self.cfg)
        self.calibrate_acts(k, layers)
        self.leaders[k] = share_leaders(plan, self.layers)
        for w in range(len(plan.waves)):
            self.quantize_wave(k, plan, w)

    # ---- the whole procedure ------------------------------------------------------------------------------
    def _run_blocks(self) -> tuple[int | None, set[int]]:
        """Units 0..the last selected one in order; returns (the block on_block stopped after or None, units done).
        """
        last = self.selected[-1]
        selected = set(self.selected)
        stopped, done = None, set()
        desc = f"{self.cfg.method} {'units' if len(self.units) > len(self.blocks) else 'blocks'}"
        for k in tqdm(range(last + 1), desc=desc, disable=not self.progress):
            unit = self.units[k]
            self.stats.start_unit()
            if k in selected:
                self.offloader.fetch(k)
                self.quantize_block(k)
                self.propagate(k, self.runner.layers_of(k))
                done.add(k)
                if self.cfg.drop_float_weights:
                    for layer in self.runner.layers_of(k).values():
                        if layer.is_quantized:
                            layer.drop_float_weight()
                if self.cfg.offload_done:
                    self.offloader.offload(k)
            elif k < last:
                self.propagate(k, None)
            self._finish_unit(k)
            block_done = k == len(self.units) - 1 or self.units[k + 1].block != unit.block
            if block_done and self.on_block is not None and self.on_block(unit.block, self) and k < last:
                stopped = unit.block
                break
        return stopped, done

    def _finish_unit(self, k: int) -> None:
        """Add unit k's statistics to its block's; the counters start again for the next unit."""
        h2d, d2h = self.cache.pop_bytes()
        moved = {"h2d_bytes": h2d, "d2h_bytes": d2h, "offload_bytes": self.offloader.pop_bytes()}
        self.stats.finish_unit(self.units[k].block, self.plans.get(k), self.runner.passes, moved)
        self.runner.passes.clear()

    def run(self) -> SequentialResult:
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        self.swap()
        try:
            if self.cfg.offload_pending:
                for k in self.selected[1:]:
                    self.offloader.offload(k)
            self.init_streams()
            stopped, done = self._run_blocks()
        finally:
            self.cache.clear()
            self.offloader.restore()
        set_quant_enabled(self.den, weights=True, acts=True)
        for k in set(self.selected) - done:  # stopped early: unprocessed units stay float
            for layer in self.runner.layers_of(k).values():
                if layer.act_quant is not None:
                    layer.act_quant.enabled = False
        timings = dict(self.timer.totals)
        timings["forward"] = timings.get("forward", 0.0) - timings.get("accumulate", 0.0)
        peak_all = max([*self.block_peak_vram.values(), torch.cuda.max_memory_allocated(self.device)]) if cuda else None
        return SequentialResult(self.reports, timings, dict(self.quant_calls), peak_all, self.layers,
                                dict(self.block_peak_vram), dict(self.block_stats), stopped)


def quantize_sequential(denoiser: nn.Module, family: ModelFamily, calib: CalibrationSet, config: SequentialConfig,
                        device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, storage: str = "cpu",
                        progress: bool = True, on_block: Callable[[int, SequentialQuantizer], bool | None] | None = None
                        ) -> SequentialResult:
    """Quantize `denoiser` in place, block by block (see the package docstring). The denoiser must be on `device`."""
    return SequentialQuantizer(denoiser, family, calib, config, device, dtype, storage, progress, on_block).run()
