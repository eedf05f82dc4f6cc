"""RTN / GPTQ / Qronos at W4A8 and W4A4 (static per-tensor, dynamic per-token, per-token behind an online Hadamard
rotation) on the bundled models, all blocks, through the same path as quantize_qronos_4blocks.py.

Per row: mean per-layer rel_out_err (all layers and the feed-forward ones), final denoiser-output error, and, with
--n_images > 0, images of the quantized pipeline vs the FP pipeline (same prompts and seeds): PSNR vs FP and
prompt_acc read back by the bundled evaluator. One FP row gives the FP prompt_acc.

  python benchmarks/weight_quant_table.py --models bundled-dit --out benchmarks/results/weight_quant_bundled_dit_cpu.md
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import statistics
import time
from dataclasses import dataclass

import torch

from diffptq.algo.driver import SequentialConfig
from diffptq.eval.metrics.similarity import psnr_score
from diffptq.eval.report import markdown_table
from diffptq.models import load_pipeline
from diffptq.models.bundled.evaluator import load_evaluator
from diffptq.models.bundled.sampling import eval_prompts, generate
from diffptq.quant.quantizer import QuantSpec
from diffptq.config import CalibConfig, Damping
from diffptq.run.quantize import quantize_pipeline


@dataclass(frozen=True)
class Setting:
    """Activation side of one table row: bits, static (per tensor) or dynamic (per token), optional rotation."""

    abits: int
    act_kind: str
    rotate: str | None = None
    rotate_conv: bool = False


SETTINGS = {
    "w4a8": Setting(8, "static"),
    "w4a4-static": Setting(4, "static"),
    "w4a4-token": Setting(4, "dynamic"),
    "w4a4-token-had": Setting(4, "dynamic", "hadamard"),
    "w4a4-token-had-conv": Setting(4, "dynamic", "hadamard", rotate_conv=True),
    "w4a4-static-had": Setting(4, "static", "hadamard"),
}
COLUMNS = ("model", "setting", "method", "damp", "mean_rel_out_err", "ffn_rel_out_err", "final_denoiser_err",
           "psnr_vs_fp", "prompt_acc", "n_fallback", "time_s")


def parse_variant(text: str) -> tuple[str, Damping]:
    """'gptq' -> ('gptq', the default damping); 'qronos:spread' -> ('qronos', the spread rule); 'gptq:0.1'."""
    method, _, damp = text.partition(":")
    return method, Damping.parse(damp) if damp else Damping()


def image_metrics(pipe, prompts: list[str], fp_images: torch.Tensor | None, evaluator) -> dict:
    if fp_images is None:
        return {}
    images = generate(pipe, prompts, seed=0)
    return {"psnr_vs_fp": psnr_score(images, fp_images), "prompt_acc": evaluator.prompt_accuracy(images, prompts)}


def run(model: str, setting_name: str, method: str, damp, calib: CalibConfig, prompts, fp_images, evaluator) -> dict:
    s = SETTINGS[setting_name]
    torch.manual_seed(0)
    pipe = load_pipeline(model)
    pipe.set_progress_bar_config(disable=True)
    cfg = SequentialConfig(method=method, weight=QuantSpec(4), act=QuantSpec(s.abits, symmetric=False),
                           act_kind=s.act_kind, damp=damp, rotate=s.rotate, rotate_conv=s.rotate_conv)
    t0 = time.perf_counter()
    q = quantize_pipeline(pipe, cfg, calib, torch.device("cpu"), torch.float32, progress=False)
    ffn = [r.rel_out_err for r in q.result.layers if ".ff." in r.layer or ".proj_out" in r.layer]
    row = q.summary_row(cfg, "all")
    return {"model": model, "setting": setting_name, "method": method, "damp": damp.setting,
            "mean_rel_out_err": row["mean_rel_out_err"], "ffn_rel_out_err": statistics.mean(ffn) if ffn else None,
            "final_denoiser_err": row["final_denoiser_err"], "n_fallback": row["n_fallback"],
            **image_metrics(pipe, prompts, fp_images, evaluator), "time_s": time.perf_counter() - t0}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="bundled-dit,bundled-unet")
    p.add_argument("--settings", default="w4a8,w4a4-static,w4a4-token,w4a4-token-had",
                   help=f"comma list of {', '.join(SETTINGS)}")
    p.add_argument("--variants", default="rtn,gptq,qronos", help="methods, with ':damp' for a damping other than 1%%")
    p.add_argument("--extra", default="w4a8:gptq:spread,w4a8:qronos:spread,"
                   "w4a4-token-had:gptq:spread,w4a4-token-had:qronos:spread",
                   help="further rows setting:method[:damp] (e.g. another damping only where it is compared; "
                        "'adaptive' needs two calibration batches, which this table's one batch does not give)")
    p.add_argument("--n_calib", type=int, default=8)
    p.add_argument("--calib_steps", type=int, default=5)
    p.add_argument("--n_images", type=int, default=32, help="images for PSNR vs FP and prompt_acc (0: none)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--out", default="benchmarks/results/weight_quant_bundled_cpu.md")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    calib = CalibConfig(n_calib=args.n_calib, calib_steps=args.calib_steps, batch_size=args.n_calib)
    jobs = [(name, *parse_variant(v)) for name in args.settings.split(",") for v in args.variants.split(",")]
    jobs += [(e.split(":", 1)[0], *parse_variant(e.split(":", 1)[1])) for e in args.extra.split(",") if e]
    evaluator = load_evaluator() if args.n_images else None
    prompts = eval_prompts(args.n_images) if args.n_images else []
    rows = []
    for model in args.models.split(","):
        fp_images = None
        if args.n_images:
            pipe = load_pipeline(model)
            pipe.set_progress_bar_config(disable=True)
            fp_images = generate(pipe, prompts, seed=0)
            rows.append({"model": model, "setting": "fp32", "method": "fp",
                         "prompt_acc": evaluator.prompt_accuracy(fp_images, prompts)})
        for setting, method, damp in jobs:
            rows.append(run(model, setting, method, damp, calib, prompts, fp_images, evaluator))
            print(rows[-1], flush=True)
    head = (f"# Weight quantization on the bundled models (CPU)\n\n{dt.date.today()}, torch {torch.__version__}, "
            f"{platform.processor() or platform.machine()} CPU with {os.cpu_count()} cores "
            f"({torch.get_num_threads()} torch threads). All blocks; weights 4-bit symmetric per output channel; "
            f"activations asymmetric: `w4a8` and `w4a4-static` static per tensor (min-max), `w4a4-token` dynamic "
            "per token, `w4a4-token-had` per token behind an online randomised Hadamard rotation of every "
            "quantized Linear's input (y = (W R)(Rᵀx), weights rotated before GPTQ/Qronos; Conv2d not rotated), "
            "`-had-conv` Conv2d rotated too. "
            f"{args.n_calib} calibration prompts × {args.calib_steps} steps with CFG, every 5th record held out "
            "for the errors. `ffn_rel_out_err`: mean over the feed-forward layers (PixArt `ff.*`, UNet `ff.*` and "
            "`proj_out`). `final_denoiser_err`: ‖ε̂ − ε‖/‖ε‖ of the whole quantized denoiser on held-out records, "
            f"mean over steps. `psnr_vs_fp` (dB) and `prompt_acc` (bundled evaluator): {args.n_images} fixed "
            "prompts, 20 sampling steps, CFG 4.5, seed 0, quantized vs FP pipeline. `time_s`: quantization plus "
            "image generation.\n\n")
    with open(args.out, "w") as f:
        f.write(head + markdown_table(rows, COLUMNS))
    print(head + markdown_table(rows, COLUMNS))


if __name__ == "__main__":
    main()
