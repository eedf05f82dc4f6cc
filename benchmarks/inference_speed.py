"""Real low-bit inference on the GPU: step latency, peak VRAM and size of the quantized paths at full scale.

Full-size random-weight PixArt-XL-2-512 and SD 1.5 UNet (diffptq.models.fullsize), 512 px, batches 16, 1 and 4.
Rows: FP16 eager, BF16 + torch.compile, fake-quant W4A8 (int8 per-token activations, eager), the W4A8 speed path
(FP8 GEMMs, eager and compiled; also with static per-tensor activation scales; for PixArt at the headline batch also
compiled with the Triton per-token quantization kernel, and with inductor's coordinate-descent tuning), the W4
memory path (packed int4, eager and compiled), torchao FP8 dynamic row-wise + compile as the peer. PixArt at the
headline batch also: BF16, torchao and static W4A8 under coordinate-descent tuning (goal rows compare compiled rows
under the same tuning only), static W4A8 with the stock tanh GELU and BF16 with the sigmoid-form one (what that
rewrite gives; the real paths use it by default). Weights: RTN W4
of every block layer (per channel for W4A8 and fake-quant; groups of 128, or 64 where 128 does not divide, for the
memory path). Also: model size on disk and in memory, a profiler breakdown of W4A8 steps, and the quality of the
exact W4A8 numerics on bundled-dit (tiny-dit when its weights are absent; prompt_acc too with the bundled evaluator).

Scheduling: every (variant, batch) is measured in its own try block (a failure is recorded, the run goes on) and
the JSON is rewritten after every row. `--budget_s` bounds the run (counted from process start when run as a
script): a first pass measures every variant of PixArt, then of the UNet, eager ones at all batches and compiled ones
at the headline batch 16 (`--first_pass`); later passes the compiled variants at batch 1, then 4; what would not
finish in time is marked skipped (each compiled batch costs a compilation: tens of seconds for PixArt's block,
about a minute for the whole UNet). Within a pass the variants go in the order of `--variants` (default: the
baseline, then the fastest W4A8 variant, then the peer), so a short budget cuts the last ones.
On the CPU (`--device cpu`, smoke tests) the real modules run their reference kernels and "compiled" rows eagerly.
`--compile_mode reduce-overhead` (CUDA graphs) compiles the whole model (per-block graphs would overwrite each
other's outputs) and marks every timed call as a new graph step.
Rows "+ CUDA graphs" (`*_graphs`) wrap the denoiser, eager or compiled under a mode that records no graphs, in
diffptq.kernels.GraphedDenoiser: each batch's first call captures one graph of the whole denoiser (3 warm-up calls
included in its first-call time), the timed calls replay it (output cloned, as users get it); the row records
replays and eager calls (a failed capture runs eagerly, and the report says so).

  python benchmarks/inference_speed.py --out results/inference_speed \\
      --report benchmarks/results/inference_speed_pixart_sd_<card>.md     (naming: benchmarks/README.md)
  python benchmarks/inference_speed.py --render results/inference_speed --report x.md     (markdown from the JSON)
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch._inductor.config as inductor_config
from safetensors.torch import save_file
from torch import nn

from diffptq.algo.rtn import install_layer_codes, rtn_layer_codes
from diffptq.eval.hardware import checkpoint_bytes, measure_latency, measure_peak_vram, module_bytes
from diffptq.io.checkpoint import save_quantized
from diffptq.kernels import (
    GraphedDenoiser,
    InferenceConfig,
    Int4WeightOnly,
    convert_for_inference,
    fp8_support,
    graph_denoiser,
    set_profile_scopes,
)
from diffptq.kernels.activations import use_sigmoid_form_gelu
from diffptq.kernels.fp8_attention_processor import use_fp8_attention
from diffptq.kernels.fp8_quant_triton import triton_available
from diffptq.kernels.int4_weight_only import set_int4_matmul
from diffptq.kernels.profiling import breakdown, kernel_records
from diffptq.models.families import FAMILIES
from diffptq.peers import PEERS
from diffptq.models.fullsize import full_size_pipeline, random_text_embeddings
from diffptq.quant.layers import quant_layers
from diffptq.quant.quantizer import QuantSpec

sys.path.append(str(Path(__file__).resolve().parent))  # the report module beside this file, however it is loaded
from inference_speed_quality import A8, A8_STATIC, W4, fit_static_ranges, quality  # noqa: E402
from inference_speed_report import ORDER, VARIANTS, Variant, meta, render  # noqa: E402

GiB = 2**30
TORCHAO_INT4 = PEERS["torchao:int4wo"]  # torchao's int4 weight-only kernel, tried before a kernel of our own
TITLES = {"pixart": "PixArt-XL-2-512 (PixArtTransformer2DModel)", "sd": "SD 1.5 UNet (UNet2DConditionModel)"}


# ---- quantized models from precomputed RTN codes (diffptq.algo.rtn) -----------------------------------------------
def group_spec(cols: int) -> QuantSpec:
    """W4 groups of 128 columns, 64 where 128 does not divide (SD's 320-channel layers), else per channel."""
    g = next((g for g in (128, 64) if cols % g == 0), None)
    return QuantSpec(4, group_size=g)


def torchao_quantize(den: nn.Module, names: list[str]) -> str:
    """torchao FP8 dynamic activations + FP8 weights, row-wise, on the same layers. Returns torchao's version."""
    import torchao
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

    wanted = set(names)
    try:  # keep torchao from changing inductor settings for the rows measured after it
        cfg = Float8DynamicActivationFloat8WeightConfig(granularity=PerRow(), set_inductor_config=False)
    except TypeError:
        cfg = Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())
    quantize_(den, cfg, filter_fn=lambda m, fqn: isinstance(m, nn.Linear) and fqn in wanted)
    return torchao.__version__


