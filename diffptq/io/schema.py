"""The checkpoint's metadata and tensors, checked whole on load: a hand-edited or damaged file is one clear error.

`check_checkpoint(meta, tensors, path)` raises CheckpointError naming the file, the entry and what is wrong: a field
missing or of the wrong type, bits outside 2..8, an unknown layer, activation or rotation kind, a tensor missing, a
PCA rotation matrix of the wrong shape or with columns that are not unit vectors, or a NaN/Inf in a weight scale,
zero point, activation quantizer state or stored rotation (such a file makes black images).
"""
from __future__ import annotations

from pathlib import Path

import torch

from diffptq.config.checks import check_bits
from diffptq.config.quant import QuantSpec
from diffptq.errors import CheckpointError, ConfigError

FAMILIES = ("pixart", "sd")
LAYER_KINDS = ("linear", "conv2d")
ACT_KINDS = (None, "static", "dynamic", "tdq")
ROTATION_FIELDS = {"hadamard": {"kind", "size", "seed"}, "pca": {"kind", "size", "matrix"}}


def _need(entry: dict, key: str, kind, where: str, path: Path, optional: bool = False):
    value = entry.get(key)
    if value is None and optional:
        return None
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise CheckpointError(f"{path}: {where}: field {key!r} missing or not a {getattr(kind, '__name__', kind)}")
    return value


def _spec(value, where: str, path: Path) -> QuantSpec:
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: {where}: not a grid description")
    try:
        return QuantSpec(**value)
    except (ConfigError, TypeError) as err:
        raise CheckpointError(f"{path}: {where}: {err}") from None


def check_metadata(meta: dict, path: Path) -> None:
    """Every field a loader reads, of the right type and range."""
    base = meta.get("base")
    if not isinstance(base, dict):
        raise CheckpointError(f"{path}: metadata has no 'base' record (which model the checkpoint was made for)")
    for key in ("source", "family", "pipeline_class", "config_hash"):
        _need(base, key, str, "base", path)
    if base["family"] not in FAMILIES:
        raise CheckpointError(f"{path}: base family {base['family']!r} is not one of {', '.join(FAMILIES)}")
    quant = meta.get("quant", {})
    if not isinstance(quant, dict):
        raise CheckpointError(f"{path}: 'quant' record is not a mapping")
    for key, allow_float in (("wbits", False), ("abits", True)):
        if quant.get(key) is not None:
            try:
                check_bits(quant[key], f"quant.{key}", allow_float=allow_float)
            except ConfigError as err:
                raise CheckpointError(f"{path}: {err}") from None
    layers = meta.get("layers")
    if not isinstance(layers, list) or not layers:
        raise CheckpointError(f"{path}: metadata lists no quantized layer")
    for i, entry in enumerate(layers):
        if not isinstance(entry, dict):
            raise CheckpointError(f"{path}: layer entry {i} is not a mapping")
        name = _need(entry, "name", str, f"layer entry {i}", path)
        where = f"layer {name}"
        if entry.get("kind") not in LAYER_KINDS:
            raise CheckpointError(f"{path}: {where}: kind {entry.get('kind')!r} is not one of {', '.join(LAYER_KINDS)}")
        shape = _need(entry, "weight_shape", list, where, path)
        if len(shape) not in (2, 4) or not all(isinstance(d, int) and d > 0 for d in shape):
            raise CheckpointError(f"{path}: {where}: weight_shape {shape} is not a Linear or Conv2d weight shape")
        _spec(entry.get("weight_spec"), f"{where} weight grid", path)
        if entry.get("act_kind") not in ACT_KINDS:
            raise CheckpointError(f"{path}: {where}: activation kind {entry.get('act_kind')!r} is not one of "
                                  f"{', '.join(str(k) for k in ACT_KINDS)}")
        if entry.get("act_kind") is not None:
            _spec(entry.get("act_spec"), f"{where} activation grid", path)
        _check_rotation(entry, where, path)
        keep = entry.get("act_keep", 0)
        if not isinstance(keep, int) or isinstance(keep, bool) or not 0 <= keep <= shape[1]:
            raise CheckpointError(f"{path}: {where}: act_keep must be 0..{shape[1]} (the input width), got {keep!r}")
        if keep and entry.get("act_kind") not in ("static", "dynamic"):
            raise CheckpointError(f"{path}: {where}: act_keep needs a static or dynamic activation quantizer")
        lowrank = entry.get("lowrank", 0)
        if not isinstance(lowrank, int) or isinstance(lowrank, bool) or lowrank < 0:
            raise CheckpointError(f"{path}: {where}: lowrank must be a rank >= 0, got {lowrank!r}")
        if not isinstance(entry.get("smooth", False), bool):
            raise CheckpointError(f"{path}: {where}: smooth must be true or false")


