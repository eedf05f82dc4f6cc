"""Sequential quantization units: a denoiser's blocks, or finer parts of them, each runnable on a cached state.

The sequential driver caches each unit's input state `(h, skips)` and re-runs the unit once per wave of layers
(see diffptq.algo.driver). A UNet down block holds two ResNets and two transformer blocks: quantized as one
unit, every one of its ~25 waves re-runs the whole block from its input. As finer units (each ResNet, transformer
block and resampler on its own, its input cached), a wave re-runs only the part that holds it.

Fine UNet units, in forward order (what diffusers' blocks compute, unrolled; attention masks and
cross_attention_kwargs are None as in the unrolled family forward):
- down block i: `resnets.j` (then `attentions.j`) for each j, then `downsamplers`; the output of each
  (ResNet, transformer) pair and of the downsampler is pushed onto `skips`.
- mid block: `resnets.0`, then `attentions.j`, `resnets.j+1` for each j.
- up block: `resnets.j` (pops the last skip and concatenates it to h first), `attentions.j`, then `upsamplers`.
Blocks of other types, or up blocks with FreeU on, stay one unit (run through the family's run_block).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor, nn

State = tuple[Tensor, list[Tensor]]
_UNROLLED = {"CrossAttnDownBlock2D", "DownBlock2D", "UNetMidBlock2DCrossAttn", "CrossAttnUpBlock2D", "UpBlock2D"}


@dataclass(frozen=True)
class Unit:
    """One unit. name: the module's qualified name in the denoiser (its layers start with name + "."); block: its
    index into ModelFamily.blocks(); run(h, skips, ctx) -> (h, skips), not mutating `skips`; skips_read: how many
    of the last skip tensors run() reads (they must be on the compute device; the others pass through as they
    are, wherever they are)."""

    name: str
    module: nn.Module
    block: int
    run: Callable[[Tensor, list[Tensor], dict], State]
    skips_read: int = 0


def _resnet(resnet: nn.Module, push: bool, h: Tensor, skips: list[Tensor], ctx: dict) -> State:
    h = resnet(h, ctx["emb"])
    return h, (skips + [h]) if push else skips


def _attention(attn: nn.Module, push: bool, h: Tensor, skips: list[Tensor], ctx: dict) -> State:
    h = attn(h, encoder_hidden_states=ctx["ehs"], encoder_attention_mask=ctx["emask"], return_dict=False)[0]
    return h, (skips + [h]) if push else skips


def _downsample(downsamplers: nn.ModuleList, h: Tensor, skips: list[Tensor], ctx: dict) -> State:
    for down in downsamplers:
        h = down(h)
    return h, skips + [h]


def _up_resnet(resnet: nn.Module, h: Tensor, skips: list[Tensor], ctx: dict) -> State:
    h = resnet(torch.cat([h, skips[-1]], dim=1), ctx["emb"])
    return h, skips[:-1]


def _upsample(upsamplers: nn.ModuleList, final: bool, h: Tensor, skips: list[Tensor], ctx: dict) -> State:
    size = skips[-1].shape[2:] if (not final and ctx["forward_upsample_size"]) else None
    for up in upsamplers:
        h = up(h, size)
    return h, skips


def _freeu_on(block: nn.Module) -> bool:
    return all(getattr(block, a, None) for a in ("s1", "s2", "b1", "b2"))


def unet_block_units(unet: nn.Module, index: int, name: str, block: nn.Module) -> list[Unit] | None:
    """The fine units of UNet block `index` (named `name`), or None when it is not a type unrolled here."""
    kind = type(block).__name__
    children = {n for n, m in block.named_children() if any(True for _ in m.parameters())}
    if kind not in _UNROLLED or not children <= {"resnets", "attentions", "downsamplers", "upsamplers"}:
        return None
    resnets = list(block.resnets)
    attns = list(getattr(block, "attentions", None) or [])
    units: list[Unit] = []

    def add(suffix: str, module: nn.Module, run, skips_read: int = 0) -> None:
        units.append(Unit(f"{name}.{suffix}", module, index, run, skips_read))
    if kind.endswith("DownBlock2D"):
        for j, res in enumerate(resnets):
            add(f"resnets.{j}", res, partial(_resnet, res, not attns))
            if attns:
                add(f"attentions.{j}", attns[j], partial(_attention, attns[j], True))
        if block.downsamplers is not None:
            add("downsamplers", block.downsamplers, partial(_downsample, block.downsamplers))
    elif kind == "UNetMidBlock2DCrossAttn":
        add("resnets.0", resnets[0], partial(_resnet, resnets[0], False))
        for j, (attn, res) in enumerate(zip(attns, resnets[1:])):
            add(f"attentions.{j}", attn, partial(_attention, attn, False))
            add(f"resnets.{j + 1}", res, partial(_resnet, res, False))
    else:
        if _freeu_on(block):
            return None
        for j, res in enumerate(resnets):
            add(f"resnets.{j}", res, partial(_up_resnet, res), skips_read=1)
            if attns:
                add(f"attentions.{j}", attns[j], partial(_attention, attns[j], False))
        if block.upsamplers is not None:
            final = block is unet.up_blocks[-1]
            add("upsamplers", block.upsamplers, partial(_upsample, block.upsamplers, final))
    return units
