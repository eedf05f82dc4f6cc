"""Block-by-block (sequential) quantization of a diffusion denoiser with cached, paired block inputs.

Data flow, over a model family's units 0..K-1 in forward order (diffptq.models.units: PixArt's transformer blocks;
the UNet's ResNets, transformer blocks and resamplers, or with granularity "block" its down/mid/up blocks). The
user selects blocks (indices into family.blocks()); a block's units are processed one after the other, and
results (layer reports, block_stats, on_block) are reported per block. Below, "block" means a unit:
1. The float prologue runs once per calibration record; both streams start from its output. Each record's state
   `(h, skips)` is cached per stream on `storage` (pinned CPU memory by default): `h` the hidden tensor, `skips`
   the UNet skip tensors that up blocks consume (so up blocks see the skips of their own stream). The context
   (timestep embedding, text states) is float and shared by both streams. Only the skips a unit reads (the one an
   up-block ResNet concatenates) are copied to the compute device; the others pass through on storage.
2. For each selected block:
   a. plan (one record, float mode): group the layers fed by the same tensor (e.g. q/k/v), in forward order, and
      find which layers' inputs depend on which earlier layers (perturb a group's outputs, see which later inputs
      change; blocks of the same class and layer order reuse the first one's answer). Groups go into waves: a
      group's wave comes after the waves of every group it depends on, so all groups of a wave can be calibrated
      from one pass (e.g. attn1 q/k/v and the cross-attention k/v, which read the text states only).
   b. calibrate the block's static activation quantizers on the quantized stream (one pass, stopped after the
      last layer that has one; the weights of the block still float, as before).
   c. per wave: one pass per stream over the calibration records, stopped after the wave's last layer: the float
      stream X (Qronos only) and the quantized stream X̃ as the matmul sees it, paired per record; accumulate
      H = X̃ᵀX̃/n (and G = X̃ᵀX/n) — once for layers with the same input and equal activation quantizers — then
      quantize the wave's weights. A layer's input depends only on layers of earlier waves, so it sees exactly
      what the one-group-at-a-time order gives it. Qronos's first float pass runs the whole block and keeps its
      output: the float stream of the next block does not depend on anything quantized. In quantized passes each
      layer input is fake-quantized once, in a pre-hook (q/k/v with equal quantizers share it; the accumulation
      reads it): the same tensors as the layers' own quantizers give, computed fewer times. The last layer that
      reads an H/G hands it to the solver (consume), which works on it in place: per solve at most two (in, in)
      float32 matrices are alive (the widest SD 1.5 conv: 23040 inputs, 1.98 GiB each).
3. Propagate: the quantized stream through the block (quantization on), and the float stream where it is still
   needed (Qronos: every record; GPTQ/RTN: only the held-out records, for rel_out_err = ‖X̃Ŵᵀ − XWᵀ‖/‖XWᵀ‖).
4. With offload_done, the finished block's weights move to `storage` (they are not needed until the run ends: later
   blocks read the cached streams), and every such block moves back before run() returns.
Only one record's activations (and the next record's inputs, copied ahead on a side stream) are on the compute
device at a time. Nothing inside the record loops waits for the device: finite-checks, error sums and timings are
resolved once per wave or block.
"""
from __future__ import annotations

import logging
import math
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from diffptq.algo.damping import any_nonfinite
from diffptq.algo.driver.memory import Loaded, PinnedPool, Prefetcher, move_module_tensors
from diffptq.algo.driver.timing import PhaseTimer
from diffptq.algo.gptq import gptq_quantize_ex
from diffptq.algo.hessian import GramAccumulator
from diffptq.algo.qronos import qronos_quantize_ex
from diffptq.algo.rtn import QuantResult, rtn_quantize_ex
from diffptq.data.calib import CalibrationSet, CalibRecord
from diffptq.errors import DiffptqError
from diffptq.models.families import ModelFamily
from diffptq.quant.act import ActQuantizer, same_quantization
from diffptq.quant.layers import QuantConfig, QuantLayer, float_mode, set_quant_enabled, swap_modules
from diffptq.quant.quantizer import QuantSpec

log = logging.getLogger(__name__)
METHODS = ("rtn", "gptq", "qronos")
GRANULARITIES = ("unit", "block")
State = tuple[Tensor, list[Tensor]]


class NonFiniteActivationError(DiffptqError, RuntimeError):
    """NaN/Inf reached a layer's input during calibration."""


