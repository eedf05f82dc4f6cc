"""Image-quality metrics for quantized diffusion models, on torchmetrics.

fid.py (FID, 2048-d Inception-v3 or an injected extractor), clip.py (CLIP score), similarity.py (LPIPS / PSNR / SSIM
vs the FP image of the same prompt and seed), suite.py (`compute_image_metrics`, `MetricOptions`, `ImageMetrics`).
"""
from .clip import DEFAULT_CLIP, clip_score, clip_score_metric, load_clip
from .fid import (
    INCEPTION_WEIGHTS,
    FeatureExtractor,
    custom_fid_metric,
    fid_feature_dim,
    frechet_distance,
    inception_fid_metric,
    load_image_dir,
)
from .similarity import (
    ALEXNET_WEIGHTS,
    lpips_metric,
    lpips_score,
    psnr_interval,
    psnr_per_image,
    psnr_score,
    ssim_score,
)
from .suite import (
    ALL_METRICS,
    RESULT_KEYS,
    BundledEvaluator,
    ImageMetrics,
    MetricOptions,
    compute_image_metrics,
    prompt_correct,
)

__all__ = [
    "ALEXNET_WEIGHTS", "ALL_METRICS", "DEFAULT_CLIP", "INCEPTION_WEIGHTS", "RESULT_KEYS", "BundledEvaluator",
    "FeatureExtractor", "ImageMetrics", "MetricOptions", "clip_score", "clip_score_metric", "compute_image_metrics",
    "custom_fid_metric", "fid_feature_dim", "frechet_distance", "inception_fid_metric", "load_clip",
    "load_image_dir", "lpips_metric", "lpips_score", "prompt_correct", "psnr_interval", "psnr_per_image", "psnr_score",
    "ssim_score",
]
