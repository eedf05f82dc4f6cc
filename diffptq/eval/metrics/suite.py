"""One entry point over all image metrics: `compute_image_metrics(images, fp_images, prompts, options) -> dict`.

A metric whose weights are absent is skipped with one warning line naming the file and how to provide it; its value is
None (an empty CSV cell). Build `ImageMetrics(options)` once to evaluate several methods without reloading networks.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from diffptq.eval.stats import wilson_interval

from .clip import DEFAULT_CLIP, clip_score, clip_score_metric
from .common import as_float01, batches, log
from .fid import custom_fid_metric, fid_feature_dim, frechet_distance, inception_fid_metric, load_image_dir
from .similarity import lpips_metric, lpips_score, psnr_interval, psnr_per_image, ssim_score

ALL_METRICS = ("fid", "clip_score", "lpips", "psnr", "ssim")
RESULT_KEYS = (
    "fid", "fid_features", "fid_images", "fid_ref_images", "clip_score", "lpips", "psnr", "ssim",
    "prompt_acc", "fid_bundled", "prompt_acc_lo", "prompt_acc_hi", "psnr_lo", "psnr_hi",
)


@runtime_checkable
class BundledEvaluator(Protocol):
    """An evaluator network shipped with the project (for the bundled models, where Inception/CLIP do not apply).

    `features(images)`: float32 (N,3,H,W) in [0,1] -> (N, d) features, used for `fid_bundled` by the same FID code.
    `prompt_accuracy(images, prompts)`: share of images (0..1) in which the evaluator recognises the prompt.
    An evaluator may also have `prompt_correct(images, prompts)` -> (N,) bools, image by image (used when present;
    otherwise prompt_accuracy is asked image by image).
    """

    def features(self, images: torch.Tensor) -> torch.Tensor: ...

    def prompt_accuracy(self, images: torch.Tensor, prompts: Sequence[str]) -> float: ...


@dataclass
class MetricOptions:
    """Where each metric finds its weights, and what to compute.

    fid_weights: Inception-v3 FID weights file; None: weights-inception-2015-12-05-6726825d.pth in the torch hub cache
        ($TORCH_HOME/hub/checkpoints, default ~/.cache/torch/hub/checkpoints).
    clip_model: CLIP hub id (looked up in the HF cache only) or save_pretrained directory.
    lpips_weights: torchvision AlexNet weights file; None: alexnet-owt-7be5be79.pth in the torch hub cache.
    ref_dir: folder of real PNG/JPG images as FID reference (resized to the generated size); None: the FP images.
    fid_extractor: replaces Inception for `fid`: an nn.Module, float (N,3,H,W) in [0,1] -> (N, d).
    evaluator: a BundledEvaluator; adds `prompt_acc` and `fid_bundled`.
    metrics: which of ALL_METRICS to compute; the others are None.
    """

    fid_weights: str | None = None
    clip_model: str = DEFAULT_CLIP
    lpips_weights: str | None = None
    ref_dir: str | None = None
    device: str = "cpu"
    fid_extractor: nn.Module | None = None
    evaluator: BundledEvaluator | None = None
    batch_size: int = 16
    metrics: tuple[str, ...] = ALL_METRICS


class ImageMetrics:
    """Builds each metric's network once (lazily, on first use) and scores image sets against the FP images."""

    def __init__(self, options: MetricOptions | None = None) -> None:
        self.options = options or MetricOptions()
        unknown = set(self.options.metrics) - set(ALL_METRICS)
        if unknown:
            raise ValueError(f"unknown metrics {sorted(unknown)}; choose from {ALL_METRICS}")
        self._built: dict[str, Any] = {}
        self._ref: tuple[tuple[int, int], torch.Tensor] | None = None

    def _get(self, key: str, build: Callable[[], Any]) -> Any:
        """The metric object under `key`, built on first call; a None (weights absent) is remembered: one warning."""
        if key not in self._built:
            metric = build()
            self._built[key] = metric.to(self.options.device) if metric is not None else None
        return self._built[key]

    def _reference(self, images: torch.Tensor, fp_images: torch.Tensor | None) -> torch.Tensor | None:
        """FID reference: `ref_dir` images at the generated size (loaded once per size), else the FP images."""
        if self.options.ref_dir is None:
            return fp_images
        size = (int(images.shape[-2]), int(images.shape[-1]))
        if self._ref is None or self._ref[0] != size:
            self._ref = (size, load_image_dir(self.options.ref_dir, size))
        return self._ref[1]

    def __call__(
        self, images: torch.Tensor, fp_images: torch.Tensor | None, prompts: Sequence[str]
    ) -> dict[str, float | int | None]:
        """Score `images` (N,3,H,W) uint8 or float in [0,1], made from `prompts` (N strings).

        fp_images: the FP model's images for the same prompts and seeds (same shape), or None (paired metrics and the
        default FID reference are then None). Returns every key of RESULT_KEYS: fid (lower is better), fid_features
        (d), fid_images / fid_ref_images (counts used), clip_score (0..100), lpips (0 = identical), psnr (dB, inf if
        identical), ssim (1 = identical), prompt_acc and fid_bundled (from `options.evaluator`); 95% intervals:
        psnr_lo / psnr_hi (bootstrap over images) and prompt_acc_lo / prompt_acc_hi (Wilson).
        """
        opts, want = self.options, set(self.options.metrics)
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        if fp_images is not None and fp_images.shape != images.shape:
            raise ValueError(f"images {tuple(images.shape)} and fp_images {tuple(fp_images.shape)} differ in shape")
        out: dict[str, float | int | None] = dict.fromkeys(RESULT_KEYS)
        ref = self._reference(images, fp_images) if ({"fid"} & want or opts.evaluator is not None) else None
        if "fid" in want:
            out.update(self._fid(images, ref))
        if "clip_score" in want:
            metric = self._get("clip_score", lambda: clip_score_metric(opts.clip_model))
            out["clip_score"] = None if metric is None else clip_score(metric, images, prompts, opts.batch_size)
        if fp_images is None and want & {"lpips", "psnr", "ssim"}:
            log.info("lpips/psnr/ssim skipped: no FP images to compare with")
        elif fp_images is not None:
            if "lpips" in want:
                metric = self._get("lpips", lambda: lpips_metric(opts.lpips_weights))
                out["lpips"] = None if metric is None else lpips_score(metric, images, fp_images, opts.batch_size)
            if "psnr" in want:
                per_image = psnr_per_image(images, fp_images, opts.batch_size)  # psnr_score is their mean
                out["psnr"] = float(per_image.mean())
                out["psnr_lo"], out["psnr_hi"] = psnr_interval(per_image)
            if "ssim" in want:
                out["ssim"] = ssim_score(images, fp_images, opts.batch_size, opts.device)
        if opts.evaluator is not None:
            out.update(self._bundled(images, ref, prompts))
        return out

    def _fid(self, images: torch.Tensor, ref: torch.Tensor | None) -> dict[str, float | int | None]:
        opts = self.options
        if ref is None:
            log.info("fid skipped: no reference (fp_images is None and no ref_dir)")
            return {}
        if opts.fid_extractor is not None:
            extractor = opts.fid_extractor.to(opts.device)
            metric = self._get("fid", lambda: custom_fid_metric(extractor, images[:2].to(opts.device)))
        else:
            metric = self._get("fid", lambda: inception_fid_metric(opts.fid_weights))
        if metric is None:
            return {}
        return {
            "fid": frechet_distance(metric, images, ref, opts.batch_size, "fid"),
            "fid_features": fid_feature_dim(metric),
            "fid_images": len(images),
            "fid_ref_images": len(ref),
        }

    def _bundled(
        self, images: torch.Tensor, ref: torch.Tensor | None, prompts: Sequence[str]
    ) -> dict[str, float | None]:
        opts, evaluator = self.options, self.options.evaluator
        correct = 0
        for sl in batches(len(images), opts.batch_size):
            batch = as_float01(images[sl]).to(opts.device)
            correct += int(prompt_correct(evaluator, batch, list(prompts[sl])).sum())
        lo, hi = wilson_interval(correct, len(images))
        out: dict[str, float | None] = {"prompt_acc": correct / len(images), "prompt_acc_lo": lo, "prompt_acc_hi": hi}
        if ref is not None:
            probe = as_float01(images[:2]).to(opts.device)
            metric = self._get("fid_bundled", lambda: custom_fid_metric(evaluator.features, probe))
            out["fid_bundled"] = frechet_distance(metric, images, ref, opts.batch_size, "fid_bundled")
        return out


def prompt_correct(evaluator: BundledEvaluator, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
    """(N,) bool: the evaluator recognises prompt i in image i (its prompt_correct, else prompt_accuracy per image)."""
    if hasattr(evaluator, "prompt_correct"):
        return torch.as_tensor(evaluator.prompt_correct(images, list(prompts))).bool().reshape(len(images))
    return torch.tensor([evaluator.prompt_accuracy(images[i:i + 1], [p]) >= 0.5 for i, p in enumerate(prompts)])


def compute_image_metrics(
    images: torch.Tensor,
    fp_images: torch.Tensor | None,
    prompts: Sequence[str],
    options: MetricOptions | None = None,
) -> dict[str, float | int | None]:
    """All image metrics of `images` vs `fp_images` in one call (see ImageMetrics.__call__ for shapes and keys)."""
    return ImageMetrics(options)(images, fp_images, prompts)
