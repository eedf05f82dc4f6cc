"""The final benchmark: the float model vs RTN / GPTQ-Sequential / Qronos at several bit widths, one row each.

For every variant (method × bits; `fp` once) the denoiser starts from a fresh copy of the float denoiser, is
quantized block by block (the sequential driver, on one calibration set collected from the float model) or loaded
from a saved checkpoint, and the pipeline generates the same prompts with the same per-image seeds. Each row holds
image metrics vs the FP images (diffptq.eval.metrics), per-image latency and peak VRAM (CUDA only: empty on CPU),
the in-memory size of the denoiser's weights, the calibration time and the throughput of the whole generation
(images_per_s: all processes together when sharded). Tables and figures: benchmark_report; with save_images the
images themselves (diffptq.eval.image_store), to compare runs on different numbers of processes. Peer quantizers
(`peers`: diffptq.peers, run by benchmark_peers) add one row each after ours, on the same calibration set, prompts
and seeds; one that cannot run keeps empty metrics and its reason in `note`.
"""
from __future__ import annotations

import copy
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from diffptq.config import CalibConfig, SequentialConfig
from diffptq.data.prompts import evaluation_prompts
from diffptq.eval.hardware import checkpoint_bytes, measure_latency, measure_peak_vram, module_bytes
from diffptq.eval.image_store import save_images
from diffptq.eval.metrics import MetricOptions
from diffptq.eval.metrics.common import as_uint8
from diffptq.eval.sample import generate, image_seeds
from diffptq.models import family_of, load_pipeline
from diffptq.models.schedulers import check_steps, set_scheduler
from diffptq.quant.layers import quant_layers
from diffptq.run.benchmark_checkpoints import VariantCheckpoint, index_checkpoints, load_into, save_variant
from diffptq.run.benchmark_peers import failure_note, is_peer, peer_variant_bits, prepare_peer
from diffptq.run.benchmark_report import (
    ALL_COLUMNS,
    COLUMNS,
    EXTRA_COLUMNS,
    RECIPE_NOTE_FIELDS,
    metric_passes,
    recipe_note,
    score,
)
from diffptq.run.shared_calib import SharedCalibration, swapped_denoiser

__all__ = ["ALL_COLUMNS", "COLUMNS", "EXTRA_COLUMNS", "BenchmarkConfig", "BenchmarkResult", "SharedCalibration",
           "Variant", "denoiser_size_bytes", "rotation_of", "run_benchmark", "swapped_denoiser", "variants"]
log = logging.getLogger("diffptq.benchmark")

GIB = 2**30
METHODS = ("fp", "rtn", "gptq", "qronos")
DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@dataclass(frozen=True)
class Variant:
    """One row: `method` (fp | rtn | gptq | qronos, or a peer name such as 'modelopt:int8_sq') at wbits/abits
    (None for fp; abits 16 = float activations)."""

    method: str
    wbits: int | None = None
    abits: int | None = None

    @property
    def bits_name(self) -> str:
        return "" if self.method == "fp" else f"w{self.wbits}a{self.abits}"

    @property
    def label(self) -> str:
        return self.method if self.method == "fp" else f"{self.method} {self.bits_name}"

    @property
    def file_stem(self) -> str:
        """'fp' or '<method>_w<W>a<A>' (a peer's ':' as '-'): the name of the variant's checkpoint and image files."""
        return self.method if self.method == "fp" else f"{self.method.replace(':', '-')}_{self.bits_name}"


def variants(methods: Sequence[str], bits: Sequence[tuple[int, int]], peers: Sequence[str] = ()) -> list[Variant]:
    """fp first (once, if listed), then for each bit setting every quantization method in the given order, then each
    peer configuration at its own bits."""
    out = [Variant("fp")] if "fp" in methods else []
    return out + [Variant(m, w, a) for w, a in bits for m in methods if m != "fp"] + [
        Variant(*fields) for fields in peer_variant_bits(peers)]


