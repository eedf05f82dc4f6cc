"""The markdown report of benchmarks/inference_speed.py (also what `--render DIR` prints), the variants it measures
(key, label, how each is built) in their order of priority, and the run's `meta` record.

The report reads only results.json: goals (measured ratios against the issue's targets), per family the latency,
peak-VRAM, size and profile tables and what was not measured, then the quality rows.
"""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import diffusers
import torch

from diffptq.eval.report import markdown_table
from diffptq.kernels.profiling import CATEGORIES

MB = 1e6


@dataclass(frozen=True)
class Variant:
    key: str
    label: str
    dtype: torch.dtype
    compiled: bool
    build: str  # float | fake | w4a8 | w4a8s | w4 | torchao | torchao_int4
    act_kernel: str = "torch"  # W4A8: per-token quantization as torch ops or the Triton kernel
    inductor: tuple = ()  # (name, value) torch._inductor.config settings for this variant's compilation
    headline_only: bool = False  # measured in the first pass only (the headline batch of compiled rows)
    sigmoid_gelu: bool | None = None  # tanh GELU as x·σ(2v); None: as convert_for_inference does (on real paths)
    graphs: bool = False  # the denoiser in diffptq.kernels.GraphedDenoiser: one CUDA graph replayed per call
    fp8_attention: bool = False  # self-attention on FP8 operands (diffptq.kernels.fp8_attention_processor)
    int4_matmul: str = "dequant"  # W4 memory path Linear layers: dequantize then GEMM, or the fused Triton kernel
    conv1x1: bool = False  # W4A8: the UNet's 1×1 convolutions on the FP8 GEMM too (InferenceConfig.conv1x1)
    weight_storage: str = "e4m3"  # W4A8: weight codes as e4m3 or packed int4 (InferenceConfig.weight_storage)


