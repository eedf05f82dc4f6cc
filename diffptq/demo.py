"""`make demo`: quantize the bundled DiT with Qronos W4A8, then benchmark FP, RTN, GPTQ and Qronos at W4A8 and W4A4.

    python -m diffptq.demo [--out_dir DIR] [--n_images 16] [--num_inference_steps 20] [--n_calib 16]

Step 1 runs qronos_diffusion/quantize_qronos_4blocks.py (all blocks) and saves checkpoints/qronos_w4a8.safetensors;
step 2 runs qronos_diffusion/benchmark_final.py with --checkpoints on that folder (the Qronos W4A8 row is evaluated
from the saved checkpoint, the other variants are quantized there with the same calibration set). Without the
bundled weights (diffptq/models/bundled/weights/dit) it falls back to the random-weight tiny-dit and says so.
Sized to finish in a few minutes on a 2-core CPU.
"""
from __future__ import annotations

import argparse
import datetime as dt
import runpy
import time
from pathlib import Path

from diffptq.cli import REPO_ROOT, ArgumentParser, check_output_dir, positive_int, run_main

SCRIPTS = REPO_ROOT / "qronos_diffusion"


def run_script(name: str, argv: list[str]) -> None:
    """Run `qronos_diffusion/<name>`'s main(argv) in this process (the same code path as the command line)."""
    print(f"\n$ python qronos_diffusion/{name} {' '.join(argv)}\n", flush=True)
    runpy.run_path(str(SCRIPTS / name), run_name="diffptq_demo")["main"](argv)


def demo_model() -> str:
    """bundled-dit when its weights are present, else tiny-dit (with a note)."""
    from diffptq.models.load import BUNDLED_MODELS

    if (BUNDLED_MODELS["bundled-dit"] / "model_index.json").is_file():
        return "bundled-dit"
    print(f"note: no bundled-dit weights at {BUNDLED_MODELS['bundled-dit']} (train them with `python -m "
          "diffptq.models.bundled.train --which dit`); running the demo on tiny-dit, a random-weight 16 px model "
          "whose images and metrics only show that the pipeline works", flush=True)
    return "tiny-dit"


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out_dir", default=None, help="default: results/demo/<timestamp>/")
    p.add_argument("--model", default=None, help="default: bundled-dit (tiny-dit when its weights are absent)")
    p.add_argument("--n_images", type=positive_int, default=16)
    p.add_argument("--num_inference_steps", type=positive_int, default=20)
    p.add_argument("--n_calib", type=positive_int, default=16, help="calibration prompts")
    p.add_argument("--calib_steps", type=positive_int, default=10)
    p.add_argument("--threads", type=positive_int, default=1,
                   help="CPU threads (default 1: these small models are as fast on one, and far faster on a busy "
                        "machine)")
    args = p.parse_args(argv)
    if args.out_dir is not None:
        check_output_dir(args.out_dir, overwrite=True)  # a file there, or no permission: refused before any work
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    import torch

    start = time.perf_counter()
    if not torch.cuda.is_available():
        torch.set_num_threads(args.threads)
    model = args.model or demo_model()
    root = Path(args.out_dir or Path("results") / "demo" / dt.datetime.now().strftime("%Y%m%d-%H%M%S"))
    root.mkdir(parents=True, exist_ok=True)
    # calibration prompts and guidance: the model's own (the bundled models' scene captions), the same in both steps
    calib = ["--n_calib", str(args.n_calib), "--calib_steps", str(args.calib_steps), "--calib_batch_size", "8",
             "--overwrite"]
    run_script("quantize_qronos_4blocks.py", [
        "--model", model, "--method", "qronos", "--wbits", "4", "--abits", "8", "--blocks", "all", *calib,
        "--out_dir", str(root / "quantize"), "--save_path", str(root / "checkpoints" / "qronos_w4a8.safetensors")])
    run_script("benchmark_final.py", [
        "--model", model, "--methods", "fp,rtn,gptq,qronos", "--bits", "w4a8,w4a4",
        "--checkpoints", str(root / "checkpoints"), "--n_images", str(args.n_images),
        "--num_inference_steps", str(args.num_inference_steps), "--batch_size", str(args.n_images), *calib,
        "--out_dir", str(root / "benchmark")])
    print(f"demo finished in {time.perf_counter() - start:.0f} s; model {model}\n"
          f"  table:       {root / 'benchmark' / 'metrics.md'} (and metrics.csv)\n"
          f"  image grid:  {root / 'benchmark' / 'grid.png'}\n  bar plots:   {root / 'benchmark' / 'metrics.png'}\n"
          f"  checkpoint:  {root / 'checkpoints' / 'qronos_w4a8.safetensors'}\n  all results: {root}")


if __name__ == "__main__":
    run_main(main)