@dataclass
class BenchmarkConfig:
    """One benchmark run: n_images prompts (from `prompts_file`, else evaluation_prompts), image i with seed
    `seed + i` in every variant. guidance_scale None: the model's own (family.call_kwargs). checkpoints: a folder of
    saved checkpoints to evaluate instead of quantizing (variants without one are quantized); save_checkpoints: write
    `<out_dir>/checkpoints/<method>_w<W>a<A>.safetensors`. latency_repeats: timed pipeline calls (CUDA only).
    save_images: write each variant's uint8 images with prompts and seeds to `<out_dir>/images/<file_stem>.safetensors`.
    """

    model: str
    variants: list[Variant]
    n_images: int = 64
    prompts_file: str | None = None
    seed: int = 0
    num_inference_steps: int = 20
    scheduler: str = "default"
    guidance_scale: float | None = None
    batch_size: int = 8
    quant: SequentialConfig = field(default_factory=SequentialConfig)  # method, bits and blocks set per variant
    blocks: str = "all"
    calib: CalibConfig = field(default_factory=CalibConfig)
    checkpoints: str | None = None
    save_checkpoints: bool = False
    save_images: bool = False
    latency_repeats: int = 3
    grid_columns: int = 8
    progress: bool = True


@dataclass
class BenchmarkResult:
    """rows: one dict per variant (ALL_COLUMNS and `label`); grid: each row's first images (uint8 (C,3,H,W)), None for
    a row without images (a peer that could not run); prompts: the evaluation prompts (the grid's first C)."""

    rows: list[dict[str, Any]]
    grid: list[torch.Tensor | None]
    prompts: list[str]


def run_benchmark(cfg: BenchmarkConfig, out_dir: Path, device: torch.device, dtype: torch.dtype,
                  metric_options: MetricOptions, accelerator: Any = None) -> BenchmarkResult:
    """Evaluate every variant of `cfg` (see the module docstring).

    Two phases: every process makes (its share of) every variant's images; then the process group is released and
    the main process scores them (torchmetrics would otherwise sync its states with processes that are not
    scoring). Images are kept as 8-bit between the phases (what a PNG holds), and all metrics see those.
    Returns the rows on the main process, an empty result elsewhere.
    """
    main = accelerator is None or getattr(accelerator, "is_main_process", True)
    pipe = load_pipeline(cfg.model, dtype=dtype, device=device)
    set_scheduler(pipe, cfg.scheduler)
    for steps, flag in ((cfg.num_inference_steps, "--num_inference_steps"), (cfg.calib.calib_steps, "--calib_steps")):
        check_steps(pipe, steps, f"{flag} {steps}")
    prompts = evaluation_prompts(pipe, cfg.n_images, cfg.prompts_file)
    made = list(_make_all(pipe, prompts, cfg, out_dir, device, dtype, accelerator, main))
    if accelerator is not None and getattr(accelerator, "num_processes", 1) > 1:
        accelerator.wait_for_everyone()
        accelerator.destroy_process_group()
    if not main:
        return BenchmarkResult([], [], prompts)
    if cfg.save_images:
        seeds = image_seeds(len(prompts), cfg.seed)
        for variant, images, fields in made:
            if images is None:
                continue
            info = {k: fields[k] for k in ("label", "method", "wbits", "abits", "model", "dtype", "num_processes")}
            save_images(out_dir / "images" / f"{variant.file_stem}.safetensors", images, prompts, seeds,
                        {**info, "num_inference_steps": cfg.num_inference_steps, "scheduler": cfg.scheduler})
    passes = metric_passes(metric_options)
    fp_images = next(images for variant, images, _ in made if variant.method == "fp")
    rows, grid = [], []
    for variant, images, fields in made:
        if variant in cfg.variants and images is None:  # a peer that could not run: empty metrics, its note
            rows.append(fields)
            grid.append(None)
        elif variant in cfg.variants:
            rows.append({**fields, **score(passes, images, fp_images, prompts, variant.label, cfg.progress)})
            grid.append(images[:cfg.grid_columns])
    return BenchmarkResult(rows, grid, prompts)


