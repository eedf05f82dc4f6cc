"""load_pipeline: PixArt-alpha and Stable Diffusion 1.5 from a hub id or a local directory, plus project models.

Order of lookup for a hub id: the local Hugging Face cache first (no network), then - unless HF_HUB_OFFLINE is
set - one download attempt. When the weights cannot be had, a ModelNotFoundError names the model, where it looked
and how to fix it, instead of a traceback from inside huggingface_hub.
"""
from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import torch
from diffusers import DiffusionPipeline, PixArtAlphaPipeline, StableDiffusionPipeline

from diffptq.errors import ModelNotFoundError, UnknownModelError
from diffptq.models.names import BUNDLED_NAMES
from diffptq.models.fullsize import FULLSIZE_MODELS, build_fullsize_pipeline
from diffptq.models.tiny import TINY_MODELS, build_tiny_pipeline

log = logging.getLogger(__name__)

BUNDLED_DIR = Path(__file__).parent / "bundled" / "weights"
BUNDLED_MODELS = {name: BUNDLED_DIR / name.removeprefix("bundled-") for name in BUNDLED_NAMES}
KNOWN_HUB_MODELS = {
    "PixArt-alpha/PixArt-XL-2-512x512": PixArtAlphaPipeline,
    "PixArt-alpha/PixArt-XL-2-1024-MS": PixArtAlphaPipeline,
    "stable-diffusion-v1-5/stable-diffusion-v1-5": StableDiffusionPipeline,
    "runwayml/stable-diffusion-v1-5": StableDiffusionPipeline,
}
PIPELINE_CLASSES = {"PixArtAlphaPipeline": PixArtAlphaPipeline, "StableDiffusionPipeline": StableDiffusionPipeline}
PROJECT_MODELS = (*BUNDLED_MODELS, *TINY_MODELS, *FULLSIZE_MODELS)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def load_pipeline(name_or_path: str, dtype: torch.dtype | None = None, device: str | torch.device | None = None):
    """A diffusers pipeline for `name_or_path`: a hub id, a local `save_pretrained` directory, `bundled-dit`,
    `bundled-unet`, `tiny-dit`, `tiny-unet`, `fullsize-pixart` or `fullsize-sd`. `dtype` defaults to float32;
    `device` to the CPU.

    `fullsize-*`: the full-size denoiser with random weights and a one-layer stand-in text encoder
    (diffptq.models.fullsize), built directly on `device` (for speed/memory, not image quality; the weights depend
    on the device's random generator, so only runs on the same kind of device make the same images)."""
    dtype = dtype or torch.float32
    name = str(name_or_path)
    if name in FULLSIZE_MODELS:
        pipe = build_fullsize_pipeline(name, dtype, device or "cpu")
    elif name in TINY_MODELS:
        pipe = build_tiny_pipeline(name)
        if dtype != torch.float32:
            pipe.to(dtype=dtype)
    elif name in BUNDLED_MODELS:
        pipe = _load_bundled(name, dtype)
    elif Path(name).expanduser().is_dir():
        pipe = _load_directory(Path(name).expanduser(), dtype)
    elif _HUB_ID.match(name) and not Path(name).exists() and not name.startswith((".", "/", "~")):
        pipe = _load_hub(name, dtype)
    elif os.sep in name or name.startswith((".", "~")):
        raise ModelNotFoundError(
            f"model directory not found: {name} (give a directory written by save_pretrained, a hub id like "
            f"{next(iter(KNOWN_HUB_MODELS))}, or one of {', '.join(PROJECT_MODELS)})"
        )
    else:
        raise UnknownModelError(
            f"unknown model {name!r}: give a hub id (org/name, e.g. {next(iter(KNOWN_HUB_MODELS))}), a local "
            f"directory, or one of {', '.join(PROJECT_MODELS)}"
        )
    pipe.to(device or "cpu")
    for component in pipe.components.values():  # models built in code start in train mode (dropout on)
        if isinstance(component, torch.nn.Module):
            component.eval()
    pipe.set_progress_bar_config(disable=True)
    pipe.diffptq_source = name
    return pipe


def _pipeline_class(model_index: dict, where: str):
    cls_name = model_index.get("_class_name")
    if cls_name not in PIPELINE_CLASSES:
        raise UnknownModelError(
            f"{where} holds a {cls_name or 'non-diffusers'} pipeline; diffptq supports "
            f"{', '.join(PIPELINE_CLASSES)}"
        )
    return PIPELINE_CLASSES[cls_name]


def _extra_kwargs(cls) -> dict:
    # SD 1.5's safety checker needs CLIP weights of its own and plays no part in quantization.
    return {"safety_checker": None, "requires_safety_checker": False} if cls is StableDiffusionPipeline else {}


def _load_directory(path: Path, dtype: torch.dtype):
    index = path / "model_index.json"
    if not index.is_file():
        raise ModelNotFoundError(f"{path} has no model_index.json: it is not a diffusers pipeline directory "
                                 "(write one with pipe.save_pretrained(DIR) or huggingface-cli download)")
    cls = _pipeline_class(json.loads(index.read_text()), str(path))
    return cls.from_pretrained(path, dtype=dtype, local_files_only=True, **_extra_kwargs(cls))


def _load_bundled(name: str, dtype: torch.dtype):
    path = BUNDLED_MODELS[name]
    if not (path / "model_index.json").is_file():
        which = name.removeprefix("bundled-")
        raise ModelNotFoundError(
            f"bundled model {name} has no weights at {path}; train them with "
            f"`python -m diffptq.models.bundled.train --which {which}` (or use tiny-{which.split('-')[0]} for a "
            "random-weight model)"
        )
    pipe = _load_directory(path, dtype)
    from diffptq.models.bundled.specs import SAMPLING

    # guidance scale the bundled models were tuned for; steps and sizes come from the pipeline and the flags
    pipe.diffptq_sampling = {"guidance_scale": SAMPLING[name.removeprefix("bundled-")]["guidance_scale"]}
    return pipe


def _load_hub(repo_id: str, dtype: torch.dtype):
    from huggingface_hub import constants

    cls = KNOWN_HUB_MODELS.get(repo_id, DiffusionPipeline)
    kwargs = {"dtype": dtype, **_extra_kwargs(cls)}
    try:
        return cls.from_pretrained(repo_id, local_files_only=True, **kwargs)
    except (OSError, ValueError) as cached_err:
        log.debug("not in cache: %s", cached_err)
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    how = (f"download it with `huggingface-cli download {repo_id}` (or `hf download {repo_id}`) on a machine "
           f"with network, or pass --model <local dir>, or use --model bundled-dit / bundled-unet")
    if offline:
        raise ModelNotFoundError(f"model {repo_id} is not in the Hugging Face cache {constants.HF_HUB_CACHE} and "
                                 f"HF_HUB_OFFLINE is set: {how}")
    try:
        return cls.from_pretrained(repo_id, **kwargs)
    except Exception as err:  # noqa: BLE001 - any hub failure becomes one clear message
        raise ModelNotFoundError(f"model {repo_id} could not be loaded from the hub or the cache "
                                 f"{constants.HF_HUB_CACHE} ({type(err).__name__}): {how}") from None
