"""benchmarks/inference_speed.py: a CPU smoke run (one PixArt block, tiny latents, eager rows) and the report."""
import json
import sys

import pytest

from diffptq.kernels.profiling import CATEGORIES


@pytest.fixture(scope="module")
def bench(benchmark_script):
    return benchmark_script("inference_speed")


def test_cpu_smoke_run_writes_json_and_report(bench, tmp_path, monkeypatch):
    out, report = tmp_path / "out", tmp_path / "r.md"
    monkeypatch.setattr(sys, "argv", [
        "inference_speed.py", "--families", "pixart", "--num_layers", "1", "--latent", "8", "--batches", "1",
        "--device", "cpu", "--variants", "w4,fp16,w4a8s_compile,w4a8,w4a8_graphs,w4a8_compile_graphs_fp8attn,"
        "w4_triton_compile_graphs,torchao_int4wo_compile_graphs,w4a8si4_compile_graphs",
        "--quality_model", "tiny-dit",
        "--quality_prompts", "2", "--quality_steps", "2", "--quality_records", "1", "--warmup", "0",
        "--repeats", "1", "--profile", "", "--out", str(out), "--report", str(report)])
    bench.main()
    res = json.loads((out / "results.json").read_text())
    rows = {r["variant"]: r for r in res["families"]["pixart"]["rows"]}
    # measured in the order given (compiled: eagerly)
    assert list(rows) == ["w4", "fp16", "w4a8s_compile", "w4a8", "w4a8_graphs", "w4a8_compile_graphs_fp8attn",
                          "w4_triton_compile_graphs", "torchao_int4wo_compile_graphs", "w4a8si4_compile_graphs"]
    assert rows.pop("torchao_int4wo_compile_graphs")["skipped"] == ("torchao's int4 weight-only kernel (tinygemm, "
                                                                    "torch._weight_int4pack_mm) runs on CUDA only")
    assert all("error" not in r and r["latency_ms"] is None for r in rows.values())
    graphs = rows["w4a8_graphs"]["graphs"]  # off CUDA the wrapped denoiser ran eagerly, and the row says so
    assert graphs["replays"] == 0 and graphs["eager_calls"] >= 1 and "graphs" not in rows["w4a8"]
    # the one block's self-attention on FP8 operands in that row only
    assert res["families"]["pixart"]["fp8_attention"] == {"w4a8_compile_graphs_fp8attn": 1}
    # the fused int4 GEMM row switches every memory-path Linear (q/k/v and the cross k/v fused: 7 for 10 layers)
    assert res["families"]["pixart"]["int4_matmul"] == {"w4_triton_compile_graphs": 7}
    sizes = res["families"]["pixart"]["sizes"]
    assert sizes["memory"]["w4"] < 0.7 * sizes["memory"]["fp16"] and sizes["disk"]["w4"] < sizes["disk"]["fp16"]
    assert set(sizes["checkpoint"]) == {"w4", "w4a8"}
    conv = res["families"]["pixart"]["conversion"]
    assert conv["w4a8"]["counts"] == {"Fp8W4A8Linear": 10} and conv["w4a8"]["fused_attention"] == 2
    # packed int4 storage: the same layers and fusions, weights in about half the bytes of the e4m3 row's
    assert conv["w4a8s_int4"]["counts"] == {"Fp8W4A8PackedLinear": 10} and conv["w4a8s_int4"]["fused_attention"] == 2
    saved = sizes["memory"]["w4a8s_compile"] - sizes["memory"]["w4a8si4_compile_graphs"]
    assert saved > 0.4 * sizes["fp16_quantized_weights"] / 2  # of the e4m3 weights' bytes (half of fp16's)
    # q/k/v (and the cross-attention k/v) calibrated on their shared input get equal static scales: fused as well
    assert conv["w4a8s"]["fused_attention"] == 2
    assert conv["w4a8"]["sigmoid_gelu"] == conv["w4a8s"]["sigmoid_gelu"] == conv["w4"]["sigmoid_gelu"] == 1
    quality = {r["numerics"]: r for r in res["quality"]["rows"]}
    assert quality["fp8_token"]["psnr_vs_fp_db"] > 30 and quality["fake_int8_token"]["psnr_vs_fake_db"] == float("inf")
    # the static numerics the w4a8s row times: e4m3 with the scale of the calibrated int8 grid, close to that grid
    assert res["quality"]["kernel"]["static"] == "fp32 reference"
    assert quality["fp8_static"]["psnr_vs_fp_db"] > 25 and quality["fake_int8_static"]["psnr_vs_fp_db"] > 25
    text = report.read_text()
    assert "Card: CPU (smoke run)" in text and "## Goals" in text and "W4A8 speed path" in text
    assert "- W4A8 speed path, eager + CUDA graphs, batch 1: 0 graph replays" in text
    assert "\n    python inference_speed.py --families pixart --num_layers 1 " in text  # the exact command
    assert f"Code at git {res['meta']['commit']}. Command:" in text