def _check_rotation(entry: dict, where: str, path: Path) -> None:
    rot = entry.get("rotation")
    if rot is None:
        return
    kind = rot.get("kind") if isinstance(rot, dict) else None
    if kind not in ROTATION_FIELDS or not ROTATION_FIELDS[kind] <= set(rot):
        raise CheckpointError(f"{path}: {where}: rotation must give kind (hadamard: size, seed; pca: size, matrix)")
    if not isinstance(rot["size"], int) or rot["size"] != entry["weight_shape"][1]:
        raise CheckpointError(f"{path}: {where}: rotation size {rot['size']!r} is not the input width "
                              f"{entry['weight_shape'][1]}")
    if kind == "pca" and (entry["kind"] != "linear" or not isinstance(rot["matrix"], str)):
        raise CheckpointError(f"{path}: {where}: a PCA rotation belongs to a Linear layer and names its matrix")


def _check_pca_matrix(entry: dict, tensors: dict[str, torch.Tensor], path: Path) -> None:
    """The stored R is (in, in), finite, with unit columns (an O(in²) check; orthogonality itself is not tested)."""
    key, size = entry["rotation"]["matrix"], entry["rotation"]["size"]
    where = f"{path}: layer {entry['name']}: rotation matrix {key}"
    if key not in tensors:
        raise CheckpointError(f"{where} is missing")
    t = tensors[key]
    if tuple(t.shape) != (size, size) or not t.is_floating_point():
        raise CheckpointError(f"{where}: expected a float ({size}, {size}) matrix, got {t.dtype} {tuple(t.shape)}")
    if not bool(torch.isfinite(t).all()):
        raise CheckpointError(f"{where} holds NaN or Inf: the file is damaged; quantize again")
    norms = torch.linalg.vector_norm(t.double(), dim=0)
    if not bool(((norms - 1).abs() < 1e-3).all()):
        raise CheckpointError(f"{where}: its columns are not unit vectors (not a rotation): the file is damaged")


def check_tensors(meta: dict, tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Each layer's codes, scales and zero points are there; scales, zeros and activation states are finite."""
    for entry in meta["layers"]:
        name = entry["name"]
        outlier = (["input_scale"] if entry.get("smooth") else []) + \
            (["lowrank_up", "lowrank_down"] if entry.get("lowrank") else [])
        for key in ("codes", "scale", "zero", *outlier):
            if f"{name}.{key}" not in tensors:
                raise CheckpointError(f"{path}: layer {name}: tensor {name}.{key} is missing")
        state = [k for k in tensors if k.startswith(f"{name}.act.")]
        extra = [f"{name}.{k}" for k in outlier]
        if (entry.get("rotation") or {}).get("kind") == "pca":
            _check_pca_matrix(entry, tensors, path)
        for key in (f"{name}.scale", f"{name}.zero", *state, *extra):
            t = tensors[key]
            if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
                raise CheckpointError(f"{path}: {key} holds NaN or Inf: the file is damaged (its images would be "
                                      "black); quantize again")
