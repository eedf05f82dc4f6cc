"""One table from several benchmark_final runs of the same model, prompts and seeds (e.g. our methods in one process,
each peer library in another, run side by side on one card).

Each run's folder holds metrics.csv and config.json. The runs must agree on what makes their rows comparable (model,
images, steps, scheduler, seed, prompts, guidance, calibration set, dtype); their FP rows must then agree too, since
they are the same float pipeline on the same prompts and seeds (prompt_acc exactly, the other metrics within
`--fp_tolerance`). The merged table has one FP row and every other row of every run, in the order given, with the
prompt_acc tie marks of benchmark_final (★ the best of a bit width, ≈ inside its interval).

  python benchmarks/merge_runs.py RUN_OURS RUN_MODELOPT RUN_OTHERS --out benchmarks/results/peers_bundled_dit_h200.md

Writes --out (markdown: the card, versions, date and every run's command, then the table) and the CSV beside it.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
from pathlib import Path

from diffptq.cli import ArgumentParser, check_output_file, run_main
from diffptq.errors import ConfigError

SAME = ("model", "n_images", "num_inference_steps", "scheduler", "seed", "prompts", "guidance_scale", "dtype",
        "n_calib", "calib_steps", "calib_batch_size", "calib_prompts")
TEXT_COLUMNS = {"method", "dtype", "model", "source", "rotate", "note", "peer_version", "label"}
FP_CHECKED = ("prompt_acc", "fid_bundled", "model_size_gb")


def read_run(folder: Path) -> tuple[dict, list[dict]]:
    """(config.json, metrics.csv rows with numbers as floats and empty cells as None) of one run's folder."""
    for name in ("config.json", "metrics.csv"):
        if not (folder / name).is_file():
            raise ConfigError(f"{folder}: no {name} (give benchmark_final output folders)")
    config = json.loads((folder / "config.json").read_text())
    with (folder / "metrics.csv").open(newline="") as f:
        rows = [{k: _value(k, v) for k, v in row.items()} for row in csv.DictReader(f)]
    return config, rows


def _value(column: str, text: str):
    if text == "":
        return None
    if column in TEXT_COLUMNS:
        return text
    try:
        return float(text)
    except ValueError:
        return text


def merge(runs: list[tuple[Path, dict, list[dict]]], fp_tolerance: float) -> list[dict]:
    """One FP row (the first run's) and every other row in order; ConfigError if the runs are not comparable."""
    first_path, first_cfg, _ = runs[0]
    fp_rows = []
    for path, cfg, rows in runs:
        for key in SAME:
            if cfg["args"].get(key) != first_cfg["args"].get(key):
                raise ConfigError(f"{path} ran with {key}={cfg['args'].get(key)!r}, {first_path} with "
                                 f"{first_cfg['args'].get(key)!r}: not one table")
        fp = [row for row in rows if row["method"] == "fp"]
        if len(fp) != 1:
            raise ConfigError(f"{path}: expected one fp row, found {len(fp)} (run with --methods fp,...)")
        fp_rows.append((path, fp[0]))
    ref_path, ref = fp_rows[0]
    for path, fp in fp_rows[1:]:
        for column in FP_CHECKED:
            a, b = ref.get(column), fp.get(column)
            same = a == b if column == "prompt_acc" or a is None or b is None else math.isclose(
                a, b, rel_tol=fp_tolerance, abs_tol=fp_tolerance)
            if not same:
                raise ConfigError(f"the fp rows of {ref_path} and {path} disagree on {column} ({a} vs {b}): not the "
                                 "same float pipeline, prompts and seeds")
    return [ref] + [row for _, _, rows in runs for row in rows if row["method"] != "fp"]


def report(rows: list[dict], runs: list[tuple[Path, dict, list[dict]]], title: str) -> str:
    from diffptq.run.benchmark_report import marked_table

    cfg = runs[0][1]
    versions = ", ".join(f"{k} {v}" for k, v in cfg.get("versions", {}).items() if v)
    lines = [f"# {title}", "", f"Card: {cfg.get('gpu') or 'CPU'}; {versions}; {cfg.get('time', '')[:10]}; git "
             f"{cfg.get('git_commit') or 'unknown'}. One table from {len(runs)} benchmark_final runs of the same "
             "model, prompts, seeds and calibration set (their FP rows agree; one is shown):", "", "```"]
    lines += [run_cfg.get("command", "") for _, run_cfg, _ in runs] + ["```", "", marked_table(rows)]
    return "\n".join(lines) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="benchmark_final output folders (metrics.csv and config.json in each)")
    p.add_argument("--out", required=True, help="markdown file; the CSV goes beside it (same stem)")
    p.add_argument("--title", default=None, help="the markdown's title (default: from the model and image count)")
    p.add_argument("--fp_tolerance", type=float, default=1e-6,
                   help="relative tolerance of the FP rows' fid_bundled and size (prompt_acc must be equal)")
    args = p.parse_args(argv)
    if not args.out.endswith(".md"):
        p.error(f"argument --out: a markdown file name ending in .md, got {args.out!r} (the CSV goes beside it)")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    out = check_output_file(args.out, "--out")
    runs = [(Path(folder), *read_run(Path(folder))) for folder in args.runs]
    rows = merge(runs, args.fp_tolerance)
    first = runs[0][1]["args"]
    title = args.title or f"benchmark_final: {first['model']}, {first['n_images']} images, " \
                          f"{first['num_inference_steps']} steps"
    from diffptq.eval.report import write_csv
    from diffptq.io.files import write_text_atomic
    from diffptq.run.benchmark_report import ALL_COLUMNS

    write_csv(rows, out.with_suffix(".csv"), [*ALL_COLUMNS])
    write_text_atomic(out, report(rows, runs, title))
    print(f"{len(rows)} rows from {len(runs)} runs\nmarkdown: {out}\ncsv: {out.with_suffix('.csv')}")


if __name__ == "__main__":
    run_main(main)