def test_unknown_variant_is_a_usage_error(bench, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["inference_speed.py", "--variants", "fp16,w4a16", "--device", "cpu"])
    with pytest.raises(SystemExit) as err:
        bench.main()
    assert err.value.code == 2 and "unknown --variants w4a16; known: fp16, bf16_compile" in capsys.readouterr().err


def test_cuda_graphs_with_per_block_compilation_is_a_usage_error(bench, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["inference_speed.py", "--compile_mode", "reduce-overhead", "--compile_scope",
                                      "blocks", "--device", "cpu"])
    with pytest.raises(SystemExit) as err:
        bench.main()
    assert err.value.code == 2 and "use --compile_scope full" in capsys.readouterr().err
    args = bench.argparse.Namespace(compile_scope="auto", compile_mode="reduce-overhead")
    run = object.__new__(bench.FamilyRun)  # compile_scope reads only these two fields
    run.name, run.args = "pixart", args
    assert run.compile_scope() == "full"
    args.compile_mode = "default"
    assert run.compile_scope() == "blocks"


def test_every_ordered_variant_is_defined(bench):
    for family, keys in bench.ORDER.items():
        assert set(keys) <= set(bench.VARIANTS), family
        assert len(set(keys)) == len(keys), family
    assert set(bench.VARIANTS) == set(bench.ORDER["pixart"])  # PixArt measures every variant


def _row(variant, batch, ms=None, peak=None):
    return {"variant": variant, "batch": batch, "label": variant, "latency_ms": ms, "peak_vram_gib": peak}


def _pixart_result(rows: list[dict]) -> tuple[dict, dict]:
    """A results.json of one PixArt family with these rows: (the whole result, the family)."""
    pixart = {"family": "pixart", "title": "PixArt", "params": 611e6, "quantized_params": 594e6,
              "quantized_layers": 224, "groups": {"128": 224}, "compile_scope": "blocks", "profiles": {},
              "sizes": {"disk": {"fp16": 1222e6, "w4": 340e6}, "checkpoint": {"w4": 334e6},
                        "fp16_quantized_weights": 1188e6, "memory": {"fp16": 1222e6}}, "rows": rows}
    res = {"meta": {"gpu": "H100", "torch": "2.11", "diffusers": "0.42", "torchao": "0.17", "date": "2026-11-25",
                    "batches": [16, 1], "latent": 64, "act_mode": "token", "others": "dequant",
                    "compile_mode": "default", "warmup": 3, "repeats": 10}, "families": {"pixart": pixart}}
    return res, pixart


def test_goals_report_measured_ratios(bench):
    res, pixart = _pixart_result([
        _row("fp16", 16, 57.7), _row("bf16_compile", 16, 46.3), _row("w4a8_compile", 16, 38.0),
        _row("w4a8s_compile", 16, 36.0), _row("torchao_compile", 16, 47.0), _row("fp16", 1, 5.0, 1.4),
        _row("w4", 1, 6.0, 0.5), {"variant": "w4", "batch": 16, "label": "w4", "error": "OOM"}])
    text = bench.render(res)
    assert "| PixArt W4A8 speed path + compile vs BF16 + compile, batch 16 (speed-up) | 1.22× | ≥ 1.15× | yes |" in text
    assert "| PixArt W4A8 speed path + compile vs FP16 eager, batch 16 (speed-up) | 1.52× | ≥ 1.4× | yes |" in text
    assert ("| PixArt W4A8 speed path, static per-tensor activations + compile vs torchao FP8 dynamic row-wise + "
            "compile, batch 16 (speed-up) | 1.31× | ≥ 1.3× | yes |") in text
    assert ("| PixArt W4A8 speed path + compile vs torchao FP8 dynamic row-wise + compile, batch 16 (speed-up) "
            "| 1.24× | ≥ 1.3× | no |") in text
    assert "Triton" not in text and "sigmoid form" not in text  # variants not measured get no goal rows
    pixart["rows"].append(_row("bf16_compile_sgelu", 16, 43.2))
    assert ("| PixArt W4A8 speed path, static per-tensor activations + compile vs BF16 + compile, GELU in sigmoid "
            "form, batch 16 (speed-up) | 1.20× | ≥ 1.15× | yes |") in bench.render(res)
    # references under coordinate-descent tuning are compared with the W4A8 rows tuned alike only
    pixart["rows"] += [_row("torchao_compile_cdt", 16, 45.0), _row("w4a8s_compile_cdt", 16, 36.0)]
    text = bench.render(res)
    assert ("| PixArt W4A8 speed path, static per-tensor activations + compile, coordinate-descent tuning vs torchao "
            "FP8 dynamic row-wise + compile, coordinate-descent tuning, batch 16 (speed-up) | 1.25× | ≥ 1.3× | no |"
            in text)
    assert "+ compile vs torchao FP8 dynamic row-wise + compile, coordinate-descent" not in text
    assert "coordinate-descent tuning vs torchao FP8 dynamic row-wise + compile, batch 16" not in text
    assert "coordinate-descent tuning vs FP16 eager, batch 16 (speed-up) | 1.60×" in text  # eager: no tuning
    del pixart["sizes"]["disk"]["w4"]
    assert "PixArt W4 transformer on disk (MB)" not in bench.render(res)  # not built: no row
    assert "memory-path tensors / FP16 | 0.28× | ≤ 0.3× | yes |" in text
    assert "peak VRAM at batch 1 / FP16 eager | 0.36× | ≤ 0.5× | yes |" in text
    assert "W4 memory path, eager FP16 vs FP16 eager, batch 16 (speed-up) | n/a" in text
    assert "- w4, batch 16: OOM" in text


