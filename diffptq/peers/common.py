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
