"""benchmarks/pipeline_latency.py: a CPU smoke run on tiny-dit / tiny-unet (compiled rows run eagerly), the speed-up
arithmetic against the JSON's medians, failures recorded as rows while the run goes on, and usage errors."""
import datetime as dt
import json
import statistics
import sys

import pytest
import torch

VARIANTS = ["bf16", "bf16_compile", "w4a8_compile", "w4_compile"]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def bench(benchmark_script):
    return benchmark_script("pipeline_latency")


def _run(bench, monkeypatch, tmp_path, *flags) -> tuple[dict, str]:
    out = tmp_path / "out"
    monkeypatch.setattr(sys, "argv", ["pipeline_latency.py", "--device", "cpu", "--tiny", "--steps", "2",
                                      "--warmup", "0", "--repeats", "2", "--out", str(out), *flags])
    bench.main()
    return json.loads((out / "results.json").read_text()), (out / "report.md").read_text()


def _row(rows: list[dict], variant: str, batch: int) -> dict:
    return next(r for r in rows if r["variant"] == variant and r["batch"] == batch)


def test_cpu_smoke_run_writes_rows_ratios_and_report(bench, monkeypatch, tmp_path):
    report = tmp_path / "pipeline_latency_pixart_sd_cpu.md"
    res, text = _run(bench, monkeypatch, tmp_path, "--batches", "1,2", "--report", str(report))
    for family in ("pixart", "sd"):
        fam = res["families"][family]
        rows = fam["rows"]
        # one row per (variant, batch), built once per variant, batches in the order given
        assert [(r["variant"], r["batch"]) for r in rows] == [(v, b) for v in VARIANTS for b in (1, 2)]
        for r in rows:
            assert "error" not in r and "skipped" not in r, r
            assert r["denoiser_calls"] == 2 and len(r["times_s"]) == 2  # --steps denoiser calls (CFG batched)
            assert r["median_s"] == statistics.median(r["times_s"])
            assert r["per_image_s"] == pytest.approx(r["median_s"] / r["batch"])
            ref = _row(rows, "bf16_compile", r["batch"])  # the reference of the same batch, never the other one
            assert r["speedup_vs_bf16_compile"] == pytest.approx(ref["median_s"] / r["median_s"])
            assert r["denoiser_share"] == pytest.approx(r["denoiser_s"] / r["median_s"]) and 0 < r["denoiser_share"] < 1
            assert r["text_encoder_s"] > 0 and r["vae_decode_s"] > 0 and r["peak_vram_gib"] is None  # CPU: no VRAM
            parts = r["denoiser_s"] + r["text_encoder_s"] + r["vae_decode_s"] + r["other_s"]
            assert parts == pytest.approx(r["median_s"], rel=0.5)  # medians of parts vs of totals: close, not equal
        assert _row(rows, "bf16_compile", 1)["speedup_vs_bf16_compile"] == 1.0
        conv = fam["conversion"]
        assert conv["w4a8"]["path"] == "w4a8" and conv["w4a8"]["counts"].get("Fp8W4A8Linear", 0) > 0
        assert conv["w4"]["path"] == "w4" and conv["w4"]["counts"].get("Int4WeightOnlyLinear", 0) > 0
        assert fam["pipeline"]["components"] == "tiny" and fam["pipeline"]["resolution_px"] == 16
    m = res["meta"]
    assert m["command"].startswith("python pipeline_latency.py --device cpu --tiny --steps 2")
    assert m["compile_mode"] == "reduce-overhead" and m["guidance_scale"] == 4.5
    assert f"torch {torch.__version__}" in text and dt.date.today().isoformat() in text
    assert "Card: CPU (smoke run)" in text and m["command"] in text and "**CPU smoke run**" in text
    assert "Compiled: the denoiser only" in text and "torch.compile mode reduce-overhead" in text
    pixart = res["families"]["pixart"]["rows"]
    row = _row(pixart, "w4a8_compile", 1)
    ratio, pooled = row["speedup_vs_bf16_compile"], row["pooled_speedup"]
    assert (f"| PixArt end-to-end, batch 1: W4A8 speed path + compile vs BF16 + compile (speed-up) | {ratio:.2f}× "
            f"({pooled:.2f}× pooled) | ≥ 1.1× | {'yes' if min(ratio, pooled) >= 1.1 else 'no'} |") in text
    assert text.count("| W4 memory path + compile (BF16) | 2 |") == 2  # one line per family
    assert report.read_text() == text
    rendered = tmp_path / "again.md"
    monkeypatch.setattr(sys, "argv", ["pipeline_latency.py", "--render", str(tmp_path / "out"),
                                      "--report", str(rendered)])
    bench.main()
    assert rendered.read_text() == text  # the report comes from the JSON alone


