"""Measure the bundled models: evaluator held-out accuracy (clean and through the VAE), prompt_acc of each pipeline
over a guidance sweep at 20 steps, a quick W4A4 RTN check, and the README sample grid.

    python -m diffptq.models.bundled.measure [--weights DIR] [--n 500] [--guidance 2 3 4 5 6] [--device cuda]
        [--grid docs/bundled_samples.png] [--json results.json]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from diffptq.models.bundled.dataset import render, sample_scenes
from diffptq.models.bundled.evaluator import attribute_accuracy, load_evaluator
from diffptq.models.bundled.quick_quant import rtn_fake_quant
from diffptq.models.bundled.sampling import eval_prompts, generate, load_bundled
from diffptq.models.bundled.specs import SAMPLING, WEIGHTS_DIR
from diffptq.models.bundled.train_evaluator import HELD_OUT_SEED
from diffptq.models.bundled.train_vae import reconstruct

GRID_PROMPT_SEED = 777


def image_grid(rows: list[torch.Tensor], scale: int = 2, pad: int = 2) -> Image.Image:
    """rows of images (K,3,H,W) in [0,1] -> one PIL image, rows stacked, nearest-neighbour upscaled."""
    k, _, h, w = rows[0].shape
    canvas = np.full((len(rows) * (h + pad) + pad, k * (w + pad) + pad, 3), 255, np.uint8)
    for r, images in enumerate(rows):
        for c, img in enumerate(images):
            y, x = pad + r * (h + pad), pad + c * (w + pad)
            canvas[y:y + h, x:x + w] = (img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    pil = Image.fromarray(canvas)
    return pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", type=Path, default=WEIGHTS_DIR)
    p.add_argument("--models", nargs="+", default=["dit", "unet"])
    p.add_argument("--n", type=int, default=400)
    p.add_argument("--guidance", type=float, nargs="+", default=[3.0, 4.5, 6.0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch_size", type=int, default=250)
    p.add_argument("--quant_check", action="store_true", help="also W8A8 / W4A16 / W4A4 RTN at the best guidance")
    p.add_argument("--grid", type=Path)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    torch.set_grad_enabled(False)
    results: dict = {"n": args.n, "steps": 20}
    evaluator = load_evaluator(args.device, args.weights / "evaluator")
    held = sample_scenes(2048, HELD_OUT_SEED)
    images = render(held, args.device)
    results["evaluator_clean"] = attribute_accuracy(evaluator.predict(images), held.cell_targets())
    prompts = eval_prompts(args.n)
    grid_prompts = sample_scenes(8, GRID_PROMPT_SEED).captions()
    grid_rows = []
    for which in args.models:
        pipe = load_bundled(which, args.weights / which, device=args.device)
        if "evaluator_vae_recon" not in results:
            recon = reconstruct(pipe.vae, images)
            results["evaluator_vae_recon"] = attribute_accuracy(evaluator.predict(recon), held.cell_targets())
        sweep = {}
        for g in args.guidance:
            imgs = generate(pipe, prompts, seed=0, batch_size=args.batch_size, guidance_scale=g)
            sweep[g] = evaluator.prompt_accuracy(imgs, prompts)
            print(f"{which} guidance {g}: prompt_acc {sweep[g]:.3f}", flush=True)
        best = max(sweep, key=sweep.get)
        entry = {"prompt_acc": sweep, "best_guidance": best,
                 "default_guidance": SAMPLING[which]["guidance_scale"]}
        if args.quant_check:
            den_name = "transformer" if hasattr(pipe, "transformer") else "unet"
            fp = getattr(pipe, den_name)
            for wb, ab in ((8, 8), (4, None), (4, 4)):
                setattr(pipe, den_name, rtn_fake_quant(fp, wb, ab))
                imgs = generate(pipe, prompts, seed=0, batch_size=args.batch_size, guidance_scale=best)
                entry[f"rtn_w{wb}a{ab or 16}"] = evaluator.prompt_accuracy(imgs, prompts)
                print(f"{which} RTN W{wb}A{ab or 16}: prompt_acc {entry[f'rtn_w{wb}a{ab or 16}']:.3f}", flush=True)
            setattr(pipe, den_name, fp)
        results[which] = entry
        if args.grid:
            grid_rows.append(generate(pipe, grid_prompts, seed=1, batch_size=8))
    results["grid_prompts"] = grid_prompts
    print(json.dumps(results, indent=2), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    if args.grid:
        args.grid.parent.mkdir(parents=True, exist_ok=True)
        image_grid(grid_rows).save(args.grid)


if __name__ == "__main__":
    main()
