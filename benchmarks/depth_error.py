"""Error versus depth: RTN / GPTQ / Qronos at W4A8 and W4A4, the relative error of each block's output against the
float model's at every depth (diffptq.eval.depth), on held-out calibration records of the same prompts.

Per model: one calibration set (--n_calib prompts × --calib_steps steps with CFG; every --holdout_every-th record held
out), one copy of the float denoiser per method × bits, quantized block by block by the sequential driver, then
measured on the held-out records. Both follow the scripts' default recipe of their bits (SequentialConfig.with_bits):
W4A8 static per-tensor 8-bit activations; W4A4 dynamic per-token 4-bit activations behind the online Hadamard
rotation, with the rank-32 16-bit branch of each Linear. With --n_images (bundled models), also the
final images of each variant against the float model's (same prompts and seeds): PSNR with its bootstrap 95%
interval and prompt_acc with its Wilson 95% interval.

  python benchmarks/depth_error.py --models bundled-dit,bundled-dit-deep --n_images 64 --out_dir results/depth_error
  python benchmarks/depth_error.py --models fullsize-pixart --device cuda --dtype bf16 --n_calib 16  (GPU)
Writes into --out_dir: depth_error.csv (model, method, bits, depth, rel_err), summary.csv (one row per model, method
and bits: output error, PSNR, prompt_acc with intervals, calibration time), depth_error.png (error vs depth, one
panel per model and bits, log scale) and depth_error.md (the tables, the depths 1, 7, 14, 21, 28 for 28 blocks).
"""
from __future__ import annotations

import argparse
import copy
import datetime as dt
import platform
import sys
import time
from pathlib import Path

from diffptq.cli import ArgumentParser, check_output_dir, device_value, positive_int, run_main

BITS = {"w4a8": (4, 8), "w4a4": (4, 4)}  # (weight, activation) bits; the rest follows the default recipe of the bits
METHODS = ("rtn", "gptq", "qronos")
DEPTH_COLUMNS = ("model", "method", "bits", "depth", "rel_err")
SUMMARY_COLUMNS = ("model", "method", "bits", "n_blocks", "err_first", "err_last", "out_err", "psnr", "psnr_lo",
                   "psnr_hi", "prompt_acc", "acc_lo", "acc_hi", "n_images", "calib_time_s")


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="bundled-dit,bundled-dit-deep", help="comma list of models")
    p.add_argument("--methods", default="rtn,gptq,qronos", help="comma list of rtn, gptq, qronos")
    p.add_argument("--bits", default="w4a8,w4a4", help="comma list of w4a8, w4a4")
    p.add_argument("--n_calib", type=positive_int, default=32)
    p.add_argument("--calib_steps", type=positive_int, default=10)
    p.add_argument("--holdout_every", type=positive_int, default=5, help="every n-th record held out")
    p.add_argument("--n_images", type=int, default=0, help="images per variant for PSNR / prompt_acc (0: none)")
    p.add_argument("--batch_size", type=positive_int, default=64, help="images per pipeline call")
    p.add_argument("--device", type=device_value, default="auto")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    p.add_argument("--out_dir", default="results/depth_error")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--report", default=None, help="also copy depth_error.md here (e.g. benchmarks/results/...)")
    args = p.parse_args(argv)
    for flag, allowed in (("methods", METHODS), ("bits", tuple(BITS))):
        items = [t.strip() for t in getattr(args, flag).split(",") if t.strip()]
        if not items or any(t not in allowed for t in items):
            p.error(f"argument --{flag}: choose a comma list of {', '.join(allowed)}")
        setattr(args, flag, items)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    if args.n_images < 0:
        p.error("argument --n_images: must be >= 0")
    check_output_dir(args.out_dir, overwrite=args.overwrite)
    return args


def variant_config(method: str, bits: str, holdout_every: int):
    from diffptq.config import RECIPE_FIELDS, SequentialConfig

    return SequentialConfig(method=method, holdout_every=holdout_every, auto=RECIPE_FIELDS).with_bits(*BITS[bits])