AUTOTUNE = (("max_autotune_gemm", True), ("max_autotune_gemm_backends", "ATEN,TRITON"))
TRITON_GEMM = (("max_autotune_gemm", True), ("max_autotune_gemm_backends", "TRITON"))
VARIANTS = {v.key: v for v in (
    Variant("fp16", "FP16 eager", torch.float16, False, "float"),
    Variant("bf16_compile", "BF16 + compile", torch.bfloat16, True, "float"),
    Variant("bf16_compile_cdt", "BF16 + compile, coordinate-descent tuning", torch.bfloat16, True, "float",
            inductor=(("coordinate_descent_tuning", True),), headline_only=True),
    Variant("bf16_compile_sgelu", "BF16 + compile, GELU in sigmoid form", torch.bfloat16, True, "float",
            headline_only=True, sigmoid_gelu=True),
    Variant("fake", "fake-quant W4A8 (int8 per token), eager FP16", torch.float16, False, "fake"),
    Variant("w4a8", "W4A8 speed path, eager", torch.bfloat16, False, "w4a8"),
    Variant("w4a8_compile", "W4A8 speed path + compile", torch.bfloat16, True, "w4a8"),
    Variant("w4a8_compile_triton", "W4A8 speed path + compile, Triton activation quantization", torch.bfloat16, True,
            "w4a8", act_kernel="triton", headline_only=True),
    Variant("w4a8_compile_cdt", "W4A8 speed path + compile, coordinate-descent tuning", torch.bfloat16, True, "w4a8",
            inductor=(("coordinate_descent_tuning", True),), headline_only=True),
    Variant("w4", "W4 memory path, eager FP16", torch.float16, False, "w4"),
    Variant("w4_compile", "W4 memory path + compile (BF16)", torch.bfloat16, True, "w4"),
    Variant("torchao_compile", "torchao FP8 dynamic row-wise + compile", torch.bfloat16, True, "torchao"),
    Variant("torchao_compile_cdt", "torchao FP8 dynamic row-wise + compile, coordinate-descent tuning", torch.bfloat16,
            True, "torchao", inductor=(("coordinate_descent_tuning", True),), headline_only=True),
    Variant("w4a8s_compile", "W4A8 speed path, static per-tensor activations + compile", torch.bfloat16, True,
            "w4a8s"),
    Variant("w4a8s_compile_cdt", "W4A8 speed path, static per-tensor activations + compile, coordinate-descent tuning",
            torch.bfloat16, True, "w4a8s", inductor=(("coordinate_descent_tuning", True),), headline_only=True),
    Variant("w4a8s_compile_tanh", "W4A8 speed path, static per-tensor activations + compile, stock tanh GELU",
            torch.bfloat16, True, "w4a8s", headline_only=True, sigmoid_gelu=False),
    # CUDA graphs over the whole denoiser (GraphedDenoiser), for the launch-bound small batches: over the eager
    # model, and over the compiled one (not with a compile mode that records graphs itself)
    Variant("bf16_graphs", "BF16 eager + CUDA graphs", torch.bfloat16, False, "float", graphs=True),
    Variant("w4a8_graphs", "W4A8 speed path, eager + CUDA graphs", torch.bfloat16, False, "w4a8", graphs=True),
    Variant("w4_graphs", "W4 memory path, eager + CUDA graphs (BF16)", torch.bfloat16, False, "w4", graphs=True),
    Variant("bf16_compile_graphs", "BF16 + compile + CUDA graphs", torch.bfloat16, True, "float", graphs=True),
    Variant("w4a8_compile_graphs", "W4A8 speed path + compile + CUDA graphs", torch.bfloat16, True, "w4a8",
            graphs=True),
    Variant("w4_compile_graphs", "W4 memory path + compile + CUDA graphs (BF16)", torch.bfloat16, True, "w4",
            graphs=True),
    Variant("w4a8_c1x1_compile_graphs", "W4A8 speed path with FP8 1x1 convolutions + compile + CUDA graphs",
            torch.bfloat16, True, "w4a8", graphs=True, conv1x1=True),
    Variant("w4a8s_compile_graphs", "W4A8 speed path, static per-tensor activations + compile + CUDA graphs",
            torch.bfloat16, True, "w4a8s", graphs=True),
    # inductor's GEMM autotuning: Triton templates only ("tgemm"), so that the pointwise work around each GEMM (the
    # activation quantization of the next layer, GELU, the int4 dequantization of the memory path) can be fused into
    # the template's epilogue or prologue; BF16 under the same autotuning (cuBLAS or Triton, whichever is faster)
    Variant("bf16_compile_autotune_graphs", "BF16 + compile, GEMM autotuning + CUDA graphs", torch.bfloat16, True,
            "float", inductor=AUTOTUNE, graphs=True),
    Variant("w4a8s_compile_tgemm_graphs", "W4A8 static + compile, Triton GEMM templates (fused epilogues) + graphs",
            torch.bfloat16, True, "w4a8s", inductor=TRITON_GEMM, graphs=True),
    Variant("w4a8_compile_tgemm_graphs", "W4A8 speed path + compile, Triton GEMM templates + CUDA graphs",
            torch.bfloat16, True, "w4a8", inductor=TRITON_GEMM, graphs=True),
    Variant("w4_compile_tgemm_graphs", "W4 memory path + compile, Triton GEMM templates (fused dequantization) + "
            "CUDA graphs", torch.bfloat16, True, "w4", inductor=TRITON_GEMM, graphs=True),
    # inductor's combo kernels: independent pointwise kernels of one compiled graph in one launch (a PixArt block's
    # ten int4 dequantizations, which depend on the weights alone), for the memory path at small batches
    Variant("w4_compile_combo_graphs", "W4 memory path + compile, combo kernels (dequantizations launched together) + "
            "CUDA graphs", torch.bfloat16, True, "w4", inductor=(("combo_kernels", True),), graphs=True),
    # the same setting on the baseline and the fastest W4A8 numerics: whether combo kernels help any model or the
    # memory path's dequantizations only (ratios under equal inductor settings)
    Variant("bf16_compile_combo_graphs", "BF16 + compile, combo kernels + CUDA graphs", torch.bfloat16, True,
            "float", inductor=(("combo_kernels", True),), graphs=True),
    Variant("w4a8s_compile_combo_graphs", "W4A8 speed path, static per-tensor activations + compile, combo kernels + "
            "CUDA graphs", torch.bfloat16, True, "w4a8s", inductor=(("combo_kernels", True),), graphs=True),
    # W4A8 with its codes stored packed (Fp8W4A8PackedLinear): the W4 path's memory with the FP8 GEMMs, paying an
    # int4 -> e4m3 unpacking per layer and call (half the bytes the memory path's bf16 dequantization writes)
    Variant("w4a8i4_compile_graphs", "W4A8 speed path, packed int4 weights + compile + CUDA graphs", torch.bfloat16,
            True, "w4a8", graphs=True, weight_storage="int4"),
    Variant("w4a8si4_compile_graphs", "W4A8 speed path, static per-tensor activations, packed int4 weights + "
            "compile + CUDA graphs", torch.bfloat16, True, "w4a8s", graphs=True, weight_storage="int4"),
    Variant("w4a8si4_compile_combo_graphs", "W4A8 speed path, static per-tensor activations, packed int4 weights + "
            "compile, combo kernels + CUDA graphs", torch.bfloat16, True, "w4a8s", graphs=True,
            weight_storage="int4", inductor=(("combo_kernels", True),)),
    Variant("w4_triton_compile_graphs", "W4 memory path, fused Triton int4 GEMM + compile + CUDA graphs (BF16)",
            torch.bfloat16, True, "w4", graphs=True, int4_matmul="triton"),
    Variant("torchao_int4wo_compile_graphs", "torchao int4 weight-only (tinygemm, groups 128-32) + compile + graphs",
            torch.bfloat16, True, "torchao_int4", graphs=True),
    Variant("bf16_compile_graphs_fp8attn", "BF16 + FP8 self-attention + compile + CUDA graphs", torch.bfloat16, True,
            "float", graphs=True, fp8_attention=True),
    Variant("w4a8_compile_graphs_fp8attn", "W4A8 speed path + FP8 self-attention + compile + CUDA graphs",
            torch.bfloat16, True, "w4a8", graphs=True, fp8_attention=True),
)}
GRAPH_VARIANTS = tuple(k for k, v in VARIANTS.items() if v.graphs)
# measurement priority without --variants: the cheap eager rows, then the compilations the goals need first (the
# baseline, the fastest W4A8 variant, the peer), so a time budget cuts the least needed rows
ORDER = {"pixart": ("fp16", "w4", "fake", "w4a8", "bf16_compile", "w4a8s_compile", "w4a8_compile", "torchao_compile",
                    "w4a8_compile_triton", "w4a8_compile_cdt", "w4a8s_compile_cdt", "w4a8s_compile_tanh",
                    "bf16_compile_sgelu", "bf16_compile_cdt", "torchao_compile_cdt", "w4_compile") + GRAPH_VARIANTS,
         "sd": ("fp16", "w4", "fake", "w4a8", "bf16_compile", "w4a8s_compile", "w4_compile", "torchao_compile",
                "w4a8_compile") + GRAPH_VARIANTS}