@dataclass
class SequentialConfig:
    """What to quantize and how.

    method: rtn | gptq | qronos. weight: the weight grid. act: the activation grid (None: weights only).
    act_kind: static (per tensor, calibrated) | dynamic (per token). damp: relative to mean(diag H), or "adaptive".
    blocks: indices into family.blocks() (None: all). granularity: "unit" (a block's ResNets, transformer blocks and
    resamplers are quantized one after the other, each re-run from its own cached input: far fewer re-computed
    layers per wave on the UNet; PixArt's blocks are units already) or "block" (each block is one unit).
    skip: layer-name glob patterns (within the denoiser) kept float.
    holdout_every: every n-th calibration record is held out from H and used for rel_out_err (0: none held out).
    act_factory(name, module) -> ActQuantizer | None builds the activation quantizers instead of `act`/`act_kind`
    (e.g. time-conditioned TDQ quantizers); any quantizer with start_calibration/finish_calibration is calibrated
    block by block on the quantized stream. before_record(record) runs before each pass over a calibration record
    (e.g. to set the record's timestep condition on time-conditioned quantizers).
    drop_float_weights: once a block is done, replace its quantized layers' float weights by the dequantized ones
    (frees their memory; float_mode then runs the quantized weights). The codes of finished blocks still add up on
    the device (1 byte per weight): with offload_done too, device memory is flat in the number of blocks.
    offload_done: once a block is done (quantized, propagated, float weights dropped if asked), move its parameters
    and buffers (weights, dequantized weights, codes, norms, ...) to the driver's `storage`: later blocks read the
    cached streams only, so the compute device holds just the blocks still to come, and its memory falls block by
    block. Left in place: blocks that are not selected (also those run in between), activation quantizers (a few
    numbers each; time-conditioned ones cache scales outside their buffers) and tensors shared with modules outside
    the block. Before run() returns (also when on_block stops it or something raises), every offloaded block moves
    back to the compute device: the returned model is the one offload_done=False gives, tensor for tensor. Moving
    back happens after the calibration caches are freed and takes the memory the finished model holds at the end of
    a run without offload_done: with drop_float_weights the float model's size plus the codes, which stays below
    the first block's peak (the whole float model plus one block's calibration working set) unless that working set
    is smaller than the codes (full-size PixArt-XL-2, bf16: 1.86 GiB allocated at the end vs 3.19 GiB in block 0);
    without drop_float_weights also a dequantized copy of each quantized weight. SequentialResult.peak_vram_bytes
    includes the move back. Nothing moves when `storage` is the compute device.
    offload_pending: the selected units after the first wait on `storage` from the start and each moves to the
    compute device just before its turn: with offload_done, the device holds one unit's weights (plus the float
    prologue/epilogue and the units not selected) instead of all those still to come. Moved back like offload_done's.
    rotate / rotate_seed / rotate_conv: an online input rotation of the swapped layers (as in
    diffptq.quant.layers.QuantConfig), set at the swap, so H, G, the activation quantizers and rel_out_err all see
    the rotated inputs.
    """

    method: str = "gptq"
    weight: QuantSpec = field(default_factory=lambda: QuantSpec(4))
    act: QuantSpec | None = None
    act_kind: str = "static"
    damp: float | str = 0.01
    act_order: bool = False
    block_size: int = 128
    blocks: list[int] | None = None
    granularity: str = "unit"
    skip: tuple[str, ...] = ()
    holdout_every: int = 5
    act_factory: Callable | None = None
    before_record: Callable[[CalibRecord], None] | None = None
    drop_float_weights: bool = False
    offload_done: bool = False
    offload_pending: bool = False
    rotate: str | None = None
    rotate_seed: int = 0
    rotate_conv: bool = False

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {', '.join(GRANULARITIES)}, got {self.granularity!r}")


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
    """timings: seconds per phase (forward = block passes without the H/G accumulation inside them; accumulate;
    solve). quant_calls: unit name → how often it was quantized (once). block_stats: per block (summed over its
    units), its passes over calibration records by kind, bytes moved (offload_bytes: its weights moved to
    storage), seconds, phases, groups and waves, peak VRAM, memory allocated after it. peak_vram_bytes: the whole
    run's peak (CUDA), moving offloaded blocks back included. stopped_after: the last block processed when
    `on_block` stopped the run early (else None)."""

    layers: list[LayerReport]
    timings: dict[str, float]
    quant_calls: dict[str, int]
    peak_vram_bytes: int | None
    quant_layers: dict[str, QuantLayer]
    block_peak_vram: dict[int, int] = field(default_factory=dict)  # cumulative peak after each block (CUDA)
    block_stats: dict[int, dict] = field(default_factory=dict)
    stopped_after: int | None = None


@dataclass
class BlockPlan:
    """How a block's layers are visited. groups: layers fed by the same tensor, in first-call order; waves: group
    indices, each wave's inputs depending only on layers of earlier waves; order: layers in first-call order;
    deps: layer → earlier layers whose outputs reach its input; exact: False when dependencies were not analysed
    (a layer called twice, or the probe failed): then every group is its own wave, in forward order."""

    groups: list[list[str]]
    waves: list[list[int]]
    order: list[str]
    deps: dict[str, set[str]]
    exact: bool = True

    def wave_layers(self, w: int) -> list[str]:
        return [n for g in self.waves[w] for n in self.groups[g]]


