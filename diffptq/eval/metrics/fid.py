"""FID on torchmetrics' FrechetInceptionDistance: the 2048-d Inception-v3 pool features, or any injected extractor.

Weights: torch-fidelity's `weights-inception-2015-12-05-6726825d.pth` (the TF FID Inception converted to PyTorch),
taken from an explicit path or from the torch hub cache `$TORCH_HOME/hub/checkpoints/` (default ~/.cache/torch),
where torch-fidelity itself would download it. It is never downloaded here: absent, FID is skipped.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image, ImageOps
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance

from .common import as_float01, as_uint8, batches, log, resolve_weights, torch_hub_checkpoint, warn_missing

INCEPTION_WEIGHTS = "weights-inception-2015-12-05-6726825d.pth"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


class FeatureExtractor(nn.Module):
    """Adapts any `fn(images) -> (N, d)` (an nn.Module or a bound method) to torchmetrics' custom-extractor API.

    `fn` receives float32 images (N,3,H,W) in [0,1]; `num_features` = d is what torchmetrics reads to size its state.
    """

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], num_features: int) -> None:
        super().__init__()
        self.fn = fn  # an nn.Module is registered as a child, so .to(device) moves it
        self.num_features = int(num_features)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.fn(images).flatten(1).to(images.device)  # e.g. an evaluator that returns CPU features


def inception_fid_metric(weights: str | os.PathLike | None = None) -> FrechetInceptionDistance | None:
    """FID over the 2048-d Inception-v3 pool features, weights from `weights` or the torch hub cache; None if absent."""
    path = resolve_weights(weights, INCEPTION_WEIGHTS)
    if not path.is_file():
        warn_missing(
            "fid", f"Inception-v3 FID weights {path}",
            f"pass fid_weights=PATH (--fid_weights) or put {INCEPTION_WEIGHTS} in {torch_hub_checkpoint('')}",
        )
        return None
    # torch-fidelity unpickles the file in full; refuse anything but plain tensors first.
    torch.load(path, map_location="cpu", weights_only=True)
    return FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=str(path))


def custom_fid_metric(fn: Callable[[torch.Tensor], torch.Tensor], probe: torch.Tensor) -> FrechetInceptionDistance:
    """FID over the features of `fn` (float images in [0,1] -> (N, d)); d is read from `fn(probe[:2])`."""
    with torch.no_grad():
        dim = fn(as_float01(probe[:2])).flatten(1).shape[1]
    return FrechetInceptionDistance(feature=FeatureExtractor(fn, dim))


def fid_feature_dim(metric: FrechetInceptionDistance) -> int:
    """Length d of the feature vectors `metric` accumulates."""
    return int(metric.real_features_sum.numel())


def frechet_distance(
    metric: FrechetInceptionDistance,
    images: torch.Tensor,
    ref_images: torch.Tensor,
    batch_size: int = 16,
    name: str = "fid",
) -> float | None:
    """FID between `images` and `ref_images`, each (N,3,H,W) uint8 or float in [0,1]; lower is closer.

    The Inception extractor gets uint8 (it resizes to 299 itself), a custom one float in [0,1]. Needs at least 2 images
    a side (None and a warning otherwise). With fewer images than features the covariances are rank-deficient: the
    value is biased upwards and not comparable to published FID (which uses 10k-50k images), and a warning says so.
    """
    n_img, n_ref, dim = len(images), len(ref_images), fid_feature_dim(metric)
    if min(n_img, n_ref) < 2:
        log.warning("%s skipped (value empty): needs at least 2 images a side, got %d and %d", name, n_img, n_ref)
        return None
    if min(n_img, n_ref) < dim:
        log.warning(
            "%s on %d/%d images < %d features: biased, not comparable to published FID", name, n_img, n_ref, dim
        )
    convert = as_float01 if metric.used_custom_model else as_uint8
    metric.reset()
    with torch.no_grad():
        for real, imgs in ((True, ref_images), (False, images)):
            for sl in batches(len(imgs), batch_size):
                metric.update(convert(imgs[sl]).to(metric.device), real=real)
        return float(metric.compute())


def load_image_dir(path: str | os.PathLike, size: tuple[int, int]) -> torch.Tensor:
    """All PNG/JPG files of folder `path` (sorted by name) as uint8 (N,3,H,W), `size` = (H, W).

    Each image is scaled to cover (H, W) and centre-cropped (aspect ratio kept, bicubic).
    """
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"reference image folder {folder} does not exist")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"no {'/'.join(IMAGE_SUFFIXES)} files in reference image folder {folder}")
    height, width = size
    tensors = []
    for file in files:
        with Image.open(file) as img:
            fitted = ImageOps.fit(img.convert("RGB"), (width, height), Image.Resampling.BICUBIC)
        tensors.append(torch.frombuffer(bytearray(fitted.tobytes()), dtype=torch.uint8).view(height, width, 3))
    return torch.stack(tensors).permute(0, 3, 1, 2).contiguous()