def test_failures_become_rows_and_the_run_goes_on(bench, monkeypatch, tmp_path):
    speed = sys.modules[bench.FamilyRun.__module__]  # inference_speed, whose FamilyRun.build converts
    convert = speed.convert_for_inference

    def no_int4(den, path, *args, **kwargs):
        if path == "w4":
            raise RuntimeError("no int4 kernel here")
        return convert(den, path, *args, **kwargs)

    measure = bench.PipelineRun.measure

    def reference_fails_at_batch_1(self, v, den, batch):
        if v.key == "bf16_compile" and batch == 1:
            raise RuntimeError("graph capture failed")
        return measure(self, v, den, batch)

    build = bench.build_pipeline

    def no_unet(family, args):
        if family == "sd":
            raise MemoryError("out of memory")
        return build(family, args)

    monkeypatch.setattr(speed, "convert_for_inference", no_int4)
    monkeypatch.setattr(bench.PipelineRun, "measure", reference_fails_at_batch_1)
    monkeypatch.setattr(bench, "build_pipeline", no_unet)
    res, text = _run(bench, monkeypatch, tmp_path, "--families", "pixart,sd", "--batches", "1,2")
    rows = res["families"]["pixart"]["rows"]
    assert len(rows) == 8
    assert _row(rows, "w4_compile", 1)["error"] == _row(rows, "w4_compile", 2)["error"] == \
        "RuntimeError: no int4 kernel here"
    assert _row(rows, "bf16_compile", 1)["error"] == "RuntimeError: graph capture failed"
    assert _row(rows, "w4a8_compile", 1)["median_s"] > 0
    assert _row(rows, "w4a8_compile", 1)["speedup_vs_bf16_compile"] is None  # no reference at batch 1
    b2 = _row(rows, "w4a8_compile", 2)
    assert b2["speedup_vs_bf16_compile"] == pytest.approx(_row(rows, "bf16_compile", 2)["median_s"] / b2["median_s"])
    assert res["families"]["sd"]["error"] == "MemoryError: out of memory"
    assert "- W4 memory path + compile (BF16), batch 1: RuntimeError: no int4 kernel here" in text
    assert "- BF16 + compile, batch 1: RuntimeError: graph capture failed" in text
    assert "- the family run, batch -: MemoryError: out of memory" in text
    goal = "| PixArt end-to-end, batch 1: W4A8 speed path + compile vs BF16 + compile (speed-up) | n/a | ≥ 1.1× | n/a |"
    assert goal in text


def test_cuda_graph_rows(bench, monkeypatch, tmp_path):
    """The CUDA-graph variants run (off CUDA: eagerly, as the row and report say); compiled ones under a compile mode
    that records graphs itself are skipped with the reason."""
    res, text = _run(bench, monkeypatch, tmp_path, "--families", "sd", "--batches", "1",
                     "--variants", "w4a8_graphs,bf16_compile_graphs")
    rows = {r["variant"]: r for r in res["families"]["sd"]["rows"]}
    assert rows["w4a8_graphs"]["median_s"] > 0 and rows["w4a8_graphs"]["graphs"]["replays"] == 0
    assert "records CUDA graphs itself" in rows["bf16_compile_graphs"]["skipped"]
    assert "- W4A8 speed path, eager + CUDA graphs, batch 1: 0 graph replays" in text


