"""Quality of the W4A8 FP8 speed path with static activation scales: one range for all steps vs log-SNR TDQ scales.

The fastest compiled W4A8 step (benchmarks/results/inference_speed_fp8_act_quant_pixart_h100.md) uses static per-tensor
e4m3 activation scales: no reduction at run time. With one min-max range for every timestep the bundled DiT loses most
of its prompt accuracy (inference_speed_quality_bundled_dit_cpu.md). Fp8W4A8Linear's static mode also takes
time-conditioned quantizers, so log-SNR TDQ scales (one per sampling step, from a small MLP) can feed the same
kernel. This script compares, on a bundled model with the same RTN W4 weight codes everywhere:
  int8 static per tensor (the sequential driver's calibration) and the FP8 static path built from it;
  int8 log-SNR TDQ and the FP8 static path built from it (the condition hook sets the scale every step);
  FP8 dynamic per-token activations (the accurate, slower variant) as the reference point.
Reports prompt_acc (bundled evaluator) and image PSNR against the FP32 pipeline, as markdown. On the CPU the FP8 GEMM
runs its fp32 reference (the same products and scales as torch._scaled_mm up to the order of accumulation).

  python benchmarks/fp8_static_quality.py --model bundled-dit --n_calib 16 --calib_steps 20 --n_eval 64 \\
      --out benchmarks/results/fp8_static_quality_bundled_dit_cpu.md
"""
from __future__ import annotations

import argparse
import copy
import datetime as dt
import time
from dataclasses import replace

import torch

from diffptq.algo.driver import SequentialConfig, quantize_sequential
from diffptq.eval.metrics.similarity import psnr_score
from diffptq.io.files import write_text_atomic
from diffptq.kernels import InferenceConfig, convert_for_inference
from diffptq.models import family_of, load_pipeline
from diffptq.data.calib import collect_calibration
from diffptq.data.prompts import calibration_prompts
from diffptq.models.bundled.evaluator import load_evaluator
from diffptq.models.names import BUNDLED_NAMES
from diffptq.models.bundled.sampling import eval_prompts, prompt_acc
from diffptq.quant.quantizer import QuantSpec
from diffptq.config import SCALE_METHODS, TdqFitConfig
from diffptq.tdq.calibrate import TdqConfig, calibrate_tdq_pipeline
from diffptq.tdq.inference import attach_tdq, detach_tdq

W4 = QuantSpec(4)
A8 = QuantSpec(8, symmetric=False, scale_method="mse")  # the TDQ scripts' activation grid, for both calibrations


def fp8_copy(pipe, act_mode: str, tdq: bool):
    """A copy of `pipe` whose quantized layers run the FP8 speed path (`act_mode` scales), bf16 elsewhere."""
    if tdq:
        detach_tdq(pipe)  # a deep copy must not carry hooks that set the original's quantizers
    out = copy.deepcopy(pipe)
    fam = family_of(out)
    convert_for_inference(fam.denoiser(out), "w4a8", "cpu", InferenceConfig(act_mode=act_mode, force=True))
    out = out.to(dtype=torch.bfloat16)
    if tdq:
        attach_tdq(pipe)
        attach_tdq(out)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="bundled-dit", choices=BUNDLED_NAMES)
    p.add_argument("--n_calib", type=int, default=16)
    p.add_argument("--calib_steps", type=int, default=20)
    p.add_argument("--n_eval", type=int, default=64)
    p.add_argument("--num_inference_steps", type=int, default=None,
                   help="evaluation sampling steps (default: the model's own, 20)")
    p.add_argument("--act_scale", default=A8.scale_method, choices=SCALE_METHODS,
                   help="how the 8-bit activation ranges are fitted (default: %(default)s, as the TDQ scripts)")
    p.add_argument("--mlp_steps", type=int, default=TdqFitConfig.steps, help="Adam steps of each TDQ scale MLP")
    p.add_argument("--out", default="results/fp8_static_quality.md")
    args = p.parse_args()
    torch.manual_seed(0)
    t_start = time.perf_counter()
    act = replace(A8, scale_method=args.act_scale)
    fp = load_pipeline(args.model)
    fam = family_of(fp)
    calib = collect_calibration(fp, calibration_prompts(fp, args.n_calib), args.calib_steps, progress=False)

    static = copy.deepcopy(fp)
    quantize_sequential(fam.denoiser(static), fam, calib, SequentialConfig(method="rtn", weight=W4, act=act),
                        progress=False)
    tdq = copy.deepcopy(fp)
    tdq_cfg = TdqConfig(condition="logsnr", fit=TdqFitConfig(steps=args.mlp_steps))
    calibrate_tdq_pipeline(tdq, tdq_cfg, SequentialConfig(method="rtn", weight=W4, act=act),
                           calib=calib,
                           progress=False)
    token = fp8_copy(static, "token", tdq=False)
    pipes = {"FP32": fp,
             "int8 static per tensor, one range for all steps (fake-quant)": static,
             "FP8 static per tensor from that range (the timed fast variant)": fp8_copy(static, "static", tdq=False),
             "int8 log-SNR TDQ, one scale per step (fake-quant)": tdq,
             "FP8 static per tensor from the TDQ scales": fp8_copy(tdq, "static", tdq=True),
             "FP8 dynamic per token (reference)": token}
    evaluator = load_evaluator("cpu")
    eval_set = eval_prompts(args.n_eval)
    rows, ref = [], None
    steps = {} if args.num_inference_steps is None else {"num_inference_steps": args.num_inference_steps}
    for name, pipe in pipes.items():
        acc, images = prompt_acc(pipe, evaluator, eval_set, **steps)
        ref = images if ref is None else ref
        rows.append((name, acc, psnr_score(images, ref)))
        print(f"{name}: prompt_acc {acc:.3f}", flush=True)
    lines = [
        f"# FP8 static activation scales: one range vs log-SNR TDQ ({args.model}, issue #8)", "",
        f"Machine: CPU ({torch.get_num_threads()} threads; the FP8 GEMM runs its fp32 reference); torch "
        f"{torch.__version__}; {dt.date.today().isoformat()}; {time.perf_counter() - t_start:.0f} s. W4 RTN per "
        f"channel on every block layer (the same codes in every row); activations 8-bit asymmetric, ranges fitted "
        f"by {args.act_scale}; "
        f"calibration {args.n_calib} scene prompts × {args.calib_steps} steps of the model's sampler with CFG; "
        f"prompt_acc on {args.n_eval} evaluation prompts, image PSNR against the FP32 pipeline.", "",
        "```", "python benchmarks/fp8_static_quality.py --model " + args.model + f" --n_calib {args.n_calib} "
        f"--calib_steps {args.calib_steps} --n_eval {args.n_eval}"
        + ("" if args.num_inference_steps is None else f" --num_inference_steps {args.num_inference_steps}")
        + ("" if args.mlp_steps == TdqFitConfig.steps else f" --mlp_steps {args.mlp_steps}")
        + ("" if args.act_scale == A8.scale_method else f" --act_scale {args.act_scale}"), "```", "",
        "| numerics | prompt_acc | image PSNR vs FP32 (dB) |", "| --- | --- | --- |"]
    lines += [f"| {n} | {a:.3f} | {s:.1f} |" for n, a, s in rows]
    write_text_atomic(args.out, "\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
