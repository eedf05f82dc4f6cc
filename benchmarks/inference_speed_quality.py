"""Quality of the numerics inference_speed.py times: denoiser outputs of FP32, BF16, fake-quant W4A8 (int8), W4 only
and the W4A8 FP8 path (per token, per tensor, static scales) on recorded inputs of a bundled model, against FP32 and
against the fake-quant model, and with the bundled evaluator the prompt_acc of each pipeline. Also the static
activation-range fitting the timed static rows use (fit_static_ranges). Imported by inference_speed.py.
"""
from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Iterable

import torch
from torch import nn

from diffptq.algo.rtn import install_layer_codes, rtn_layer_codes
from diffptq.data.calib import collect_calibration, move_inputs
from diffptq.data.prompts import load_prompts
from diffptq.kernels import InferenceConfig, convert_for_inference
from diffptq.models import BUNDLED_MODELS, family_of, load_pipeline
from diffptq.quant.layers import quant_layers, set_quant_enabled
from diffptq.quant.quantizer import QuantSpec

W4 = QuantSpec(4)
A8 = QuantSpec(8)  # fake-quant activations: int8 symmetric, dynamic per token
# static ranges as the quantization scripts fit them (asymmetric, MSE clipping): with plain symmetric min-max
# ranges the static FP8 path lost most of bundled-dit's prompt accuracy (inference_speed_quality_bundled_dit_cpu.md)
A8_STATIC = QuantSpec(8, symmetric=False, scale_method="mse")


def psnr(x: torch.Tensor, ref: torch.Tensor) -> float:
    """PSNR (dB) of x against ref over all elements, peak = ref's range."""
    mse = float(((x.float() - ref.float()) ** 2).mean())
    peak = float(ref.max() - ref.min())
    return math.inf if mse == 0 else 10 * math.log10(peak**2 / mse)


@contextlib.contextmanager
def static_calibration(den: nn.Module):
    """Within the block, the activation quantizers of `den`'s quant layers record ranges; fitted on leaving it."""
    quantizers = [layer.act_quant for _, layer in quant_layers(den)]
    for aq in quantizers:
        aq.start_calibration()
    yield
    for aq in quantizers:
        aq.finish_calibration()


def fit_static_ranges(den: nn.Module, batches: Iterable[dict]) -> None:
    """Fit the static int8 activation ranges of `den`'s quant layers on denoiser keyword-argument batches."""
    with static_calibration(den), torch.no_grad():
        for inputs in batches:
            den(**inputs, return_dict=False)


def quality_pipelines(pipe, fam, dev: str, calib_records: list) -> tuple[dict, dict]:
    """({numerics: (pipeline, dtype)}, {act mode: GEMM used}) for the FP, BF16, fake-quant, W4-only and W4A8 rows;
    the static rows' int8 ranges are fitted on `calib_records`."""
    q = copy.deepcopy(pipe)
    den = fam.denoiser(q)
    codes = rtn_layer_codes(den, fam.block_layer_names(den), lambda _: W4)
    install_layer_codes(den, codes, A8)
    w4 = copy.deepcopy(q)
    set_quant_enabled(fam.denoiser(w4), acts=False)
    pipes = {"fp32": (pipe, torch.float32), "bf16": (copy.deepcopy(pipe).to(dtype=torch.bfloat16), torch.bfloat16),
             "fake_int8_token": (q, torch.float32), "w4_only": (w4, torch.float32)}
    kernels = {}
    for mode in ("token", "tensor"):
        speed = copy.deepcopy(q)  # convert in fp32, then cast: the fp8 codes and fp32 scales keep their dtype
        cfg = InferenceConfig(act_mode=mode, force=True)  # off an FP8 GPU the reference GEMM computes the same
        conv = convert_for_inference(fam.denoiser(speed), "w4a8", dev, cfg)
        kernels[mode] = "fp32 reference" if "forced" in conv.reason else "torch._scaled_mm"
        pipes[f"fp8_{mode}"] = (speed.to(dtype=torch.bfloat16), torch.bfloat16)
    static = copy.deepcopy(pipe)
    install_layer_codes(fam.denoiser(static), codes, A8_STATIC, "static")
    fit_static_ranges(fam.denoiser(static), (move_inputs(r.inputs, dev, torch.float32) for r in calib_records))
    pipes["fake_int8_static"] = (static, torch.float32)
    speed = copy.deepcopy(static)
    conv = convert_for_inference(fam.denoiser(speed), "w4a8", dev, InferenceConfig(act_mode="static", force=True))
    kernels["static"] = "fp32 reference" if "forced" in conv.reason else "torch._scaled_mm"
    pipes["fp8_static"] = (speed.to(dtype=torch.bfloat16), torch.bfloat16)
    return pipes, kernels