@pytest.mark.parametrize("flags, message", [
    (["--variants", "bf16,w4a16"], "unknown --variants w4a16; known: bf16, fp16, bf16_compile"),
    (["--batches", "1,x"], "--batches '1,x': a comma list of positive integers"),
    (["--batches", "0"], "a comma list of positive integers"),
    (["--families", "pixart,flux"], "--families 'pixart,flux': a comma list of pixart, sd"),
    (["--compile_mode", "fast"], "argument --compile_mode: invalid choice: 'fast'"),
    (["--components", "real"], "argument --components: invalid choice: 'real'"),
    (["--repeats", "0"], "--repeats must be at least 1, --warmup at least 0"),
    (["--steps", "1"], "--steps 1: at least 2"),
])
def test_bad_flags_are_usage_errors(bench, monkeypatch, capsys, flags, message):
    monkeypatch.setattr(sys, "argv", ["pipeline_latency.py", "--device", "cpu", *flags])
    with pytest.raises(SystemExit) as err:
        bench.main()
    assert err.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without CUDA")
def test_cuda_without_a_gpu_is_a_usage_error(bench, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["pipeline_latency.py"])  # --device cuda is the default
    with pytest.raises(SystemExit) as err:
        bench.main()
    assert err.value.code == 2 and "CUDA is not available here (smoke runs: --device cpu --tiny)" in \
        capsys.readouterr().err


def test_speedups_of_cuda_graph_rows_are_against_bf16_compile_with_graphs_where_measured(bench):
    def row(variant, batch, total, denoiser):
        return {"variant": variant, "batch": batch, "median_s": total, "denoiser_s": denoiser}

    rows = [row("bf16_compile", 1, 0.30, 0.20), row("bf16_compile_graphs", 1, 0.24, 0.15),
            row("w4a8_compile_graphs", 1, 0.20, 0.12), row("w4a8_compile", 1, 0.25, 0.16),
            row("bf16_compile", 4, 1.0, 0.8), row("w4a8_compile_graphs", 4, 0.8, 0.5), {"variant": "w4", "batch": 1}]
    bench.add_speedups(rows)
    graphs1, plain1, graphs4 = rows[2], rows[3], rows[5]
    assert graphs1["speedup_ref"] == "bf16_compile_graphs"  # like for like
    assert graphs1["speedup_vs_bf16_compile"] == pytest.approx(0.24 / 0.20)
    assert graphs1["denoiser_speedup"] == pytest.approx(0.15 / 0.12)
    assert plain1["speedup_ref"] == "bf16_compile" and plain1["speedup_vs_bf16_compile"] == pytest.approx(0.30 / 0.25)
    assert graphs4["speedup_ref"] == "bf16_compile"  # no graph reference at batch 4: the plain one
    assert graphs4["speedup_vs_bf16_compile"] == pytest.approx(1.25) and "speedup_ref" not in rows[6]
    # the shared parts (call minus denoiser) at batch 1 are 0.10, 0.09, 0.08, 0.09 s: median 0.09
    assert graphs1["pooled_speedup"] == pytest.approx((0.15 + 0.09) / (0.12 + 0.09))
    assert plain1["pooled_speedup"] == pytest.approx((0.20 + 0.09) / (0.16 + 0.09))
    assert graphs4["pooled_speedup"] == pytest.approx((0.8 + 0.25) / (0.5 + 0.25))  # batch 4: 0.2 and 0.3


def test_a_spread_of_the_shared_parts_does_not_pass_for_a_speed_up(bench):
    """Two rows with the same denoiser time, one with a faster text encoder by chance: measured 1.1×, pooled 1.0×,
    and the goal (≥ 1.1×) is not met."""
    rows = [{"variant": "bf16_compile", "batch": 1, "median_s": 0.22, "denoiser_s": 0.13, "label": "BF16 + compile"},
            {"variant": "w4a8_compile", "batch": 1, "median_s": 0.20, "denoiser_s": 0.13, "label": "W4A8"}]
    bench.add_speedups(rows)
    assert rows[1]["speedup_vs_bf16_compile"] == pytest.approx(1.1) and rows[1]["pooled_speedup"] == pytest.approx(1.0)
    report = sys.modules["pipeline_latency_report"]
    lines = report.goal_lines({"families": {"pixart": {"rows": rows}}})
    assert "| 1.10× (1.00× pooled) | ≥ 1.1× | no |" in "\n".join(lines)
