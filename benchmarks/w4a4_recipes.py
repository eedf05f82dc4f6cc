"""W4A4 outlier recipes: RTN / GPTQ / Qronos × outlier recipe × damping on the bundled models, one row each.

Every row quantizes a fresh copy of the float denoiser (all blocks) at W4A4: 4-bit weights per output channel, 4-bit
per-token dynamic activations, on one calibration set per model collected once from the float pipeline and shared by
all rows; then the pipeline generates the same prompts with the same per-image seeds as the FP pipeline. Recipes
(`recipe`; the flags of quantize_qronos_4blocks.py that give each):
  hadamard        online Hadamard rotation of every quantized Linear's input (--rotate hadamard: the default recipe)
  lowrank         hadamard + a rank-R 16-bit branch kept out of each Linear's quantized weight (--lowrank R)
  smooth+lowrank  hadamard + smoothing with alpha 0.5 + the rank-R branch (--smooth 0.5 --lowrank R)
  pca             PCA rotation, the K leading components of each Linear's input at 8 bits (--rotate pca --keep K)
  pca+lowrank     pca + the rank-R branch
(R: --lowrank_rank, K: --keep; docs/ALGORITHMS.md §8-§8b.) `damp`: each --damps value for GPTQ and Qronos (adaptive:
chosen per layer on held-out calibration prompts, needs two calibration batches; §7); RTN has no damping (one row per
recipe, damp empty). `correction`: each --corrections value for Qronos (the share of the upstream error it corrects:
1 as published, 0.25 in the default W4A4 recipe; docs/ALGORITHMS.md §6), empty for RTN and GPTQ.
Per row, as benchmark_final computes them: prompt_acc (the bundled evaluator) with its Wilson 95% interval, PSNR (dB)
against the FP images of the same prompts and seeds with its bootstrap interval over images, fid_bundled (against
the FP images), calib_time_s (the sequential quantization's wall time) and model_size_gb (the denoiser as deployed);
one FP row per model (psnr inf). The markdown marks per model the best prompt_acc (★) and the rows whose Wilson
interval overlaps it (≈).

  python benchmarks/w4a4_recipes.py   # bundled-dit and bundled-unet, 512 images (the committed table's command:
                                      # benchmarks/README.md)
  python benchmarks/w4a4_recipes.py --models bundled-dit --recipes hadamard,pca --methods gptq --n_images 64

Writes --out (default benchmarks/results/w4a4_recipes_<models>_<card>.md, e.g. w4a4_recipes_bundled_dit_unet_h200.md)
and the CSV beside it (same stem), both rewritten after every row (the markdown says when it is partial).
"""
from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path

from diffptq.cli import (
    ArgumentParser,
    add_calib_args,
    calib_config,
    check_output_file,
    device_value,
    non_negative_int,
    positive_int,
    prompt_file,
    run_main,
    seed_value,
)
from diffptq.cli.parser import parse_methods
from diffptq.config import Damping, SequentialConfig, check_calibration_fits
from diffptq.config.checks import check_float
from diffptq.errors import ConfigError


@dataclass(frozen=True)
class Recipe:
    """The outlier handling of one row: the rotation, smoothing alpha (None: off), whether the low-rank branch is on
    (its rank R and PCA's K come from the flags), and what the table's notes say of it."""

    rotate: str
    smooth: float | None = None
    lowrank: bool = False
    text: str = ""


RECIPES = {"hadamard": Recipe("hadamard", text="Hadamard rotation"),
           "lowrank": Recipe("hadamard", lowrank=True, text="Hadamard + rank-{R} branch"),
           "smooth+lowrank": Recipe("hadamard", smooth=0.5, lowrank=True,
                                    text="Hadamard + smoothing α 0.5 + rank-{R} branch"),
           "pca": Recipe("pca", text="PCA rotation, its {K} leading components at 8 bits"),
           "pca+lowrank": Recipe("pca", lowrank=True, text="PCA rotation (keep {K}) + rank-{R} branch")}