# ---- one family ---------------------------------------------------------------------------------------------------
def denoiser_inputs(family: str, batch: int, dtype: torch.dtype, device: str, latent: int) -> dict:
    """Keyword inputs of one denoiser step: random latents, timestep 500, random text states of the real shape."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 4, latent, latent, generator=g).to(device, dtype)
    t = torch.full((batch,), 500, dtype=torch.long, device=device)
    emb = random_text_embeddings(family, batch, dtype, device)
    if family == "pixart":
        return {"hidden_states": x, "timestep": t, "encoder_hidden_states": emb["prompt_embeds"],
                "encoder_attention_mask": emb["prompt_attention_mask"],
                "added_cond_kwargs": {"resolution": None, "aspect_ratio": None}}
    return {"sample": x, "timestep": t, "encoder_hidden_states": emb["prompt_embeds"]}


class FamilyRun:
    """Builds and measures the variants of one family, recording into `self.result`."""

    def __init__(self, name: str, args, tmp: Path, denoiser: nn.Module | None = None):
        """`denoiser`: measure this one (it becomes the CPU master copy) instead of a new full-size FP16 one."""
        self.name, self.args, self.tmp, self.dev = name, args, tmp, args.device
        self.family = FAMILIES[name]
        den = denoiser
        if den is None:
            den = self.family.denoiser(full_size_pipeline(name, torch.float16, self.dev, num_layers=args.num_layers))
        self.names = self.family.block_layer_names(den)
        t0 = time.perf_counter()  # RTN codes computed where the weights live (the GPU), kept on the CPU
        self.codes = {"w4a8": rtn_layer_codes(den, self.names, lambda _: W4),
                      "w4": rtn_layer_codes(den, self.names, group_spec)}
        self.master = den.to("cpu")
        q_params = sum(self.master.get_submodule(n).weight.numel() for n in self.names)
        self.compile_est = 20.0  # seconds one compilation is expected to take (updated as they are measured)
        self.result = {"family": name, "title": TITLES[name], "rows": [], "sizes": {}, "profiles": {},
                       "params": sum(p.numel() for p in self.master.parameters()), "quantized_params": q_params,
                       "quantized_layers": len(self.names), "rtn_s": time.perf_counter() - t0,
                       "compile_scope": self.compile_scope(), "groups": self._group_counts()}

    def _group_counts(self) -> dict:
        counts: dict = {}
        for spec, *_ in self.codes["w4"].values():
            counts[str(spec.group_size)] = counts.get(str(spec.group_size), 0) + 1
        return counts

    def compile_scope(self) -> str:
        if self.args.compile_scope != "auto":
            return self.args.compile_scope
        # CUDA graphs need the whole model in one graph (see main)
        return "blocks" if self.name == "pixart" and not uses_cuda_graphs(self.args.compile_mode) else "full"

    def build(self, v: Variant) -> nn.Module:
        den = copy.deepcopy(self.master).to(self.dev, v.dtype)
        if v.build == "torchao":
            self.result["torchao"] = torchao_quantize(den, self.names)
        elif v.build == "torchao_int4":  # the peer row of benchmark_final: the same layers and groups
            self.result["torchao"] = TORCHAO_INT4.version()
            self.result.setdefault("notes", {})[v.key] = TORCHAO_INT4.quantize(den, [], self.dev)
        elif v.build != "float":
            kind = "w4" if v.build == "w4" else "w4a8"
            act = {"fake": A8, "w4a8s": A8_STATIC}.get(v.build)
            install_layer_codes(den, self.codes[kind], act, "static" if v.build == "w4a8s" else "dynamic")
            if v.build == "w4a8s":
                self.calibrate_static(den, v.dtype)
            if v.build == "fake":
                for _, layer in quant_layers(den):
                    layer.drop_float_weight()
                    layer._size_exclude = ("weight_q",)  # an alias of the weight now: count it once
            else:
                self.record_checkpoint(den, kind)
                mode = "static" if v.build == "w4a8s" else self.args.act_mode
                cfg = InferenceConfig(act_mode=mode, others=self.args.others, act_kernel=v.act_kernel,
                                      sigmoid_gelu=v.sigmoid_gelu is not False, conv1x1=v.conv1x1,
                                      weight_storage=v.weight_storage,
                                      force=(torch.device(self.dev).type == "cpu"))
                conv = convert_for_inference(den, "w4" if v.build == "w4" else "w4a8", self.dev, cfg)
                build = v.build if v.weight_storage == "e4m3" else f"{v.build}_{v.weight_storage}"
                self.result.setdefault("conversion", {})[build] = {"path": conv.path, "reason": conv.reason,
                                                                     "counts": conv.counts(), "kept": len(conv.kept),
                                                                     "fused_attention": conv.fused_attention,
                                                                     "sigmoid_gelu": conv.sigmoid_gelu}
        if v.build == "float" and v.sigmoid_gelu:
            use_sigmoid_form_gelu(den)
        if v.int4_matmul != "dequant":
            self.result.setdefault("int4_matmul", {})[v.key] = set_int4_matmul(den, v.int4_matmul)
        if v.fp8_attention:
            self.result.setdefault("fp8_attention", {})[v.key] = use_fp8_attention(den)
        den.eval().requires_grad_(False)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        self.record_size(v, den)
        if v.compiled and torch.device(self.dev).type == "cuda":  # CPU smoke runs measure these rows eagerly
            self.compile(den)
        return graph_denoiser(den) if v.graphs else den  # captured at each batch's first call (off CUDA: eager)

    def calibrate_static(self, den: nn.Module, dtype: torch.dtype) -> None:
        """Fit the static int8 activation ranges on one batch of 2 (what the FP8 static scales derive from)."""
        fit_static_ranges(den, [denoiser_inputs(self.name, 2, dtype, self.dev, self.args.latent)])

    def compile(self, den: nn.Module) -> None:
        mode = self.args.compile_mode
        if self.compile_scope() == "blocks":
            for _, block in self.family.blocks(den):
                block.compile(mode=mode)
        else:
            den.compile(mode=mode)

    def record_checkpoint(self, den: nn.Module, kind: str) -> None:
        """Size of the diffptq checkpoint of the quantized layers (packed int4 codes, fp32 scale and zero)."""
        if kind in self.result["sizes"].get("checkpoint", {}):
            return
        path = self.tmp / f"{self.name}_{kind}.safetensors"
        save_quantized(path, den, {"source": f"fullsize-{self.name}", "family": self.name,
                                   "pipeline_class": self.family.pipeline_class}, {"method": "rtn", "kind": kind})
        self.result["sizes"].setdefault("checkpoint", {})[kind] = checkpoint_bytes(path)
        path.unlink()

    def record_size(self, v: Variant, den: nn.Module) -> None:
        """In-memory bytes of each variant's weights; on disk, the FP16 and memory-path state as safetensors."""
        sizes = self.result["sizes"]
        sizes.setdefault("memory", {})[v.key] = module_bytes(den)
        if torch.cuda.is_available() and torch.device(self.dev).type == "cuda":  # what the GPU really holds
            sizes.setdefault("allocated", {})[v.key] = torch.cuda.memory_allocated(self.dev)
        if v.build == "w4":
            mods = [m for m in den.modules() if isinstance(m, Int4WeightOnly)]
            stored = sum(t.numel() * t.element_size() for m in mods for t in (m.packed, m.scale, m.zero)
                         if t is not None)
            sizes["w4_bits_per_weight"] = 8 * stored / max(1, sum(2 * m.packed.numel() for m in mods))
        if v.key in ("fp16", "w4") and v.key not in sizes.get("disk", {}):
            path = self.tmp / f"{self.name}_{v.key}_state.safetensors"
            save_file({k: t.detach().contiguous() for k, t in den.state_dict().items()}, str(path))
            sizes.setdefault("disk", {})[v.key] = checkpoint_bytes(path)
            path.unlink()
        if v.key == "fp16":
            sizes["fp16_quantized_weights"] = sum(den.get_submodule(n).weight.numel() * 2 for n in self.names)

    def measure(self, v: Variant, den: nn.Module, batch: int) -> dict:
        """One row: latency, resident and peak VRAM of `den`'s step at `batch` (profiled at the top batch when
        `--profile` names the variant)."""
        profile = batch == max(int(b) for b in self.args.batches.split(",")) and v.key in self.args.profile.split(",")
        inputs = denoiser_inputs(self.name, batch, v.dtype, self.dev, self.args.latent)

        graphs = v.compiled and uses_cuda_graphs(self.args.compile_mode)

        def step():
            if graphs:  # each call is a new step: the previous step's outputs may be overwritten
                torch.compiler.cudagraph_mark_step_begin()
            return den(**inputs, return_dict=False)

        row = {"variant": v.key, "label": v.label, "batch": batch, "dtype": str(v.dtype).replace("torch.", "")}
        with torch.no_grad():
            t0 = time.perf_counter()
            step()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            row["first_call_s"] = time.perf_counter() - t0  # includes compilation for compiled rows
            lat = measure_latency(step, 1, warmup=self.args.warmup, repeats=self.args.repeats, device=self.dev)
            row["latency_ms"] = None if lat is None else lat * 1e3
            row["resident_gib"] = torch.cuda.memory_allocated() / GiB if torch.cuda.is_available() else None
            peak = measure_peak_vram(step, self.dev)
            row["peak_vram_gib"] = None if peak is None else peak / GiB
            if profile:  # a graph replay hides its kernels from the profiler: the same compiled kernels, launched
                inner = den.denoiser if isinstance(den, GraphedDenoiser) else den  # one by one outside the graph
                self.result["profiles"][f"{v.key}@{batch}"] = profile_step(lambda: inner(**inputs, return_dict=False))
        return add_graph_stats(row, den)


