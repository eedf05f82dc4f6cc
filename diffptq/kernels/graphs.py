"""CUDA graphs over whole denoiser calls: GraphedDenoiser replays one captured graph per input signature.

At batch 1-4 a quantized denoiser step is launch-bound: hundreds of small kernels (per-token FP8 quantization,
per-call int4 dequantization, norms, attention) each cost more CPU time to launch than GPU time to run. Replaying a
CUDA graph launches all of them at once.

How: the first call with a new signature (`call_signature`: every tensor's shape, dtype and device, which arguments
are None, the values of the other arguments, grad / inference mode) clones its tensors into static input buffers,
runs the denoiser `warmup` times on a side stream (lazy initialisation, cuBLAS / cuDNN choices, compilation of a
compiled denoiser happen there, as PyTorch's CUDA-graph documentation prescribes), then captures one call into a
CUDAGraph whose memory comes from one pool shared by all captures of this wrapper. Later calls with that signature
copy their tensors into the static buffers and replay. At most `max_graphs` signatures are kept (least recently used
dropped, logged): CFG's doubled batch and a last partial batch each get their own graph.

Outputs: cloned after each replay by default (one device copy). With `clone_outputs=False` a call returns the
graph's static outputs, which the next call (of any signature: the captures share one pool) overwrites. diffusers'
PixArt and SD pipelines consume the denoiser output within the step only under CFG (`noise_pred.chunk(2)` makes a new
tensor); without CFG the scheduler gets the output itself, and multistep schedulers keep it across steps (PNDM's
`ets`, DPM-Solver's `model_outputs`), hence the default.

Eager instead (one log line per reason, once): off CUDA, under torch.compile tracing (silently), inside an outer
capture, with autograd on (graphs replay under torch.no_grad() / torch.inference_mode() only), an argument it cannot
buffer (an object other than tensors, None, numbers, strings and lists / tuples / dicts of them), time-conditioned
activation quantizers or forward hooks on the denoiser (their Python state is read once, at capture: the per-step
scales of TDQ would freeze), or a failed capture (e.g. a host synchronisation inside forward; that signature stays
eager). What a graph cannot see: any other Python-side state read during forward is frozen at capture. Moving or
casting the wrapper (`.to`, `.half`) or switching train / eval drops its graphs; copies (deepcopy, pickle) hold none.
"""
from __future__ import annotations

import contextlib
import logging
from collections import OrderedDict
from collections.abc import Hashable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)
VALUE_TYPES = (bool, int, float, str, bytes, torch.dtype, torch.device)  # arguments keyed by value


class Unbufferable(TypeError):
    """An argument a graph cannot take: not a tensor, None, a plain value or a list / tuple / dict of them."""


def _leaf_key(obj: Any, tensors: list[Tensor]) -> Hashable:
    if isinstance(obj, Tensor):
        tensors.append(obj)
        return "tensor", tuple(obj.shape), obj.dtype, obj.device, obj.requires_grad
    if obj is None or isinstance(obj, VALUE_TYPES):
        return "value", type(obj), obj
    if isinstance(obj, (list, tuple)):
        return type(obj), tuple(_leaf_key(o, tensors) for o in obj)
    if isinstance(obj, dict):
        return type(obj), tuple((k, _leaf_key(v, tensors)) for k, v in obj.items())
    raise Unbufferable(f"an argument of type {type(obj).__name__}")


def call_signature(args: tuple, kwargs: dict) -> tuple[Hashable, list[Tensor]]:
    """(key, tensors): a hashable key equal for calls one graph can replay, and the call's tensors in a fixed order
    (the order `rebuild_call` consumes them). Raises Unbufferable for an argument a graph cannot take."""
    tensors: list[Tensor] = []
    key = (_leaf_key(args, tensors), _leaf_key(dict(sorted(kwargs.items())), tensors),
           torch.is_grad_enabled(), torch.is_inference_mode_enabled())
    return key, tensors