class _Stop(Exception):
    """Raised inside a block once the layers of interest have run (early exit)."""


def _layer_output(layer: QuantLayer, x: Tensor, w: Tensor) -> Tensor:
    """The layer's matmul without bias: x (…, in) or (N, C, H, W) with weight w in the layer's shape."""
    if isinstance(layer, nn.Conv2d):
        return layer._conv_forward(x, w, None)
    return F.linear(x, w)


def same_matmul_input(a: QuantLayer, b: QuantLayer) -> bool:
    """True if two Linear layers given the same tensor see the same matmul input: no activation quantizers, or
    equal deterministic ones (static with equal scale/zero, or dynamic per token with equal grids)."""
    if not (isinstance(a, nn.Linear) and isinstance(b, nn.Linear)):
        return False
    qa, qb = a.act_quant, b.act_quant
    if qa is None or qb is None:
        return qa is None and qb is None
    return qa.enabled == qb.enabled and same_quantization(qa, qb)


def set_layers(layers, quant: bool) -> None:
    """Quantized weights and activation quantizers on (quant) or off for these layers."""
    for layer in layers:
        layer.quant_weight = quant
        if layer.act_quant is not None:
            layer.act_quant.enabled = quant


def _fingerprint(x: Tensor) -> Tensor:
    """Sum and norm of x in float32: equal for equal tensors (same reductions), different after a perturbation."""
    return torch.stack([x.sum(dtype=torch.float32), torch.linalg.vector_norm(x, dtype=torch.float32)])


def _is_act_quantizer(module: nn.Module) -> bool:
    return isinstance(module, ActQuantizer)


def _flat(state: State | None) -> list[Tensor]:
    return [] if state is None else [state[0], *state[1]]