def add_graph_stats(row: dict, den: nn.Module) -> dict:
    """`row` with, for a CUDA-graph row, what its calls did (graphs kept, replays, eager calls and why), counted
    from this row's first call."""
    if isinstance(den, GraphedDenoiser):
        row["graphs"] = den.stats(clear=True)
    return row


def profile_step(step) -> dict:
    """GPU time of one step by category (diffptq.kernels.profiling), module scopes on in eager mode."""
    acts = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    set_profile_scopes(True)
    try:
        with torch.profiler.profile(activities=acts) as prof:
            step()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
    finally:
        set_profile_scopes(False)
    return breakdown(kernel_records(prof.events()))


def run_pass(run: FamilyRun, batches_of, deadline: float, save) -> None:
    """Measure the selected variants of one family at `batches_of(variant)` until `deadline` (time.monotonic())."""
    res, args = run.result, run.args
    wanted = ORDER[run.name] if args.variants is None else args.variants.split(",")
    for key in [k for k in wanted if k in ORDER[run.name]]:  # --variants: in the order given
        v, batches = VARIANTS[key], batches_of(VARIANTS[key])
        if not batches:
            continue
        skip = skip_reason(v, args, deadline, run.compile_est)
        if skip:
            res["rows"] += [{"variant": key, "label": v.label, "batch": b, "skipped": skip} for b in batches]
            continue
        with inductor_settings(v):  # inductor reads them when each batch compiles, at its first call
            measure_variant(run, v, batches, deadline, save)
        free_memory()  # also resets dynamo: the next variant compiles afresh


