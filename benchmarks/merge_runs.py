"""One table from several benchmark_final runs of the same model, prompts and seeds (e.g. our methods in one process,
each peer library in another, run side by side on one card).

Each run's folder holds metrics.csv and config.json. The runs must agree on what makes their rows comparable (model,
images, steps, scheduler, seed, prompts, guidance, calibration set, dtype); their FP rows must then agree too, since
they are the same float pipeline on the same prompts and seeds (prompt_acc exactly, the other metrics within
`--fp_tolerance`). The merged table has one FP row and every other row of every run, in the order given, with the
prompt_acc tie marks of benchmark_final (★ the best of a bit width, ≈ inside its interval).

  python benchmarks/merge_runs.py RUN_OURS RUN_MODELOPT RUN_OTHERS --out benchmarks/results/peers_bundled_dit_h200.md

With --base TABLE.csv (a table this script wrote before), the runs add rows to that table instead: each run's FP row
must agree with the table's; a run's row replaces the table's row of the same configuration (method, bits, rotation
and, for our rows, the recipe note: a peer row that failed before, say) and any other row is appended (ours with
--skip, say); the commands of the table's own markdown are kept. Our rows state non-default recipe flags in `note`.

  python benchmarks/merge_runs.py RUN_BREVITAS --base benchmarks/results/peers_bundled_dit_h200.csv \
      --out benchmarks/results/peers_bundled_dit_h200.md

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
BASE_SAME = ("model", "n_images", "dtype")  # the settings a merged table's CSV still shows
ROW_KEY = ("method", "wbits", "abits", "rotate")  # with, for our rows, their recipe note


def read_run(folder: Path) -> tuple[dict, list[dict]]:
    """(config.json, metrics.csv rows with numbers as floats and empty cells as None) of one run's folder."""
    for name in ("config.json", "metrics.csv"):
        if not (folder / name).is_file():
            raise ConfigError(f"{folder}: no {name} (give benchmark_final output folders)")
    config = json.loads((folder / "config.json").read_text())
    with (folder / "metrics.csv").open(newline="") as f:
        rows = [{k: _value(k, v) for k, v in row.items()} for row in csv.DictReader(f)]
    from diffptq.run.benchmark_report import recipe_note

    for row in rows:  # runs older than the recipe note: ours state their non-default recipe from the run's flags
        if row.get("source") == "quantized" and not row.get("note"):
            row["note"] = recipe_note(config.get("args", {})) or None
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


def read_table(csv_path: Path) -> list[dict]:
    """The rows of a table this script wrote (numbers as floats, empty cells as None)."""
    if not csv_path.is_file():
        raise ConfigError(f"--base {csv_path}: no such file (give the CSV of a table merge_runs.py wrote)")
    with csv_path.open(newline="") as f:
        rows = [{k: _value(k, v) for k, v in row.items()} for row in csv.DictReader(f)]
    if sum(row.get("method") == "fp" for row in rows) != 1:
        raise ConfigError(f"--base {csv_path}: expected one fp row (a table merge_runs.py wrote)")
    return rows


def table_commands(csv_path: Path) -> list[str]:
    """The commands listed in the markdown beside a merged table's CSV (its first ``` block); [] if there is none."""
    md = csv_path.with_suffix(".md")
    if not md.is_file():
        return []
    blocks = md.read_text().split("```")
    return [line for line in blocks[1].splitlines() if line.strip()] if len(blocks) > 2 else []


def _check_fp(ref_name, ref: dict, name, fp: dict, fp_tolerance: float) -> None:
    for column in FP_CHECKED:
        a, b = ref.get(column), fp.get(column)
        same = a == b if column == "prompt_acc" or a is None or b is None else math.isclose(
            a, b, rel_tol=fp_tolerance, abs_tol=fp_tolerance)
        if not same:
            raise ConfigError(f"the fp rows of {ref_name} and {name} disagree on {column} ({a} vs {b}): not the "
                             "same float pipeline, prompts and seeds")