METHODS = ("rtn", "gptq", "qronos")
WBITS = ABITS = 4
COLUMNS = ("model", "method", "recipe", "damp", "correction", "prompt_acc", "prompt_acc_lo", "prompt_acc_hi", "psnr",
           "psnr_lo", "psnr_hi", "fid_bundled", "calib_time_s", "model_size_gb")


@dataclass(frozen=True)
class Job:
    """One quantized row: method, recipe name, damping (None for RTN, which has none) and the share of the upstream
    error Qronos corrects (None for the others)."""

    method: str
    recipe: str
    damp: Damping | None
    correction: float | None = None


def recipe_config(job: Job, rank: int, keep: int) -> SequentialConfig:
    """The sequential driver's config of a row at W4A4; the activation quantizer is the recipe of 4 bits (per
    token), the rotation, smoothing and branch those of the row's recipe."""
    r = RECIPES[job.recipe]
    return SequentialConfig(method=job.method, damp=job.damp or Damping(), rotate=r.rotate, smooth=r.smooth,
                            lowrank=rank if r.lowrank else 0, keep=keep if r.rotate == "pca" else 0,
                            correction=1.0 if job.correction is None else job.correction,
                            auto=("act_kind",)).with_bits(WBITS, ABITS)


def _items(p: ArgumentParser, flag: str, text: str, allowed: tuple[str, ...]) -> list[str]:
    try:
        return parse_methods(text, allowed)
    except ConfigError as err:
        p.error(f"argument {flag}: {err}")


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="bundled-dit,bundled-unet", help="comma list of models (default: %(default)s)")
    p.add_argument("--recipes", default=",".join(RECIPES), help="comma list of %(default)s (default: all)")
    p.add_argument("--methods", default=",".join(METHODS), help="comma list of %(default)s (default: all)")
    p.add_argument("--damps", default="0.01,adaptive",
                   help="comma list of GPTQ/Qronos dampings: numbers > 0 (relative to mean diag H), adaptive, spread "
                        "or lambda_max (default: %(default)s)")
    p.add_argument("--corrections", default="1",
                   help="comma list of Qronos's correction shares in [0, 1] (1: as published, the default recipe's "
                        "0.25 at W4A4; default: %(default)s)")
    p.add_argument("--lowrank_rank", type=positive_int, default=32, help="rank R of the low-rank branch (default: 32)")
    p.add_argument("--keep", type=non_negative_int, default=32,
                   help="PCA components K kept at 8 bits by the pca recipes (default: %(default)s)")
    p.add_argument("--n_images", type=positive_int, default=512, help="images per row (default: %(default)s)")
    p.add_argument("--prompts", type=prompt_file, default=None,
                   help="evaluation prompt file, one per line (default: the model's evaluation prompts)")
    p.add_argument("--batch_size", type=positive_int, default=64, help="images per pipeline call (default: 64)")
    p.add_argument("--num_inference_steps", type=positive_int, default=20, help="sampling steps (default: 20)")
    add_calib_args(p, prompts_flag="--calib_prompts")
    p.add_argument("--evaluator", default=None, help="bundled evaluator folder (default: the committed one)")
    p.add_argument("--device", type=device_value, default="auto", help="cuda, cuda:N, cpu or auto (default: auto)")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"],
                   help="float dtype of the models (default: fp16 on GPU, fp32 on CPU)")
    p.add_argument("--seed", type=seed_value, default=0, help="image i has seed + i; calibration seed (default: 0)")
    p.add_argument("--out", default=None,
                   help="markdown file; the CSV goes beside it (default: benchmarks/results/"
                        "w4a4_recipes_<models>_<card>.md)")
    args = p.parse_args(argv)
    args.models = list(dict.fromkeys(m.strip() for m in args.models.split(",") if m.strip()))
    if not args.models:
        p.error("argument --models: give at least one model")
    args.recipes = _items(p, "--recipes", args.recipes, tuple(RECIPES))
    methods = _items(p, "--methods", args.methods, METHODS)
    try:
        damps = list({d.label: d for d in (Damping.parse(t, "--damps") for t in args.damps.split(",") if t.strip())
                      }.values())
    except ConfigError as err:
        p.error(str(err))
    if not damps and set(methods) - {"rtn"}:
        p.error("argument --damps: give at least one damping for gptq / qronos")
    try:
        corrections = list(dict.fromkeys(check_float(t, "--corrections", lo=0.0, hi=1.0)
                                         for t in args.corrections.split(",") if t.strip()))
    except ConfigError as err:
        p.error(str(err))
    if not corrections:
        p.error("argument --corrections: give at least one value in [0, 1]")
    args.jobs = [Job(m, r, d, c) for m in methods for r in args.recipes for d in ([None] if m == "rtn" else damps)
                 for c in (corrections if m == "qronos" else [None])]
    if args.out is not None and not args.out.endswith(".md"):
        p.error(f"argument --out: a markdown file name ending in .md, got {args.out!r} (the CSV goes beside it)")
    calib = calib_config(args)
    for job in args.jobs:  # adaptive damping holds out calibration batches: checked before anything heavy
        check_calibration_fits(recipe_config(job, args.lowrank_rank, args.keep), calib.n_calib, calib.batch_size)
    return args


