"""The bundled evaluation network: a small CNN trained on the procedural scenes.

Its pooled trunk features (96-d, mean over the 8x8 map after the last ReLU) are the feature space of FID on the
bundled models (`features`), and its heads read a scene back: the background colour from the pooled features, and
for each of the 4 cells of the 2x2 grid whether an object is there and its shape, colour and size. `prompt_accuracy`
counts an image right when every attribute of the caption's scene is read back (background, and for every cell:
presence, and where an object is, its shape, colour and size), so a missing, extra or wrong object fails it.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from diffptq.models.bundled.dataset import scene_batch
from diffptq.models.bundled.scenes import BACKGROUNDS, COLOURS, GRID, NUM_CELLS, SHAPES, SIZES, parse_caption
from diffptq.models.bundled.specs import WEIGHTS_DIR

CELL_HEADS = {"present": 2, "shape": len(SHAPES), "colour": len(COLOURS), "size": len(SIZES)}
ATTRIBUTES = ("background", *CELL_HEADS)


@dataclass
class EvaluatorSpec:
    """CNN widths: a stem at full resolution, then one stride-2 stage per entry (64 -> 32 -> 16 -> 8 px)."""

    stem: int = 24
    channels: tuple[int, ...] = (32, 64, 96)
    norm_groups: int = 8


def _conv(c_in: int, c_out: int, stride: int, groups: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.GroupNorm(groups, c_out), nn.ReLU())


class EvalNet(nn.Module):
    """images (N,3,64,64) in [0,1] -> features (N,C) and logits {background: (N,4), present/shape/colour/size:
    (N,4,k)}, cells in reading order."""

    def __init__(self, spec: EvaluatorSpec):
        super().__init__()
        self.spec = spec
        layers = [_conv(3, spec.stem, 1, spec.norm_groups)]
        c = spec.stem
        for width in spec.channels:
            layers += [_conv(c, width, 2, spec.norm_groups), _conv(width, width, 1, spec.norm_groups)]
            c = width
        self.trunk = nn.Sequential(*layers)
        self.feature_dim = c
        self.background = nn.Linear(c, len(BACKGROUNDS))
        self.cell_pos = nn.Parameter(torch.zeros(1, c, GRID, GRID))
        self.cell_head = nn.Sequential(nn.Conv2d(c, c, 1), nn.ReLU(), nn.Conv2d(c, sum(CELL_HEADS.values()), 1))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        fmap = self.trunk((images - 0.5) / 0.25)
        feats = fmap.mean(dim=(2, 3))
        cells = self.cell_head(F.adaptive_avg_pool2d(fmap, GRID) + self.cell_pos)  # (N, K, 3, 3)
        cells = cells.flatten(2).transpose(1, 2)  # (N, 4, K)
        logits = {"background": self.background(feats)}
        logits.update(zip(CELL_HEADS, cells.split(list(CELL_HEADS.values()), dim=-1)))
        return feats, logits


def targets_from_prompts(prompts: list[str]) -> dict[str, np.ndarray]:
    """Per-cell targets (as SceneBatch.cell_targets) of the scenes that `prompts` describe."""
    return scene_batch([parse_caption(p) for p in prompts]).cell_targets()


def scene_correct(pred: dict[str, np.ndarray], target: dict[str, np.ndarray]) -> np.ndarray:
    """(N,) bool: background, presence in all 4 cells, and shape/colour/size wherever the target has an object."""
    ok = (pred["background"] == target["background"]) & (pred["present"] == target["present"]).all(1)
    has = target["present"] == 1
    for key in ("shape", "colour", "size"):
        ok &= ((pred[key] == target[key]) | ~has).all(1)
    return ok


class BundledEvaluator:
    """Feature extractor and prompt-adherence judge for images of the bundled scenes (float (N,3,64,64) in [0,1])."""

    def __init__(self, net: EvalNet, device: str | torch.device = "cpu", batch_size: int = 256):
        self.net = net.eval().to(device)
        self.device = torch.device(device)
        self.batch_size = batch_size

    @property
    def feature_dim(self) -> int:
        return self.net.feature_dim

    @torch.no_grad()
    def _run(self, images: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images (N, 3, H, W), got {tuple(images.shape)}")
        feats, logits = [], []
        for i in range(0, len(images), self.batch_size):
            x = images[i:i + self.batch_size].to(self.device, torch.float32).clamp(0, 1)
            if x.shape[-1] != 64 or x.shape[-2] != 64:
                x = F.interpolate(x, size=(64, 64), mode="bilinear", antialias=True, align_corners=False)
            f, lg = self.net(x)
            feats.append(f.float().cpu())
            logits.append({k: v.float().cpu() for k, v in lg.items()})
        return torch.cat(feats), {k: torch.cat([lg[k] for lg in logits]) for k in logits[0]}

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 96) float32 pooled trunk features (CPU), for FID on the bundled models."""
        return self._run(images)[0]

    def predict(self, images: torch.Tensor) -> dict[str, np.ndarray]:
        """Read-back attributes: background (N,); present, shape, colour, size (N,4) (shape etc. -1 where no
        object is predicted)."""
        logits = self._run(images)[1]
        pred = {k: v.argmax(-1).numpy() for k, v in logits.items()}
        for key in ("shape", "colour", "size"):
            pred[key] = np.where(pred["present"] == 1, pred[key], -1)
        return pred

    def prompt_correct(self, images: torch.Tensor, prompts: list[str]) -> np.ndarray:
        """(N,) bool: image i shows exactly the scene of prompts[i] (see scene_correct)."""
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        return scene_correct(self.predict(images), targets_from_prompts(prompts))

    def prompt_accuracy(self, images: torch.Tensor, prompts: list[str]) -> float:
        """Fraction of images whose read-back scene matches ALL attributes of their prompt's scene."""
        return float(self.prompt_correct(images, prompts).mean())


