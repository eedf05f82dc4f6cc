"""CSV / markdown tables, image grids and bar plots."""
import csv

import pytest
import torch
from PIL import Image

from diffptq.eval.report import (
    bar_values,
    format_value,
    markdown_table,
    save_bar_plots,
    save_image_grid,
    write_csv,
    write_markdown,
)

ROWS = [
    {"method": "fp", "fid": 0.0, "psnr": float("inf"), "latency_s": None, "bits": 16},
    {"method": "gptq", "fid": 12.345678912, "psnr": 31.25, "latency_s": 0.0421, "bits": 4, "extra": "x"},
]


def test_csv_keeps_the_column_order_and_leaves_none_empty(tmp_path):
    columns = ["method", "bits", "latency_s", "fid", "psnr", "not_measured"]
    path = write_csv(ROWS, tmp_path / "out" / "metrics.csv", columns)
    with path.open(newline="") as f:
        table = list(csv.reader(f))
    assert table[0] == columns
    assert table[1] == ["fp", "16", "", "0", "inf", ""]
    assert table[2] == ["gptq", "4", "0.0421", "12.3457", "31.25", ""]  # 'extra' is not a column: left out


def test_csv_without_columns_uses_first_seen_key_order(tmp_path):
    path = write_csv(ROWS, tmp_path / "m.csv")
    header = path.read_text().splitlines()[0]
    assert header == "method,fid,psnr,latency_s,bits,extra"


def test_format_value():
    assert format_value(None) == ""
    assert format_value(torch.tensor(2.5)) == "2.5"
    assert format_value(123456789.0) == "123456789"
    assert format_value(True) == "True"
    assert format_value(float("nan")) == "nan"


def test_markdown_table_has_a_line_per_row(tmp_path):
    table = markdown_table(ROWS, ["method", "fid", "latency_s"])
    lines = table.strip().splitlines()
    assert len(lines) == 2 + len(ROWS)
    assert lines[0] == "| method | fid | latency_s |"
    assert lines[2] == "| fp | 0 |  |"
    assert lines[3] == "| gptq | 12.35 | 0.0421 |"
    path = write_markdown(ROWS, tmp_path / "m.md", ["method"], title="Results")
    assert path.read_text().startswith("# Results\n\n| method |")


def test_image_grid_is_rows_by_columns_tiles_plus_labels(tmp_path):
    rows = [torch.rand(3, 3, 20, 30) for _ in range(2)]
    rows[1][:] = 0.0  # a black row to find again
    path = save_image_grid(rows, tmp_path / "grid.png", ["fp", "w4a8"], label_width=50)
    with Image.open(path) as img:
        assert img.size == (50 + 3 * 30, 2 * 20)
        assert img.getpixel((50 + 45, 30)) == (0, 0, 0)
    path = save_image_grid(rows, tmp_path / "grid2.png", ["fp", "w4a8"], ["a cat", "a dog", "a very long prompt"] * 1,
                           label_width=50, header_height=16)
    with Image.open(path) as img:
        assert img.size == (50 + 3 * 30, 16 + 2 * 20)


def test_image_grid_checks_its_inputs(tmp_path):
    with pytest.raises(ValueError):
        save_image_grid([torch.rand(2, 3, 8, 8)], tmp_path / "g.png", ["a", "b"])
    with pytest.raises(ValueError):
        save_image_grid([torch.rand(2, 3, 8, 8), torch.rand(3, 3, 8, 8)], tmp_path / "g.png", ["a", "b"])


def test_bar_plots_skip_empty_values(tmp_path):
    assert bar_values(ROWS, "fid") == [("fp", 0.0), ("gptq", 12.345678912)]
    assert bar_values(ROWS, "psnr") == [("gptq", 31.25)]  # inf has no bar
    assert bar_values(ROWS, "latency_s") == [("gptq", 0.0421)]
    assert bar_values(ROWS, "missing") == []
    path = save_bar_plots(ROWS, ["fid", "psnr", "latency_s", "missing"], tmp_path / "plots" / "bars.png")
    with Image.open(path) as img:
        assert img.size[0] > img.size[1] > 100
