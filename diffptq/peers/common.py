"""What the peer adapters share: the block layers to quantize, group sizes that fit them, calibration passes."""
from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import nn

from diffptq.models.families import family_of
from diffptq.peers.registry import Peer, PeerFailed


def block_layers(denoiser: nn.Module) -> dict[str, nn.Module]:
    """name -> module of the layers our methods quantize (ModelFamily.block_layer_names), in forward order."""
    return {name: denoiser.get_submodule(name) for name in family_of(denoiser).block_layer_names(denoiser)}


def fitting_group(width: int, preferred: int, smallest: int = 16, whole_row: bool = True) -> int | None:
    """The largest power-of-two group size in [smallest, preferred] dividing `width` (a layer's input width);
    with `whole_row`, the whole row (`width`) when it is itself at most `preferred`; None when nothing fits."""
    if whole_row and smallest <= width <= preferred:
        return width
    group = preferred
    while group >= smallest:
        if width % group == 0:
            return group
        group //= 2
    return None


class Replay:
    """Calibration inputs iterable any number of times: a re-iterable is kept as is, a one-shot iterator is listed
    once (its items then stay in memory)."""

    def __init__(self, calib_inputs: Iterable[dict]) -> None:
        self.source = list(calib_inputs) if iter(calib_inputs) is calib_inputs else calib_inputs

    def __iter__(self) -> Iterator[dict]:
        return iter(self.source)


def _batch_size(inputs: dict) -> int:
    """The batch of one record: the first dimension of its first tensor with one (the latents come first)."""
    for value in inputs.values():
        if isinstance(value, torch.Tensor) and value.dim():
            return value.shape[0]
    raise PeerFailed("a calibration record has no batched tensor")


def _joinable(a, b) -> bool:
    """Whether two values of one key can be joined along the batch: tensors alike but for their batch, dicts of
    joinable values, anything else equal."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.dtype == b.dtype and a.device == b.device and a.dim() == b.dim() and a.shape[1:] == b.shape[1:]
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_joinable(a[k], b[k]) for k in a)
    return not isinstance(a, torch.Tensor) and not isinstance(b, torch.Tensor) and a == b


def _join(values: list, sizes: list[int]):
    """One value from the records' values of a key: tensors concatenated along the batch (a 0-d tensor, e.g. a UNet's
    timestep, first repeated over its record's batch), dicts key by key, anything else the first (all are equal)."""
    first = values[0]
    if isinstance(first, torch.Tensor):
        return torch.cat([v.reshape(1).expand(n) if v.dim() == 0 else v for v, n in zip(values, sizes)])
    if isinstance(first, dict):
        return {k: _join([v[k] for v in values], sizes) for k in first}
    return first


def merge_records(calib_inputs: Iterable[dict], max_batch: int) -> list[dict]:
    """The records joined, in order, into as few records of at most `max_batch` samples as their shapes allow: the
    same samples in fewer denoiser calls (for a peer that runs many calibration passes, each call costing Python
    overhead). A record larger than max_batch stays alone."""
    merged, group, sizes = [], [], []

    def flush():
        if group:
            merged.append(group[0] if len(group) == 1 else
                          {k: _join([r[k] for r in group], sizes) for k in group[0]})
            group.clear()
            sizes.clear()

    for inputs in calib_inputs:
        n = _batch_size(inputs)
        if group and (sum(sizes) + n > max_batch or inputs.keys() != group[0].keys()
                      or not all(_joinable(group[0][k], inputs[k]) for k in inputs)):
            flush()
        group.append(inputs)
        sizes.append(n)
    flush()
    return merged


@torch.no_grad()
def forward_all(model: nn.Module, calib_inputs: Iterable[dict]) -> int:
    """One calibration pass: model(**inputs) for every record; returns the number of records."""
    n = 0
    for inputs in calib_inputs:
        model(**inputs)
        n += 1
    if n == 0:
        raise PeerFailed("no calibration records: the calibration set is empty")
    return n


def layer_note(peer: Peer, done: int, total: int, left: dict[str, int] | None = None, tail: str = "") -> str:
    """`Q/N block layers quantized[; K <why> left in float][; tail]`: a metrics row's note."""
    parts = [f"{done}/{total} block layers quantized"]
    parts += [f"{k} {why} left in float" for why, k in (left or {}).items() if k]
    return "; ".join(parts + ([tail] if tail else []))
