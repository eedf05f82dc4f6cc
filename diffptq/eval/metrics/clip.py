"""CLIP score (100 · cosine of CLIP image and text embeddings, clamped at 0) on torchmetrics' CLIPScore.

The CLIP model comes from a local `save_pretrained` directory or a hub id that is already in the Hugging Face cache
(`$HF_HOME/hub`, default ~/.cache/huggingface/hub); it is loaded with `local_files_only=True`, so an absent model is
skipped at once instead of retrying a download.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from diffptq.models.names import DEFAULT_CLIP

from .common import as_uint8, batches, warn_missing



class _TensorFeatures(nn.Module):
    """A CLIPModel whose get_image/text_features return tensors, as torchmetrics 1.9 expects.

    transformers >= 5 returns a BaseModelOutputWithPooling whose `pooler_output` holds the projected embedding.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.config = model.config

    @staticmethod
    def _tensor(out: Any) -> torch.Tensor:
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    def get_image_features(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self._tensor(self.model.get_image_features(*args, **kwargs))

    def get_text_features(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self._tensor(self.model.get_text_features(*args, **kwargs))


def load_clip(name_or_dir: str | os.PathLike) -> tuple[nn.Module, Any] | None:
    """(model, processor) of a CLIP hub id or local directory, from local files only; None and a warning if absent."""
    from transformers import CLIPModel, CLIPProcessor

    try:
        model = CLIPModel.from_pretrained(str(name_or_dir), local_files_only=True)
        processor = CLIPProcessor.from_pretrained(str(name_or_dir), local_files_only=True)
    except (OSError, ValueError):
        from huggingface_hub.constants import HF_HUB_CACHE

        where = f"directory {name_or_dir}" if Path(name_or_dir).is_dir() else f"HF cache {HF_HUB_CACHE}"
        warn_missing(
            "clip_score",
            f"CLIP model {str(name_or_dir)!r} (config.json, model.safetensors, tokenizer and preprocessor files) "
            f"in {where}",
            "pass clip_model=DIR (--clip_model, a save_pretrained folder) or fill the HF cache on a networked machine",
        )
        return None
    return _TensorFeatures(model.eval()), processor


def clip_score_metric(name_or_dir: str | os.PathLike = DEFAULT_CLIP) -> Any | None:
    """torchmetrics CLIPScore on the locally available CLIP `name_or_dir`; None if absent."""
    loaded = load_clip(name_or_dir)
    if loaded is None:
        return None
    from torchmetrics.multimodal.clip_score import CLIPScore

    return CLIPScore(model_name_or_path=lambda: loaded)


def clip_score(metric: Any, images: torch.Tensor, prompts: Sequence[str], batch_size: int = 16) -> float:
    """Mean CLIP score of images (N,3,H,W) uint8 or float in [0,1] against their prompts (N strings); 0..100."""
    if len(images) != len(prompts):
        raise ValueError(f"clip_score needs one prompt per image, got {len(images)} images, {len(prompts)} prompts")
    metric.reset()
    with torch.no_grad():
        for sl in batches(len(images), batch_size):
            # uint8: the CLIP processor rescales by 1/255 itself
            metric.update(as_uint8(images[sl]).to(metric.device), list(prompts[sl]))
        return float(metric.compute())