QUALITY_LABELS = {"fp32": "FP32", "bf16": "BF16, not quantized",
                  "fake_int8_token": "fake-quant W4A8: int8 per-token activations",
                  "w4_only": "W4 weights only", "fp8_token": "W4A8 speed path: e4m3 per-token activations (timed)",
                  "fp8_tensor": "W4A8 speed path: e4m3 per-tensor activations",
                  "fake_int8_static": "fake-quant W4A8: int8 static per-tensor activations (asymmetric, MSE-fitted)",
                  "fp8_static": "W4A8 speed path: e4m3 static per-tensor activations from that int8 grid (timed "
                                "as 'static per-tensor')"}


def versions(device: str) -> dict:
    """The card (or "CPU (smoke run)"), software versions and today's date."""
    try:
        import torchao

        tao = torchao.__version__
    except ImportError:
        tao = "not installed"
    cuda = torch.cuda.is_available() and torch.device(device).type == "cuda"
    return {"gpu": torch.cuda.get_device_name() if cuda else "CPU (smoke run)", "torch": torch.__version__,
            "diffusers": diffusers.__version__, "torchao": tao, "date": dt.date.today().isoformat()}


def meta(args) -> dict:
    """The run's settings and software versions: results.json's `meta`, read by `render`."""
    import shlex
    import sys

    from diffptq.cli.common import git_commit

    return {**versions(args.device), "batches": [int(b) for b in args.batches.split(",")], "latent": args.latent,
            "act_mode": args.act_mode, "others": args.others, "compile_mode": args.compile_mode,
            "warmup": args.warmup, "repeats": args.repeats, "commit": git_commit() or "unknown",
            "command": "python " + shlex.join(sys.argv)}


