"""The peer rows of the benchmark (`--peers`): each peer configuration (diffptq.peers) quantizes a fresh copy of the
float denoiser with its own library, calibrated on the benchmark's shared calibration set, and is evaluated on the
same prompts and seeds as our methods.

A peer that cannot run (package absent, a CUDA-only kernel on the CPU, a layer it refuses, a failure while
generating) does not stop the benchmark: its row keeps empty metrics and says why in `note`.
"""
from __future__ import annotations

import copy
import logging
import time
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from diffptq.peers import PEERS, PeerFailed, PeerUnavailable, get_peer

log = logging.getLogger("diffptq.benchmark")


def is_peer(method: str) -> bool:
    """`method` names a peer configuration (e.g. 'modelopt:int8_sq'), not one of our methods."""
    return method in PEERS


def peer_variant_bits(names: Sequence[str]) -> list[tuple[str, int, int]]:
    """(name, wbits, abits) of each listed peer, in order: the benchmark's Variant fields."""
    return [(p.name, p.wbits, p.abits) for p in map(get_peer, names)]


class CalibInputs:
    """The denoiser's keyword inputs of every calibration record on `device` in `dtype`, replayed from the start on
    every iteration (CalibrationSet.batches each time): peers that run several calibration passes see them all."""

    def __init__(self, calib_set, device: torch.device, dtype: torch.dtype) -> None:
        self.calib_set, self.device, self.dtype = calib_set, device, dtype

    def __iter__(self) -> Iterator[dict]:
        return self.calib_set.batches(self.device, self.dtype)


def failure_note(err: BaseException, stage: str) -> str:
    """A row's note for a peer that could not run: the line of PeerUnavailable / PeerFailed (which say why), else
    '<stage> failed: <Type>: <first line of the library's message>'."""
    if isinstance(err, (PeerUnavailable, PeerFailed)):
        return str(err)
    first = (str(err).strip().splitlines() or [""])[0][:300]
    return f"{stage} failed: {type(err).__name__}: {first}"


def prepare_peer(fp_cpu: nn.Module, method: str, calib, device: torch.device,
                 dtype: torch.dtype) -> tuple[nn.Module | None, dict[str, Any]]:
    """A fresh copy of the float denoiser on `device`, quantized in place by peer `method` on the shared calibration
    set (`calib.get()`), and its row fields (source, peer_version, calib_time_s: the peer's own wall time, note).
    (None, fields with the reason in `note`) when the peer cannot run."""
    peer = PEERS[method]
    info: dict[str, Any] = {"source": "peer", "peer_version": peer.version(), "calib_time_s": None,
                            "checkpoint_gb": None}
    denoiser = None
    try:
        peer.require()  # before collecting the calibration set for nothing
        denoiser = copy.deepcopy(fp_cpu).to(device)
        inputs = CalibInputs(calib.get(denoiser), device, dtype)  # collected, if first, by the float copy on device
        t0 = time.perf_counter()
        info["note"] = peer.quantize(denoiser, inputs, device)
        info["calib_time_s"] = time.perf_counter() - t0
        log.info("%s: %s", method, info["note"])
        return denoiser, info
    except Exception as err:  # any failure of a peer library becomes its row's note
        info["note"] = failure_note(err, "quantize")
        log.warning("%s skipped (metrics empty): %s", method, info["note"])
        del denoiser
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return None, info
