"""Quantized checkpoints: one safetensors file (whatever its name, `.pt` included) with the config as JSON metadata.

Tensors, per quantized layer `<name>` of the denoiser:
  `<name>.codes`  packed integer weight codes (int4: two per uint8; 5..8 bits: one int8/uint8 per code)
  `<name>.scale`, `<name>.zero`  float32 (out, n_groups)
  `<name>.act.<key>`  the activation quantizer's state (static scale/zero, or a TDQ MLP's parameters)
Metadata key `diffptq`: JSON with the format version, the base model (source, family, pipeline class, hash of the
denoiser config), the quantization settings and one entry per layer (shape, kind, weight spec, activation kind,
and `rotation`: {kind, size, seed} of an online input rotation, from which it is rebuilt, or absent/null).
  `<name>.input_scale`, `<name>.lowrank_up`, `<name>.lowrank_down`  smoothing factors and the low-rank branch
  `<name>.rotation`  a PCA rotation's matrix R (in, in) float32, stored once per group of layers sharing it (under
      the group's first layer); each layer's `rotation` is {kind: "pca", size, matrix: the tensor's key}
  `act_keep` (metadata): K > 0 when the activation quantizer keeps the first K rotated channels at 8 bits (its
      state then holds `lead.*` and `rest.*`)
Version 2 added `rotation`, version 3 `smooth` and `lowrank` (with their tensors), version 4 PCA rotations and
`act_keep`. A file is written with the lowest version that holds it (1 without rotations or outlier handling), so
older readers load what they can and refuse rather than silently drop what they cannot. All four versions are read.
Nothing is ever unpickled: a file that is not safetensors is refused with a clear error.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from diffptq.errors import CheckpointError
from diffptq.quant.act import (
    ActQuantizer,
    DynamicActQuantizer,
    LeadingActQuantizer,
    StaticActQuantizer,
    keep_leading,
)
from diffptq.quant.layers import QuantLayer, QuantLinear, quant_layers
from diffptq.quant.quantizer import QuantSpec, pack_codes, unpack_codes
from diffptq.io.schema import check_metadata, check_tensors
from diffptq.quant.rotation import PcaRotation, Rotation, make_rotation

FORMAT = "diffptq-checkpoint"
VERSION = 4
READ_VERSIONS = (1, 2, 3, 4)


def config_hash(denoiser: nn.Module) -> str:
    """sha256 (16 hex digits) of the denoiser's architecture config: identifies the base model's shape."""
    cfg = {k: v for k, v in dict(denoiser.config).items() if not k.startswith("_")}
    return hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _act_kind(aq: ActQuantizer | None) -> str | None:
    if isinstance(aq, LeadingActQuantizer):
        aq = aq.rest  # its kind and grid; act_keep says what it keeps at 8 bits
    if aq is None:
        return None
    if isinstance(aq, StaticActQuantizer):
        return "static"
    if isinstance(aq, DynamicActQuantizer):
        return "dynamic"
    return getattr(aq, "checkpoint_kind", type(aq).__name__)


def layer_entry(name: str, layer: QuantLayer) -> dict:
    aq = layer.act_quant
    return {
        "name": name,
        "kind": "linear" if isinstance(layer, QuantLinear) else "conv2d",
        "weight_shape": list(layer.weight.shape),
        "weight_spec": asdict(layer.weight_spec),
        "act_kind": _act_kind(aq),
        "act_spec": asdict(aq.spec) if aq is not None else None,
        "act_extra": aq.checkpoint_config() if hasattr(aq, "checkpoint_config") else None,
        "rotation": layer.rotation.config() if layer.rotation is not None else None,
        "smooth": layer.input_scale is not None,
        "lowrank": 0 if layer.lowrank_up is None else int(layer.lowrank_up.shape[1]),
        "act_keep": aq.keep if isinstance(aq, LeadingActQuantizer) else 0,
    }


def _version(layers: list[dict]) -> int:
    """The lowest format version that holds these layer entries."""
    if any(e["act_keep"] or (e["rotation"] or {}).get("kind") == "pca" for e in layers):
        return 4
    if any(e["smooth"] or e["lowrank"] for e in layers):
        return 3
    return 2 if any(e["rotation"] for e in layers) else 1


def save_quantized(path: str | Path, denoiser: nn.Module, base: dict, quant: dict) -> dict:
    """Write the quantized layers of `denoiser` to `path` (atomically: temporary name, then rename).

    base: {'source', 'family', 'pipeline_class'} of the base model; quant: settings to record (method, bits, ...).
    Returns the metadata written.
    """
    tensors: dict[str, torch.Tensor] = {}
    layers = []
    pca_keys: dict[int, str] = {}  # a shared PCA rotation → the tensor that holds its matrix
    for name, layer in quant_layers(denoiser):
        if not layer.is_quantized:
            continue
        spec = layer.weight_spec
        tensors[f"{name}.codes"] = pack_codes(layer.weight_codes.cpu(), spec).contiguous()
        tensors[f"{name}.scale"] = layer.weight_scale.float().cpu().contiguous()
        tensors[f"{name}.zero"] = layer.weight_zero.float().cpu().contiguous()
        if layer.act_quant is not None:
            for key, t in layer.act_quant.state_dict().items():
                tensors[f"{name}.act.{key}"] = t.detach().float().cpu().contiguous()
        for key in ("input_scale", "lowrank_up", "lowrank_down"):
            if getattr(layer, key) is not None:
                # a copy each: layers fed by one input share one smoothing tensor, which safetensors refuses
                tensors[f"{name}.{key}"] = getattr(layer, key).detach().float().cpu().clone().contiguous()
        entry = layer_entry(name, layer)
        if isinstance(layer.rotation, PcaRotation):
            key = pca_keys.setdefault(id(layer.rotation), f"{name}.rotation")
            if key not in tensors:
                tensors[key] = layer.rotation.basis.detach().float().cpu().clone().contiguous()
            entry["rotation"]["matrix"] = key
        layers.append(entry)
    if not layers:
        raise CheckpointError("nothing to save: the model has no quantized layer")
    meta = {"format": FORMAT, "version": _version(layers), "base": {**base, "config_hash": config_hash(denoiser)},
            "quant": quant, "layers": layers}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    try:
        save_file(tensors, str(tmp), metadata={"diffptq": json.dumps(meta, default=str)})
        os.replace(tmp, path)
    except BaseException:  # interrupted or failed: leave nothing behind, not even the temporary file
        tmp.unlink(missing_ok=True)
        raise
    return meta


def read_checkpoint(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(metadata, tensors) of a checkpoint; CheckpointError for anything that is not a valid one."""
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoint.safetensors"
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("diffptq")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        with path.open("rb") as fh:
            head = fh.read(2)
        kind = "a pickle (torch.save) file, which diffptq never unpickles" if head[:1] == b"\x80" else \
            "truncated or corrupted"
        raise CheckpointError(f"{path} is not a readable diffptq checkpoint: {kind} ({err})") from None
    if raw is None:
        raise CheckpointError(f"{path} is a safetensors file without diffptq metadata: not a diffptq checkpoint")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: corrupted diffptq metadata ({err})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("version") not in READ_VERSIONS:
        got = f"{meta.get('format')} v{meta.get('version')}" if isinstance(meta, dict) else type(meta).__name__
        raise CheckpointError(f"{path}: unsupported checkpoint format {got} "
                              f"(this diffptq reads {FORMAT} v{', v'.join(map(str, READ_VERSIONS))})")
    check_metadata(meta, path)
    check_tensors(meta, tensors, path)
    return meta, tensors


