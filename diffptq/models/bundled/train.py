"""Reproduce a bundled model from scratch.

    python -m diffptq.models.bundled.train --which vae       --out DIR     # AutoencoderKL (first)
    python -m diffptq.models.bundled.train --which evaluator --out DIR     # evaluation CNN (independent)
    python -m diffptq.models.bundled.train --which dit  --vae VAE_DIR --out DIR   # also dit-deep (28 blocks)
    python -m diffptq.models.bundled.train --which unet --vae VAE_DIR --out DIR

`--out` defaults to diffptq/models/bundled/weights/<which> (vae: weights/vae, not committed: the pipelines carry it
as their `vae` subfolder); `--vae` defaults to the committed weights/dit/vae. Training stops by itself after
`--minutes` of wall clock (or `--steps`) and saves fp16 safetensors. Prints loss and steps/s as it goes.
`--init DIR` continues a dit/unet from a saved pipeline. train_all.sh runs the whole recipe of the committed weights.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
from diffusers import AutoencoderKL

from diffptq.models.bundled.evaluator import save_evaluator
from diffptq.models.bundled.specs import WEIGHTS_DIR, TrainConfig, vae_spec
from diffptq.models.bundled.train_common import log

DEFAULTS = {  # minutes, batch size, peak lr per model
    "vae": (1.25, 256, 1e-3),
    "evaluator": (1.0, 256, 2e-3),
    "dit": (6.25, 1024, 1e-3),
    "dit-deep": (8.0, 512, 8e-4),
    "unet": (6.25, 1024, 8e-4),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--which", required=True, choices=tuple(DEFAULTS))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--minutes", type=float,
                   help="wall-clock budget (default: vae 1.25, evaluator 1, dit/unet 6.25, dit-deep 8)")
    p.add_argument("--steps", type=int, default=1_000_000, help="stop after this many steps at the latest")
    p.add_argument("--batch_size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--pool_size", type=int, default=800_000, help="dit/unet: scenes encoded once at the start")
    p.add_argument("--vae", type=Path, default=WEIGHTS_DIR / "dit" / "vae",
                   help="diffusion models: trained VAE directory")
    p.add_argument("--high_noise_fraction", type=float, default=0.0, help="dit/unet: share of t from the upper half")
    p.add_argument("--high_noise_weight", type=float, default=1.0, help="dit/unet: loss weight cap where SNR < 1")
    p.add_argument("--warmup", type=int, default=300)
    p.add_argument("--init", type=Path, help="dit/unet: continue from this saved pipeline's weights")
    p.add_argument("--out", type=Path)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log_every", type=int, default=200)
    p.add_argument("--compile", action="store_true", help="dit/unet: torch.compile the training step's loss")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    minutes, batch_size, lr = DEFAULTS[args.which]
    cfg = TrainConfig(minutes=args.minutes or minutes, max_steps=args.steps, batch_size=args.batch_size or batch_size,
                      lr=args.lr or lr, pool_size=args.pool_size, seed=args.seed, log_every=args.log_every,
                      device=args.device, high_noise_fraction=args.high_noise_fraction,
                      high_noise_weight=args.high_noise_weight, warmup=args.warmup,
                      compile=args.compile)
    out = args.out or WEIGHTS_DIR / args.which
    if torch.cuda.is_available() and args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        log(f"device: {torch.cuda.get_device_name()}")
    if args.which == "evaluator":
        from diffptq.models.bundled.train_evaluator import train_evaluator

        net, metrics = train_evaluator(cfg)
        save_evaluator(net, out, metrics)
    elif args.which == "vae":
        from diffptq.models.bundled.train_vae import train_vae

        vae, metrics = train_vae(vae_spec(), cfg)
        vae.to(torch.float16).save_pretrained(out)
        (out / "train_metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    else:
        from diffptq.models.bundled.sampling import load_bundled
        from diffptq.models.bundled.train_diffusion import train_diffusion

        vae = AutoencoderKL.from_pretrained(args.vae, dtype=torch.float32, local_files_only=True).to(args.device)
        init = load_bundled(args.which, args.init) if args.init else None
        pipe, metrics = train_diffusion(args.which, vae, cfg, init)
        pipe.to(torch.float16).save_pretrained(out)
        metrics["device"] = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
        (out / "train_metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    log(f"saved {args.which} to {out}")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