def _table(columns: list[str], rows: list[list[str]]) -> list[str]:
    """A markdown table of formatted cells, as lines (columns must be distinct)."""
    return markdown_table([dict(zip(columns, r)) for r in rows], columns).splitlines()


def _mb(n_bytes: int | None) -> str:
    """A size cell in MB ('' when not measured)."""
    return "" if n_bytes is None else f"{n_bytes / MB:.0f}"


def _cell(row: dict | None, key: str, fmt: str) -> str:
    if row is None:
        return ""
    if "error" in row:
        return "error"
    if "skipped" in row:
        return "skipped"
    return "n/a" if row.get(key) is None else format(row[key], fmt)


def _lookup(fam: dict, key: str, batch: int) -> dict | None:
    return next((r for r in fam["rows"] if r["variant"] == key and r["batch"] == batch), None)


def _value(fam: dict | None, key: str, batch: int, field: str) -> float | None:
    r = _lookup(fam, key, batch) if fam else None
    return None if r is None else r.get(field)


def goals(res: dict) -> list[str]:
    """The issue's goals with measured ratios side by side (met / missed / not measured); [] when none of their rows
    was measured."""
    p, s = res["families"].get("pixart"), res["families"].get("sd")
    rows = []

    def add(goal, num, den, target, higher=True, unit="×"):
        ok = None if not (num and den) else (num / den >= target if higher else num / den <= target)
        measured = "n/a" if ok is None else f"{num / den:.2f}{unit}"
        rows.append([goal, measured, f"{'≥' if higher else '≤'} {target}{unit}",
                     "n/a" if ok is None else "yes" if ok else "no"])

    lat = "latency_ms"
    # the W4A8 variants (activation numerics and compile settings)
    speed = ("w4a8_compile", "w4a8s_compile", "w4a8_compile_triton", "w4a8_compile_cdt", "w4a8s_compile_cdt",
             "w4a8s_compile_tanh")
    # references beyond the three, when measured: BF16 given the same GELU rewrite (what the rewrite alone
    # gives), and BF16 / torchao under coordinate-descent tuning (compared with the W4A8 rows tuned alike)
    extra = (("bf16_compile_sgelu", 1.15), ("bf16_compile_cdt", 1.15), ("torchao_compile_cdt", 1.3))
    for ref, target in (("bf16_compile", 1.15), ("fp16", 1.4), ("torchao_compile", 1.3)) + extra:
        if (ref, target) in extra and not _value(p, ref, 16, lat):
            continue
        for key in speed:
            if ref != "fp16" and key.endswith("_cdt") != ref.endswith("_cdt"):
                continue  # compiled rows are compared under the same inductor tuning only
            if key == "w4a8_compile" or _value(p, key, 16, lat):
                add(f"PixArt {VARIANTS[key].label} vs {VARIANTS[ref].label}, batch 16 (speed-up)",
                    _value(p, ref, 16, lat), _value(p, key, 16, lat), target)
    if p and "disk" in p["sizes"]:
        d = p["sizes"]["disk"]
        add("PixArt W4 transformer on disk, memory-path tensors / FP16", d.get("w4"), d.get("fp16"), 0.3, False)
        rest = (d.get("fp16") or 0) - p["sizes"].get("fp16_quantized_weights", 0)
        ck = p["sizes"].get("checkpoint", {}).get("w4")
        add("PixArt W4 diffptq checkpoint + float remainder / FP16", ck and ck + rest, d.get("fp16"), 0.3, False)
        if d.get("w4"):  # the memory-path variant was built in this run
            rows.append(["PixArt W4 transformer on disk (MB): memory-path tensors / checkpoint + remainder",
                         f"{d['w4'] / MB:.0f} / {((ck or 0) + rest) / MB:.0f}", "≤ 350",
                         "yes" if d["w4"] <= 350 * MB else "no"])
    for fam, label in ((p, "PixArt"), (s, "UNet")):
        for key in ("w4", "w4_compile"):
            ref = "fp16" if key == "w4" else "bf16_compile"
            add(f"{label} {VARIANTS[key].label} peak VRAM at batch 1 / {VARIANTS[ref].label}",
                _value(fam, key, 1, "peak_vram_gib"), _value(fam, ref, 1, "peak_vram_gib"), 0.5, False)
    for key, ref in (("w4", "fp16"), ("w4_compile", "bf16_compile"), ("w4a8_compile", "bf16_compile"),
                     ("w4a8s_compile", "bf16_compile")):
        for b in (16, 1):
            add(f"UNet {VARIANTS[key].label} vs {VARIANTS[ref].label}, batch {b} (speed-up)",
                _value(s, ref, b, lat), _value(s, key, b, lat), 1.0)
    if all(row[1] == "n/a" for row in rows):  # a run of other rows (e.g. CUDA graphs only): no empty table
        return []
    return _table(["goal", "measured", "target", "met"], rows)


