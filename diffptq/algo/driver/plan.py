"""Planning a unit: its layers grouped by input tensor, which layers' inputs depend on which, and the waves of groups
that one pass per stream can calibrate together."""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass

import torch
from torch import Tensor

from diffptq.algo.driver.passes import UnitRunner, hooks
from diffptq.quant.layers import QuantLayer

log = logging.getLogger(__name__)


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


def _fingerprint(x: Tensor) -> Tensor:
    """Sum and norm of x in float32: equal for equal tensors (same reductions), different after a perturbation."""
    return torch.stack([x.sum(dtype=torch.float32), torch.linalg.vector_norm(x, dtype=torch.float32)])


@torch.no_grad()
def plan_unit(runner: UnitRunner, k: int, layers: dict[str, QuantLayer], i: int,
              known: dict[tuple, dict[str, set[str]]]) -> BlockPlan:
    """Groups and waves of unit k's layers, from float passes on record i (its quantized-stream state). known:
    dependencies by unit structure (class, layer names relative to the unit, group sizes), filled here, so units
    that run the same code are probed once."""
    unit = runner.units[k]
    ctx, state = runner.cache.load_ctx(i), runner.state_to_dev(k, runner.cache.q[i])
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
    runner.block_pass(k, state, ctx, False, layers, record, kind="plan")
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
        log.warning("%s: layers never called in the forward pass stay float: %s", unit.name, sorted(missing))
    chain = BlockPlan(groups, [[g] for g in range(len(groups))], order, {}, exact=False)
    if any(c > 1 for c in counts.values()):
        log.info("%s: a layer runs more than once per pass; quantizing one group at a time", unit.name)
        return chain
    # blocks of one class calling the same layers in the same order run the same code: probe the first only
    prefix = unit.name + "."
    key = (type(unit.module), tuple((n[len(prefix):], type(runner.layers[n])) for n in order),
           tuple(len(g) for g in groups))
    if key not in known:
        try:
            deps = _dependencies(runner, k, state, ctx, groups, prints)
        except Exception as e:  # noqa: BLE001 - the one-group-at-a-time order is always right
            log.warning("%s: dependency probe failed (%s); quantizing one group at a time", unit.name, e)
            return chain
        known[key] = {n[len(prefix):]: {d[len(prefix):] for d in ds} for n, ds in deps.items()}
    deps = {prefix + n: {prefix + d for d in ds} for n, ds in known[key].items()}
    group_of = {n: g for g, names in enumerate(groups) for n in names}
    wave_of: list[int] = []
    for names in groups:
        before = {group_of[d] for n in names for d in deps[n]}
        wave_of.append(1 + max((wave_of[g] for g in before), default=-1))
    waves = [[g for g in range(len(groups)) if wave_of[g] == w] for w in range(max(wave_of, default=-1) + 1)]
    return BlockPlan(groups, waves, order, deps)


def _dependencies(runner: UnitRunner, k: int, state, ctx: dict, groups: list[list[str]], prints: dict[str, Tensor]
                  ) -> dict[str, set[str]]:
    """layer → earlier layers it depends on: a group's outputs get random noise added, and every later layer
    whose input changes (its fingerprint differs from the plain pass's `prints`) depends on that group,
    directly or through other layers."""
    layers = runner.layers
    deps: dict[str, set[str]] = {n: set() for g in groups for n in g}
    for gi, names in enumerate(groups[:-1]):
        later = [n for g in groups[gi + 1:] for n in g]
        gen = torch.Generator(device=runner.cache.device).manual_seed(gi)
        seen: dict[str, Tensor] = {}

        def look(name, mod, x, seen=seen):
            if name not in seen:
                seen[name] = _fingerprint(x)

        def perturb(name, mod, out, gen=gen):
            noise = torch.randn(out.shape, generator=gen, device=out.device, dtype=torch.float32)
            return out + (noise * (out.detach().float().abs().mean() + 1.0)).to(out.dtype)
        with hooks({n: layers[n] for n in later}, look, {n: layers[n] for n in names}, perturb), \
                runner.mode(k, False), runner.timer("forward"):
            runner.passes[("plan", True)] += 1
            runner.run(k, state, ctx)
        for n in later:
            if n not in seen or not torch.equal(seen[n], prints[n]):
                deps[n].update(names)
    return deps
