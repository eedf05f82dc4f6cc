"""The markdown report of benchmarks/pipeline_latency.py (also what `--render DIR` prints), from results.json alone:
the setting, the goal (PixArt end-to-end at batch 1 against BF16 + compile), then per family one table of rows."""
from __future__ import annotations

from diffptq.eval.report import markdown_table
from inference_speed_report import graph_notes

REFERENCE = "bf16_compile"  # the speed-ups' denominator: BF16 + compile at the same batch, same process
GOAL = ("pixart", 1, 1.1)  # family, batch, speed-up of a quantized + compiled row over the reference
COLUMNS = ("variant", "batch", "ms / call", "ms / image", "speed-up vs BF16 + compile", "denoiser speed-up",
           "speed-up, shared parts pooled", "denoiser share",
           "denoiser ms", "text encoder ms", "VAE decode ms", "other ms", "peak VRAM GiB", "denoiser MB",
           "first call s")


def _fmt(value, spec: str, unit: str = "") -> str:
    return "n/a" if value is None else format(value, spec) + unit


def _row_cells(r: dict, fam: dict) -> dict:
    cells = {"variant": r["label"], "batch": str(r["batch"])}
    if "error" in r or "skipped" in r:
        return {**cells, "ms / call": "error" if "error" in r else "skipped"}
    ms = {c: _fmt(r.get(k) and 1e3 * r[k], ".1f") for c, k in (
        ("ms / call", "median_s"), ("ms / image", "per_image_s"), ("denoiser ms", "denoiser_s"),
        ("text encoder ms", "text_encoder_s"), ("VAE decode ms", "vae_decode_s"), ("other ms", "other_s"))}
    size = fam.get("sizes", {}).get("memory", {}).get(r["variant"])
    return {**cells, **ms, "speed-up vs BF16 + compile": _fmt(r.get("speedup_vs_bf16_compile"), ".2f", "×"),
            "denoiser speed-up": _fmt(r.get("denoiser_speedup"), ".2f", "×"),
            "speed-up, shared parts pooled": _fmt(r.get("pooled_speedup"), ".2f", "×"),
            "denoiser share": _fmt(r.get("denoiser_share") and 100 * r["denoiser_share"], ".0f", "%"),
            "peak VRAM GiB": _fmt(r.get("peak_vram_gib"), ".2f"), "denoiser MB": _fmt(size and size / 1e6, ".0f"),
            "first call s": _fmt(r.get("first_call_s"), ".1f")}


def goal_lines(res: dict) -> list[str]:
    """The issue's goal: every quantized row of PixArt at batch 1 against BF16 + compile (met / missed / n/a)."""
    family, batch, target = GOAL
    fam = res["families"].get(family, {"rows": []})
    rows = []
    for r in fam["rows"]:
        if r["batch"] != batch or r["variant"].startswith(("fp16", "bf16")):  # float rows: not quantized
            continue
        ratio, pooled = r.get("speedup_vs_bf16_compile"), r.get("pooled_speedup")
        shown = "n/a" if ratio is None else f"{ratio:.2f}×" + ("" if pooled is None else f" ({pooled:.2f}× pooled)")
        met = "n/a" if ratio is None else "yes" if min(ratio, pooled or ratio) >= target else "no"
        rows.append({"goal": f"PixArt end-to-end, batch {batch}: {r['label']} vs BF16 + compile (speed-up)",
                     "measured": shown, "target": f"≥ {target}×", "met": met})
    if not rows:
        return ["No quantized PixArt row at batch 1 in this run.", ""]
    return markdown_table(rows, ["goal", "measured", "target", "met"]).splitlines() + [""]


def family_lines(fam: dict) -> list[str]:
    """One family: what the pipeline is made of, its rows by batch, and what was not measured."""
    lines = [f"## {fam['title']}", ""]
    info = fam.get("pipeline")
    if info:
        lines += [f"{info['resolution_px']} px; denoiser {info['denoiser']}; text encoder {info['text_encoder']}; "
                  f"VAE {info['vae']}; {info['scheduler']} (components: {info['components']}).", ""]
    rows = sorted(fam["rows"], key=lambda r: r["batch"])  # stable: variants in measuring order within a batch
    if rows:
        lines += markdown_table([_row_cells(r, fam) for r in rows], COLUMNS).splitlines()
    problems = [r for r in rows if "error" in r or "skipped" in r]
    lines += graph_notes(rows)
    if fam.get("error"):
        problems.append({"label": "the family run", "batch": "-", "error": fam["error"]})
    if problems:
        lines += ["", "Not measured:", ""]
        lines += [f"- {r['label']}, batch {r['batch']}: {r.get('error') or r['skipped']}" for r in problems]
    return lines + [""]


def render(res: dict) -> str:
    """The markdown report of a results.json (`res`)."""
    m = res["meta"]
    cpu = m["gpu"].startswith("CPU")
    compiled = "the denoiser, the text encoder and the VAE decode" if m["compile_all"] else \
        "the denoiser only (whole; text encoder and VAE eager)"
    models = "tiny random pipelines (tiny-dit / tiny-unet: a smoke run)" if m["tiny"] else {
        "full": "full-size random-weight pipelines with real-size (random) text encoders and VAE",
        "standin": "full-size random-weight denoisers with the small stand-in text encoder and VAE of fullsize-* "
                   "(their cost is not representative)"}[m["components"]]
    lines = ["# End-to-end pipeline latency: quantized denoisers vs BF16 + compile", "",
             f"Card: {m['gpu']}; torch {m['torch']}; diffusers {m['diffusers']}; torchao {m['torchao']}; {m['date']}. "
             f"Wall time of this run: {m.get('wall_s', 0):.0f} s. Code at git {m.get('commit', 'unknown')}. "
             "Command:", "",
             f"    {m['command']}", "",
             f"Models: {models}. One call = `pipe(prompt=..., output_type=\"pt\")`: text encoder (prompt and "
             f"negative), {m['steps']} denoiser steps with CFG {m['guidance_scale']} (each at twice the batch), VAE "
             f"decode; the same prompts and per-image seeds in every row. Batch = prompts per call. Compiled: "
             f"{compiled}; torch.compile mode {m['compile_mode']} for every compiled row. The first call (compilation "
             f"included) is the last column, not in the medians; then {m['warmup']} warm-up calls; then the median "
             f"of {m['repeats']} calls timed by the wall clock (GPU synchronized around each). Denoiser / text "
             "encoder / VAE decode: CUDA-event time of their calls within the timed calls; other: the rest "
             "(scheduler, guidance, pre/post-processing, launch gaps between them). Peak VRAM: one more call, every "
             "component resident. Speed-up: BF16 + compile's median at the same batch over the row's (>1: faster; a "
             "CUDA-graph row's reference is BF16 + compile + CUDA graphs where the run has it); denoiser speed-up: "
             "the same ratio of the denoiser's time alone; shared parts pooled: the same ratio with what every row "
             "shares (text encoder, VAE, the rest) at its median over the batch's rows, so that its spread between "
             "rows does not count as a speed-up (the goal is met only when both this and the measured ratio reach "
             f"it); all rows of one process. W4A8 activations: "
             f"{m['act_mode']}; layers the FP8 GEMM cannot take: {m['others']}.", ""]
    if cpu:
        lines += ["**CPU smoke run**: compiled rows ran eagerly, the parts were timed by the wall clock; the times say "
                  "nothing about GPU speed.", ""]
    lines += ["## Goal", ""] + goal_lines(res)
    for fam in res["families"].values():
        lines += family_lines(fam)
    return "\n".join(lines) + "\n"