# faster than BF16 at every batch: every row a CUDA graph over the compiled denoiser, against BF16 + compile + graphs
GRAPH_REFERENCE = "bf16_compile_graphs"
GRAPH_TARGETS = {"pixart": {1: 1.15, 4: 1.25, 16: 1.5}, "sd": {1: 1.0, 4: 1.0, 16: 1.1}}  # W4A8 speed-up
W4_TARGET, W4_VRAM_TARGET = 0.95, 0.35  # memory path: speed-up at every batch, peak VRAM at batch 1


def _equal_settings_references(key: str) -> list[str]:
    """The float CUDA-graph variants compiled under the same inductor settings as `key` (none for default settings):
    a ratio against one of them isolates what the quantization gains from what the settings give any model."""
    v = VARIANTS[key]
    return [k for k, r in VARIANTS.items() if v.inductor and r.build == "float" and r.graphs and r.compiled
            and r.inductor == v.inductor and not r.fp8_attention and r.sigmoid_gelu is None]


def _with_interval(value: float, lo: float | None, hi: float | None, fmt: str) -> str:
    """'0.812 (0.776-0.844)', or the value alone when there is no interval (results of older runs, the reference)."""
    text = format(value, fmt)
    return text if lo is None or hi is None else f"{text} ({format(lo, fmt)}-{format(hi, fmt)})"