def inductor_settings(v: Variant) -> contextlib.AbstractContextManager:
    """The variant's torch._inductor.config settings while it is built and measured, restored after."""
    return inductor_config.patch(dict(v.inductor)) if v.inductor else contextlib.nullcontext()


def measure_variant(run: FamilyRun, v: Variant, batches: list[int], deadline: float, save) -> None:
    """Build one variant and record its rows at `batches` (errors and skips recorded as rows)."""
    res = run.result
    if torch.cuda.is_available():  # what earlier rows left allocated (it is in this row's allocated and peak VRAM)
        res["sizes"].setdefault("before_build", {})[v.key] = torch.cuda.memory_allocated()
    try:
        den = run.build(v)
    except Exception as err:  # noqa: BLE001 - any failure of one variant is recorded, the run goes on
        res["rows"] += [{"variant": v.key, "label": v.label, "batch": b, "error": error_text(err)} for b in batches]
        save()
        return
    for batch in batches:
        if deadline - time.monotonic() < (run.compile_est if v.compiled else 5.0):
            res["rows"].append({"variant": v.key, "label": v.label, "batch": batch, "skipped": "time budget"})
            continue
        try:
            row = run.measure(v, den, batch)
            if v.compiled:
                run.compile_est = max(run.compile_est, row["first_call_s"])
        except Exception as err:  # noqa: BLE001
            row = {"variant": v.key, "label": v.label, "batch": batch, "error": error_text(err)}
        res["rows"].append(row)
        save()
    del den


