"""FP vs RTN / GPTQ-Sequential / Qronos: image metrics, latency, memory and size, one row per method × bits.

Example: python qronos_diffusion/benchmark_final.py --model bundled-dit --methods fp,rtn,gptq,qronos --bits w4a8,w4a4
Side by side with other libraries' quantizers (pip install -r requirements-peers.txt): add e.g.
--peers modelopt:int8_sq,torchao:int8da_int4w,quanto:w4a8,brevitas:qronos (one more row each).
Re-evaluate saved checkpoints: add --save_checkpoints to a first run, then --checkpoints <its out_dir> (each is
evaluated as saved, its rotation included). The w4a4 rows use per-token activations behind a Hadamard rotation
(the defaults --act_quant auto --rotate auto; at 8 bits these mean static per-tensor, unrotated).
Several processes, each generating a slice of the prompts: accelerate launch --num_processes 2 this_script ... on
GPUs (one per process); on a CPU host accelerate launch --multi_gpu --num_processes 2 (or torchrun --nproc_per_node 2)
this_script ... --device cpu (gloo). Check that N processes make the images of one: run with --save_images on 1 and
on N processes, then python benchmarks/multi_gpu_compare.py --runs DIR_1 DIR_N. Speed at full size with random
weights: --model fullsize-pixart (or fullsize-sd).
Writes into --out_dir: metrics.csv / metrics.md, grid.png (rows: methods, columns: prompts), metrics.png (bar
plots), config.json (written last), checkpoints/ (with --save_checkpoints) and images/ (with --save_images).
"""
from __future__ import annotations

import os
import sys
from argparse import RawDescriptionHelpFormatter

from diffptq.cli import (
    ArgumentParser,
    add_blocks_arg,
    add_calib_args,
    add_common_args,
    add_guidance_arg,
    add_rotation_args,
    add_weight_args,
    bits_list_value,
    calib_config,
    check_rotation_flags,
    file_sha256,
    finish_run,
    methods_value,
    peers_value,
    positive_int,
    prompt_file,
    run_main,
    sequential_config,
)
from diffptq.config import check_calibration_fits
from diffptq.models.names import DEFAULT_CLIP
from diffptq.peers import INSTALL_HINT, PEERS, parse_peers


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=RawDescriptionHelpFormatter)
    add_common_args(p, "pixart")
    p.add_argument("--methods", type=methods_value, default="fp,rtn,gptq,qronos",
                   help="comma list of fp, rtn, gptq, qronos (default: %(default)s)")
    p.add_argument("--bits", type=bits_list_value, default="w4a8,w4a4",
                   help="comma list of wXaY (w4 or w4a16: float activations) (default: %(default)s)")
    p.add_argument("--peers", type=peers_value, default="",
                   help="comma list of peer quantizers to add as rows, each calibrated on the same calibration set "
                        f"(needs {INSTALL_HINT}): {', '.join(PEERS)} (default: none)")
    p.add_argument("--checkpoints", default=None,
                   help="folder of saved checkpoints (or a previous --out_dir) to evaluate instead of quantizing; "
                        "variants without a checkpoint there are quantized")
    p.add_argument("--save_checkpoints", action="store_true", help="save each quantized variant to checkpoints/")
    p.add_argument("--save_images", action="store_true",
                   help="save each variant's uint8 images, prompts and seeds to images/<method>[_wXaY].safetensors "
                        "(for benchmarks/multi_gpu_compare.py)")
    p.add_argument("--n_images", type=positive_int, default=64, help="images per method (default: %(default)s)")
    p.add_argument("--prompts", type=prompt_file, default=None,
                   help="evaluation prompt file, one per line (default: the model's evaluation prompts)")
    p.add_argument("--batch_size", type=positive_int, default=8, help="images per pipeline call")
    add_guidance_arg(p)
    p.add_argument("--latency_repeats", type=positive_int, default=3, help="timed pipeline calls (CUDA only)")
    q = p.add_argument_group("quantization (variants not loaded from --checkpoints)")
    add_blocks_arg(q, "all")
    add_weight_args(q, method_flag=None, bits=False)
    add_calib_args(q, prompts_flag="--calib_prompts", guidance=False)
    add_rotation_args(q)
    m = p.add_argument_group("metrics (a metric whose weights are absent is left empty, with one message)")
    m.add_argument("--fid_weights", default=None, help="Inception FID weights (default: the torch-fidelity cache)")
    m.add_argument("--clip_model", default=DEFAULT_CLIP, help="CLIP hub id in the HF cache or a local folder")
    m.add_argument("--lpips_weights", default=None, help="AlexNet weights (default: the torch hub cache)")
    m.add_argument("--ref_dir", default=None, help="real images as FID reference (default: the FP images)")
    m.add_argument("--evaluator", default=None, help="bundled evaluator folder (default: the committed one, bundled-*)")
    args = p.parse_args(argv)
    check_rotation_flags(args)
    for flag in ("checkpoints", "ref_dir", "evaluator"):
        path = getattr(args, flag)
        if path is not None and not os.path.isdir(path):
            p.error(f"argument --{flag}: no folder {path}")
    for name in parse_peers(args.peers):  # an absent package: a warning, and the peer's row says why it is empty
        if not PEERS[name].available():
            print(f"warning: {PEERS[name].missing()}; its row keeps empty metrics", file=sys.stderr)
    calib = calib_config(args)  # every value checked before anything heavy is imported
    for method in {"rtn", "gptq", "qronos"} & set(args.methods.split(",")):
        check_calibration_fits(sequential_config(args, method=method, wbits=4, abits=8), calib.n_calib,
                               calib.batch_size)
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    from diffptq.run.benchmark_script import benchmark_script, shared_run  # heavy: torch, diffusers, metrics

    run, state = shared_run(args)
    done = benchmark_script(args, run, state)
    if done is None:  # another process of a sharded run: the main one writes the results
        return
    paths, saved = done
    finish_run(run, checkpoints={p.name: file_sha256(p) for p in saved})
    print(paths["md"].read_text())
    print("\n".join(f"{kind}: {path}" for kind, path in paths.items()) + f"\nresults: {run.out_dir}")


if __name__ == "__main__":
    run_main(main)
