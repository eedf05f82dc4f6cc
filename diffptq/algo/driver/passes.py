"""One pass of a unit over one record's cached state: float or quantized, with hooks on its layers and early exit."""
from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, nullcontext

from torch import Tensor, nn

from diffptq.algo.driver.cache import Pick, StreamCache
from diffptq.algo.driver.memory import Loaded
from diffptq.algo.driver.timing import PhaseTimer
from diffptq.models.units import State, Unit
from diffptq.quant.layers import QuantLayer, set_quant_enabled


class Stop(Exception):
    """Raised inside a unit once the layers of interest have run (early exit)."""


def set_layers(layers, quant: bool) -> None:
    """Quantized weights and activation quantizers on (quant) or off for these layers."""
    for layer in layers:
        layer.quant_weight = quant
        if layer.act_quant is not None:
            layer.act_quant.enabled = quant


@contextmanager
def hooks(modules: dict[str, nn.Module], fn, post: dict[str, nn.Module] | None = None, post_fn=None):
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
def quant_mode(model: nn.Module):
    """Every quant layer of `model` quantized (weights where quantized, activation quantizers on), float after."""
    set_quant_enabled(model, weights=True, acts=True)
    try:
        yield
    finally:
        set_quant_enabled(model, weights=False, acts=False)


def grab(store: dict, name: str, mod: QuantLayer, x: Tensor) -> None:
    """A hook that keeps each layer's input by name."""
    store[name] = x


class UnitRunner:
    """Runs unit k of `units` on a cached state, its inputs moved to the device from `cache`; counts the passes by
    (kind, whole unit run) in `passes`. layers: every swapped layer by name (set by SequentialQuantizer.swap).
    leaders: per unit, layer → the layer whose matmul input it shares (set once the unit is planned)."""

    def __init__(self, units: list[Unit], cache: StreamCache, timer: PhaseTimer, leaders: dict[int, dict[str, str]]):
        self.units, self.cache, self.timer, self.leaders = units, cache, timer, leaders
        self.layers: dict[str, QuantLayer] = {}
        self.passes: Counter = Counter()
        self._layers_of: dict[int, dict[str, QuantLayer]] = {}

    def layers_of(self, k: int) -> dict[str, QuantLayer]:
        """Unit k's quant layers by name."""
        if k not in self._layers_of:
            prefix = self.units[k].name + "."
            self._layers_of[k] = {n: m for n, m in self.layers.items() if n.startswith(prefix)}
        return self._layers_of[k]

    def state_to_dev(self, k: int, state: State) -> State:
        """h and the skips that unit k reads on the compute device; the other skips stay where they are."""
        h, skips = state
        first = len(skips) - self.units[k].skips_read
        return self.cache.to_dev(h), [self.cache.to_dev(s) if j >= first else s for j, s in enumerate(skips)]

    def run(self, k: int, state: State, ctx: dict) -> State:
        return self.units[k].run(*self.state_to_dev(k, state), ctx)

    def records(self, k: int, indices: Iterable[int], streams: Pick) -> Iterator[tuple[int, Loaded]]:
        """StreamCache.records for unit k: of each state only the skips it reads go to the device."""
        return self.cache.records(indices, streams, self.units[k].skips_read)

    @contextmanager
    def mode(self, k: int, quant: bool):
        """Unit k's layers quantized (weights where quantized, activation quantizers on) or float. Outside passes
        every layer is float (swap() and quant_mode() leave it so); only unit k runs, so only its layers switch
        (switching the whole model each pass costs milliseconds of Python per pass on a 28-block model)."""
        layers = self.layers_of(k).values()
        set_layers(layers, quant)
        try:
            yield
        finally:
            set_layers(layers, False)

    def block_pass(self, k: int, state, ctx: dict, quant: bool, modules: dict | None = None, fn=None,
                   stop_after: str | None = None, stop_post: bool = False, kind: str | None = None):
        """Run unit k on `state` in quantized or float mode, calling fn(name, module, x) before each of `modules`
        and stopping right before `stop_after` runs (after its hook), or right after it when `stop_post`.
        Returns the output state, or None when stopped early."""
        pre = dict(modules) if (fn is not None and modules) else {}
        if stop_after is not None:
            pre.setdefault(stop_after, self.layers[stop_after])

        def hook(name, mod, x):
            if fn is not None and modules and name in modules:
                fn(name, mod, x)
            if name == stop_after and not stop_post:
                raise Stop

        def stop(name, mod, out):
            raise Stop
        post = {stop_after: self.layers[stop_after]} if (stop_after is not None and stop_post) else None
        self.passes[(kind or ("q" if quant else "fp"), stop_after is None)] += 1
        mode = self.mode(k, quant)
        once = self.act_quant_once(k) if (quant and kind != "calibrate" and k in self.leaders) else nullcontext()
        with mode, once, hooks(pre, hook, post, stop), self.timer("forward"):
            try:
                return self.run(k, state, ctx)
            except Stop:
                return None

    @contextmanager
    def act_quant_once(self, k: int):
        """In a quantized pass over unit k, apply each layer's activation quantizer in a pre-hook and switch it off
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