def rebuild_call(args: tuple, kwargs: dict, tensors: list[Tensor]) -> tuple[tuple, dict]:
    """(args, kwargs) with their tensors replaced, in call_signature's order, by `tensors`."""
    it = iter(tensors)
    return rebuild(args, it), rebuild(dict(sorted(kwargs.items())), it)


def rebuild(obj: Any, tensors: Iterator[Tensor]) -> Any:
    """`obj` (arguments, or outputs) with its tensors replaced, in order, by those of `tensors`."""
    if isinstance(obj, Tensor):
        return next(tensors)
    if isinstance(obj, (list, tuple)):
        items = [rebuild(o, tensors) for o in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)  # namedtuples take fields
    if isinstance(obj, dict):
        return type(obj)(**{k: rebuild(v, tensors) for k, v in obj.items()})  # also diffusers' BaseOutput
    return obj


def tensors_of(obj: Any) -> list[Tensor]:
    """The tensors inside outputs (tensors, lists / tuples / dicts of them), in `rebuild`'s order."""
    if isinstance(obj, Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for o in obj for t in tensors_of(o)]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in tensors_of(v)]
    return []


class GraphCache:
    """At most `max_entries` values by key, least recently used dropped first."""

    def __init__(self, max_entries: int):
        self.max_entries = max_entries
        self.entries: OrderedDict = OrderedDict()

    def get(self, key: Hashable) -> Any:
        """The value of `key` (now the most recently used), or None."""
        value = self.entries.get(key)
        if value is not None:
            self.entries.move_to_end(key)
        return value

    def put(self, key: Hashable, value: Any) -> list[Hashable]:
        """Store `value` under `key`; returns the keys dropped to stay within max_entries."""
        self.entries[key] = value
        self.entries.move_to_end(key)
        dropped = []
        while len(self.entries) > self.max_entries:
            dropped.append(self.entries.popitem(last=False)[0])
        return dropped

    def __len__(self) -> int:
        return len(self.entries)


@dataclass
class CapturedCall:
    """One signature's graph, its static input buffers and static outputs; graph None: runs eagerly (`reason`)."""

    graph: Any = None
    inputs: list[Tensor] | None = None
    outputs: Any = None
    reason: str = ""


_WARMUP_STREAMS: dict[int, torch.cuda.Stream] = {}


def warmup_stream() -> torch.cuda.Stream:
    """One side stream per device for every capture's warm-up calls: a stream of its own per capture would also get
    cuBLAS a workspace of its own per stream, kept until the process ends."""
    device = torch.cuda.current_device()
    if device not in _WARMUP_STREAMS:
        _WARMUP_STREAMS[device] = torch.cuda.Stream(device)
    return _WARMUP_STREAMS[device]


def capture_graph(fn, args: tuple, kwargs: dict, warmup: int, pool) -> tuple[torch.cuda.CUDAGraph, Any]:
    """(graph, static outputs) of `fn(*args, **kwargs)` on static inputs: `warmup` calls on a side stream, then one
    captured call drawing memory from `pool`. The graph has not run yet."""
    side = warmup_stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn(*args, **kwargs)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        outputs = fn(*args, **kwargs)
    return graph, outputs


def device_reason(tensors: list[Tensor]) -> str | None:
    """Why calls with these tensors cannot replay a graph (None when they can)."""
    if not tensors:
        return "no tensor argument"
    devices = {t.device for t in tensors}
    if len(devices) > 1 or next(iter(devices)).type != "cuda":
        return f"inputs on {', '.join(sorted(str(d) for d in devices))}, not one CUDA device"
    return None


def describe(key: Hashable) -> str:
    """The tensor shapes of a signature, for log lines: '(2, 4, 8, 8) bfloat16, (2,) int64, ...'."""
    parts: list[str] = []

    def walk(k):
        if isinstance(k, tuple) and len(k) == 5 and k[0] == "tensor":
            parts.append(f"{k[1]} {str(k[2]).removeprefix('torch.')}")
        elif isinstance(k, tuple):
            for item in k:
                walk(item)

    walk(key[:2])
    return ", ".join(parts)