def graph_goals(res: dict) -> list[str]:
    """The goals of the CUDA-graph rows (W4A8 and W4 speed-ups at each batch, the W4 peak VRAM at batch 1) for every
    quantized graph row this run has beside its BF16 + compile + CUDA graphs reference, and beside the BF16 graph row
    under the same inductor settings when the run has one; [] when there is none."""
    rows = []
    for name, fam in res["families"].items():
        label = {"pixart": "PixArt", "sd": "UNet"}.get(name, name)
        keys = [k for k in ORDER.get(name, ()) if VARIANTS[k].graphs and VARIANTS[k].compiled
                and VARIANTS[k].build != "float" and any(r["variant"] == k for r in fam.get("rows", []))]
        for key in keys:
            w4 = VARIANTS[key].build in ("w4", "torchao_int4")
            refs = [GRAPH_REFERENCE] + _equal_settings_references(key)  # the latter never holds the former
            for batch, target in GRAPH_TARGETS.get(name, {}).items():
                if _lookup(fam, key, batch) is None:
                    continue
                goal, ours = W4_TARGET if w4 else target, _value(fam, key, batch, "latency_ms")
                for ref_key in refs:
                    ref = _value(fam, ref_key, batch, "latency_ms")
                    if ref is None:
                        continue
                    ratio = ref / ours if ours else None
                    versus = "" if ref_key == GRAPH_REFERENCE else f" vs {VARIANTS[ref_key].label}"
                    rows.append([f"{label} {VARIANTS[key].label}{versus}, batch {batch} (speed-up)",
                                 "n/a" if ratio is None else f"{ratio:.2f}×", f"≥ {goal}×",
                                 "n/a" if ratio is None else "yes" if ratio >= goal else "no"])
            ref, ours = _value(fam, GRAPH_REFERENCE, 1, "peak_vram_gib"), _value(fam, key, 1, "peak_vram_gib")
            if (w4 or VARIANTS[key].weight_storage == "int4") and ref and ours:  # the memory path's VRAM goal
                rows.append([f"{label} {VARIANTS[key].label}, peak VRAM at batch 1 / BF16", f"{ours / ref:.2f}×",
                             f"≤ {W4_VRAM_TARGET}×", "yes" if ours / ref <= W4_VRAM_TARGET else "no"])
    return _table(["goal", "measured", "target", "met"], rows) if rows else []


