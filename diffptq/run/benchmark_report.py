"""The benchmark's table, metric passes and figures: metrics.csv/.md columns, scoring, grid and bar plots."""
from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from diffptq.eval.metrics import ImageMetrics, MetricOptions
from diffptq.eval.stats import overlaps
from diffptq.models.names import is_bundled

log = logging.getLogger("diffptq.benchmark")

COLUMNS = ("method", "dtype", "wbits", "abits", "model", "n_images", "fid", "fid_features", "clip_score", "lpips",
           "psnr", "ssim", "prompt_acc", "latency_s", "peak_vram_gb", "model_size_gb", "calib_time_s")
# after the columns: FID in the bundled evaluator's features, denoiser-only latency per image, the size of the
# checkpoint file the row was saved to / loaded from, where the quantized weights came from, the online input
# rotation of the quantized layers (empty: none), images per second of the whole (sharded) generation and the number
# of processes that shared it
# then the 95% intervals of prompt_acc (Wilson) and psnr (bootstrap over images), and for peer rows (--peers) the
# peer library's installed version and a note (what it quantized, or why it could not run)
EXTRA_COLUMNS = ("fid_bundled", "denoiser_latency_s", "checkpoint_gb", "source", "rotate", "images_per_s",
                 "num_processes", "prompt_acc_lo", "prompt_acc_hi", "psnr_lo", "psnr_hi", "peer_version", "note")
ALL_COLUMNS = COLUMNS + EXTRA_COLUMNS
TIE_LEGEND = ("prompt_acc: ★ the best of its bit width (same wbits and abits, two rows or more), ≈ tied with it "
              "(their Wilson 95% intervals, prompt_acc_lo..prompt_acc_hi, overlap).")
PLOT_COLUMNS = ("fid", "fid_bundled", "clip_score", "lpips", "psnr", "ssim", "prompt_acc", "latency_s",
                "model_size_gb")


# recipe settings a row of ours states in its `note` when they differ from the default (the flag names of
# benchmark_final.py, whose config.json records them under these names): (name, default)
RECIPE_NOTE_FIELDS = (("skip", ()), ("lowrank_conv", False), ("rotate_conv", False), ("smooth", None), ("keep", 0),
                      ("act_order", False), ("group_size", None))


def recipe_note(settings: dict[str, Any]) -> str:
    """The non-default recipe settings of one of our rows, e.g. "skip re:conv|proj_in|proj_out; lowrank_conv" ("" when
    all are defaults). settings: flag name -> value (missing names count as defaults)."""
    parts = []
    for name, default in RECIPE_NOTE_FIELDS:
        value = settings.get(name, default)
        if value in (default, None, [], ()) or value is False:
            continue
        shown = ",".join(map(str, value)) if isinstance(value, (list, tuple)) else value
        parts.append(name if value is True else f"{name} {shown}")
    return "; ".join(parts)


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


def acc_marks(rows: Sequence[dict[str, Any]]) -> dict[int, str]:
    """Row index -> '★' for the best prompt_acc among the rows of one bit width (wbits, abits; two rows or more with a
    value and an interval), '≈' for the rows of that bit width whose interval overlaps the best one's."""
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, row in enumerate(rows):
        if row.get("prompt_acc") is not None and row.get("prompt_acc_lo") is not None:
            groups[(row.get("wbits"), row.get("abits"))].append(i)
    marks = {}
    for members in (m for m in groups.values() if len(m) > 1):
        best = max(members, key=lambda i: rows[i]["prompt_acc"])
        interval = (rows[best]["prompt_acc_lo"], rows[best]["prompt_acc_hi"])
        marks[best] = "★"
        marks.update({i: "≈" for i in members if i != best
                      and overlaps((rows[i]["prompt_acc_lo"], rows[i]["prompt_acc_hi"]), interval)})
    return marks


def marked_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] = ALL_COLUMNS) -> str:
    """A markdown table of `rows` with prompt_acc marked by acc_marks, and the legend when a mark is there."""
    from diffptq.eval.report import format_value, markdown_table

    marks = acc_marks(rows)
    shown = [{**row, "prompt_acc": f"{format_value(row['prompt_acc'], 4)} {marks[i]}"} if i in marks else row
             for i, row in enumerate(rows)]
    return markdown_table(shown, columns) + (f"\n{TIE_LEGEND}\n" if marks else "")


def metrics_markdown(rows: Sequence[dict[str, Any]], title: str) -> str:
    """metrics.md: the ALL_COLUMNS table with prompt_acc marked (marked_table)."""
    return f"# {title}\n\n" + marked_table(rows)


def write_outputs(rows: list[dict[str, Any]], grid: list[torch.Tensor | None], prompts: Sequence[str], out_dir: Path,
                  title: str) -> dict[str, Path]:
    """metrics.csv and metrics.md (ALL_COLUMNS), grid.png (rows: variants, columns: prompts), metrics.png (bars).

    rows: dicts with ALL_COLUMNS and `label`; grid: per row the first images (C,3,H,W), None for a row without images
    (a peer that could not run: not in the grid); prompts: their C prompts.
    """
    from diffptq.eval.report import save_bar_plots, save_image_grid, write_csv
    from diffptq.io.files import write_text_atomic

    paths = {"csv": write_csv(rows, out_dir / "metrics.csv", ALL_COLUMNS),
             "md": write_text_atomic(out_dir / "metrics.md", metrics_markdown(rows, title))}
    shown = [(row["label"], images) for row, images in zip(rows, grid, strict=True) if images is not None]
    if shown:
        labels = [label for label, _ in shown]
        paths["grid"] = save_image_grid([_grid_images(g) for _, g in shown], out_dir / "grid.png", labels,
                                        list(prompts))
    if rows:
        plotted = [c for c in PLOT_COLUMNS if any(row.get(c) is not None for row in rows)]
        if plotted:
            paths["plots"] = save_bar_plots(rows, plotted, out_dir / "metrics.png", label_key="label")
    return paths