def quality(args) -> dict:
    """Denoiser outputs of FP, BF16, fake-quant W4A8 (int8), W4 only and the W4A8 FP8 path vs FP and vs fake-quant,
    on recorded calibration inputs of bundled-dit (tiny-dit when its weights are absent); with the bundled
    evaluator also prompt_acc of each pipeline (its own sampling settings)."""
    name = args.quality_model or ("bundled-dit" if BUNDLED_MODELS["bundled-dit"].is_dir() else "tiny-dit")
    dev = args.device
    pipe = load_pipeline(name, device=dev)
    fam = family_of(pipe)
    kwargs = {}
    prompts = load_prompts(n=args.quality_prompts)
    if name.startswith("bundled"):
        from diffptq.data.prompts import calibration_prompts
        from diffptq.models.bundled.specs import SAMPLING

        kwargs = {k: v for k, v in SAMPLING[name.removeprefix("bundled-")].items() if k != "num_inference_steps"}
        # the captions the model knows (as the quantization scripts calibrate): static ranges fitted on everyday
        # captions made the static rows' prompt_acc fall to 0.05-0.14
        prompts = calibration_prompts(pipe, args.quality_prompts)
    calib = collect_calibration(pipe, prompts, args.quality_steps,
                                batch_size=args.quality_prompts, progress=False, **kwargs)
    records = list(calib.records)[-args.quality_records:]
    fit = list(calib.records)  # static ranges from every recorded step (records are step-ordered: a prefix would
    # cover only the noisy early steps, and the late ones would clip: prompt_acc fell to 0.05 that way)
    channels = fam.denoiser(pipe).config.in_channels  # the noise prediction (PixArt also predicts a variance)
    pipes, kernels = quality_pipelines(pipe, fam, dev, fit)
    outs = {}
    with torch.no_grad():
        for key, (p, dtype) in pipes.items():
            den = fam.denoiser(p).eval()
            outs[key] = torch.cat([den(**move_inputs(r.inputs, dev, dtype)).sample[:, :channels].float().cpu()
                                   for r in records])
    ref, fake = outs["fp32"], outs["fake_int8_token"]
    rows = [{"numerics": k, "psnr_vs_fp_db": psnr(o, ref), "psnr_vs_fake_db": psnr(o, fake),
             "rel_err_vs_fp": float((o - ref).norm() / ref.norm())} for k, o in outs.items() if k != "fp32"]
    latents = records[0].inputs.get("hidden_states", records[0].inputs.get("sample"))  # PixArt / UNet argument
    result = {"model": name, "records": len(records), "batch": int(latents.shape[0]),
              "kernel": kernels, "rows": rows}
    if name.startswith("bundled") and args.prompt_acc:
        result["prompt_acc"] = bundled_prompt_acc(pipes, args)
    return result


def bundled_prompt_acc(pipes: dict, args) -> dict:
    """Sampled images of every pipeline with the bundled evaluator: {numerics: {prompt_acc (+ Wilson 95 % interval
    prompt_acc_lo / _hi), n_images, psnr_db (+ bootstrap 95 % interval over images psnr_lo / _hi; none where some
    image equals its reference), lpips}} (image PSNR / LPIPS against the FP32 pipeline's images; LPIPS empty
    without the AlexNet weights), or {'error': ...}."""
    from diffptq.eval.metrics.similarity import lpips_metric, lpips_score, psnr_per_image
    from diffptq.eval.stats import bootstrap_interval, wilson_interval
    from diffptq.models.bundled.evaluator import load_evaluator
    from diffptq.models.bundled.sampling import eval_prompts, prompt_acc

    try:
        evaluator = load_evaluator(args.device)
    except FileNotFoundError as err:
        return {"error": str(err)}
    prompts = eval_prompts(args.prompt_acc)
    lpips = lpips_metric()
    out, ref = {}, None
    for key, (p, _) in pipes.items():
        acc, images = prompt_acc(p, evaluator, prompts)
        ref = images if ref is None else ref  # fp32 comes first
        per_image = psnr_per_image(images, ref)
        finite = per_image[torch.isfinite(per_image)]  # identical images (the reference itself) have no PSNR
        lo, hi = wilson_interval(round(acc * len(prompts)), len(prompts))
        psnr_lo, psnr_hi = bootstrap_interval(finite) if len(finite) == len(per_image) else (None, None)
        out[key] = {"prompt_acc": acc, "prompt_acc_lo": lo, "prompt_acc_hi": hi, "n_images": len(prompts),
                    "psnr_db": float(per_image.mean()), "psnr_lo": psnr_lo, "psnr_hi": psnr_hi,
                    "lpips": None if lpips is None else lpips_score(lpips, images, ref)}
    return out