def check_base(meta: dict, denoiser: nn.Module, family: str, path: str | Path) -> None:
    """Refuse a checkpoint made for another model family or another base architecture."""
    base = meta["base"]
    if base.get("family") != family:
        raise CheckpointError(f"{path} was made for a {base.get('family')} model ({base.get('source')}), "
                              f"not for this {family} model")
    got = config_hash(denoiser)
    if base.get("config_hash") != got:
        raise CheckpointError(f"{path} was made for base model {base.get('source')} (config hash "
                              f"{base.get('config_hash')}), but the loaded base model has config hash {got}: "
                              "a different model or version")


@torch.no_grad()
def apply_checkpoint(denoiser: nn.Module, meta: dict, tensors: dict[str, torch.Tensor], act_builder=None) -> dict:
    """Swap the checkpoint's layers into `denoiser` and load codes, scales and activation states.

    act_builder(entry) -> ActQuantizer | None builds activation quantizers of kinds other than static/dynamic
    (e.g. TDQ). A layer's recorded rotation is rebuilt and applied to the base float weight before its codes are
    loaded. Returns {name: QuantLayer}.
    """
    from diffptq.quant.layers import QuantConv2d

    out = {}
    pca: dict[str, PcaRotation] = {}  # one instance per stored matrix: its layers share one rotated input again
    for entry in meta["layers"]:
        name = entry["name"]
        try:
            module = denoiser.get_submodule(name)
        except AttributeError:
            raise CheckpointError(f"layer {name} of the checkpoint does not exist in the base model") from None
        if list(module.weight.shape) != entry["weight_shape"]:
            raise CheckpointError(f"layer {name}: checkpoint weight shape {entry['weight_shape']} vs base model "
                                  f"{list(module.weight.shape)}")
        wspec = QuantSpec(**entry["weight_spec"])
        act = _build_act(entry, act_builder)
        if not isinstance(module, QuantLayer):
            module = (QuantLinear if entry["kind"] == "linear" else QuantConv2d)(module, act, wspec)
            parent, _, child = name.rpartition(".")
            setattr(denoiser.get_submodule(parent) if parent else denoiser, child, module)
        else:
            module.act_quant, module.weight_spec = act, wspec
        shape = (entry["weight_shape"][0], int(torch.tensor(entry["weight_shape"][1:]).prod()))
        try:
            # before the codes: they are in the rotated (smoothed, split) basis
            module.set_rotation(_rotation(entry.get("rotation"), tensors, pca, module.weight.device))
            if entry.get("smooth"):
                module.set_smoothing(tensors[f"{name}.input_scale"])
            if entry.get("lowrank"):
                module.set_lowrank(tensors[f"{name}.lowrank_up"], tensors[f"{name}.lowrank_down"])
            codes = unpack_codes(tensors[f"{name}.codes"], shape, wspec)
            module.set_quantized_weight(codes, tensors[f"{name}.scale"], tensors[f"{name}.zero"])
            if act is not None:
                state = {k[len(name) + 5:]: v for k, v in tensors.items() if k.startswith(f"{name}.act.")}
                act.load_state_dict(state)
                act.to(module.weight.device)
        except (KeyError, RuntimeError, TypeError, ValueError) as err:
            raise CheckpointError(f"layer {name}: checkpoint tensors or rotation are missing or malformed ({err})"
                                  ) from None
        out[name] = module
    return out


def _rotation(rot: dict | None, tensors: dict[str, torch.Tensor], pca: dict[str, PcaRotation],
              device: torch.device) -> Rotation | None:
    """The rotation a layer entry records: rebuilt from kind, size and seed, or a PCA matrix (shared per key)."""
    if not rot:
        return None
    if rot["kind"] != "pca":
        return make_rotation(**rot)
    if rot["matrix"] not in pca:
        pca[rot["matrix"]] = PcaRotation(tensors[rot["matrix"]].to(device))
    return pca[rot["matrix"]]


def _build_act(entry: dict, act_builder) -> ActQuantizer | None:
    kind = entry["act_kind"]
    if kind is None:
        return None
    spec = QuantSpec(**entry["act_spec"])
    channel_dim = 1 if entry["kind"] == "conv2d" else -1
    if kind in ("static", "dynamic"):
        quantizer = (StaticActQuantizer if kind == "static" else DynamicActQuantizer)(spec, channel_dim)
        return keep_leading(quantizer, entry.get("act_keep", 0), entry["weight_shape"][1])
    if act_builder is None:
        raise CheckpointError(f"layer {entry['name']}: activation quantizer kind {kind!r} needs a builder")
    return act_builder(entry)
