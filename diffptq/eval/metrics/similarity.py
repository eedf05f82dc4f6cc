"""Paired similarity to the FP image of the same prompt and seed: LPIPS (AlexNet), PSNR and SSIM, on torchmetrics.

LPIPS needs two files: torchvision's AlexNet ImageNet weights `alexnet-owt-7be5be79.pth` (from an explicit path or the
torch hub cache `$TORCH_HOME/hub/checkpoints/`, never downloaded here) and the LPIPS linear heads, which ship inside
torchmetrics (`torchmetrics/functional/image/lpips_models/alex.pth`). PSNR and SSIM need no weights.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from torchmetrics import Metric
from torchmetrics.image import (
    LearnedPerceptualImagePatchSimilarity,
    StructuralSimilarityIndexMeasure,
)

from diffptq.eval.stats import bootstrap_interval, wilson_interval

from .common import as_float01, batches, log, resolve_weights, torch_hub_checkpoint, warn_missing

ALEXNET_WEIGHTS = "alexnet-owt-7be5be79.pth"
LPIPS_MIN_SIZE = 32  # AlexNet's pooling stack leaves no pixels below this


def lpips_heads_file() -> Path:
    """The LPIPS AlexNet linear-head weights bundled with torchmetrics."""
    import torchmetrics.functional.image.lpips as tm_lpips

    return Path(tm_lpips.__file__).parent / "lpips_models" / "alex.pth"


def lpips_metric(weights: str | os.PathLike | None = None) -> LearnedPerceptualImagePatchSimilarity | None:
    """LPIPS (AlexNet backbone, inputs in [0,1]); backbone from `weights` or the torch hub cache; None if absent."""
    path = resolve_weights(weights, ALEXNET_WEIGHTS)
    if not path.is_file():
        warn_missing(
            "lpips", f"AlexNet weights {path}",
            f"pass lpips_weights=PATH (--lpips_weights) or put {ALEXNET_WEIGHTS} in {torch_hub_checkpoint('')}",
        )
        return None
    if not lpips_heads_file().is_file():
        warn_missing("lpips", f"LPIPS linear heads {lpips_heads_file()}", "reinstall torchmetrics")
        return None
    with _hub_cache_holding(path):
        return LearnedPerceptualImagePatchSimilarity(net_type="alex", normalize=True)


@contextlib.contextmanager
def _hub_cache_holding(path: Path) -> Iterator[None]:
    """Point torch.hub at a temporary cache whose checkpoints/ links to `path` (unless `path` is the cached file).

    torchvision looks the AlexNet weights up in the hub cache only; this lets a path option feed the same loader.
    Changes process-wide state for the duration (not thread-safe).
    """
    if path.resolve() == torch_hub_checkpoint(ALEXNET_WEIGHTS).resolve():
        yield
        return
    previous = getattr(torch.hub, "_hub_dir", None)  # None means "follow $TORCH_HOME": restore exactly that
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "checkpoints").mkdir()
        (Path(tmp) / "checkpoints" / ALEXNET_WEIGHTS).symlink_to(path.resolve())
        torch.hub.set_dir(tmp)
        try:
            yield
        finally:
            torch.hub._hub_dir = previous


def _paired_mean(metric: Metric, images: torch.Tensor, ref_images: torch.Tensor, batch_size: int) -> float:
    """Run `metric.update(img, ref)` over batches of float [0,1] images on the metric's device; its computed mean."""
    if images.shape != ref_images.shape:
        raise ValueError(f"paired metrics need equal shapes, got {tuple(images.shape)} and {tuple(ref_images.shape)}")
    metric.reset()
    with torch.no_grad():
        for sl in batches(len(images), batch_size):
            metric.update(as_float01(images[sl]).to(metric.device), as_float01(ref_images[sl]).to(metric.device))
        return float(metric.compute())


def lpips_score(
    metric: LearnedPerceptualImagePatchSimilarity, images: torch.Tensor, ref_images: torch.Tensor, batch_size: int = 16
) -> float | None:
    """Mean LPIPS over image pairs (N,3,H,W) uint8 or float in [0,1]; 0 = identical, higher = more different.

    None (and a warning) for images smaller than LPIPS_MIN_SIZE pixels a side, which AlexNet cannot take.
    """
    if min(images.shape[-2:]) < LPIPS_MIN_SIZE:
        log.warning("lpips skipped (value empty): images of %s px; AlexNet LPIPS needs at least %d px a side",
                    "x".join(map(str, images.shape[-2:])), LPIPS_MIN_SIZE)
        return None
    return _paired_mean(metric, images, ref_images, batch_size)


def psnr_score(
    images: torch.Tensor, ref_images: torch.Tensor, batch_size: int = 16, device: str | torch.device = "cpu"
) -> float:
    """Mean over images of per-image PSNR in dB, data range 1: 10·log10(1 / MSE) (psnr_per_image, float64 on the
    CPU; `device` is accepted for the other metrics' signature); inf when a pair is identical."""
    return float(psnr_per_image(images, ref_images, batch_size).mean())


def psnr_per_image(images: torch.Tensor, ref_images: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
    """(N,) float64 PSNR in dB of each image vs its reference, data range 1 (the values psnr_score averages); inf
    for an identical pair."""
    if images.shape != ref_images.shape:
        raise ValueError(f"paired metrics need equal shapes, got {tuple(images.shape)} and {tuple(ref_images.shape)}")
    out = []
    for sl in batches(len(images), batch_size):
        diff = as_float01(images[sl]).double() - as_float01(ref_images[sl]).double()
        out.append(-10 * torch.log10(diff.pow(2).flatten(1).mean(1)))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


def psnr_interval(per_image: torch.Tensor) -> tuple[float | None, float | None]:
    """Bootstrap 95% interval of the mean PSNR over images (diffptq.eval.stats); (inf, inf) when every pair is
    identical, (None, None) when only some are (a mean with infinite terms has no interval)."""
    finite = torch.isfinite(per_image)
    if bool(finite.all()) and len(per_image):
        return bootstrap_interval(per_image)
    if len(per_image) and bool((per_image == float("inf")).all()):
        return float("inf"), float("inf")
    return None, None


def ssim_score(
    images: torch.Tensor, ref_images: torch.Tensor, batch_size: int = 16, device: str | torch.device = "cpu"
) -> float:
    """Mean SSIM (Gaussian window 11, sigma 1.5, data range 1) over image pairs; 1 = identical."""
    metric = StructuralSimilarityIndexMeasure(data_range=1.0).to(device)
    return _paired_mean(metric, images, ref_images, batch_size)


def image_scores(images: torch.Tensor, ref_images: torch.Tensor, prompts=(), evaluator=None) -> dict:
    """PSNR of images (N, 3, H, W) in [0, 1] against ref_images (same prompts and seeds): psnr (mean over images,
    dB), psnr_lo / psnr_hi (bootstrap 95%), n_images; with a bundled evaluator (its prompt_correct(images, prompts))
    also prompt_acc with its Wilson 95% interval (acc_lo, acc_hi)."""
    per_image = psnr_per_image(images, ref_images)
    lo, hi = psnr_interval(per_image)
    out = {"psnr": float(per_image.mean()), "psnr_lo": lo, "psnr_hi": hi, "n_images": len(images)}
    if evaluator is not None:
        correct = evaluator.prompt_correct(images, prompts)
        out["acc_lo"], out["acc_hi"] = wilson_interval(int(correct.sum()), len(correct))
        out["prompt_acc"] = float(correct.mean())
    return out

