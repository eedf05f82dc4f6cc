"""The benchmark's table, metric passes and figures: metrics.csv/.md columns, scoring, grid and bar plots."""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from diffptq.eval.metrics import ImageMetrics, MetricOptions
from diffptq.models.names import is_bundled

log = logging.getLogger("diffptq.benchmark")

COLUMNS = ("method", "dtype", "wbits", "abits", "model", "n_images", "fid", "fid_features", "clip_score", "lpips",
           "psnr", "ssim", "prompt_acc", "latency_s", "peak_vram_gb", "model_size_gb", "calib_time_s")
# after the columns: FID in the bundled evaluator's features, denoiser-only latency per image, the size of the
# checkpoint file the row was saved to / loaded from, where the quantized weights came from, the online input
# rotation of the quantized layers (empty: none), images per second of the whole (sharded) generation and the number
# of processes that shared it
EXTRA_COLUMNS = ("fid_bundled", "denoiser_latency_s", "checkpoint_gb", "source", "rotate", "images_per_s",
                 "num_processes")
ALL_COLUMNS = COLUMNS + EXTRA_COLUMNS
PLOT_COLUMNS = ("fid", "fid_bundled", "clip_score", "lpips", "psnr", "ssim", "prompt_acc", "latency_s",
                "model_size_gb")


def metric_passes(options: MetricOptions) -> list[tuple[str, ImageMetrics]]:
    """One ImageMetrics per metric (and one for the bundled evaluator), so that each pass ticks a progress bar.

    Each network is still built once (by its own pass) and a metric skipped for absent weights warns once.
    """
    passes = [(name, ImageMetrics(replace(options, metrics=(name,), evaluator=None))) for name in options.metrics]
    if options.evaluator is not None:
        passes.append(("evaluator", ImageMetrics(replace(options, metrics=(), evaluator=options.evaluator))))
    return passes


def score(passes: list[tuple[str, ImageMetrics]], images: torch.Tensor, fp_images: torch.Tensor,
          prompts: Sequence[str], label: str, progress: bool) -> dict[str, Any]:
    """All metrics of one variant's images (N,3,H,W) vs the FP images: RESULT_KEYS -> value, None where skipped."""
    out: dict[str, Any] = {}
    for _, metric in tqdm(passes, desc=f"metrics {label}", unit="metric", disable=not progress, leave=False):
        for key, value in metric(images, fp_images, prompts).items():
            if value is not None or key not in out:
                out[key] = value
    return out


def load_bundled_evaluator(model: str, path: str | None, device: torch.device):
    """The bundled evaluator (prompt_acc, fid_bundled) for a bundled model or an explicit `path`; else None.

    Absent weights: None and one warning naming the folder (the two columns stay empty)."""
    if path is None and not is_bundled(model):
        log.info("prompt_acc / fid_bundled skipped (value empty): only for the bundled models or with --evaluator DIR")
        return None
    from diffptq.models.bundled.evaluator import load_evaluator

    try:
        return load_evaluator(device, path)
    except FileNotFoundError as err:
        log.warning("prompt_acc / fid_bundled skipped (value empty): %s", err)
        return None


def _grid_images(images: torch.Tensor, min_side: int = 128) -> torch.Tensor:
    """Small images scaled up by an integer factor (nearest) so that the grid's labels fit beside them."""
    factor = -(-min_side // min(images.shape[-2:]))
    if factor <= 1:
        return images
    return torch.nn.functional.interpolate(images.float(), scale_factor=factor, mode="nearest").to(images.dtype)


def write_outputs(rows: list[dict[str, Any]], grid: list[torch.Tensor], prompts: Sequence[str], out_dir: Path,
                  title: str) -> dict[str, Path]:
    """metrics.csv and metrics.md (ALL_COLUMNS), grid.png (rows: variants, columns: prompts), metrics.png (bars).

    rows: dicts with ALL_COLUMNS and `label`; grid: per row the first images (C,3,H,W); prompts: their C prompts.
    """
    from diffptq.eval.report import save_bar_plots, save_image_grid, write_csv, write_markdown

    paths = {"csv": write_csv(rows, out_dir / "metrics.csv", ALL_COLUMNS),
             "md": write_markdown(rows, out_dir / "metrics.md", ALL_COLUMNS, title=title)}
    if rows:
        labels = [row["label"] for row in rows]
        paths["grid"] = save_image_grid([_grid_images(g) for g in grid], out_dir / "grid.png", labels, list(prompts))
        plotted = [c for c in PLOT_COLUMNS if any(row.get(c) is not None for row in rows)]
        if plotted:
            paths["plots"] = save_bar_plots(rows, plotted, out_dir / "metrics.png", label_key="label")
    return paths