def family_section(fam: dict, batches: list[int]) -> list[str]:
    """One family's markdown: latency, peak VRAM, sizes, profiles, and the rows that were not measured."""
    if "params" not in fam:
        return [f"## {fam['title']}", "", f"failed before any measurement: {fam.get('error')}", ""]
    head = ["variant"] + [f"batch {b}" for b in batches]
    keys = [k for k in ORDER[fam["family"]] if any(r["variant"] == k for r in fam["rows"])]
    latency = [[VARIANTS[k].label] + [_cell(_lookup(fam, k, b), "latency_ms", ".1f") for b in batches]
               + [_cell(_lookup(fam, k, batches[0]), "first_call_s", ".1f")] for k in keys]
    peak = [[VARIANTS[k].label] + [_cell(_lookup(fam, k, b), "peak_vram_gib", ".2f") for b in batches] for k in keys]
    lines = [f"## {fam['title']}", "",
             f"{fam['params'] / 1e6:.1f}M parameters, {fam['quantized_params'] / 1e6:.1f}M in "
             f"{fam['quantized_layers']} quantized block layers; memory-path group sizes (layers): {fam['groups']}; "
             f"compile scope: {fam['compile_scope']}.", "", "Denoiser step latency (ms, median):", ""]
    lines += _table(head + [f"first call s (batch {batches[0]})"], latency)
    lines += ["", "Peak VRAM during one step (GiB, weights and inputs included):", ""] + _table(head, peak)
    sz = fam["sizes"]  # by hand: its empty cells are "| |", not markdown_table's "|  |"
    lines += ["", "Model size (MB): parameters and buffers at their stored size; GPU memory allocated after building "
              "(before any step; torchao's tensor subclasses count correctly only there) and, before building, what "
              "earlier rows left allocated (counted in the row's allocated and peak VRAM too); on disk as "
              "safetensors.", "", "| variant | in memory | GPU allocated | allocated before building | on disk |",
              "| --- | --- | --- | --- | --- |"]
    for k, b in sz.get("memory", {}).items():
        alloc, before, disk = (sz.get(kind, {}).get(k) for kind in ("allocated", "before_build", "disk"))
        lines.append(f"| {VARIANTS[k].label} | {b / MB:.0f} | {_mb(alloc)} | {_mb(before)} | {_mb(disk)} |")
    if "w4_bits_per_weight" in sz:
        lines.append(f"| memory-path layers alone: packed codes + scales (+ zeros) | "
                     f"{sz['w4_bits_per_weight']:.3f} bits/weight | | | |")
    for kind, b in sz.get("checkpoint", {}).items():
        lines.append(f"| diffptq checkpoint of the {kind} codes (quantized layers only; packed int4, fp32 scale and "
                     f"zero) | | | | {b / MB:.0f} ({8 * b / fam['quantized_params']:.2f} bits/weight) |")
    for key, prof in fam.get("profiles", {}).items():
        v, b = key.split("@")
        shares = [f"{prof['ms'][c]:.1f} ms ({100 * prof['share'][c]:.0f}%)" for c in CATEGORIES]
        how = " (its kernels launched one by one outside the CUDA graph, which hides them from the profiler)" \
            if VARIANTS[v].graphs else ""
        lines += ["", f"GPU time of one {VARIANTS[v].label} step at batch {b}{how} ({prof['total_ms']:.1f} ms of "
                  "kernels):", ""] + _table(list(CATEGORIES), [shares])
        lines += ["", "Top kernels: " + "; ".join(f"`{n[:60]}` {t:.2f} ms ({c})" for n, t, c in prof["top"][:5])]
    problems = [r for r in fam["rows"] if "error" in r or "skipped" in r]
    lines += graph_notes(fam["rows"])
    if fam.get("error"):
        problems.append({"label": "the family run", "batch": "-", "error": fam["error"]})
    if problems:
        lines += ["", "Not measured:", ""] + [f"- {r['label']}, batch {r['batch']}: {r.get('error') or r['skipped']}"
                                              for r in problems]
    return lines + [""]


def graph_notes(rows: list[dict]) -> list[str]:
    """Lines for the CUDA-graph rows whose calls did not all replay a graph (what ran eagerly, and why)."""
    notes = [f"- {r['label']}, batch {r['batch']}: {g['replays']} graph replays, {g['eager_calls']} eager calls "
             f"({'; '.join(g['eager_reasons'])})" for r in rows if (g := r.get("graphs")) and g["eager_calls"]]
    return ["", "CUDA-graph rows that ran (partly) eagerly:", ""] + notes if notes else []


def _command_lines(m: dict) -> list[str]:
    """The command and git commit of the run, where its results.json has them (older runs' do not)."""
    if "command" not in m:
        return []
    return [f"Code at git {m.get('commit', 'unknown')}. Command:", "", f"    {m['command']}", ""]


def _known_variants_only(res: dict) -> tuple[dict, list[str]]:
    """`res` without the rows (and sizes) of variants this script no longer has, and those rows' labels."""
    dropped, families = [], {}
    for name, fam in res["families"].items():
        rows = [r for r in fam.get("rows", []) if r["variant"] in VARIANTS]
        dropped += sorted({r["label"] for r in fam.get("rows", []) if r["variant"] not in VARIANTS})
        sizes = {kind: {k: v for k, v in table.items() if k in VARIANTS} if isinstance(table, dict) else table
                 for kind, table in fam.get("sizes", {}).items()}
        families[name] = {**fam, "rows": rows, **({"sizes": sizes} if "sizes" in fam else {})}
    return {**res, "families": families}, dropped


