"""What FP8 self-attention costs in image quality: each bundled model with its self-attention on FP8 operands
(diffptq.kernels.fp8_attention, installed by use_fp8_attention) against the same model with exact attention.

Per model: the float pipeline generates `--n_images` evaluation prompts (image i with seed i), then the same pipeline
with FP8 self-attention (cross-attention unchanged) generates them again. Rows: `exact` (the reference images) and
`fp8`, with PSNR against the reference images (bootstrap 95% interval) and prompt_acc from the bundled evaluator
(Wilson 95% interval). On the CPU the FP8 attention runs its torch reference, which the Triton kernel reproduces up
to float rounding (tests/kernels/test_fp8_attention.py), so the quality measured there is the kernel's.

  python benchmarks/fp8_attention_quality.py --models bundled-dit,bundled-unet --n_images 512 \\
      --out benchmarks/results/fp8_attention_quality_bundled_dit_unet_cpu.md
Writes --out (markdown with the date, machine, versions, commit and command) and the CSV beside it.
"""
from __future__ import annotations

import argparse

from diffptq.cli import ArgumentParser, check_output_file, device_value, positive_int, run_main

COLUMNS = ("model", "attention", "switched", "psnr", "psnr_lo", "psnr_hi", "prompt_acc", "acc_lo", "acc_hi",
           "n_images", "time_s")


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="bundled-dit,bundled-unet", help="comma list of bundled models")
    p.add_argument("--n_images", type=positive_int, default=512)
    p.add_argument("--batch_size", type=positive_int, default=64, help="images per pipeline call")
    p.add_argument("--device", type=device_value, default="auto")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"])
    p.add_argument("--backend", default="auto", choices=["auto", "kernel", "reference"],
                   help="FP8 attention: the Triton kernel where it runs (CUDA sm_89+), else the reference")
    p.add_argument("--out", default="results/fp8_attention_quality.md", help="markdown file; the CSV goes beside it")
    args = p.parse_args(argv)
    from diffptq.models.names import is_bundled

    args.models = [m for m in args.models.split(",") if m]
    for model in args.models:
        if not is_bundled(model):
            p.error(f"--models: {model!r} is not a bundled model (the evaluator that scores prompts is bundled)")
    return args


def run_model(model: str, args, device, dtype) -> list[dict]:
    import time

    import torch

    from diffptq.data.prompts import evaluation_prompts
    from diffptq.eval.sample import generate
    from diffptq.eval.metrics.similarity import image_scores
    from diffptq.kernels.fp8_attention_processor import use_fp8_attention
    from diffptq.models import family_of, load_pipeline
    from diffptq.run.benchmark_report import load_bundled_evaluator

    pipe = load_pipeline(model, dtype=dtype, device=device)
    prompts = evaluation_prompts(pipe, args.n_images)
    evaluator = load_bundled_evaluator(model, None, device)
    rows = []
    t0 = time.perf_counter()
    exact = generate(pipe, prompts, 0, batch_size=args.batch_size, progress=True)
    rows.append({"model": model, "attention": "exact", "switched": 0, "time_s": time.perf_counter() - t0,
                 **image_scores(exact, exact, prompts, evaluator)})
    switched = use_fp8_attention(family_of(pipe).denoiser(pipe), args.backend)
    t0 = time.perf_counter()
    with torch.no_grad():
        fp8 = generate(pipe, prompts, 0, batch_size=args.batch_size, progress=True)
    rows.append({"model": model, "attention": "fp8 self-attention", "switched": switched,
                 "time_s": time.perf_counter() - t0, **image_scores(fp8, exact, prompts, evaluator)})
    rows[0]["psnr"] = rows[0]["psnr_lo"] = rows[0]["psnr_hi"] = None  # the reference against itself
    return rows


def report(rows: list[dict], meta: dict) -> str:
    from diffptq.eval.report import markdown_table

    from diffptq.cli.common import report_header

    return "\n".join([
        *report_header("FP8 self-attention: image quality on the bundled models", meta),
        "Rows: `exact` (scaled_dot_product_attention: the reference images) and `fp8 self-attention` (Q, K per "
        "token and V per channel in e4m3, probabilities in e4m3, fp32 accumulation; cross-attention unchanged; "
        "`switched` self-attention modules). `psnr` (dB) of the FP8 images against the exact ones with its "
        "bootstrap 95% interval; `prompt_acc` (bundled evaluator) with its Wilson 95% interval; `time_s` the "
        "generation time of the row (the reference implementation on the CPU: not a speed).", "",
        markdown_table(rows, COLUMNS), ""])


def main(argv=None) -> None:
    args = parse_args(argv)

    from diffptq.cli import resolve_device, resolve_dtype
    from diffptq.cli.common import report_meta
    from diffptq.eval.report import write_csv
    from diffptq.io.files import write_text_atomic

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    out = check_output_file(args.out, "--out")
    meta = report_meta("benchmarks/fp8_attention_quality.py", argv, device, dtype, ("torch", "diffusers"))
    rows: list[dict] = []
    for model in args.models:
        rows += run_model(model, args, device, dtype)
        write_csv(rows, out.with_suffix(".csv"), COLUMNS)
        write_text_atomic(out, report(rows, meta))
    print(out.read_text())


if __name__ == "__main__":
    run_main(main)
