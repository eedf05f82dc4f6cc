"""The peer quantizers benchmarked next to ours: one `Peer` per configuration, named `<library>:<config>`.

Light: importing this module imports neither torch nor any peer library. A peer's package is imported only when its
adapter runs (`Peer.quantize`); an absent package raises `PeerUnavailable` with the one install line.
"""
from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from diffptq.errors import ConfigError, DiffptqError

INSTALL_HINT = "pip install 'diffptq[peers]' (or pip install -r requirements-peers.txt)"
# pip distribution -> the version this project pins (requirements-peers.txt says the same; a test checks it)
PINS = {"nvidia-modelopt": "0.47.0", "torchao": "0.18.0", "optimum-quanto": "0.2.7", "brevitas": "0.13.4"}


class PeerUnavailable(DiffptqError):
    """A peer whose Python package is not installed."""


class PeerFailed(DiffptqError, RuntimeError):
    """A peer that cannot run here (a CUDA-only kernel on the CPU, a dtype it does not take); the message says why."""


@dataclass(frozen=True)
class Peer:
    """One peer configuration. name: `method` of its metrics row; module: the adapter module in diffptq.peers;
    package: the import name; dist: the pip distribution; wbits/abits: the bits it quantizes to (abits 16: float
    activations); what: one line on the format; settings: passed to the adapter; cuda_only: why it cannot run off
    CUDA ('' where it can)."""

    name: str
    module: str
    package: str
    dist: str
    wbits: int
    abits: int
    what: str
    settings: dict[str, Any] = field(default_factory=dict)
    cuda_only: str = ""

    @property
    def pinned(self) -> str:
        return PINS[self.dist]

    def available(self) -> bool:
        """The package can be imported (found on the path; only a namespace parent such as `optimum` is imported)."""
        try:
            return importlib.util.find_spec(self.package) is not None
        except (ImportError, ValueError):  # the parent package is absent, or a half-imported module
            return False

    def missing(self) -> str:
        """The one line for an absent package: which package, and the install command."""
        return (f"peer {self.name} needs the Python package {self.package!r} ({self.dist}=={self.pinned}), which is "
                f"not installed: {INSTALL_HINT}")

    def require(self) -> None:
        """Raise PeerUnavailable (`missing()`) unless the package is installed."""
        if not self.available():
            raise PeerUnavailable(self.missing())

    def version(self) -> str | None:
        """The installed version of the peer's distribution, None when its package cannot be imported."""
        from importlib import metadata

        if not self.available():
            return None
        try:
            return metadata.version(self.dist)
        except metadata.PackageNotFoundError:
            return None

    def quantize(self, denoiser: Any, calib_inputs: Iterable[dict], device: Any) -> str:
        """Quantize `denoiser` in place with the peer's own API and calibration loop; returns a one-line note.

        calib_inputs: the denoiser's keyword inputs, one dict per calibration record, on `device` in the denoiser's
        dtype (CalibrationSet.batches(device, dtype)); iterated once per calibration pass (a one-shot iterator is
        kept in a list). Only the block layers (ModelFamily.block_layer_names) are quantized.
        Raises PeerUnavailable (package absent) or PeerFailed / the library's own error (cannot run here)."""
        self.require()
        import torch

        if self.cuda_only and torch.device(device).type != "cuda":
            raise PeerFailed(f"{self.name} cannot run on {torch.device(device).type}: {self.cuda_only}")
        adapter = importlib.import_module(f"diffptq.peers.{self.module}")
        return adapter.quantize(self, denoiser, calib_inputs, device)


def _peers() -> list[Peer]:
    mo = dict(module="modelopt", package="modelopt", dist="nvidia-modelopt")
    ao = dict(module="torchao", package="torchao", dist="torchao")
    qo = dict(module="quanto", package="optimum.quanto", dist="optimum-quanto")
    bv = dict(module="brevitas", package="brevitas", dist="brevitas")
    nvfp4_cuda = "ModelOpt's NVFP4 fake-quant (dynamic block scales) runs on CUDA only"
    return [
        Peer("modelopt:int8_sq", **mo, wbits=8, abits=8, settings={"preset": "INT8_SMOOTHQUANT_CFG"},
             what="INT8 SmoothQuant: per-channel weights, per-tensor static activations (fake-quant)"),
        Peer("modelopt:w4a8_awq", **mo, wbits=4, abits=8, settings={"preset": "W4A8_AWQ_BETA_CFG"},
             what="AWQ-lite int4 weights (group 128), FP8 e4m3 activations (fake-quant)"),
        Peer("modelopt:int4_awq", **mo, wbits=4, abits=16, settings={"preset": "INT4_AWQ_CFG"},
             what="AWQ-lite int4 weights (group 128), float activations (fake-quant)"),
        Peer("modelopt:nvfp4", **mo, wbits=4, abits=4, settings={"preset": "NVFP4_DEFAULT_CFG"},
             cuda_only=nvfp4_cuda,
             what="NVFP4 weights and activations (e2m1, blocks of 16 with e4m3 scales; fake-quant)"),
        Peer("modelopt:nvfp4_svdquant", **mo, wbits=4, abits=4, settings={"preset": "NVFP4_SVDQUANT_DEFAULT_CFG"},
             cuda_only=nvfp4_cuda,
             what="SVDQuant: NVFP4 W4A4 with a rank-32 float low-rank branch (fake-quant)"),
        Peer("torchao:int8da_int4w", **ao, wbits=4, abits=8, settings={"config": "int8da_int4w", "group": 32},
             what="int4 weights (group 32), int8 dynamic per-token activations"),
        Peer("torchao:int4wo", **ao, wbits=4, abits=16, settings={"config": "int4wo", "group": 128},
             cuda_only="torchao's int4 weight-only kernel (tinygemm, torch._weight_int4pack_mm) runs on CUDA only",
             what="int4 weight-only (group 128, tinygemm kernel: CUDA, bf16)"),
        Peer("quanto:w4a8", **qo, wbits=4, abits=8, settings={"activations": "qint8"},
             what="qint4 weights (group 128), qint8 static activations from quanto's Calibration"),
        Peer("quanto:w4a16", **qo, wbits=4, abits=16, settings={"activations": None},
             what="qint4 weights (group 128), float activations"),
        Peer("brevitas:gptq", **bv, wbits=4, abits=8, settings={"algorithm": "gptq"},
             what="GPTQ (act order) on int4 per-channel weights, int8 per-tensor static activations"),
        Peer("brevitas:qronos", **bv, wbits=4, abits=8, settings={"algorithm": "qronos"},
             what="Qronos (act order, alpha 1e-6) on int4 per-channel weights, int8 per-tensor static activations"),
    ]


PEERS: dict[str, Peer] = {p.name: p for p in _peers()}


def peer_names() -> list[str]:
    return list(PEERS)


def parse_peers(text: str) -> list[str]:
    """'modelopt:int8_sq,quanto:w4a8' -> the listed peer names in that order (each once); '' or 'none' -> []."""
    items = list(dict.fromkeys(p.strip() for p in text.split(",") if p.strip()))
    if items == ["none"]:
        return []
    unknown = [p for p in items if p not in PEERS]
    if unknown:
        raise ConfigError(f"unknown peer {', '.join(unknown)}; choose from {', '.join(PEERS)}")
    return items


def get_peer(name: str) -> Peer:
    """The peer called `name`; ConfigError naming the known ones otherwise."""
    parse_peers(name)
    return PEERS[name]