def render(res: dict) -> str:
    """The markdown report of a results.json (`res`); rows of variants no longer defined here are left out, named."""
    res, dropped = _known_variants_only(res)
    m = res["meta"]
    batches = m["batches"]
    lines = ["# Inference speed and memory: W4A8 speed path and W4 memory path", "",
             f"Card: {m['gpu']}; torch {m['torch']}; diffusers {m['diffusers']}; torchao {m['torchao']}; {m['date']}. "
             f"Full-size random-weight denoisers at 512 px ({m['latent']}×{m['latent']} latents), one denoiser step "
             f"per call at the given batch. Weights: RTN W4 symmetric of the block layers (embedders and final "
             f"projections stay in float). W4A8: per-channel weights as exact e4m3, {m['act_mode']} e4m3 activations, "
             f"torch._scaled_mm row-wise (fast accumulation), q/k/v fused; layers the FP8 GEMM cannot take: "
             f"{m['others']}. Memory path: packed int4, fp16 group scales, dequantized per call. torch.compile mode "
             f"{m['compile_mode']}, static shapes per batch. Latency: median of {m['repeats']} CUDA-event-timed "
             f"steps after {m['warmup']} warm-up steps. Wall time of this run: {m.get('wall_s', 0):.0f} s.", "",
             *_command_lines(m), "## Goals", ""]
    older, graph = goals(res), graph_goals(res)
    if older:
        lines += older + [""]
    if graph:
        lines += ["CUDA-graph rows against BF16 + compile + CUDA graphs of this run:", ""] + graph + [""]
    if not older and not graph:
        lines += ["No goal's rows were measured in this run.", ""]
    if dropped:
        lines += ["Rows of variants no longer in benchmarks/inference_speed.py are left out of this rendering: "
                  + "; ".join(dropped) + ".", ""]
    for fam in res["families"].values():
        lines += family_section(fam, batches)
    q = res.get("quality")
    if q and "rows" in q:
        gemm = ", ".join(f"{k}: {v}" for k, v in q["kernel"].items())
        lines += [f"## Quality of the timed W4A8 numerics ({q['model']})", "",
                  f"Denoiser noise predictions on {q['records']} recorded calibration inputs (batch {q['batch']}); "
                  f"FP8 GEMM ({gemm}). The reference is the fp32 model; the fake-quant model has the same W4 codes.",
                  ""]
        lines += _table(["numerics", "PSNR vs FP (dB)", "PSNR vs fake-quant A8 (dB)", "rel. error vs FP"],
                        [[QUALITY_LABELS.get(r["numerics"], r["numerics"]), f"{r['psnr_vs_fp_db']:.1f}",
                          f"{r['psnr_vs_fake_db']:.1f}", f"{r['rel_err_vs_fp']:.4f}"] for r in q["rows"]])
        acc = q.get("prompt_acc")
        if acc and "error" in acc:
            lines += ["", f"prompt_acc: {acc['error']}"]
        elif acc:
            lines += ["", "Sampled images (bundled pipelines, their own sampling settings): prompt_acc with the "
                      "bundled evaluator and its Wilson 95 % interval; image PSNR and LPIPS against the FP32 "
                      "pipeline's images, PSNR with its bootstrap 95 % interval over images. Differences inside the "
                      "intervals are ties.", ""]
            lines += _table(["numerics", "images", "prompt_acc (95 %)", "image PSNR dB (95 %)", "LPIPS"],
                            [[QUALITY_LABELS.get(k, k), str(v.get("n_images", "")), _with_interval(
                                v["prompt_acc"], v.get("prompt_acc_lo"), v.get("prompt_acc_hi"), ".3f"),
                              _with_interval(v["psnr_db"], v.get("psnr_lo"), v.get("psnr_hi"), ".1f"),
                              "" if v["lpips"] is None else format(v["lpips"], ".4f")] for k, v in acc.items()])
    elif q:
        lines += ["## Quality", "", f"failed: {q.get('error')}"]
    return "\n".join(lines) + "\n"