def run_all(families: list[str], args, tmp: Path, results: dict, save, start: float) -> None:
    """Passes over the families: first every variant, eager ones at all batches and compiled ones at the leading
    `--first_pass` batches; then one pass per remaining batch for the compiled variants (each compiled batch costs a
    compilation; `headline_only` variants take no later pass). The first family may use half of the first pass's
    time, the first pass 90% of the budget."""
    batches = [int(b) for b in args.batches.split(",")]
    first, later = batches[:args.first_pass], batches[args.first_pass:]
    passes = [(lambda v: first if v.compiled else batches, 0.9)]
    passes += [(lambda v, b=b: [b] if v.compiled and not v.headline_only else [], 1.0) for b in later]
    runs: dict[str, FamilyRun] = {}
    for batches_of, share in passes:
        for i, name in enumerate(families):
            part = share * (0.5 if (share < 1 and i == 0 and len(families) > 1) else 1.0)
            try:
                if name not in runs:
                    runs[name] = FamilyRun(name, args, tmp)
                    results[name] = runs[name].result
                    save()
                run_pass(runs[name], batches_of, start + args.budget_s * part, save)
            except Exception as err:  # noqa: BLE001 - e.g. out of memory building the model: keep what exists
                results.setdefault(name, {"family": name, "title": TITLES[name], "rows": [], "sizes": {}})
                results[name]["error"] = error_text(err)
            save()
            free_memory()


def skip_reason(v: Variant, args, deadline: float, compile_est: float) -> str | None:
    """Why `v` cannot be measured here or in the time left before `deadline`; None when it can."""
    if v.build == "torchao_int4" and torch.device(args.device).type != "cuda":
        return TORCHAO_INT4.cuda_only
    if v.int4_matmul == "triton" and not triton_available():
        return "Triton does not import"
    if v.build in ("torchao", "torchao_int4"):
        try:
            import torchao  # noqa: F401
        except ImportError:
            return "torchao not installed"
    if v.build in ("w4a8", "w4a8s") and torch.device(args.device).type == "cuda" and not fp8_support(args.device)[0]:
        return f"no FP8 GEMM: {fp8_support(args.device)[1]}"
    if v.act_kernel == "triton" and not triton_available():
        return "Triton does not import"
    if v.graphs and v.compiled and uses_cuda_graphs(args.compile_mode):
        return f"--compile_mode {args.compile_mode} records CUDA graphs itself (run this row under another mode)"
    if deadline - time.monotonic() < (2 * compile_est if v.compiled else 15.0):
        return "time budget"
    return None


def error_text(err: Exception) -> str:
    """A failure as one short line for a row's `error` field."""
    return f"{type(err).__name__}: {err}"[:400]


def free_memory() -> None:
    """Release the last variant's memory and compiled code (dynamo reset: the next variant compiles afresh), and
    cuBLAS's per-stream workspaces, which the allocator counts and which would otherwise add up in later rows."""
    gc.collect()
    torch._dynamo.reset()
    if torch.cuda.is_available():
        if hasattr(torch._C, "_cuda_clearCublasWorkspaces"):
            torch._C._cuda_clearCublasWorkspaces()
        torch.cuda.empty_cache()


# ---- main -----------------------------------------------------------------------------------------------------------
def uses_cuda_graphs(compile_mode: str) -> bool:
    """Whether a torch.compile mode records CUDA graphs ("reduce-overhead", "max-autotune")."""
    return compile_mode in ("reduce-overhead", "max-autotune")


def publish(text: str, *paths) -> None:
    """Write the markdown report to each path given (None: none; folders made as needed), then print it."""
    for path in paths:
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(text)
    print(text, flush=True)