def attribute_accuracy(pred: dict[str, np.ndarray], target: dict[str, np.ndarray]) -> dict[str, float]:
    """Held-out accuracy per attribute: background per image, presence per cell, shape/colour/size per true object;
    `scene` = all of an image right."""
    has = target["present"] == 1
    acc = {"background": float((pred["background"] == target["background"]).mean()),
           "present": float((pred["present"] == target["present"]).mean())}
    for key in ("shape", "colour", "size"):
        acc[key] = float((pred[key][has] == target[key][has]).mean())
    acc["scene"] = float(scene_correct(pred, target).mean())
    return acc


def save_evaluator(net: EvalNet, out: str | Path, metrics: dict | None = None) -> None:
    """`out`/model.safetensors (fp16) + `out`/config.json (spec, attribute names, metrics)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().half().contiguous().cpu() for k, v in net.state_dict().items()},
              str(out / "model.safetensors"))
    config = {"spec": asdict(net.spec), "shapes": SHAPES, "colours": COLOURS, "sizes": SIZES,
              "backgrounds": BACKGROUNDS, "cells": NUM_CELLS, "feature_dim": net.feature_dim, "metrics": metrics or {}}
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def load_evaluator(device: str | torch.device = "cpu", path: str | Path | None = None) -> BundledEvaluator:
    """The committed evaluator (weights/evaluator), or the one at `path`, in float32 on `device`."""
    path = Path(path) if path is not None else WEIGHTS_DIR / "evaluator"
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"no evaluator weights at {path}; train them with "
                                "`python -m diffptq.models.bundled.train --which evaluator`")
    config = json.loads((path / "config.json").read_text())
    spec = config["spec"]
    net = EvalNet(EvaluatorSpec(stem=spec["stem"], channels=tuple(spec["channels"]), norm_groups=spec["norm_groups"]))
    net.load_state_dict({k: v.float() for k, v in load_file(str(path / "model.safetensors")).items()})
    return BundledEvaluator(net, device)
