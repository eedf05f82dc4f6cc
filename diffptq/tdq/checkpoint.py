"""Rebuild a TDQ activation quantizer from its checkpoint entry (``diffptq.io.checkpoint`` stores the rest).

A layer entry with ``act_kind == "tdq"`` carries ``act_spec`` (the grid) and ``act_extra`` =
``TdqActQuantizer.checkpoint_config()``: the condition ({kind, bounds, clamp}) and the shapes (``ScaleMLP.config()``)
of the scale MLP and, on asymmetric grids, of the zero point's offset MLP; their tensors come from ``<layer>.act.*``
via ``load_state_dict``, which also marks the quantizer calibrated.
"""
from __future__ import annotations

from diffptq.errors import CheckpointError
from diffptq.quant.quantizer import QuantSpec

from .quantizer import TdqActQuantizer


def build_tdq_act(entry: dict) -> TdqActQuantizer:
    """An uncalibrated TdqActQuantizer of the entry's shape; ``apply_checkpoint`` loads its state next."""
    extra = entry.get("act_extra") or {}
    if "condition" not in extra or "mlp" not in extra:
        raise CheckpointError(f"layer {entry.get('name')}: TDQ entry without condition/MLP config")
    spec = QuantSpec(**entry["act_spec"])
    channel_dim = 1 if entry.get("kind") == "conv2d" else -1
    return TdqActQuantizer(spec, extra["condition"], channel_dim=channel_dim, mlp_config=extra["mlp"],
                           offset_mlp_config=extra.get("offset_mlp"), extrapolate=extra.get("extrapolate", "mlp"),
                           cond_range=extra.get("cond_range"))
