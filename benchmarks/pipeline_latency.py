"""End-to-end pipeline latency per image (issue #22, item 6): text encoder + `--steps` denoiser steps with CFG 4.5 +
VAE decode, quantized denoisers against BF16 + torch.compile, at batch 1 and 4 (prompts per call).

Models: full-size random-weight PixArt-XL-2-512 and SD 1.5 pipelines (diffptq.models.fullsize) at 512 px, by default
(`--components full`) with the real-size text encoders (T5 v1.1 XXL encoder / CLIP ViT-L text) and the SD VAE, random
as well; `--components standin` keeps the one-layer stand-in text encoder and small VAE of `fullsize-pixart` /
`fullsize-sd`, whose cost is not representative. Rows (`--variants`): BF16 eager, BF16 + compile, the W4A8 speed path
+ compile (RTN W4 per-channel weights as e4m3, FP8 per-token activations) and the W4 memory path + compile (packed
int4, groups of 128, 64 where 128 does not divide). The denoisers are built as inference_speed.py builds them (its
FamilyRun: the same RTN codes and conversions); any of its variants may be named too (e.g. `w4a8s_compile`, static
FP8 scales, calibrated here on one pipeline call at batch 2), and the CUDA-graph rows (`bf16_graphs`, `w4a8_graphs`,
`w4_graphs`: the eager denoiser in diffptq.kernels.GraphedDenoiser, one graph per denoiser batch, captured in the
first call; `*_compile_graphs` need `--compile_mode default`, as reduce-overhead records graphs itself).

Each row times the whole call `pipe(prompt=..., num_inference_steps=--steps, output_type="pt")` (the VAE decodes;
the same prompts and per-image generator seeds in every row). The first call is reported apart (it compiles); then
`--warmup` untimed calls; then `--repeats` calls timed by the wall clock with the GPU synchronized around each:
median seconds per call and per image. Inside those calls CUDA events time each denoiser call, the text encoder calls
and the VAE decode (diffptq.eval.hardware.CallTimer): the denoiser's share, and what the text encoder, the VAE and the
rest (scheduler, guidance, pre/post-processing) cost. Peak VRAM: one more call, every component resident. Speed-up:
BF16 + compile's median at the same batch over the row's, rows of one process under one compile mode.

Compilation: only the denoiser, whole (its forward), unless `--compile_all` (also the text encoder's forward and the
VAE's decode); `--compile_mode reduce-overhead` (default: CUDA graphs, every compiled call a new graph step) or
`default`. Text encoder and VAE run in the row's dtype. On the CPU (`--device cpu`: smoke tests, `--tiny` for
tiny-dit / tiny-unet) compiled rows run eagerly.

Robustness as inference_speed.py: every (variant, batch) in its own try (failures recorded with the reason),
results.json rewritten after every row, `--budget_s` (from process start) skips what would not fit. Order: family by
family, variant by variant (built once), batches in the order given; each compiled batch costs a compilation.

  python benchmarks/pipeline_latency.py --out results/pipeline_latency \\
      --report benchmarks/results/pipeline_latency_pixart_sd_<card>.md     (naming: benchmarks/README.md)
  python benchmarks/pipeline_latency.py --render results/pipeline_latency --report x.md     (markdown from the JSON)
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from diffptq.cli.common import git_commit
from diffptq.data.prompts import load_prompts
from diffptq.eval.hardware import CallTimer, measure_peak_vram, wall_seconds
from diffptq.models import load_pipeline
from diffptq.models.families import FAMILIES
from diffptq.models.fullsize import COMPONENTS, FULLSIZE_SAMPLING, build_fullsize_pipeline

sys.path.append(str(Path(__file__).resolve().parent))  # the modules beside this file, however it is loaded
from inference_speed import (  # noqa: E402
    TITLES,
    FamilyRun,
    add_graph_stats,
    compile_settings,
    error_text,
    free_memory,
    inductor_settings,
    measure_variant,
    process_age_s,
    publish,
    skip_reason,
    uses_cuda_graphs,
)
from inference_speed_quality import static_calibration  # noqa: E402
from inference_speed_report import GRAPH_REFERENCE, VARIANTS, Variant, versions  # noqa: E402
from pipeline_latency_report import REFERENCE, render  # noqa: E402

GiB = 2**30
PIPELINE_VARIANTS = {"bf16": Variant("bf16", "BF16 eager", torch.bfloat16, False, "float"), **VARIANTS}
DEFAULT_VARIANTS = "bf16,bf16_compile,w4a8_compile,w4_compile"
TINY = {"pixart": "tiny-dit", "sd": "tiny-unet"}
COMPILE_MODES = ("reduce-overhead", "default", "max-autotune-no-cudagraphs", "max-autotune")
PARTS = ("denoiser", "text_encoder", "vae_decode")


def build_pipeline(family: str, args):
    """The family's pipeline in BF16 on args.device, in eval mode: full size (args.components), or tiny (args.tiny)."""
    if args.tiny:
        pipe = load_pipeline(TINY[family], dtype=torch.bfloat16, device=args.device)
    else:
        pipe = build_fullsize_pipeline(f"fullsize-{family}", torch.bfloat16, args.device, num_layers=args.num_layers,
                                       components=args.components)
    for m in pipe.components.values():
        if isinstance(m, nn.Module):
            m.eval().requires_grad_(False)
    return pipe