def test_quality_path_runs_for_the_unet_family(bench, tmp_path, monkeypatch):
    """The quality rows read the latent batch of either family's inputs (PixArt hidden_states, UNet sample)."""
    out = tmp_path / "out"
    monkeypatch.setattr(sys, "argv", [
        "inference_speed.py", "--families", "", "--device", "cpu", "--quality_model", "tiny-unet",
        "--quality_prompts", "2", "--quality_steps", "2", "--quality_records", "1", "--warmup", "0",
        "--repeats", "1", "--profile", "", "--out", str(out), "--report", str(tmp_path / "r.md")])
    bench.main()
    quality = json.loads((out / "results.json").read_text())["quality"]
    assert "error" not in quality and quality["model"] == "tiny-unet" and quality["batch"] == 4  # 2 prompts × CFG
    rows = {r["numerics"]: r for r in quality["rows"]}
    assert rows["fake_int8_token"]["psnr_vs_fake_db"] == float("inf")
    assert rows["fp8_token"]["psnr_vs_fake_db"] > rows["fp8_token"]["psnr_vs_fp_db"]  # the timed numerics track fake


def test_graph_goals_compare_graph_rows_with_bf16_compile_graphs(bench):
    """The CUDA-graph rows' goals: W4A8 per family and batch, W4 ≥ 0.95× at every batch and ≤ 0.35× peak VRAM at
    batch 1; rows without a reference at that batch get none, and a run with no graph rows gets no table."""
    rows = [_row("bf16_compile_graphs", 1, 4.8, 1.2), _row("bf16_compile_graphs", 4, 12.0),
            _row("w4a8_compile_graphs", 1, 4.0), _row("w4a8_compile_graphs", 4, 10.0),
            _row("w4_compile_graphs", 1, 5.0, 0.4), _row("w4_compile_graphs", 16, 40.0)]
    from inference_speed_report import graph_goals

    text = "\n".join(graph_goals({"families": {"pixart": {"family": "pixart", "rows": rows}}}))
    assert "| PixArt W4A8 speed path + compile + CUDA graphs, batch 1 (speed-up) | 1.20× | ≥ 1.15× | yes |" in text
    assert "| PixArt W4A8 speed path + compile + CUDA graphs, batch 4 (speed-up) | 1.20× | ≥ 1.25× | no |" in text
    assert "W4 memory path + compile + CUDA graphs (BF16), batch 1 (speed-up) | 0.96× | ≥ 0.95× | yes |" in text
    assert "CUDA graphs (BF16), peak VRAM at batch 1 / BF16 | 0.33× | ≤ 0.35× | yes |" in text
    assert "batch 16" not in text  # no BF16 graph row at batch 16
    assert graph_goals({"families": {"pixart": {"family": "pixart", "rows": rows[:2]}}}) == []


def test_a_run_of_graph_rows_only_gets_the_graph_goals_and_a_run_of_none_says_so(bench):
    """The older goal table is left out when none of its rows ran (no table of n/a rows); no goals at all: one line."""
    res, pixart = _pixart_result([_row("bf16_compile_graphs", 1, 4.7, 1.2), _row("w4a8_compile_graphs", 1, 4.0)])
    pixart["sizes"] = {}
    text = bench.render(res)
    assert "| PixArt W4A8 speed path + compile + CUDA graphs, batch 1 (speed-up) | 1.18× | ≥ 1.15× | yes |" in text
    assert "vs BF16 + compile, batch 16" not in text and "No goal's rows" not in text
    pixart["rows"] = [_row("bf16_compile_graphs", 1, 4.7, 1.2)]
    assert "## Goals\n\nNo goal's rows were measured in this run.\n" in bench.render(res)