def run_model(model: str, args, device, dtype) -> tuple[list[dict], list[dict]]:
    import torch

    from diffptq.algo.driver import SequentialQuantizer
    from diffptq.config import CalibConfig
    from diffptq.data.calib import calibration_set
    from diffptq.data.prompts import evaluation_prompts
    from diffptq.eval.depth import depth_errors
    from diffptq.eval.metrics.similarity import image_scores
    from diffptq.eval.sample import generate
    from diffptq.models import family_of, load_pipeline
    from diffptq.models.names import is_bundled
    from diffptq.run.benchmark import swapped_denoiser
    from diffptq.run.benchmark_report import load_bundled_evaluator

    pipe = load_pipeline(model, dtype=dtype, device=device)
    family = family_of(pipe)
    fp = family.denoiser(pipe)
    calib, _ = calibration_set(pipe, CalibConfig(n_calib=args.n_calib, calib_steps=args.calib_steps), progress=True)
    _, held = calib.split(args.holdout_every)
    prompts = evaluation_prompts(pipe, args.n_images) if args.n_images else []
    gen = lambda: generate(pipe, prompts, 0, batch_size=args.batch_size, progress=False)  # noqa: E731
    fp_images = gen() if prompts else None
    evaluator = load_bundled_evaluator(model, None, device) if prompts and is_bundled(model) else None
    depth_rows, summary = [], []
    if fp_images is not None:
        summary.append({"model": model, "method": "fp", "bits": "", **image_scores(fp_images, fp_images, prompts,
                                                                                    evaluator)})
    for bits in args.bits:
        for method in args.methods:
            den = copy.deepcopy(fp)
            cfg = variant_config(method, bits, args.holdout_every)
            t0 = time.perf_counter()
            with swapped_denoiser(pipe, den):
                SequentialQuantizer(den, family, calib, cfg, device, dtype, progress=False).run()
                calib_s = time.perf_counter() - t0
                d = depth_errors(den, family, held, device, dtype)
                scores = image_scores(gen(), fp_images, prompts, evaluator) if prompts else {}
            depth_rows += [{"model": model, "method": method, "bits": bits, "depth": k + 1, "rel_err": e}
                           for k, e in enumerate(d.block_err)]
            summary.append({"model": model, "method": method, "bits": bits, "n_blocks": len(d.block_err),
                            "err_first": d.block_err[0], "err_last": d.block_err[-1], "out_err": d.out_err,
                            "calib_time_s": calib_s, **scores})
            print(f"{model} {bits} {method}: block errors {d.block_err[0]:.4f} … {d.block_err[-1]:.4f}, output "
                  f"{d.out_err:.4f}" + (f", psnr {scores['psnr']:.2f}" if scores else ""), flush=True)
            del den
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return depth_rows, summary


def plot(depth_rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = list(dict.fromkeys((r["model"], r["bits"]) for r in depth_rows))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, (model, bits) in zip(axes[0], panels):
        for method in dict.fromkeys(r["method"] for r in depth_rows):
            pts = [(r["depth"], r["rel_err"]) for r in depth_rows
                   if (r["model"], r["bits"], r["method"]) == (model, bits, method)]
            if pts:
                ax.plot(*zip(*pts), marker="o", markersize=2.5, label=method)
        ax.set(title=f"{model} {bits.upper()}", xlabel="block (depth)", ylabel="relative error of the block output",
               yscale="log")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def report(depth_rows, summary, args, device, meta: dict) -> str:
    from diffptq.eval.report import markdown_table

    lines = [f"# Error versus depth ({meta['date']}, {meta['card']})", "",
             f"torch {meta['torch']}, diffusers {meta['diffusers']}; command: `{meta['command']}`", "",
             "Relative error ‖h_q − h_fp‖ / ‖h_fp‖ of each block's output on the held-out calibration records "
             "(diffptq/eval/depth.py); W4A8 static per-tensor activations, W4A4 per-token activations + Hadamard "
             "rotation + rank-32 16-bit branch of each Linear (the default recipes).", ""]
    for model in args.models:
        rows = [r for r in depth_rows if r["model"] == model]
        if not rows:
            continue
        n = max(r["depth"] for r in rows)
        depths = [1, 7, 14, 21, 28] if n == 28 else list(range(1, n + 1))
        table = []
        for bits in args.bits:
            for method in args.methods:
                errs = {r["depth"]: r["rel_err"] for r in rows if (r["bits"], r["method"]) == (bits, method)}
                table.append({"bits": bits, "method": method, **{f"block {d}": errs.get(d) for d in depths}})
        lines += [f"## {model} ({n} blocks)", "", markdown_table(table, ["bits", "method",
                                                                       *[f"block {d}" for d in depths]]), ""]
    lines += ["## Summary", "", markdown_table(summary, SUMMARY_COLUMNS), "", "![error vs depth](depth_error.png)", ""]
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    import diffusers
    import torch

    from diffptq.cli import resolve_device, resolve_dtype
    from diffptq.eval.report import write_csv
    from diffptq.io.files import write_text_atomic

    torch.manual_seed(0)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    out = Path(args.out_dir)
    depth_rows, summary = [], []
    for model in args.models:
        d, s = run_model(model, args, device, dtype)
        depth_rows += d
        summary += s
    write_csv(depth_rows, out / "depth_error.csv", DEPTH_COLUMNS)
    write_csv(summary, out / "summary.csv", SUMMARY_COLUMNS)
    plot(depth_rows, out / "depth_error.png")
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or 'x86'})"
    meta = {"date": dt.date.today().isoformat(), "card": card, "torch": torch.__version__,
            "diffusers": diffusers.__version__, "command": "python " + " ".join(sys.argv)}
    text = report(depth_rows, summary, args, device, meta)
    write_text_atomic(out / "depth_error.md", text)
    if args.report:
        write_text_atomic(args.report, text)
    print(text)


if __name__ == "__main__":
    run_main(main)