def compile_method(module: nn.Module, method: str, mode: str) -> None:
    """module.<method> = torch.compile(module.<method>), on the instance (undone by `delattr`). Under CUDA graphs
    every call starts a new graph step: the pipeline has consumed the previous call's output by then."""
    compiled = torch.compile(getattr(module, method), mode=mode)
    graphs = uses_cuda_graphs(mode)

    @functools.wraps(compiled)
    def call(*args, **kwargs):
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()
        return compiled(*args, **kwargs)

    setattr(module, method, call)


class PipelineRun(FamilyRun):
    """inference_speed's FamilyRun (RTN codes, variant builds, sizes) whose rows time whole pipeline calls."""

    def __init__(self, name: str, args, tmp: Path):
        self.pipe = build_pipeline(name, args)
        family = FAMILIES[name]
        den = family.denoiser(self.pipe)
        self.call_kwargs = {**family.call_kwargs(self.pipe), **FULLSIZE_SAMPLING,
                            "num_inference_steps": args.steps, "output_type": "pt"}
        info = describe(self.pipe, den, "tiny" if args.tiny else args.components)
        super().__init__(name, args, tmp, denoiser=den)
        setattr(self.pipe, family.denoiser_attr, None)  # each row puts in its own
        self.result.update(pipeline=info, title=f"{TINY[name]} (CPU smoke model)" if args.tiny else TITLES[name])

    def compile_scope(self) -> str:
        return "full"

    def compile(self, den: nn.Module) -> None:
        compile_method(den, "forward", self.args.compile_mode)  # whole, with the timers outside the graph

    @contextlib.contextmanager
    def attached(self, den: nn.Module, dtype: torch.dtype, compiled: bool = False):
        """The pipeline with `den` as its denoiser, text encoder and VAE in `dtype`, and with `compiled` and
        --compile_all on CUDA those two compiled (undone on leaving)."""
        pipe, attr = self.pipe, self.family.denoiser_attr
        others = [(pipe.text_encoder, "forward"), (pipe.vae, "decode")]
        for module, _ in others:
            if module.dtype != dtype:
                module.to(dtype=dtype)
        also = compiled and self.args.compile_all and torch.device(self.dev).type == "cuda"
        for module, method in others if also else ():
            compile_method(module, method, self.args.compile_mode)
        setattr(pipe, attr, den)
        try:
            yield pipe
        finally:
            setattr(pipe, attr, None)
            for module, method in others if also else ():
                delattr(module, method)

    def generate(self, batch: int):
        """The timed call: the first `batch` everyday captions, one generator per image seeded --seed + i."""
        prompts = load_prompts(n=batch)

        def call():
            generators = [torch.Generator().manual_seed(self.args.seed + i) for i in range(batch)]
            return self.pipe(prompt=prompts, generator=generators, **self.call_kwargs)

        return call

    def calibrate_static(self, den: nn.Module, dtype: torch.dtype) -> None:
        """Static activation ranges from one pipeline call at batch 2: the denoiser's real inputs at every step."""
        with static_calibration(den), self.attached(den, dtype):
            self.generate(2)()

    def measure(self, v: Variant, den: nn.Module, batch: int) -> dict:
        """One row: the whole pipeline call at `batch` prompts (first call, medians, parts), resident and peak VRAM."""
        dev, call = self.dev, self.generate(batch)
        row = {"variant": v.key, "label": v.label, "batch": batch, "dtype": str(v.dtype).replace("torch.", "")}
        with self.attached(den, v.dtype, v.compiled) as pipe, contextlib.ExitStack() as stack:
            methods = {"denoiser": (den, "forward"), "text_encoder": (pipe.text_encoder, "forward"),
                       "vae_decode": (pipe.vae, "decode")}
            timers = {part: stack.enter_context(CallTimer(m, name, dev)) for part, (m, name) in methods.items()}
            row["first_call_s"] = wall_seconds(call, dev)  # compilation included for compiled rows
            for _ in range(self.args.warmup):
                call()
            for timer in timers.values():
                timer.seconds()  # forget the untimed calls
            calls = []
            for _ in range(self.args.repeats):
                total = wall_seconds(call, dev)
                spans = {part: timer.seconds() for part, timer in timers.items()}
                calls.append({"total_s": total, "denoiser_calls": len(spans["denoiser"]),
                              **{f"{part}_s": sum(s) for part, s in spans.items()}})
            row.update(summarize(calls, batch))
            cuda = torch.device(dev).type == "cuda" and torch.cuda.is_available()
            row["resident_gib"] = torch.cuda.memory_allocated(dev) / GiB if cuda else None
            peak = measure_peak_vram(call, dev)
            row["peak_vram_gib"] = None if peak is None else peak / GiB
        return add_graph_stats(row, den)


