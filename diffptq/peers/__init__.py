"""Peer quantizers (NVIDIA ModelOpt, torchao, optimum-quanto, Brevitas) run on our denoisers, side by side with ours.

`PEERS` holds one `Peer` per configuration (`modelopt:int8_sq`, `torchao:int4wo`, ...); `Peer.quantize(denoiser,
calib_inputs, device)` quantizes the denoiser's block layers in place with the peer's own API and calibration loop.
One adapter module per library (modelopt, torchao, quanto, brevitas), over the shared helpers of `common`.
Importing this package imports no peer library and no torch; an absent library raises `PeerUnavailable`.
"""
from diffptq.peers.registry import (
    INSTALL_HINT,
    PEERS,
    PINS,
    Peer,
    PeerFailed,
    PeerUnavailable,
    get_peer,
    parse_peers,
    peer_names,
)

__all__ = ["INSTALL_HINT", "PEERS", "PINS", "Peer", "PeerFailed", "PeerUnavailable", "get_peer", "parse_peers",
           "peer_names"]