def _make_all(pipe, prompts: list[str], cfg: BenchmarkConfig, out_dir: Path, device: torch.device,
              dtype: torch.dtype, accelerator: Any, main: bool) -> Iterator[tuple[Variant, torch.Tensor | None, dict]]:
    """For fp (always: the reference) and every variant: (variant, uint8 images (N,3,H,W), row fields but metrics).
    Processes other than the main one yield no images; a peer that could not run yields None and its note."""
    family = family_of(pipe)
    fp_cpu = copy.deepcopy(family.denoiser(pipe)).to("cpu")  # the pristine float weights every variant starts from
    ckpts = index_checkpoints(cfg.checkpoints, fp_cpu, family.name) if cfg.checkpoints else {}
    calib = SharedCalibration(pipe, cfg.calib, cfg.progress and main)
    world = int(getattr(accelerator, "num_processes", 1)) if accelerator is not None else 1
    wanted = cfg.variants if Variant("fp") in cfg.variants else [Variant("fp"), *cfg.variants]
    for variant in wanted:
        if variant.method == "fp":
            denoiser, info = family.denoiser(pipe), {"source": "fp"}
        else:
            family.denoiser(pipe).to("cpu")  # the float weights leave the GPU: VRAM is measured per variant
            if is_peer(variant.method):
                denoiser, info = prepare_peer(fp_cpu, variant.method, calib, device, dtype)
            else:
                denoiser, info = prepare_variant(pipe, fp_cpu, variant, cfg, calib, ckpts, out_dir, device, dtype,
                                                 main)
        images, measured = None, {"n_images": 0}
        if denoiser is not None:
            try:
                images, measured = _measure(pipe, denoiser, variant, cfg, prompts, device, accelerator, main)
            except Exception as err:
                if not is_peer(variant.method):
                    raise
                info["note"] = failure_note(err, "generation")  # a peer's model that cannot run here: its note
                log.warning("%s: %s", variant.method, info["note"])
        if variant.method != "fp":
            del denoiser
            family.denoiser(pipe).to(device)
            if device.type == "cuda":
                torch.cuda.empty_cache()
        if variant.method != "fp" and not is_peer(variant.method):
            info.setdefault("note", recipe_note(_recipe_settings(cfg.quant)))
        fields = {"method": variant.method, "label": variant.label, "dtype": DTYPE_NAMES[dtype],
                  "wbits": variant.wbits, "abits": variant.abits, "model": cfg.model, "calib_time_s": None,
                  "num_processes": world, **measured, **info}
        yield variant, None if images is None else as_uint8(images) if main else images[:0], fields


def _recipe_settings(quant: SequentialConfig) -> dict[str, Any]:
    """The recipe settings recipe_note reads, from the run's SequentialConfig (under benchmark_final's flag names:
    the config's own field names, but for the weight grid's group size)."""
    settings = {name: getattr(quant, name) for name, _ in RECIPE_NOTE_FIELDS if name != "group_size"}
    return {**settings, "group_size": quant.weight.group_size}


def _measure(pipe, denoiser: nn.Module, variant: Variant, cfg: BenchmarkConfig, prompts: list[str],
             device: torch.device, accelerator: Any, main: bool) -> tuple[torch.Tensor, dict[str, Any]]:
    """With `denoiser` in the pipeline: every prompt's images (8-bit values) and the row's measurements (n_images,
    latency_s, peak_vram_gb, denoiser_latency_s, model_size_gb, rotate, images_per_s)."""
    seeds = image_seeds(len(prompts), cfg.seed)
    n_time = min(cfg.batch_size, len(prompts))
    make_all = partial(_generate, pipe, cfg, prompts, seeds, cfg.progress and main, accelerator,
                       f"generate {variant.label}", uint8=True)  # 8-bit before the gather: what is kept
    make_batch = partial(_generate, pipe, cfg, prompts[:n_time], seeds[:n_time], False)
    with swapped_denoiser(pipe, denoiser):
        _generate(pipe, cfg, prompts[:1], seeds[:1], False)  # warm-up, every process: one-off start-up costs
        (images, seconds), peak = _measured(partial(_timed, make_all, device, accelerator), device)
        latency = measure_latency(make_batch, images_per_call=n_time, repeats=cfg.latency_repeats, device=device)
        return images, {"n_images": len(images), "latency_s": latency,
                        "peak_vram_gb": None if peak is None else peak / GIB,
                        "denoiser_latency_s": denoiser_latency(pipe, cfg, prompts[:n_time], device),
                        "model_size_gb": denoiser_size_bytes(denoiser) / GIB, "rotate": rotation_of(denoiser),
                        "images_per_s": len(images) / seconds}


