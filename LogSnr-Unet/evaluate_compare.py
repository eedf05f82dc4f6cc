"""Compare FP, static, timestep-TDQ and log-SNR-TDQ on Stable Diffusion 1.5 across samplers, step counts and spacings.

Example: python LogSnr-Unet/evaluate_compare.py --model bundled-unet --wbits 8 4 --abits 8 4
Each condition is calibrated on --scheduler with --calib_steps steps (default DDIM-20), then evaluated on every
--eval sampler (default DDIM-20, DDIM-10, DDIM-50 trailing, DPM-Solver-20, Euler-30 Karras) on the FP trajectories
of --n_prompts prompts. Writes into --out_dir: metrics.csv/.md (condition × sampler × steps × bits: act_mse,
eps_mse, psnr/ssim/lpips vs FP, prompt_acc on bundled models), act_mse.md / eps_mse.md (pivot by condition),
scales_w*a*.png (scale vs λ per method against the per-step optimum), act_mse_steps_w*a*.png, grid_*.png, config.json.
"""
from __future__ import annotations

from diffptq.cli import run_main
from diffptq.run.tdq_scripts import compare_main


def main(argv=None) -> None:
    compare_main("sd", __doc__, argv)


if __name__ == "__main__":
    run_main(main)