def describe(pipe, den: nn.Module, components: str) -> dict:
    """What the pipeline is made of: parameters per component, resolution, scheduler."""
    def named(m: nn.Module) -> str:
        return f"{type(m).__name__}, {sum(p.numel() for p in m.parameters()) / 1e6:.4g}M params"

    return {"components": components, "resolution_px": den.config.sample_size * pipe.vae_scale_factor,
            "text_encoder": named(pipe.text_encoder), "vae": named(pipe.vae), "denoiser": named(den),
            "scheduler": type(pipe.scheduler).__name__}


def summarize(calls: list[dict], batch: int) -> dict:
    """Medians over the timed calls: seconds per call and per image, per part, the rest, the denoiser's share."""
    def median(key) -> float:
        return statistics.median(key(c) if callable(key) else c[key] for c in calls)

    total = median("total_s")
    parts = {f"{p}_s": median(f"{p}_s") for p in PARTS}
    other = median(lambda c: c["total_s"] - sum(c[f"{p}_s"] for p in PARTS))
    return {"median_s": total, "per_image_s": total / batch, "times_s": [c["total_s"] for c in calls], **parts,
            "other_s": other, "denoiser_share": parts["denoiser_s"] / total,
            "denoiser_calls": calls[0]["denoiser_calls"]}


def add_speedups(rows: list[dict]) -> None:
    """speedup_vs_bf16_compile of every measured row: the reference's median at the same batch over the row's, and
    denoiser_speedup: the same for the denoiser's time alone. The reference of a CUDA-graph row (`*_graphs`) is
    BF16 + compile + CUDA graphs where the run has it (like for like), else BF16 + compile; `speedup_ref` names it.
    pooled_speedup: the whole call with the parts every row shares (the same text encoder, VAE and scheduler) taken
    at their median over the batch's rows, so that their run-to-run spread does not pass for a denoiser's effect."""
    measured = {(r["variant"], r["batch"]): r for r in rows if r.get("median_s")}
    shared = {}
    for batch in {b for _, b in measured}:
        parts = [r["median_s"] - r["denoiser_s"] for (_, b), r in measured.items()
                 if b == batch and r.get("denoiser_s") is not None]
        shared[batch] = statistics.median(parts) if parts else None
    for r in rows:
        if not r.get("median_s"):
            continue
        names = [GRAPH_REFERENCE, REFERENCE] if r["variant"].endswith("_graphs") else [REFERENCE]
        ref = next((measured[(n, r["batch"])] for n in names if (n, r["batch"]) in measured), None)
        r["speedup_ref"] = ref and ref["variant"]
        r["speedup_vs_bf16_compile"] = ref and ref["median_s"] / r["median_s"]
        den, ref_den = r.get("denoiser_s"), ref and ref.get("denoiser_s")
        r["denoiser_speedup"] = ref_den and den and ref_den / den
        pooled = shared[r["batch"]]
        r["pooled_speedup"] = (ref_den + pooled) / (den + pooled) if ref_den and den and pooled is not None else None


