"""Command line: `python -m diffptq generate --checkpoint PATH --prompt "..." [--n 4 --seed 0 --steps 20 --out DIR]`.
`--kernels w4a8|w4`: real low-bit kernels instead of fake-quant layers (diffptq.kernels: FP8 GEMMs on CUDA sm_89+,
or packed int4 weights on CUDA; where the device cannot, fake-quant with one warning). `--compile`: torch.compile
the whole denoiser (diffptq.kernels.compiled). `--cuda_graphs`: replay one CUDA graph per denoiser call
(diffptq.kernels.graphs; for small batches on a GPU). `--fp8_attention`: self-attention on FP8 operands
(diffptq.kernels.fp8_attention; the Triton kernel on CUDA sm_89+). The fastest small-batch setting on a GPU:
`--kernels w4a8 --compile --cuda_graphs`; the least memory: `--kernels w4 --compile --cuda_graphs`.

Loads the quantized pipeline (its base model as recorded in the checkpoint, or --base_model) and writes one PNG
per image into --out (`<index>_seed<seed>.png`) plus `prompts.txt`; each file appears under its final name only
once complete.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from diffptq.cli import (
    ArgumentParser,
    check_output_dir,
    device_value,
    guidance_value,
    positive_int,
    prompt_file,
    run_main,
    seed_value,
)
from diffptq.cli.common import DTYPE_NAMES
from diffptq.errors import ConfigError
from diffptq.models.names import SCHEDULER_NAMES


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(prog="python -m diffptq", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate images from a quantized checkpoint")
    g.add_argument("--checkpoint", required=True, help="diffptq checkpoint (safetensors; a .pt name is accepted)")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="one prompt")
    src.add_argument("--prompts", type=prompt_file, help="a file with one prompt per line")
    g.add_argument("--n", type=positive_int, default=4, help="images per prompt (default: %(default)s)")
    g.add_argument("--seed", type=seed_value, default=0, help="seed of the first image; image i uses seed + i")
    g.add_argument("--steps", type=positive_int, default=20)
    g.add_argument("--guidance_scale", type=guidance_value, default=None)
    g.add_argument("--scheduler", default="default", choices=["default", *SCHEDULER_NAMES])
    g.add_argument("--batch_size", type=positive_int, default=4)
    g.add_argument("--base_model", default=None, help="load the checkpoint onto this base model instead")
    g.add_argument("--device", default="auto", type=device_value)
    g.add_argument("--dtype", default="auto", choices=["auto", *DTYPE_NAMES])
    g.add_argument("--kernels", default="fake", choices=["fake", "w4a8", "w4"],
                   help="fake: fake-quant layers, the numerics the quality tables measure (default); w4a8: FP8 GEMMs "
                        "(CUDA sm_89+); w4: packed int4 weights, a third of the memory (CUDA)")
    g.add_argument("--act_mode", default=None, choices=["auto", "token", "tensor", "static"],
                   help="--kernels w4a8: activation scales; auto (default): the checkpoint's calibrated static "
                        "scales where it has them, per token elsewhere")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the whole denoiser (compiles at the first batch: tens of seconds)")
    g.add_argument("--cuda_graphs", action="store_true",
                   help="CUDA graphs over each denoiser call (faster small batches on a GPU; eager elsewhere)")
    g.add_argument("--fp8_attention", action="store_true",
                   help="self-attention on FP8 operands (the Triton kernel on CUDA sm_89+, its reference elsewhere)")
    g.add_argument("--out", default="generated", help="output folder (default: %(default)s)")
    args = p.parse_args(argv)
    if args.prompt is not None and not args.prompt.strip():
        raise ConfigError("--prompt is empty")
    if args.cuda_graphs and not args.device.startswith(("cuda", "auto")):
        raise ConfigError(f"--cuda_graphs needs a CUDA device, got --device {args.device}")
    if args.act_mode is not None and args.kernels != "w4a8":
        raise ConfigError(f"--act_mode sets the FP8 activation scales of --kernels w4a8; got --kernels {args.kernels}")
    if not os.path.exists(args.checkpoint):
        raise ConfigError(f"--checkpoint {args.checkpoint}: no such file")
    check_output_dir(args.out, "--out", overwrite=True)  # a file there, or no permission: refused before sampling
    return args


def generate_command(args: argparse.Namespace) -> list[Path]:
    import diffptq
    from diffptq.cli import resolve_device, resolve_dtype
    from diffptq.data.prompts import load_prompts
    from diffptq.eval.sample import generate
    from diffptq.models.schedulers import check_steps, set_scheduler

    prompts = [args.prompt] if args.prompt is not None else load_prompts(args.prompts)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    pipe = diffptq.load_quantized(args.checkpoint, device=device, dtype=dtype, base_model=args.base_model)
    set_scheduler(pipe, args.scheduler)
    path = convert_kernels(pipe, args.kernels, args.act_mode or "auto", device) if args.kernels != "fake" else "fake"
    if args.fp8_attention:
        from diffptq.kernels.fp8_attention_processor import use_fp8_attention
        from diffptq.models import family_of

        use_fp8_attention(family_of(pipe).denoiser(pipe))
    if args.compile:
        from diffptq.kernels.compiled import compile_denoiser

        compile_denoiser(pipe, path)
    if args.cuda_graphs:
        from diffptq.kernels.graphs import graph_denoiser

        graph_denoiser(pipe)
    check_steps(pipe, args.steps, f"--steps {args.steps}")
    all_prompts = [p for p in prompts for _ in range(args.n)]
    seeds = [args.seed + i for i in range(len(all_prompts))]
    images = generate(pipe, all_prompts, seeds, batch_size=args.batch_size, num_inference_steps=args.steps,
                      guidance_scale=args.guidance_scale)
    return save_images(images, seeds, all_prompts, Path(args.out))


def convert_kernels(pipe, kernels: str, act_mode: str, device: str, force: bool = False) -> str:
    """Put the inference modules of `kernels` into the pipeline's denoiser and say in one line what was converted
    (or why the layers stay fake-quant); returns the path taken ("fake" where the device cannot run `kernels`).
    force: the real modules even where the device cannot run them (tests)."""
    from diffptq.kernels import InferenceConfig, convert_for_inference
    from diffptq.models import family_of

    conv = convert_for_inference(family_of(pipe).denoiser(pipe), kernels, device,
                                 InferenceConfig(act_mode=act_mode, force=force))
    if conv.path == "fake":
        print(f"kernels: fake-quant layers kept ({conv.reason})")
        return conv.path
    counts = ", ".join(f"{n} {name}" for name, n in sorted(conv.counts().items())) or "no layer converted"
    print(f"kernels: {conv.path} ({conv.reason}): {counts}; {len(conv.kept)} kept fake-quant")
    return conv.path


def save_images(images, seeds: list[int], prompts: list[str], out: Path) -> list[Path]:
    """Write images (N,3,H,W) in [0,1] as PNGs, each to a temporary name first, then renamed."""
    from torchvision.utils import save_image

    from diffptq.io.files import write_text_atomic

    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (img, seed) in enumerate(zip(images, seeds, strict=True)):
        path = out / f"{i:04d}_seed{seed}.png"
        tmp = path.with_name(path.stem + ".partial.png")
        save_image(img, tmp)
        os.replace(tmp, path)
        paths.append(path)
    write_text_atomic(out / "prompts.txt", "".join(f"{p.name}\t{t}\n" for p, t in zip(paths, prompts, strict=True)))
    return paths


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.command == "generate":
        paths = generate_command(args)
        print(f"wrote {len(paths)} images to {paths[0].parent}")


if __name__ == "__main__":
    run_main(main)