def test_rows_under_other_inductor_settings_are_also_compared_with_bf16_under_the_same_settings(bench):
    """W4 with combo kernels: its goal row against plain BF16 + compile + graphs, and a second row against BF16
    compiled with combo kernels too, when that row ran (what the setting gives any model is not the W4 path's)."""
    from inference_speed_report import graph_goals

    rows = [_row("bf16_compile_graphs", 1, 4.8, 1.2), _row("w4_compile_combo_graphs", 1, 5.0, 0.4)]
    res = {"families": {"pixart": {"family": "pixart", "rows": rows}}}
    text = "\n".join(graph_goals(res))
    assert "| PixArt W4 memory path + compile, combo kernels (dequantizations launched together) + CUDA graphs, " \
           "batch 1 (speed-up) | 0.96× | ≥ 0.95× | yes |" in text
    assert "vs BF16 + compile, combo kernels" not in text  # that reference did not run
    rows.append(_row("bf16_compile_combo_graphs", 1, 4.5, 1.2))
    text = "\n".join(graph_goals(res))
    assert ("CUDA graphs vs BF16 + compile, combo kernels + CUDA graphs, batch 1 (speed-up) | 0.90× | ≥ 0.95× | no |"
            in text)
    assert "| PixArt BF16 + compile, combo kernels + CUDA graphs, batch 1" not in text  # references get no goal


def test_rows_of_removed_variants_are_left_out_of_a_rendering_and_named(bench):
    """A results.json from before a variant was removed still renders: its rows and sizes are dropped, named once."""
    res, pixart = _pixart_result([_row("bf16_compile_graphs", 1, 4.7, 1.2), _row("w4a8_compile_graphs", 1, 4.0),
                                  {**_row("w4a8_gone_graphs", 1, 3.0), "label": "W4A8, a removed variant"}])
    pixart["sizes"]["memory"]["w4a8_gone_graphs"] = 600e6
    text = bench.render(res)
    assert ("Rows of variants no longer in benchmarks/inference_speed.py are left out of this rendering: W4A8, a "
            "removed variant.") in text
    assert text.count("W4A8, a removed variant") == 1  # in no table
    assert "| PixArt W4A8 speed path + compile + CUDA graphs, batch 1 (speed-up) | 1.18× | ≥ 1.15× | yes |" in text
    assert len(pixart["rows"]) == 3 and "w4a8_gone_graphs" in pixart["sizes"]["memory"]  # the input is not changed


def test_a_graph_rows_profile_runs_the_wrapped_denoiser_and_says_so(bench, tmp_path, monkeypatch):
    """A CUDA-graph replay hides its kernels from the profiler: the profiled call goes to the compiled denoiser
    inside the GraphedDenoiser, and the report names that."""
    calls = {"graphed": 0, "profiled_graphed": 0}
    forward = bench.GraphedDenoiser.forward

    def counting_forward(self, *args, **kwargs):
        calls["graphed"] += 1
        return forward(self, *args, **kwargs)

    def fake_profile(step):
        before = calls["graphed"]
        out = step()
        calls["profiled_graphed"] += calls["graphed"] - before
        assert isinstance(out, tuple) and out[0].ndim == 4  # the denoiser's (sample,) output
        return {"total_ms": 1.0, "ms": dict.fromkeys(CATEGORIES, 0.2), "share": dict.fromkeys(CATEGORIES, 0.2),
                "top": [("k", 1.0, "gemm")]}

    monkeypatch.setattr(bench.GraphedDenoiser, "forward", counting_forward)
    monkeypatch.setattr(bench, "profile_step", fake_profile)
    out = tmp_path / "out"
    monkeypatch.setattr(sys, "argv", [
        "inference_speed.py", "--families", "pixart", "--num_layers", "1", "--latent", "8", "--batches", "1",
        "--device", "cpu", "--variants", "w4a8_graphs,w4a8", "--skip_quality", "--warmup", "0", "--repeats", "1",
        "--profile", "w4a8_graphs,w4a8", "--out", str(out)])
    bench.main()
    res = json.loads((out / "results.json").read_text())
    assert set(res["families"]["pixart"]["profiles"]) == {"w4a8_graphs@1", "w4a8@1"}
    assert calls["graphed"] > 0 and calls["profiled_graphed"] == 0  # timed through the wrapper, profiled inside it
    text = bench.render(res)
    note = "(its kernels launched one by one outside the CUDA graph, which hides them from the profiler)"
    assert f"W4A8 speed path, eager + CUDA graphs step at batch 1 {note}" in text
    assert f"W4A8 speed path, eager step at batch 1 {note}" not in text
    assert "W4A8 speed path, eager step at batch 1 (1.0 ms of kernels)" in text