class SequentialQuantizer:
    """Runs the block-by-block procedure on one denoiser. Use `quantize_sequential()` unless you need the parts.

    on_block(k, quantizer) runs after each block k of family.blocks() (with offload_done, once its units are on
    storage); returning True stops the run there (the later blocks stay float, their activation quantizers off),
    e.g. for a time budget. Internally `k` indexes `self.units`.
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
        self.block_peak_vram: dict[int, int] = {}
        self.block_stats: dict[int, dict] = {}
        self.reports: list[LayerReport] = []
        self.plans: dict[int, BlockPlan] = {}
        self._layers_of: dict[int, dict[str, QuantLayer]] = {}
        self._deps_by_structure: dict[tuple, dict[str, set[str]]] = {}
        self.leaders: dict[int, dict[str, str]] = {}  # per block: layer → layer whose matmul input it shares
        self._pin = self.device.type == "cuda" and storage == "cpu"
        self._pool = PinnedPool()
        self._prefetch = Prefetcher(self.device)
        self._passes: Counter = Counter()
        self._d2h_bytes = 0
        self._next_fp: dict[int, State] = {}
        self._offloaded: list[int] = []
        self._offload_bytes = 0

    # ---- set-up -------------------------------------------------------------------------------------------
    def swap(self) -> dict[str, QuantLayer]:
        include = tuple(f"{self.units[k].name}.*" for k in self.selected)
        qcfg = QuantConfig(weight=self.cfg.weight, act=self.cfg.act, act_kind=self.cfg.act_kind, include=include,
                           skip=self.cfg.skip, act_factory=self.cfg.act_factory, rotate=self.cfg.rotate,
                           rotate_seed=self.cfg.rotate_seed, rotate_conv=self.cfg.rotate_conv)
        self.layers = swap_modules(self.den, qcfg)
        set_quant_enabled(self.den, weights=False, acts=False)
        return self.layers

    def _store(self, t: Tensor, origin: dict[int, Tensor] | None = None) -> Tensor:
        """Cache t on `storage` (pinned host buffers from the pool, filled without waiting when computing on CUDA).
        A tensor that is an unchanged device copy of a cached one (`origin`), or a cached one that a unit passed
        through without reading it (a skip left on the host), is not copied again."""
        if origin is not None and id(t) in origin:
            return origin[id(t)]
        if self._pin and t.device.type == "cpu":
            return t
        t = t.detach()
        if not self._pin:
            return t.to(self.storage)
        buf = self._pool.take(t.shape, t.dtype)
        buf.copy_(t, non_blocking=True)
        self._d2h_bytes += t.numel() * t.element_size()
        return buf

    def _store_state(self, state: State, origin: dict[int, Tensor] | None = None) -> State:
        return self._store(state[0], origin), [self._store(s, origin) for s in state[1]]

    def _to_dev(self, t: Tensor) -> Tensor:
        if t.device != self.device:
            self._prefetch.h2d_bytes += t.numel() * t.element_size()
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
        # the float stream is needed for Qronos's G everywhere, else only for rel_out_err on held-out records
        # (and by subclasses that refine against it, e.g. TDQ's end-to-end refinement)
        every = self.cfg.method == "qronos" or getattr(self, "refine_steps", 0) > 0
        self.fp_records = set(range(len(self.calib))) if every else set(self.held)

    def _ctx(self, i: int) -> dict:
        if self.cfg.before_record is not None:
            self.cfg.before_record(self.calib.records[i])
        return {k: self._to_dev(v) if isinstance(v, Tensor) else v for k, v in self.ctx[i].items()}

    def _state_to_dev(self, k: int, state: State) -> State:
        """h and the skips that unit k reads on the compute device; the other skips stay where they are."""
        h, skips = state
        first = len(skips) - self.units[k].skips_read
        return self._to_dev(h), [self._to_dev(s) if j >= first else s for j, s in enumerate(skips)]

    def _run(self, k: int, state, ctx) -> State:
        return self.units[k].run(*self._state_to_dev(k, state), ctx)

    def _records(self, k: int, indices, streams: tuple[str, ...] | Callable[[int], tuple[str, ...]]
                 ) -> Iterator[tuple[int, Loaded]]:
        """Records `indices` with the states of `streams` ("fp", "q"; or a function of the index) and the context
        on the device (of the states: h and the skips unit k reads), the next record's copied ahead; before_record
        runs before each is yielded."""
        pick = streams if callable(streams) else (lambda i: streams)

        def fetch(i):
            return {s: (self.fp if s == "fp" else self.q)[i] for s in pick(i)}, self.ctx[i]
        for i, loaded in self._prefetch(indices, fetch, self.units[k].skips_read):
            if self.cfg.before_record is not None:
                self.cfg.before_record(self.calib.records[i])
            yield i, loaded

    def _block_layers(self, k: int) -> dict[str, QuantLayer]:
        if k not in self._layers_of:
            prefix = self.units[k].name + "."
            self._layers_of[k] = {n: m for n, m in self.layers.items() if n.startswith(prefix)}
        return self._layers_of[k]

    @contextmanager
    def _mode(self, k: int, quant: bool):
        """Block k's layers quantized (weights where quantized, activation quantizers on) or float. Outside passes
        every layer is float (swap() and _quant_block() leave it so); only block k runs, so only its layers switch
        (switching the whole model each pass costs milliseconds of Python per pass on a 28-block model)."""
        layers = self._block_layers(k).values()
        set_layers(layers, quant)
        try:
            yield
        finally:
            set_layers(layers, False)

    @contextmanager
    def _hooks(self, modules: dict[str, nn.Module], fn, post: dict[str, nn.Module] | None = None, post_fn=None):
        """fn(name, module, x) before each of `modules` runs; post_fn(name, module, out) after each of `post` (its
        return value, when not None, replaces the output)."""
        handles = [m.register_forward_pre_hook(lambda mod, args, name=name: fn(name, mod, args[0]))
                   for name, m in modules.items()]
        handles += [m.register_forward_hook(lambda mod, args, out, name=name: post_fn(name, mod, out))
                    for name, m in (post or {}).items()]
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

    def _block_pass(self, k: int, state, ctx: dict, quant: bool, modules: dict | None = None, fn=None,
                    stop_after: str | None = None, stop_post: bool = False, kind: str | None = None):
        """Run block k on `state` in quantized or float mode, calling fn(name, module, x) before each of `modules`
        and stopping right before `stop_after` runs (after its hook), or right after it when `stop_post`.
        Returns the output state, or None when stopped early."""
        pre = dict(modules) if (fn is not None and modules) else {}
        if stop_after is not None:
            pre.setdefault(stop_after, self.layers[stop_after])

        def hook(name, mod, x):
            if fn is not None and modules and name in modules:
                fn(name, mod, x)
            if name == stop_after and not stop_post:
                raise _Stop

        def stop(name, mod, out):
            raise _Stop
        post = {stop_after: self.layers[stop_after]} if (stop_after is not None and stop_post) else None
        self._passes[(kind or ("q" if quant else "fp"), stop_after is None)] += 1
        mode = self._mode(k, quant)
        once = self._act_quant_once(k) if (quant and kind != "calibrate" and k in self.leaders) else nullcontext()
        with mode, once, self._hooks(pre, hook, post, stop), self.timer("forward"):
            try:
                return self._run(k, state, ctx)
            except _Stop:
                return None

    # ---- planning -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def plan_block(self, k: int, layers: dict[str, QuantLayer]) -> BlockPlan:
        """Groups and waves of block k's layers (see the module docstring), from float passes on one record."""
        i = self.train[0] if self.train else 0
        ctx, state = self._ctx(i), self._state_to_dev(k, self.q[i])
        calls: list[tuple[str, int]] = []
        counts: Counter = Counter()
        prints: dict[str, Tensor] = {}
        last: list[Tensor] = []  # the last input stays alive: a freed tensor's id could come back for the next one

        def record(name, mod, x):
            counts[name] += 1
            if counts[name] == 1:
                calls.append((name, id(x)))
                prints[name] = _fingerprint(x)
                last[:] = [x]
        self._block_pass(k, state, ctx, False, layers, record, kind="plan")
        last.clear()
        groups: list[list[str]] = []
        last_id = None
        for name, xid in calls:
            if groups and xid == last_id:
                groups[-1].append(name)
            else:
                groups.append([name])
            last_id = xid
        order = [n for n, _ in calls]
        missing = set(layers) - set(order)
        if missing:
            log.warning("%s: layers never called in the forward pass stay float: %s", self.units[k].name,
                        sorted(missing))
        chain = BlockPlan(groups, [[g] for g in range(len(groups))], order, {}, exact=False)
        if any(c > 1 for c in counts.values()):
            log.info("%s: a layer runs more than once per pass; quantizing one group at a time", self.units[k].name)
            return chain
        # blocks of one class calling the same layers in the same order run the same code: probe the first only
        prefix = self.units[k].name + "."
        key = (type(self.units[k].module), tuple((n[len(prefix):], type(self.layers[n])) for n in order),
               tuple(len(g) for g in groups))
        if key not in self._deps_by_structure:
            try:
                deps = self._dependencies(k, state, ctx, groups, prints)
            except Exception as e:  # noqa: BLE001 - the one-group-at-a-time order is always right
                log.warning("%s: dependency probe failed (%s); quantizing one group at a time", self.units[k].name, e)
                return chain
            self._deps_by_structure[key] = {n[len(prefix):]: {d[len(prefix):] for d in ds} for n, ds in deps.items()}
        deps = {prefix + n: {prefix + d for d in ds} for n, ds in self._deps_by_structure[key].items()}
        group_of = {n: g for g, names in enumerate(groups) for n in names}
        wave_of: list[int] = []
        for names in groups:
            before = {group_of[d] for n in names for d in deps[n]}
            wave_of.append(1 + max((wave_of[g] for g in before), default=-1))
        waves = [[g for g in range(len(groups)) if wave_of[g] == w] for w in range(max(wave_of, default=-1) + 1)]
        return BlockPlan(groups, waves, order, deps)

    def _dependencies(self, k: int, state, ctx: dict, groups: list[list[str]], prints: dict[str, Tensor]
                      ) -> dict[str, set[str]]:
        """layer → earlier layers it depends on: a group's outputs get random noise added, and every later layer
        whose input changes (its fingerprint differs from the plain pass's `prints`) depends on that group,
        directly or through other layers."""
        deps: dict[str, set[str]] = {n: set() for g in groups for n in g}
        for gi, names in enumerate(groups[:-1]):
            later = [n for g in groups[gi + 1:] for n in g]
            gen = torch.Generator(device=self.device).manual_seed(gi)
            seen: dict[str, Tensor] = {}

            def look(name, mod, x, seen=seen):
                if name not in seen:
                    seen[name] = _fingerprint(x)

            def perturb(name, mod, out, gen=gen):
                noise = torch.randn(out.shape, generator=gen, device=out.device, dtype=torch.float32)
                return out + (noise * (out.detach().float().abs().mean() + 1.0)).to(out.dtype)
            with self._hooks({n: self.layers[n] for n in later}, look, {n: self.layers[n] for n in names}, perturb), \
                    self._mode(k, False), self.timer("forward"):
                self._passes[("plan", True)] += 1
                self._run(k, state, ctx)
            for n in later:
                if n not in seen or not torch.equal(seen[n], prints[n]):
                    deps[n].update(names)
        return deps

    @torch.no_grad()
    def forward_groups(self, k: int, layers: dict[str, QuantLayer]) -> list[list[str]]:
        """Layer names of block k grouped by shared input tensor, in the order the forward pass calls them."""
        return self.plan_block(k, layers).groups

    # ---- one block ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def calibrate_acts(self, k: int, layers: dict[str, QuantLayer]) -> None:
        static = {n: m.act_quant for n, m in layers.items() if hasattr(m.act_quant, "start_calibration")}
        if not static:
            return
        for aq in static.values():
            aq.start_calibration()
        plan = self.plans.get(k)
        stop = None
        if plan is not None and plan.exact and set(static) <= set(plan.order):
            stop = max(static, key=plan.order.index)  # nothing after the last calibrated layer matters
        for _, loaded in self._records(k, self.train, ("q",)):
            self._block_pass(k, loaded.states["q"], loaded.ctx, True, stop_after=stop, stop_post=True,
                             kind="calibrate")
        for aq in static.values():
            aq.finish_calibration()

    @staticmethod
    def _grab(store: dict, name: str, mod: QuantLayer, x: Tensor) -> None:
        store[name] = x

    def _accumulate(self, k: int, acc: dict, leader: dict, x_fp: dict, bad: dict, name: str, mod: QuantLayer,
                    x: Tensor) -> None:
        if leader[name] != name:
            return  # same matmul input as its leader, which was accumulated already
        xq = mod.quant_input(x)
        flag = any_nonfinite(xq)
        bad[name] = flag if name not in bad else bad[name] | flag
        with self.timer("accumulate"):
            acc[name].update(xq, x_fp.get(name))

    def _share_leaders(self, plan: BlockPlan) -> dict[str, str]:
        """layer → the first layer of its group with the same matmul input (itself when none matches): these share
        one fake-quantized input in quantized passes and one H/G accumulator."""
        leader: dict[str, str] = {}
        for names in plan.groups:
            reps: list[str] = []
            for n in names:
                lead = next((r for r in reps if plan.exact and same_matmul_input(self.layers[r], self.layers[n])),
                            None)
                if lead is None:
                    reps.append(n)
                leader[n] = lead or n
        return leader

    @contextmanager
    def _act_quant_once(self, k: int):
        """In a quantized pass over block k, apply each layer's activation quantizer in a pre-hook and switch it off
        for the layer's own call; consecutive layers with the same input and leader (q/k/v) reuse the result. The
        matmuls see the same tensors as without it, computed fewer times, and later pre-hooks (accumulation,
        measurement) get the quantized input instead of quantizing it once more."""
        leader = self.leaders[k]
        last: list = [None, None, None]  # input, leader, quantized input

        def pre(name, mod, args):
            x = args[0]
            if last[0] is not x or last[1] != leader[name]:
                last[:] = [x, leader[name], mod.act_quant(x)]
            mod.act_quant.enabled = False
            return (last[2], *args[1:])

        def post(name, mod, args, out):
            mod.act_quant.enabled = True
        mods = {n: self.layers[n] for n in leader if self.layers[n].act_quant is not None}
        handles = [m.register_forward_pre_hook(lambda mod, args, name=name: pre(name, mod, args))
                   for name, m in mods.items()]
        handles += [m.register_forward_hook(lambda mod, args, out, name=name: post(name, mod, args, out))
                    for name, m in mods.items()]
        try:
            yield
        finally:
            for h in handles:
                h.remove()
            last.clear()

    @torch.no_grad()
    def quantize_wave(self, k: int, plan: BlockPlan, w: int) -> None:
        """Accumulate H (and G) for the layers of wave w of block k over the training records, then quantize them."""
        names = plan.wave_layers(w)
        layers = {n: self.layers[n] for n in names}
        cfg = self.cfg
        if cfg.method == "rtn":
            for name in names:
                self._solve(k, name, layers[name], None, None)
            return
        cross = cfg.method == "qronos"
        leader = self.leaders[k]
        acc = {n: GramAccumulator(m if isinstance(m, nn.Conv2d) else None, cross=cross)
               for n, m in layers.items() if leader[n] == n}
        stop = max(names, key=plan.order.index)
        keep_fp = cross and w == 0  # the first float pass runs the whole block: its output is the next float state
        bad: dict[str, Tensor] = {}
        for i, loaded in self._records(k, self.train, ("fp", "q") if cross else ("q",)):
            x_fp: dict[str, Tensor] = {}
            if cross:
                grab = partial(self._grab, x_fp)
                out = self._block_pass(k, loaded.states["fp"], loaded.ctx, False, layers, grab,
                                       None if keep_fp else stop)
                if keep_fp:
                    self._next_fp[i] = self._store_state(out, loaded.origin)
            self._block_pass(k, loaded.states["q"], loaded.ctx, True, layers,
                             partial(self._accumulate, k, acc, leader, x_fp, bad), stop)
        if bad:
            flags = torch.stack([bad[n] for n in names if n in bad]).tolist()
            for n, f in zip([n for n in names if n in bad], flags):
                if f:
                    raise NonFiniteActivationError(
                        f"NaN/Inf in the input of layer {n} (block {self.units[k].block}) during calibration: check "
                        "the model weights and the calibration data (dtype overflow? try --dtype fp32 or bf16)")
        stats = {n: a.finish() for n, a in acc.items()}  # in place: no copies of the (in, in) matrices
        acc.clear()
        last_use = {leader[n]: n for n in names}
        for name in names:  # the last layer of a shared H/G gives them up: at most two (in, in) matrices alive
            own = last_use[leader[name]] == name
            H, G = stats.pop(leader[name]) if own else stats[leader[name]]
            self._solve(k, name, layers[name], H, G, consume=own)
            del H, G

    def _solve(self, k: int, name: str, layer: QuantLayer, H: Tensor | None, G: Tensor | None,
               consume: bool = False) -> None:
        """Quantize one layer; with `consume` its H and G are released by the solver (no other layer reads them)."""
        cfg = self.cfg
        W = layer.weight_matrix()
        with self.timer("solve"):
            if cfg.method == "rtn":
                res = rtn_quantize_ex(W, cfg.weight)
            elif cfg.method == "gptq":
                res = gptq_quantize_ex(W, H, cfg.weight, cfg.damp, cfg.act_order, cfg.block_size, consume)
            else:
                res = qronos_quantize_ex(W, H, G, cfg.weight, cfg.damp, cfg.act_order, cfg.block_size, consume)
        layer.set_quantized_weight(res.codes, res.scale, res.zero)
        self._report(k, name, res)

    def _report(self, k: int, name: str, res: QuantResult) -> None:
        if res.fell_back:
            log.warning("layer %s: fell back to RTN (%s)", name, res.reason)
        abits = self.cfg.act.bits if self.cfg.act is not None else None
        self.reports.append(LayerReport(self.units[k].block, name, self.cfg.method, self.cfg.weight.bits, abits,
                                        res.damp_rel, math.nan, res.fell_back, res.reason))

    @staticmethod
    def _measure(x_fp: dict, num: dict, den: dict, name: str, mod: QuantLayer, x: Tensor) -> None:
        ref = _layer_output(mod, x_fp[name], mod.weight).float()
        out = _layer_output(mod, mod.quant_input(x), mod.current_weight()).float()
        e, r = (out - ref).pow(2).sum(), ref.pow(2).sum()
        num[name] = num[name] + e if name in num else e
        den[name] = den[name] + r if name in den else r

    @torch.no_grad()
    def propagate(self, k: int, measure: dict[str, QuantLayer] | None) -> None:
        """Run the streams through block k; on held-out records measure each layer's rel_out_err."""
        n = len(self.calib)
        num: dict[str, Tensor] = {}
        den: dict[str, Tensor] = {}
        held = set(self.held) if measure else set()
        one_stream = self.streams_equal and k not in self.selected
        new_fp: list[State | None] = [None] * n
        new_q: list[State | None] = [None] * n

        def streams(i):
            if one_stream:
                return ("q",)
            return ("q", "fp") if (i in self.fp_records and i not in self._next_fp) else ("q",)
        for i, loaded in self._records(k, range(n), streams):
            if one_stream:  # before the first selected block: one float stream (these blocks have no quant layers)
                out = self._block_pass(k, loaded.states["q"], loaded.ctx, False)
                new_q[i] = new_fp[i] = self._store_state(out, loaded.origin)
            else:
                x_fp: dict[str, Tensor] = {}
                if i in self._next_fp:
                    new_fp[i] = self._next_fp.pop(i)
                elif "fp" in loaded.states:
                    grab = partial(self._grab, x_fp) if i in held else None
                    out = self._block_pass(k, loaded.states["fp"], loaded.ctx, False, measure, grab)
                    new_fp[i] = self._store_state(out, loaded.origin)
                err = partial(self._measure, x_fp, num, den) if i in held else None
                out = self._block_pass(k, loaded.states["q"], loaded.ctx, True, measure, err)
                new_q[i] = self._store_state(out, loaded.origin)
            if self._pin:  # hand the record's old buffers back (the copies reading them are queued before reuse)
                keep = {id(t) for t in _flat(new_fp[i]) + _flat(new_q[i])}
                old = {id(t): t for t in _flat(self.fp[i]) + _flat(self.q[i])}
                self._pool.give(t for tid, t in old.items() if tid not in keep)
        self.fp, self.q = new_fp, new_q
        self._next_fp.clear()
        self._pool.trim()  # free buffers this unit neither took nor gave back (e.g. of another resolution) go
        if k in self.selected:
            self.streams_equal = False
        if measure and num:
            names = list(num)
            vals = torch.stack([torch.stack([num[m], den[m]]) for m in names]).tolist()
            errs = {m: math.sqrt(a / max(b, 1e-30)) for m, (a, b) in zip(names, vals)}
            for r in self.reports:
                if r.block == self.units[k].block and r.layer in errs:
                    r.rel_out_err = errs[r.layer]

    def quantize_block(self, k: int) -> None:
        layers = self._block_layers(k)
        self.quant_calls[self.units[k].name] += 1
        plan = self.plans[k] = self.plan_block(k, layers)
        self.calibrate_acts(k, layers)
        self.leaders[k] = self._share_leaders(plan)
        for w in range(len(plan.waves)):
            self.quantize_wave(k, plan, w)

    # ---- the whole procedure ------------------------------------------------------------------------------
    def _offload(self, k: int) -> None:
        """Move finished block k's parameters and buffers to storage (SequentialConfig.offload_done)."""
        prefix = self.units[k].name + "."
        shared = {id(t) for name, m in self.den.named_modules(remove_duplicate=False)
                  if not (name + ".").startswith(prefix)
                  for t in (*m.parameters(recurse=False), *m.buffers(recurse=False))}
        self._offloaded.append(k)  # first: a move that fails half-way is still undone
        self._offload_bytes += move_module_tensors(self.units[k].module, lambda t: t.to(self.storage),
                                                   _is_act_quantizer, shared)

    def _fetch(self, k: int) -> None:
        """Bring unit k back to the compute device if it is offloaded (a pending unit before its turn, or any at
        the end)."""
        if k in self._offloaded:
            move_module_tensors(self.units[k].module, lambda t: t.to(self.device), _is_act_quantizer)
            self._offloaded.remove(k)

    def _restore_offloaded(self) -> None:
        """Move every offloaded unit back to the compute device."""
        for k in list(self._offloaded):
            self._fetch(k)

    def _finish_unit(self, k: int, t0: float, before: dict[str, float], peak: int) -> None:
        """Add unit k's statistics to its block's (block_stats, block_peak_vram)."""
        phases = self.timer.totals  # synchronizes
        cuda = self.device.type == "cuda"
        unit_peak = torch.cuda.max_memory_allocated(self.device) if cuda else 0
        b = self.units[k].block
        if cuda:
            self.block_peak_vram[b] = max(peak, unit_peak, self.block_peak_vram.get(b, 0))
        plan = self.plans.get(k)
        stats = self.block_stats.setdefault(b, {
            "units": 0, "seconds": 0.0, "phases": {}, "record_passes": {}, "h2d_bytes": 0, "d2h_bytes": 0,
            "offload_bytes": 0, "groups": 0, "waves": 0, "peak_vram_bytes": None, "allocated_bytes": None})
        stats["units"] += 1
        stats["seconds"] += time.perf_counter() - t0
        for p, v in phases.items():
            stats["phases"][p] = stats["phases"].get(p, 0.0) + v - before.get(p, 0.0)
        for (kind, full), c in self._passes.items():
            key = f"{kind}{'' if full else '_early_exit'}"
            stats["record_passes"][key] = stats["record_passes"].get(key, 0) + c
        stats["record_passes"] = dict(sorted(stats["record_passes"].items()))
        stats["h2d_bytes"] += self._prefetch.h2d_bytes
        stats["d2h_bytes"] += self._d2h_bytes
        stats["offload_bytes"] += self._offload_bytes
        stats["groups"] += len(plan.groups) if plan else 0
        stats["waves"] += len(plan.waves) if plan else 0
        if cuda:
            stats["peak_vram_bytes"] = max(stats["peak_vram_bytes"] or 0, unit_peak)  # this block's peak
            stats["allocated_bytes"] = torch.cuda.memory_allocated(self.device)  # after it (model, caches)
        self._passes.clear()
        self._prefetch.h2d_bytes = self._d2h_bytes = self._offload_bytes = 0

    def _run_blocks(self) -> tuple[int | None, set[int]]:
        """Units 0..the last selected one in order; returns (the block on_block stopped after or None, units done).
        """
        cuda = self.device.type == "cuda"
        last = self.selected[-1]
        selected = set(self.selected)
        peak, stopped, done = 0, None, set()
        desc = f"{self.cfg.method} {'units' if len(self.units) > len(self.blocks) else 'blocks'}"
        for k in tqdm(range(last + 1), desc=desc, disable=not self.progress):
            unit = self.units[k]
            t0, before = time.perf_counter(), dict(self.timer.totals)
            if cuda:
                peak = max(peak, torch.cuda.max_memory_allocated(self.device))
                torch.cuda.reset_peak_memory_stats(self.device)
            if k in selected:
                self._fetch(k)
                self.quantize_block(k)
                self.propagate(k, self._block_layers(k))
                done.add(k)
                if self.cfg.drop_float_weights:
                    for layer in self._block_layers(k).values():
                        if layer.is_quantized:
                            layer.drop_float_weight()
                if self.cfg.offload_done:
                    self._offload(k)
            elif k < last:
                self.propagate(k, None)
            self._finish_unit(k, t0, before, peak)
            peak = self.block_peak_vram.get(unit.block, 0)
            block_done = k == len(self.units) - 1 or self.units[k + 1].block != unit.block
            if block_done and self.on_block is not None and self.on_block(unit.block, self) and k < last:
                stopped = unit.block
                break
        return stopped, done

    def run(self) -> SequentialResult:
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        self.swap()
        try:
            if self.cfg.offload_pending:
                for k in self.selected[1:]:
                    self._offload(k)
            self.init_streams()
            stopped, done = self._run_blocks()
        finally:
            self.fp = self.q = self.ctx = []  # free the caches
            self._next_fp.clear()
            self._pool.clear()
            self._restore_offloaded()
        set_quant_enabled(self.den, weights=True, acts=True)
        for k in set(self.selected) - done:  # stopped early: unprocessed units stay float
            for layer in self._block_layers(k).values():
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
    """Quantize `denoiser` in place, block by block (see the module docstring). The denoiser must be on `device`."""
    return SequentialQuantizer(denoiser, family, calib, config, device, dtype, storage, progress, on_block).run()


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