def compile_settings() -> None:
    """torch settings of the timed runs: one static-shape compilation per batch size, room for many, cuDNN tuning."""
    cfg = torch._dynamo.config
    setattr(cfg, "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit", 64)
    cfg.automatic_dynamic_shapes = False
    torch.backends.cudnn.benchmark = True


def process_age_s() -> float:
    """Seconds since this process started (0 when psutil is not installed)."""
    try:
        import psutil

        return max(0.0, time.time() - psutil.Process().create_time())
    except ImportError:
        return 0.0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--families", default="pixart,sd", help="comma list of pixart, sd (empty: quality only)")
    p.add_argument("--variants", default=None,
                   help="comma list, measured in this order (default: all, in the order of priority): "
                   + ", ".join(VARIANTS))
    p.add_argument("--batches", default="16,1,4", help="measured in this order (the first is the headline)")
    p.add_argument("--first_pass", type=int, default=1,
                   help="compiled variants measure the first N batches in the first pass, each other one in a pass of "
                        "its own after every family's first pass")
    p.add_argument("--latent", type=int, default=64, help="latent side (64 = 512 px)")
    p.add_argument("--num_layers", type=int, default=None, help="shorten PixArt (smoke tests)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--act_mode", default="token", choices=["token", "tensor"])
    p.add_argument("--others", default="dequant", choices=["dequant", "w4", "fake"],
                   help="W4A8: what layers the FP8 GEMM cannot take (the UNet's convolutions) become")
    p.add_argument("--compile_mode", default="default")
    p.add_argument("--compile_scope", default="auto", choices=["auto", "blocks", "full"])
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--profile", default="w4a8,w4a8_compile,w4a8_compile_triton,bf16_compile",
                   help="variants profiled at the top batch")
    p.add_argument("--budget_s", type=float, default=480.0, help="stop starting new measurements after this")
    p.add_argument("--quality_model", default=None, help="default: bundled-dit, tiny-dit when absent")
    p.add_argument("--quality_prompts", type=int, default=4)
    p.add_argument("--quality_steps", type=int, default=4)
    p.add_argument("--quality_records", type=int, default=4)
    p.add_argument("--prompt_acc", type=int, default=64, help="bundled models: prompts for prompt_acc (0: none)")
    p.add_argument("--skip_quality", action="store_true")
    p.add_argument("--out", default="results/inference_speed", help="folder for results.json")
    p.add_argument("--report", default=None, help="markdown report to write")
    p.add_argument("--render", default=None, help="only re-render the markdown from this folder's results.json")
    args = p.parse_args()
    unknown = [] if args.variants is None else [v for v in args.variants.split(",") if v not in VARIANTS]
    if unknown:
        p.error(f"unknown --variants {', '.join(unknown)}; known: {', '.join(VARIANTS)}")
    if uses_cuda_graphs(args.compile_mode) and args.compile_scope == "blocks":
        # measured on an H200: every row failed ("accessing tensor output of CUDAGraphs that has been overwritten
        # by a subsequent run"): one block's graph replays for the next block while its output is still in use
        p.error(f"--compile_mode {args.compile_mode} records CUDA graphs, which per-block compilation cannot replay "
                "(each block's replay overwrites the previous block's output); use --compile_scope full or auto")
    logging.basicConfig(format="%(name)s: %(message)s")
    logging.getLogger("diffptq.kernels").setLevel(logging.INFO)  # the path each conversion chose, and why
    if args.render:
        publish(render(json.loads((Path(args.render) / "results.json").read_text())), args.report)
        return
    # run as a script, the budget counts the imports and CUDA start-up too; called in a longer process (a test), not
    start = time.monotonic() - (process_age_s() if __name__ == "__main__" else 0.0)
    compile_settings()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    res = {"meta": meta(args), "families": {}}

    def save():
        res["meta"]["wall_s"] = time.monotonic() - start
        (out / "results.json").write_text(json.dumps(res, indent=1, default=str))

    if not args.skip_quality:
        try:
            res["quality"] = quality(args)
        except Exception as err:  # noqa: BLE001
            res["quality"] = {"error": error_text(err)}
        save()
    families = [f for f in args.families.split(",") if f]
    with tempfile.TemporaryDirectory(prefix="diffptq_bench_") as tmp:
        run_all(families, args, Path(tmp), res["families"], save, start)
    save()
    publish(render(res), args.report)


if __name__ == "__main__":
    main()