def default_out(models: list[str], card: str) -> Path:
    """benchmarks/results/w4a4_recipes_<models>_<card>.md (naming: benchmarks/README.md); a word repeated at the
    start of the next model's name is left out (bundled-dit,bundled-unet -> bundled_dit_unet)."""
    words: list[str] = []
    for model in models:
        parts = model.replace("/", "-").replace("_", "-").lower().split("-")
        words += parts[1:] if words and parts[0] == words[0] else parts
    return Path("benchmarks/results") / f"w4a4_recipes_{'_'.join(words)}_{card}.md"


def run_model(model: str, args, device, dtype, rows: list[dict], write) -> None:
    """The FP row and every job's row of `model`, appended to `rows`; `write()` after each."""
    import copy

    from tqdm.auto import tqdm

    from diffptq.data.prompts import evaluation_prompts
    from diffptq.eval.metrics import MetricOptions
    from diffptq.eval.sample import generate, image_seeds
    from diffptq.models import family_of, load_pipeline
    from diffptq.models.schedulers import check_steps
    from diffptq.run.benchmark import GIB, SharedCalibration, denoiser_size_bytes, swapped_denoiser
    from diffptq.run.benchmark_report import load_bundled_evaluator, metric_passes, score

    pipe = load_pipeline(model, dtype=dtype, device=device)
    for flag in ("calib_steps", "num_inference_steps"):  # a count the scheduler cannot sample: one line, before work
        check_steps(pipe, getattr(args, flag), f"--{flag} {getattr(args, flag)}")
    family = family_of(pipe)
    prompts = evaluation_prompts(pipe, args.n_images, args.prompts)
    seeds = image_seeds(len(prompts), args.seed)
    options = MetricOptions(metrics=("psnr",), device=str(device), batch_size=args.batch_size,
                            evaluator=load_bundled_evaluator(model, args.evaluator, device))
    passes = metric_passes(options)

    def images_of(label: str):
        return generate(pipe, prompts, seeds, args.batch_size, args.num_inference_steps, args.guidance_scale,
                        desc=f"generate {model} {label}", uint8=True)

    def add(label: str, fields: dict, images, size_bytes: int) -> None:
        """One row: `fields`, the scores of `images` and the size (wbits / abits group the rows for the tie marks)."""
        scores = score(passes, images, fp_images, prompts, label, True)
        rows.append({"model": model, **fields, **{c: scores[c] for c in COLUMNS if c in scores},
                     "model_size_gb": size_bytes / GIB})
        write()

    fp_images = images_of("fp")
    fp_cpu = copy.deepcopy(family.denoiser(pipe)).to("cpu")  # the float weights every row starts from
    add("fp", {"method": "fp"}, fp_images, denoiser_size_bytes(family.denoiser(pipe)))
    calib = SharedCalibration(pipe, calib_config(args), progress=True)
    for job in tqdm(args.jobs, desc=f"{model} rows", unit="row"):
        label = f"{job.method} {job.recipe}" + (f" damp {job.damp.label}" if job.damp else "") + (
            f" correction {job.correction:g}" if job.correction is not None else "")
        denoiser, seconds = quantized_denoiser(pipe, fp_cpu, calib, job, model, args, device, dtype)
        with swapped_denoiser(pipe, denoiser):
            images = images_of(label)
        add(label, {"method": job.method, "recipe": job.recipe, "damp": job.damp.label if job.damp else None,
                    "correction": job.correction,
                    "wbits": WBITS, "abits": ABITS, "calib_time_s": seconds}, images, denoiser_size_bytes(denoiser))
        del denoiser


