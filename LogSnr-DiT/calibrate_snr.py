"""Calibrate log-SNR (or timestep, or static) TDQ activation quantization for a PixArt-alpha denoiser.

Example: python LogSnr-DiT/calibrate_snr.py --abits 8 --wbits 8 --save_path logsnr_checkpoints.pt
         python LogSnr-DiT/calibrate_snr.py --model bundled-dit --abits 4 --wbits 8 --condition logsnr
Each block's activation quantizers get per-condition MSE-optimal scales on the quantized stream, reproduced by a
scale MLP over Fourier features of the condition; then the block's weights are quantized (--weight_method).
Writes into --out_dir: the checkpoint (--save_path, default <out_dir>/checkpoint.safetensors; load it with
diffptq.io.load.load_quantized: the pipeline comes back with per-step scales for any scheduler), layers.csv/.md
(weight error and TDQ fit per layer), summary.csv/.md and config.json.
"""
from __future__ import annotations

from diffptq.cli import run_main
from diffptq.run.tdq_scripts import calibrate_main


def main(argv=None) -> None:
    calibrate_main("pixart", __doc__, argv)


if __name__ == "__main__":
    run_main(main)