def add_to_table(base_path: Path, base: list[dict], runs: list[tuple[Path, dict, list[dict]]],
                 fp_tolerance: float) -> list[dict]:
    """The base table's rows with each run's rows replacing those of the same ROW_KEY, the others appended."""
    merged = merge(runs, fp_tolerance)
    base_fp = next(row for row in base if row["method"] == "fp")
    path, cfg, _ = runs[0]
    for key in BASE_SAME:
        ran = cfg["args"].get(key)
        if base_fp.get(key) != ran and not (isinstance(ran, (int, float)) and base_fp.get(key) == float(ran)):
            raise ConfigError(f"{path} ran with {key}={ran!r}, the table --base {base_path} has "
                             f"{base_fp.get(key)!r}: not one table")
    _check_fp(f"--base {base_path}", base_fp, path, merged[0], fp_tolerance)
    rows = list(base)
    where = {_row_key(row): i for i, row in enumerate(rows)}
    for row in merged[1:]:
        key = _row_key(row)
        if key in where:
            rows[where[key]] = row
        else:
            where[key] = len(rows)
            rows.append(row)
    return rows


def _row_key(row: dict) -> tuple:
    """Rows of one key are the same configuration: a later run's replaces the table's (a peer's note may differ)."""
    return (*(row.get(k) for k in ROW_KEY), row.get("note") if row.get("source") == "quantized" else None)


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
        _check_fp(ref_path, ref, path, fp, fp_tolerance)
    return [ref] + [row for _, _, rows in runs for row in rows if row["method"] != "fp"]


def report(rows: list[dict], runs: list[tuple[Path, dict, list[dict]]], title: str,
           earlier_commands: list[str] | None = None) -> str:
    """The markdown: card, versions, date, commit and every run's command, then the marked table. With
    earlier_commands (those of a --base table), they come first and the header says the table was added to."""
    from diffptq.run.benchmark_report import marked_table

    cfg = runs[0][1]
    versions = ", ".join(f"{k} {v}" for k, v in cfg.get("versions", {}).items() if v)
    source = (f"One table from {len(runs)} benchmark_final runs of the same model, prompts, seeds and calibration set "
              "(their FP rows agree; one is shown):")
    later = [run_cfg.get("command", "") for _, run_cfg, _ in runs]
    if earlier_commands is not None:
        again = sum(command in earlier_commands for command in later)
        repeated = f", {again} of them an earlier command run again (listed once)" if again else ""
        source = (f"An earlier table's {len(earlier_commands)} runs (first below) with {len(runs)} later run(s) of the "
                  f"same model, prompts, seeds and calibration set added{repeated} (the later runs' date and commit "
                  "are these; their FP rows agree with the table's; one is shown):")
        later = [command for command in later if command not in earlier_commands]
    lines = [f"# {title}", "", f"Card: {cfg.get('gpu') or 'CPU'}; {versions}; {cfg.get('time', '')[:10]}; git "
             f"{cfg.get('git_commit') or 'unknown'}. {source}", "", "```"]
    lines += list(earlier_commands or []) + later
    lines += ["```", "", marked_table(rows)]
    return "\n".join(lines) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="benchmark_final output folders (metrics.csv and config.json in each)")
    p.add_argument("--out", required=True, help="markdown file; the CSV goes beside it (same stem)")
    p.add_argument("--base", default=None, help="the CSV of a table merge_runs.py wrote: the runs add rows to it "
                   "(replacing rows of the same method, bits and rotation) instead of making a new table")
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
    earlier = None
    if args.base:
        base_path = Path(args.base)
        earlier = table_commands(base_path)
        rows = add_to_table(base_path, read_table(base_path), runs, args.fp_tolerance)
    else:
        rows = merge(runs, args.fp_tolerance)
    first = runs[0][1]["args"]
    title = args.title or f"benchmark_final: {first['model']}, {first['n_images']} images, " \
                          f"{first['num_inference_steps']} steps"
    from diffptq.eval.report import write_csv
    from diffptq.io.files import write_text_atomic
    from diffptq.run.benchmark_report import ALL_COLUMNS

    write_csv(rows, out.with_suffix(".csv"), [*ALL_COLUMNS])
    write_text_atomic(out, report(rows, runs, title, earlier))
    print(f"{len(rows)} rows from {len(runs)} runs\nmarkdown: {out}\ncsv: {out.with_suffix('.csv')}")


if __name__ == "__main__":
    run_main(main)