AUTOGRAD = "autograd is on: graphs replay under torch.no_grad() or torch.inference_mode() only"


def cuda_reason() -> str | None:
    """Why no call can replay a graph here now, whatever its arguments (None when one can)."""
    if not torch.cuda.is_available():
        return "CUDA is not available"
    if torch.cuda.is_current_stream_capturing():
        return "an outer CUDA graph is being captured (it takes these kernels itself)"
    return None


def _on(device: torch.device) -> contextlib.AbstractContextManager:
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


class GraphedDenoiser(nn.Module):
    """A denoiser whose calls replay CUDA graphs (see the module docstring). Attributes it lacks (`config`, `dtype`,
    `device`, the denoiser's methods and submodules) are the denoiser's, so diffusers pipelines run it as their
    transformer / unet; its own module tree holds the denoiser as `denoiser` (quantize or convert before wrapping).

    max_graphs: signatures kept (≥ 1). warmup: eager calls before each capture (≥ 1). clone_outputs: return copies
    (default) or the static outputs, which the next call overwrites.
    Counters: `replays`, `eager_calls`, `eager_reasons` ({reason: calls}; each reason logged once).
    """

    def __init__(self, denoiser: nn.Module, max_graphs: int = 8, warmup: int = 3, clone_outputs: bool = True):
        super().__init__()
        for name, value in (("max_graphs", max_graphs), ("warmup", warmup)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"GraphedDenoiser {name} must be an integer ≥ 1, got {value!r}")
        self.denoiser = denoiser
        self.training = denoiser.training
        self.warmup, self.clone_outputs = warmup, bool(clone_outputs)
        self.cache = GraphCache(max_graphs)
        self.pool = None
        self.replays = self.eager_calls = 0
        self.eager_reasons: dict[str, int] = {}

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            modules = self.__dict__.get("_modules", {})
            if name == "denoiser" or "denoiser" not in modules:
                raise
            return getattr(modules["denoiser"], name)

    def forward(self, *args, **kwargs) -> Any:
        if torch.compiler.is_compiling():  # traced as the plain denoiser; no log line (it would break the graph)
            return self.denoiser(*args, **kwargs)
        reason, entry, tensors = cuda_reason() or (AUTOGRAD if torch.is_grad_enabled() else None), None, []
        if reason is None:
            try:
                key, tensors = call_signature(args, kwargs)
                reason = device_reason(tensors)
            except Unbufferable as err:
                reason = f"{err} (graphs take tensors, None, plain values and lists / tuples / dicts of them)"
        if reason is None:
            entry = self.cache.get(key) or self._capture(key, args, kwargs, tensors)
            reason = entry.reason
        if entry is None or entry.graph is None:
            self._eager(reason)
            return self.denoiser(*args, **kwargs)
        with _on(tensors[0].device):
            for static, new in zip(entry.inputs, tensors, strict=True):
                static.copy_(new)
            entry.graph.replay()
            self.replays += 1
            if not self.clone_outputs:
                return entry.outputs
            return rebuild(entry.outputs, iter([t.clone() for t in tensors_of(entry.outputs)]))

    def _eager(self, reason: str) -> None:
        self.eager_calls += 1
        if reason not in self.eager_reasons:  # on a CUDA machine a fallback is news: a warning
            log.log(logging.WARNING if torch.cuda.is_available() else logging.INFO,
                    "GraphedDenoiser: running eagerly: %s", reason)
        self.eager_reasons[reason] = self.eager_reasons.get(reason, 0) + 1

    def _refusal(self) -> str | None:
        """Why this denoiser cannot be captured at all (None when it can)."""
        from diffptq.tdq.step_hook import find_conditioned_quantizers

        den = self.denoiser
        if den._forward_pre_hooks or den._forward_hooks:
            return "forward hooks on the denoiser (a graph would run them at capture only)"
        if find_conditioned_quantizers(den):
            return "time-conditioned activation quantizers (their per-step scales are set outside the graph)"
        return None

    def _capture(self, key: Hashable, args: tuple, kwargs: dict, tensors: list[Tensor]) -> CapturedCall:
        """Capture the graph of a new signature (or record why it runs eagerly), keeping at most max_graphs."""
        shapes = describe(key)
        entry = CapturedCall(reason=self._refusal() or "")
        if not entry.reason:
            static = [t.clone() for t in tensors]
            static_args, static_kwargs = rebuild_call(args, kwargs, static)
            device = static[0].device
            try:
                with _on(device):
                    if self.pool is None and device.type == "cuda":
                        self.pool = torch.cuda.graph_pool_handle()  # one pool for every capture of this wrapper
                    graph, outputs = capture_graph(self.denoiser, static_args, static_kwargs, self.warmup, self.pool)
                entry = CapturedCall(graph, static, outputs)
                log.info("GraphedDenoiser: captured a graph for %s", shapes)
            except Exception as err:  # noqa: BLE001 - whatever broke the capture, this signature runs eagerly
                entry = CapturedCall(reason=f"capture failed for {shapes}: {type(err).__name__}: {str(err)[:300]}")
        for dropped in self.cache.put(key, entry):
            log.info("GraphedDenoiser: max_graphs=%d reached, dropped the least recently used signature (%s)",
                     self.cache.max_entries, describe(dropped))
        return entry

    @property
    def num_graphs(self) -> int:
        """Captured graphs kept now."""
        return sum(e.graph is not None for e in self.cache.entries.values())

    def stats(self, clear: bool = False) -> dict:
        """{graphs, replays, eager_calls, eager_reasons}: what the calls so far did (`clear`: then count afresh)."""
        out = {"graphs": self.num_graphs, "replays": self.replays, "eager_calls": self.eager_calls,
               "eager_reasons": dict(self.eager_reasons)}
        if clear:
            self.replays = self.eager_calls = 0
            self.eager_reasons = {}
        return out

    def reset(self) -> None:
        """Drop every captured graph and their memory pool; the next calls capture afresh."""
        self.cache = GraphCache(self.cache.max_entries)
        self.pool = None

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)  # copies and pickles hold no graph: they capture their own
        state.update(cache=GraphCache(self.cache.max_entries), pool=None)
        return state

    def _apply(self, fn, recurse=True):
        self.reset()  # moved or cast: the graphs read the old tensors
        return super()._apply(fn, recurse)

    def train(self, mode: bool = True) -> GraphedDenoiser:
        if mode != self.training:
            self.reset()
        return super().train(mode)

    def extra_repr(self) -> str:
        return f"max_graphs={self.cache.max_entries}, warmup={self.warmup}, clone_outputs={self.clone_outputs}"


def graph_denoiser(pipe_or_denoiser: Any, max_graphs: int = 8, warmup: int = 3,
                   clone_outputs: bool = True) -> GraphedDenoiser:
    """CUDA graphs over every denoiser call. A pipeline: its denoiser (pipe.transformer / pipe.unet) is replaced by a
    GraphedDenoiser around it, in place, and that is returned. A denoiser module: returned wrapped (put it where the
    module was). Already wrapped: returned as it is. Quantize / convert first (convert_for_inference, compile):
    the wrapper captures whatever the denoiser is at its first call of each signature."""
    if isinstance(pipe_or_denoiser, GraphedDenoiser):
        return pipe_or_denoiser
    if isinstance(pipe_or_denoiser, nn.Module):
        return GraphedDenoiser(pipe_or_denoiser, max_graphs, warmup, clone_outputs)
    from diffptq.models.families import family_of

    attr = family_of(pipe_or_denoiser).denoiser_attr
    graphed = graph_denoiser(getattr(pipe_or_denoiser, attr), max_graphs, warmup, clone_outputs)
    setattr(pipe_or_denoiser, attr, graphed)
    return graphed