def quantized_denoiser(pipe, fp_cpu, calib, job: Job, model: str, args, device, dtype):
    """(a fresh copy of the float denoiser on `device` quantized for `job`, calib_time_s): benchmark_final's
    prepare_variant with the row's config."""
    from diffptq.run.benchmark import BenchmarkConfig, Variant, prepare_variant

    cfg = BenchmarkConfig(model=model, variants=[], quant=recipe_config(job, args.lowrank_rank, args.keep),
                          calib=calib.cfg)
    denoiser, info = prepare_variant(pipe, fp_cpu, Variant(job.method, WBITS, ABITS), cfg, calib, {}, Path("."),
                                     device, dtype)
    return denoiser, info["calib_time_s"]


def report(rows: list[dict], args, meta: dict, done: bool) -> str:
    from diffptq.run.benchmark_report import marked_table

    n_rows = len(args.models) * (1 + len(args.jobs))
    from diffptq.cli.common import report_header

    lines = [*report_header("W4A4 outlier recipes", meta),
             f"W4A4: weights 4-bit symmetric per output channel, activations 4-bit asymmetric per token (dynamic); all "
             f"blocks; {args.n_calib} calibration prompts × {args.calib_steps} steps with CFG in batches of "
             f"{args.calib_batch_size} (one set per model, shared by all rows); {args.n_images} images per row, "
             f"{args.num_inference_steps} steps, image i with seed {args.seed} + i. Recipes: "
             + "; ".join(f"`{name}` {RECIPES[name].text.format(R=args.lowrank_rank, K=args.keep)}"
                         for name in args.recipes)
             + ". `damp`: GPTQ/Qronos damping relative to mean diag H, or `adaptive` (per layer on held-out prompts);"
             " RTN has none. `correction`: the share of the upstream error Qronos corrects (1: as published)."
             " `psnr` (dB) vs the FP images, `psnr_lo/hi` bootstrap 95%; `prompt_acc_lo/hi` Wilson 95%;"
             " `fid_bundled` in the bundled evaluator's features vs the FP images (for comparing rows only).", ""]
    if not done:
        lines += [f"**Partial:** {len(rows)} of {n_rows} rows (the run is going on or was stopped).", ""]
    for model in args.models:
        model_rows = [row for row in rows if row["model"] == model]
        if model_rows:
            lines += [f"## {model}", "", marked_table(model_rows, COLUMNS)]
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    import torch

    from diffptq.cli import resolve_device, resolve_dtype
    from diffptq.cli.common import report_meta
    from diffptq.eval.hardware import card_name
    from diffptq.eval.report import write_csv
    from diffptq.io.files import write_text_atomic

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    out = check_output_file(args.out or default_out(args.models, card_name(device)), "--out")
    torch.manual_seed(args.seed)
    meta = report_meta("benchmarks/w4a4_recipes.py", argv, device, dtype, ("torch", "diffusers", "transformers"))
    rows: list[dict] = []

    def write(done: bool = False) -> None:
        write_csv(rows, out.with_suffix(".csv"), COLUMNS)
        write_text_atomic(out, report(rows, args, meta, done))

    for model in args.models:
        run_model(model, args, device, dtype, rows, write)
    write(done=True)
    print(out.read_text())
    print(f"markdown: {out}\ncsv: {out.with_suffix('.csv')}")


if __name__ == "__main__":
    run_main(main)
