"""Result tables and figures: CSV and markdown from row dicts, image grids, bar plots.

A row is a dict column -> value; None (a value that could not be measured) is an empty cell, never 0.
"""
from __future__ import annotations

import csv
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw, ImageFont

from diffptq.io.files import write_text_atomic

Row = Mapping[str, Any]


def format_value(value: Any, precision: int = 6) -> str:
    """A cell: None -> '', floats to `precision` significant digits (no exponent for |v| >= 1e-4), others str()."""
    if value is None:
        return ""
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:  # 0-d tensors, numpy scalars
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, float):
        return str(value)
    if math.isnan(value) or math.isinf(value):
        return str(value)
    if abs(value) >= 10**precision:
        return f"{value:.0f}"
    return f"{value:.{precision}g}"


def _columns(rows: Sequence[Row], columns: Sequence[str] | None) -> list[str]:
    """`columns` as given, or the keys of all rows in first-seen order."""
    if columns is not None:
        return list(columns)
    return list(dict.fromkeys(key for row in rows for key in row))


def write_csv(rows: Sequence[Row], path: str | os.PathLike, columns: Sequence[str] | None = None) -> Path:
    """Write `rows` as CSV with `columns` in that order (keys not in `columns` are left out; missing keys -> '').

    Atomic: written to a temporary name beside `path`, then renamed, so `path` never holds a partial table.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cols = _columns(rows, columns)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(cols)
        for row in rows:
            writer.writerow([format_value(row.get(col)) for col in cols])
    os.replace(tmp, path)
    return path


def markdown_table(rows: Sequence[Row], columns: Sequence[str] | None = None, precision: int = 4) -> str:
    """A GitHub markdown table of `rows`: header, separator, one line per row; None -> empty cell."""
    cols = _columns(rows, columns)

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"

    lines = [line(cols), line(["---"] * len(cols))]
    lines += [line([format_value(row.get(col), precision) for col in cols]) for row in rows]
    return "\n".join(lines) + "\n"


def write_markdown(
    rows: Sequence[Row], path: str | os.PathLike, columns: Sequence[str] | None = None, title: str | None = None
) -> Path:
    """Write `markdown_table(rows, columns)` to `path`, under a `# title` heading if given (atomically)."""
    head = f"# {title}\n\n" if title else ""
    return write_text_atomic(path, head + markdown_table(rows, columns))


def _to_pil(image: torch.Tensor) -> Image.Image:
    """(3,H,W) float in [0,1] or uint8 -> PIL RGB."""
    if image.dtype != torch.uint8:
        image = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    return Image.fromarray(image.cpu().permute(1, 2, 0).contiguous().numpy(), "RGB")


def _fit_text(draw: ImageDraw.ImageDraw, text: str, width: int, font: Any) -> str:
    """`text`, cut with '…' so that it fits `width` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def save_image_grid(
    rows: Sequence[torch.Tensor],
    path: str | os.PathLike,
    row_labels: Sequence[str],
    col_labels: Sequence[str] | None = None,
    label_width: int = 160,
    header_height: int = 24,
) -> Path:
    """A PNG grid: one row per method, one column per prompt, a label column on the left.

    rows: R tensors (C,3,H,W) float in [0,1] or uint8, all the same shape. col_labels (C prompts) add a header row.
    Size: (label_width + C·W) x (R·H [+ header_height]) pixels.
    """
    if len(rows) != len(row_labels):
        raise ValueError(f"{len(rows)} image rows but {len(row_labels)} row labels")
    shapes = {tuple(r.shape) for r in rows}
    if len(shapes) != 1 or len(next(iter(shapes))) != 4:
        raise ValueError(f"every row must be a (C,3,H,W) tensor of one shape, got {sorted(shapes)}")
    n_cols, _, height, width = next(iter(shapes))
    top = header_height if col_labels is not None else 0
    grid = Image.new("RGB", (label_width + n_cols * width, top + len(rows) * height), "white")
    draw, font = ImageDraw.Draw(grid), ImageFont.load_default()
    for col, label in enumerate(col_labels or []):
        draw.text((label_width + col * width + 4, 4), _fit_text(draw, label, width - 8, font), fill="black", font=font)
    for r, (images, label) in enumerate(zip(rows, row_labels, strict=True)):
        y = top + r * height
        draw.text((4, y + height // 2 - 6), _fit_text(draw, label, label_width - 8, font), fill="black", font=font)
        for c, image in enumerate(images):
            grid.paste(_to_pil(image), (label_width + c * width, y))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path


def _finite_number(value: Any) -> float | None:
    if value is None or isinstance(value, (bool, str)):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def bar_values(rows: Sequence[Row], column: str, label_key: str = "method") -> list[tuple[str, float]]:
    """(label, value) of each row with a finite number in `column`; None, NaN, inf and non-numbers are left out."""
    points = [(str(row.get(label_key, i)), _finite_number(row.get(column))) for i, row in enumerate(rows)]
    return [(label, value) for label, value in points if value is not None]


def save_bar_plots(
    rows: Sequence[Row], columns: Sequence[str], path: str | os.PathLike, label_key: str = "method"
) -> Path:
    """One bar chart per column in `columns` (side by side), a bar per row labelled by `row[label_key]`.

    Empty values (None, NaN, inf, non-numbers) get no bar; a column without any value says so in its panel.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(3.0, 1.2 + 0.5 * len(rows)) * len(columns), 3.6), layout="constrained")
    FigureCanvasAgg(fig)  # Agg canvas, no global pyplot state or display needed
    axes = fig.subplots(1, len(columns), squeeze=False)[0]
    for ax, col in zip(axes, columns, strict=True):
        points = bar_values(rows, col, label_key)
        ax.set_title(col)
        if not points:
            ax.text(0.5, 0.5, "no values", ha="center", va="center", transform=ax.transAxes)
            ax.set_xticks([])
            continue
        labels, values = zip(*points, strict=True)
        ax.bar(range(len(values)), values, color="tab:blue")
        ax.set_xticks(range(len(values)), labels, rotation=45, ha="right")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path
