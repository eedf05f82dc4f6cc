"""Compare two benchmark_final runs, typically one process vs N: same images? same metrics? how much faster?

Both runs need --save_images (images/<method>[_wXaY].safetensors). For every variant in both:
- images: max and mean absolute difference in 8-bit levels, the fraction of pixels where any channel differs, the
  PSNR between the two sets; and whether the prompts and seeds are the same;
- metrics.csv: each numeric column side by side with its difference (B − A);
- throughput: images_per_s of each run, their ratio B / A, and num_processes of each.
Writes markdown (--out, default <DIR_B>/multi_gpu_compare.md) and the same as JSON beside it, and prints the
markdown. Exit status 0 when every common variant matches (max abs difference <= --tolerance levels, same prompts,
seeds and image shape), 1 when one does not, 2 for unusable input (a missing folder, no images).

  accelerate launch --num_processes 1 qronos_diffusion/benchmark_final.py --model fullsize-pixart --save_images \\
      --out_dir results/mgpu/n1 ...
  accelerate launch --num_processes 4 qronos_diffusion/benchmark_final.py --model fullsize-pixart --save_images \\
      --out_dir results/mgpu/n4 ...
  python benchmarks/multi_gpu_compare.py --runs results/mgpu/n1 results/mgpu/n4 --tolerance 2
"""
from __future__ import annotations

import argparse
import csv
import math
import sys
from pathlib import Path
from typing import Any

from diffptq.cli import run_main
from diffptq.errors import ConfigError
from diffptq.eval.image_store import image_difference, load_images
from diffptq.eval.report import markdown_table
from diffptq.io.files import write_json, write_text_atomic
from diffptq.run.benchmark import Variant

KEY_COLUMNS = ("method", "wbits", "abits")
THROUGHPUT_COLUMNS = ("images_per_s", "num_processes")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", nargs=2, required=True, metavar=("DIR_A", "DIR_B"),
                   help="two benchmark_final --out_dir folders made with --save_images (A: the reference, e.g. 1 GPU)")
    p.add_argument("--out", default=None, help="markdown report (default: DIR_B/multi_gpu_compare.md); JSON beside it")
    p.add_argument("--tolerance", type=float, default=2.0,
                   help="largest allowed absolute difference of a pixel value, in 8-bit levels (default: %(default)s)")
    return p.parse_args(argv)


def read_run(path: str | Path) -> tuple[dict[str, Path], dict[str, dict[str, str]]]:
    """({variant file stem: image file}, {variant file stem: metrics.csv row}) of a benchmark_final folder."""
    root = Path(path)
    if not root.is_dir():
        raise ConfigError(f"run folder not found: {root} (give a benchmark_final --out_dir)")
    if not (root / "metrics.csv").is_file():
        raise ConfigError(f"{root} has no metrics.csv: not a finished benchmark_final run")
    images = {p.stem: p for p in sorted((root / "images").glob("*.safetensors"))}
    if not images:
        raise ConfigError(f"{root} holds no saved images ({root / 'images'}/*.safetensors): run benchmark_final.py "
                          "with --save_images")
    with (root / "metrics.csv").open(newline="") as f:
        rows = {_stem(row): row for row in csv.DictReader(f)}
    return images, rows


def _stem(row: dict[str, str]) -> str:
    """The variant's file stem (Variant.file_stem) from its metrics.csv row."""
    method = row["method"]
    return (Variant(method) if method == "fp" else Variant(method, int(row["wbits"]), int(row["abits"]))).file_stem


def _number(text: str | None) -> float | None:
    try:
        return float(text) if text not in (None, "") else None
    except ValueError:
        return None