def run_family(name: str, args, tmp: Path, results: dict, save, deadline: float) -> None:
    """Every variant of one family at every batch, into results[name]."""
    run = PipelineRun(name, args, tmp)
    results[name] = run.result
    save()
    batches = [int(b) for b in args.batches.split(",")]
    for key in args.variants.split(","):
        v = PIPELINE_VARIANTS[key]
        skip = skip_reason(v, args, deadline, run.compile_est)
        if skip:
            run.result["rows"] += [{"variant": key, "label": v.label, "batch": b, "skipped": skip} for b in batches]
            save()
            continue
        with inductor_settings(v):
            measure_variant(run, v, batches, deadline, save)
        free_memory()


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--families", default="pixart,sd", help="comma list of pixart, sd")
    p.add_argument("--batches", default="1,4", help="prompts per pipeline call, measured in this order")
    p.add_argument("--variants", default=DEFAULT_VARIANTS,
                   help=f"comma list, measured in this order ({REFERENCE} is the reference of the speed-ups, "
                   f"{GRAPH_REFERENCE} that of the *_graphs rows where measured); "
                        "known: " + ", ".join(PIPELINE_VARIANTS))
    p.add_argument("--steps", type=int, default=20, help="denoiser steps per image (CFG 4.5: each at twice the batch)")
    p.add_argument("--components", default="full", choices=COMPONENTS,
                   help="text encoder and VAE: real-size random ones (full) or fullsize-*'s small stand-ins")
    p.add_argument("--tiny", action="store_true", help="tiny-dit / tiny-unet instead (CPU smoke runs)")
    p.add_argument("--num_layers", type=int, default=None, help="shorten PixArt (smoke runs)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--compile_mode", default="reduce-overhead", choices=COMPILE_MODES)
    p.add_argument("--compile_all", action="store_true", help="compile the text encoder and the VAE decode too")
    p.add_argument("--act_mode", default="token", choices=["token", "tensor"], help="W4A8 activation scales")
    p.add_argument("--others", default="dequant", choices=["dequant", "w4", "fake"],
                   help="W4A8: what layers the FP8 GEMM cannot take (the UNet's convolutions) become")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls after the first one")
    p.add_argument("--repeats", type=int, default=5, help="timed calls")
    p.add_argument("--seed", type=int, default=0, help="image i of a call uses generator seed + i")
    p.add_argument("--budget_s", type=float, default=1800.0, help="start no row that would not finish by then")
    p.add_argument("--out", default="results/pipeline_latency", help="folder for results.json and report.md")
    p.add_argument("--report", default=None, help="also write the markdown report here")
    p.add_argument("--render", default=None, help="only re-render the markdown from this folder's results.json")
    args = p.parse_args()
    if args.render:
        return args
    families = args.families.split(",")
    if not families or not set(families) <= set(FAMILIES):
        p.error(f"--families {args.families!r}: a comma list of {', '.join(FAMILIES)}")
    unknown = [v for v in args.variants.split(",") if v not in PIPELINE_VARIANTS]
    if unknown:
        p.error(f"unknown --variants {', '.join(unknown)}; known: {', '.join(PIPELINE_VARIANTS)}")
    if not all(b.strip().isdigit() and int(b) > 0 for b in args.batches.split(",")):
        p.error(f"--batches {args.batches!r}: a comma list of positive integers")
    if args.steps < 2:  # at 1 step PixArtAlphaPipeline expects a one-step (DMD) scheduler's output
        p.error(f"--steps {args.steps}: at least 2")
    if args.repeats < 1 or args.warmup < 0:
        p.error("--repeats must be at least 1, --warmup at least 0")
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device {args.device}: CUDA is not available here (smoke runs: --device cpu --tiny)")
    return args


def main() -> None:
    args = parse_args()
    if args.render:
        publish(render(json.loads((Path(args.render) / "results.json").read_text())), args.report)
        return
    start = time.monotonic() - (process_age_s() if __name__ == "__main__" else 0.0)  # as inference_speed.py
    compile_settings()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = {k: getattr(args, k) for k in ("families", "batches", "variants", "steps", "components", "tiny",
                                              "num_layers", "device", "compile_mode", "compile_all", "act_mode",
                                              "others", "warmup", "repeats", "seed", "budget_s")}
    res = {"meta": {**versions(args.device), **settings, "guidance_scale": FULLSIZE_SAMPLING["guidance_scale"],
                    "command": "python " + shlex.join(sys.argv), "commit": git_commit() or "unknown"}, "families": {}}

    def save():
        res["meta"]["wall_s"] = time.monotonic() - start
        for fam in res["families"].values():
            add_speedups(fam["rows"])
        (out / "results.json").write_text(json.dumps(res, indent=1, default=str))

    gc.freeze()  # what is alive now (the imported libraries: ~0.5M objects) is no garbage: keep it out of the
    # gc.collect() between variants (0.6 s each on a small CPU; what the rows allocate is still collected)
    try:
        with tempfile.TemporaryDirectory(prefix="diffptq_pipeline_") as tmp:
            for name in args.families.split(","):
                try:
                    run_family(name, args, Path(tmp), res["families"], save, start + args.budget_s)
                except Exception as err:  # noqa: BLE001 - e.g. out of memory building the pipeline: keep what exists
                    fam = res["families"].setdefault(name, {"family": name, "title": TITLES[name], "rows": []})
                    fam["error"] = error_text(err)
                save()
                free_memory()
    finally:
        gc.unfreeze()
    publish(render(res), out / "report.md", args.report)


if __name__ == "__main__":
    main()