# ---- one variant --------------------------------------------------------------------------------------------------
def variant_config(cfg: BenchmarkConfig, variant: Variant, n_blocks: int) -> SequentialConfig:
    """The sequential driver's config of one variant: the benchmark's settings at the variant's method and bits."""
    from diffptq.run.quantize import parse_blocks

    blocks = parse_blocks(cfg.blocks, n_blocks)
    return replace(cfg.quant.with_bits(variant.wbits, variant.abits), method=variant.method, blocks=blocks)


def quantize_variant(denoiser: nn.Module, pipe, seq_cfg: SequentialConfig, calib: SharedCalibration,
                     device: torch.device, dtype: torch.dtype, progress: bool = True) -> float:
    """Quantize `denoiser` (a float copy, on `device`, in place in `pipe`) with the sequential driver; returns
    calib_time_s, the driver's wall time (the shared calibration set's collection excluded)."""
    from diffptq.algo.driver import SequentialQuantizer

    calib_set = calib.get()
    t0 = time.perf_counter()
    SequentialQuantizer(denoiser, family_of(pipe), calib_set, seq_cfg, device, dtype, progress=progress).run()
    return time.perf_counter() - t0


def prepare_variant(pipe, fp_cpu: nn.Module, variant: Variant, cfg: BenchmarkConfig, calib: SharedCalibration,
                    ckpts: dict[tuple, VariantCheckpoint], out_dir: Path, device: torch.device, dtype: torch.dtype,
                    main: bool = True) -> tuple[nn.Module, dict[str, Any]]:
    """A fresh copy of the float denoiser on `device`, loaded or quantized for `variant`; and its row fields.
    main: this is the main process, which writes the checkpoint (cfg.save_checkpoints) and shows progress."""
    denoiser = copy.deepcopy(fp_cpu).to(device)
    found = ckpts.get((variant.method, variant.wbits, variant.abits))
    if found is not None:
        load_into(denoiser, found, family_of(pipe).name)
        return denoiser, {"calib_time_s": found.meta["quant"].get("calib_time_s"), "source": found.path.name,
                          "checkpoint_gb": checkpoint_bytes(found.path) / GIB}
    if cfg.checkpoints:
        log.info("no checkpoint for %s in %s: quantizing", variant.label, cfg.checkpoints)
    seq_cfg = variant_config(cfg, variant, len(family_of(pipe).blocks(denoiser)))
    with swapped_denoiser(pipe, denoiser):
        calib_s = quantize_variant(denoiser, pipe, seq_cfg, calib, device, dtype, cfg.progress and main)
    info: dict[str, Any] = {"calib_time_s": calib_s, "source": "quantized", "checkpoint_gb": None}
    if cfg.save_checkpoints:
        path = out_dir / "checkpoints" / f"{variant.file_stem}.safetensors"
        if main:
            save_variant(path, denoiser, pipe, cfg.model, seq_cfg, cfg.calib, calib_s)
            info["checkpoint_gb"] = checkpoint_bytes(path) / GIB
    for _, layer in quant_layers(denoiser):  # as a loaded checkpoint: same outputs, no float copy of the weights
        if layer.is_quantized:
            layer.drop_float_weight()
    return denoiser, info