def compare_variant(path_a: Path, path_b: Path, row_a: dict | None, row_b: dict | None,
                    tolerance: float) -> dict[str, Any]:
    """Image differences, metric pairs and throughput of one variant in runs A and B; `ok` is the verdict."""
    a, b = load_images(path_a), load_images(path_b)
    out: dict[str, Any] = {"n_images": len(a.images), "same_prompts": a.prompts == b.prompts,
                           "same_seeds": a.seeds == b.seeds, "same_shape": a.images.shape == b.images.shape}
    problems = [f"{what} differ" for what, same in (("prompts", out["same_prompts"]), ("seeds", out["same_seeds"]))
                if not same]
    if out["same_shape"]:
        out.update(image_difference(a.images, b.images))
        if out["max_abs"] > tolerance:
            problems.append(f"max abs difference {out['max_abs']:g} > {tolerance:g} levels")
    else:
        problems.append(f"image shapes {tuple(a.images.shape)} vs {tuple(b.images.shape)}")
    out["problems"], out["ok"] = problems, not problems
    row_a, row_b = row_a or {}, row_b or {}
    metrics = {}
    for col in dict.fromkeys([*row_a, *row_b]):
        if col in KEY_COLUMNS or col in THROUGHPUT_COLUMNS:
            continue
        va, vb = _number(row_a.get(col)), _number(row_b.get(col))
        if va is None and vb is None:
            continue
        diff = vb - va if va is not None and vb is not None and math.isfinite(va) and math.isfinite(vb) else None
        metrics[col] = {"a": va, "b": vb, "diff": diff}
    out["metrics"] = metrics
    ips_a, ips_b = _number(row_a.get("images_per_s")), _number(row_b.get("images_per_s"))
    out["throughput"] = {"images_per_s_a": ips_a, "images_per_s_b": ips_b,
                         "ratio": ips_b / ips_a if ips_a and ips_b is not None else None,
                         "num_processes_a": _number(row_a.get("num_processes")),
                         "num_processes_b": _number(row_b.get("num_processes"))}
    return out


def compare_runs(dir_a: str | Path, dir_b: str | Path, tolerance: float) -> dict[str, Any]:
    """The whole comparison (what the JSON holds): per common variant compare_variant, the variants in one run only,
    and `ok` (every common variant matches)."""
    images_a, rows_a = read_run(dir_a)
    images_b, rows_b = read_run(dir_b)
    common = [stem for stem in images_a if stem in images_b]
    if not common:
        raise ConfigError(f"no variant has images in both runs ({', '.join(images_a)} vs {', '.join(images_b)})")
    variants = {stem: compare_variant(images_a[stem], images_b[stem], rows_a.get(stem), rows_b.get(stem), tolerance)
                for stem in common}
    return {"run_a": str(dir_a), "run_b": str(dir_b), "tolerance": tolerance, "variants": variants,
            "only_in_a": [s for s in images_a if s not in images_b],
            "only_in_b": [s for s in images_b if s not in images_a], "ok": all(v["ok"] for v in variants.values())}


def to_markdown(report: dict[str, Any]) -> str:
    """The report as markdown: verdict, images, throughput and metric tables."""
    variants = report["variants"]
    verdict = "PASS" if report["ok"] else "FAIL"
    lines = ["# multi-process comparison", "",
             f"A: `{report['run_a']}`  ", f"B: `{report['run_b']}`  ",
             f"tolerance: max |A − B| <= {report['tolerance']:g} levels (8-bit)", "",
             f"**{verdict}**" + "".join(f"\n- {stem}: {'; '.join(v['problems'])}"
                                       for stem, v in variants.items() if not v["ok"]), ""]
    for side in ("a", "b"):
        if report[f"only_in_{side}"]:
            lines += [f"only in {side.upper()} (not compared): {', '.join(report[f'only_in_{side}'])}", ""]
    image_rows = [{"variant": stem, "n_images": v["n_images"], "max_abs": v.get("max_abs"),
                   "mean_abs": v.get("mean_abs"), "frac_pixels_differ": v.get("frac_pixels_differ"),
                   "psnr_db": v.get("psnr_db"), "same prompts/seeds": v["same_prompts"] and v["same_seeds"],
                   "ok": v["ok"]} for stem, v in variants.items()]
    speed_rows = [{"variant": stem, **v["throughput"]} for stem, v in variants.items()]
    metric_rows = [{"variant": stem, "column": col, "A": m["a"], "B": m["b"], "B − A": m["diff"]}
                   for stem, v in variants.items() for col, m in v["metrics"].items()]
    lines += ["## Images", "", markdown_table(image_rows), "## Throughput (B / A)", "", markdown_table(speed_rows),
              "## metrics.csv (A, B, B − A)", "", markdown_table(metric_rows)]
    return "\n".join(lines)


def _finite(obj: Any) -> Any:
    """`obj` with inf/nan floats as strings ('inf'): strict JSON has no infinity (PSNR of equal images)."""
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return str(obj) if isinstance(obj, float) and not math.isfinite(obj) else obj


def main(argv=None) -> int:
    args = parse_args(argv)
    report = compare_runs(args.runs[0], args.runs[1], args.tolerance)
    out = Path(args.out) if args.out else Path(args.runs[1]) / "multi_gpu_compare.md"
    text = to_markdown(report)
    write_text_atomic(out, text)
    write_json(out.with_suffix(".json"), _finite(report))
    print(text)
    print(f"markdown: {out}\njson: {out.with_suffix('.json')}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    run_main(lambda: sys.exit(main()))