# ---- measurements -------------------------------------------------------------------------------------------------
def rotation_of(denoiser: nn.Module) -> str | None:
    """The `rotate` column: the rotation kind of the quantized layers (e.g. 'hadamard', with '+conv' when Conv2d
    inputs are rotated too, '+keepK' when leading PCA components are kept at 8 bits (K: the largest per layer, after
    clamping to its width), as quantize_pipeline names it), None when no layer rotates its input. Read off the
    layers, so a variant loaded from a checkpoint reports what the file holds."""
    rotated = [layer for _, layer in quant_layers(denoiser) if layer.rotation is not None]
    if not rotated:
        return None
    kinds = "/".join(sorted({layer.rotation.kind for layer in rotated}))
    keep = max(getattr(layer.act_quant, "keep", 0) for layer in rotated)
    return (kinds + ("+conv" if any(isinstance(layer, nn.Conv2d) for layer in rotated) else "")
            + (f"+keep{keep}" if keep else ""))


def denoiser_size_bytes(denoiser: nn.Module) -> int:
    """Bytes of the denoiser's weights in memory as deployed.

    Counted: every parameter/buffer at its stored dtype (float parts, biases, scales, zeros, activation quantizer
    state); for each quantized layer its integer codes at their packed size (bits <= 4: two codes per byte, else one
    byte per code: the checkpoint's format). Not counted (marked through the `_size_exclude` convention of
    diffptq.eval.hardware): a quantized layer's float `weight` and its dequantized cache `weight_q`, and the unpacked
    one-byte-per-code `weight_codes` kept in memory (replaced by the packed size).
    """
    packed = 0
    for _, layer in quant_layers(denoiser):
        if layer.is_quantized:
            layer._size_exclude = ("weight", "weight_q", "weight_codes")
            n = layer.weight_codes.numel()
            packed += (n + 1) // 2 if layer.weight_spec.bits <= 4 else n
    return module_bytes(denoiser) + packed


class _Captured(Exception):
    pass


def denoiser_latency(pipe, cfg: BenchmarkConfig, prompts: Sequence[str], device: torch.device) -> float | None:
    """Seconds per image spent in the denoiser: median of one forward on a captured CFG batch × steps / images.
    None off CUDA (nothing is run)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    denoiser, captured = family_of(pipe).denoiser(pipe), {}

    def grab(module, args, kwargs):
        captured.update(args=args, kwargs=kwargs)
        raise _Captured  # one call's inputs are enough: stop the pipeline

    handle = denoiser.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        _generate(pipe, cfg, prompts, image_seeds(len(prompts), cfg.seed), progress=False)
    except _Captured:
        pass
    finally:
        handle.remove()
    with torch.no_grad():
        per_call = measure_latency(lambda: denoiser(*captured["args"], **captured["kwargs"]),
                                   repeats=cfg.latency_repeats, device=device)
    return None if per_call is None else per_call * cfg.num_inference_steps / len(prompts)


def _generate(pipe, cfg: BenchmarkConfig, prompts: Sequence[str], seeds: Sequence[int], progress: bool,
              accelerator: Any = None, desc: str = "generate", uint8: bool = False) -> torch.Tensor:
    return generate(pipe, prompts, seeds, cfg.batch_size, cfg.num_inference_steps, cfg.guidance_scale,
                    accelerator=accelerator, progress=progress, desc=desc, uint8=uint8)


def _timed(fn, device: torch.device, accelerator: Any = None) -> tuple[Any, float]:
    """(fn(), wall seconds). Sharded: all processes start together (a barrier first) and fn's gather ends it, so the
    main process's seconds span the whole generation. CUDA work is synchronised on both ends."""
    if accelerator is not None and getattr(accelerator, "num_processes", 1) > 1:
        accelerator.wait_for_everyone()
    _synchronize(device)
    t0 = time.perf_counter()
    out = fn()
    _synchronize(device)
    return out, time.perf_counter() - t0


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda" and torch.cuda.is_available():
        torch.cuda.synchronize(device)


def _measured(fn, device: torch.device) -> tuple[Any, int | None]:
    """(fn(), peak VRAM bytes while it ran); the peak is None off CUDA (fn then runs unmeasured)."""
    out: list[Any] = []
    peak = measure_peak_vram(lambda: out.append(fn()), device)
    return (out[0], peak) if out else (fn(), None)
