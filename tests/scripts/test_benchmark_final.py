"""benchmark_final.py on tiny-dit: the metrics.csv columns and rows, empty cells where nothing can be measured,
--checkpoints reproducing the numbers of the run that quantized and saved them, and W4A4 behind --rotate hadamard."""
import csv
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from diffptq.cli.parser import parse_bits, parse_methods
from diffptq.errors import ConfigError
from diffptq.io.checkpoint import read_checkpoint
from diffptq.io.load import load_quantized
from diffptq.models import family_of
from diffptq.quant.layers import quant_layers
from diffptq.quant.layers import QuantConfig, swap_modules
from diffptq.quant.quantizer import QuantSpec
from diffptq.run.benchmark import (
    ALL_COLUMNS,
    COLUMNS,
    Variant,
    denoiser_size_bytes,
    variants,
)

ISSUE_COLUMNS = ["method", "dtype", "wbits", "abits", "model", "n_images", "fid", "fid_features", "clip_score", "lpips",
                 "psnr", "ssim", "prompt_acc", "latency_s", "peak_vram_gb", "model_size_gb", "calib_time_s"]
ROOT = Path(__file__).resolve().parents[2]
N_IMAGES = 4
TIMING = ("source", "images_per_s")  # columns that differ between two runs of the same variant


def _same_but_timing(a: dict, b: dict) -> bool:
    return {k: v for k, v in a.items() if k not in TIMING} == {k: v for k, v in b.items() if k not in TIMING}


def test_column_order_is_the_issues():
    assert list(COLUMNS) == ISSUE_COLUMNS and list(ALL_COLUMNS[:len(COLUMNS)]) == ISSUE_COLUMNS
    assert ALL_COLUMNS[len(COLUMNS)] == "fid_bundled" and ALL_COLUMNS[-9:-6] == ("rotate", "images_per_s",
                                                                                "num_processes")
    assert ALL_COLUMNS[-6:] == ("prompt_acc_lo", "prompt_acc_hi", "psnr_lo", "psnr_hi", "peer_version", "note")


def test_parse_methods_bits_and_variant_order():
    assert parse_methods("fp, rtn,qronos,rtn") == ["fp", "rtn", "qronos"]
    assert parse_bits("w4a8,W4A4,w3") == [(4, 8), (4, 4), (3, 16)]
    for bad in ("w4x8", "a8", "w9a8", "w4a1", ""):
        with pytest.raises(ConfigError):
            parse_bits(bad)
    with pytest.raises(ConfigError):
        parse_methods("fp,awq")
    got = variants(["fp", "rtn", "gptq"], [(4, 8), (4, 4)])
    assert got == [Variant("fp"), Variant("rtn", 4, 8), Variant("gptq", 4, 8), Variant("rtn", 4, 4),
                   Variant("gptq", 4, 4)]
    assert got[0].label == "fp" and got[1].label == "rtn w4a8" and got[1].bits_name == "w4a8"


def test_size_counts_packed_codes_not_float_caches():
    model = nn.Sequential(nn.Linear(8, 4))
    assert denoiser_size_bytes(model) == (8 * 4 + 4) * 4  # float32 weight + bias
    (layer,) = swap_modules(model, QuantConfig(weight=QuantSpec(4))).values()
    layer.set_quantized_weight(torch.zeros(4, 8, dtype=torch.int8), torch.ones(4, 1), torch.zeros(4, 1))
    # bias 16 + scale 16 + zero 16 (float32) + 32 int4 codes packed two per byte = 16; weight, weight_q excluded
    assert denoiser_size_bytes(model) == 16 + 16 + 16 + 16


def _run(args, tmp_path, name, n_images=N_IMAGES):
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "OMP_NUM_THREADS": "1", "TORCH_HOME": str(tmp_path / "torch_home"), "HF_HOME": str(tmp_path / "hf_home"),
           "PYTHONPATH": str(ROOT)}  # this checkout's diffptq, whichever one the interpreter has installed
    out = tmp_path / name
    cmd = [sys.executable, "qronos_diffusion/benchmark_final.py", "--model", "tiny-dit", "--n_images", str(n_images),
           "--num_inference_steps", "2", "--n_calib", "2", "--calib_steps", "2", "--calib_batch_size", "2",
           "--batch_size", "4", "--out_dir", str(out), *args]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    with (out / "metrics.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    return out, rows, res


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Run 1 quantizes and saves every variant; run 2 evaluates the saved checkpoints (a fake bundled evaluator)."""
    from diffptq.models.bundled.evaluator import EvalNet, EvaluatorSpec, save_evaluator
    from diffptq.models.bundled.sampling import eval_prompts

    tmp = tmp_path_factory.mktemp("bench")
    torch.manual_seed(0)
    save_evaluator(EvalNet(EvaluatorSpec()), tmp / "evaluator")
    (tmp / "scenes.txt").write_text("\n".join(eval_prompts(N_IMAGES)) + "\n")
    common = ["--prompts", str(tmp / "scenes.txt"), "--evaluator", str(tmp / "evaluator")]
    first = _run([*common, "--save_checkpoints"], tmp, "run1")
    second = _run([*common, "--checkpoints", str(first[0])], tmp, "run2")
    return first, second


def test_one_row_per_method_and_bits_with_the_issues_columns(runs):
    (out, rows, _), _ = runs
    with (out / "metrics.csv").open(newline="") as f:
        header = next(csv.reader(f))
    assert header[:len(ISSUE_COLUMNS)] == ISSUE_COLUMNS and header == list(ALL_COLUMNS)
    assert [(r["method"], r["wbits"], r["abits"]) for r in rows] == [
        ("fp", "", ""), ("rtn", "4", "8"), ("gptq", "4", "8"), ("qronos", "4", "8"),
        ("rtn", "4", "4"), ("gptq", "4", "4"), ("qronos", "4", "4")]
    assert {r["dtype"] for r in rows} == {"fp32"} and {r["model"] for r in rows} == {"tiny-dit"}
    assert {r["n_images"] for r in rows} == {str(N_IMAGES)}
    for name in ("metrics.md", "grid.png", "metrics.png", "config.json"):
        assert (out / name).is_file(), name
    assert (out / "metrics.md").read_text().count("\n| ") == 2 + 7  # header, separator, 7 rows
    assert json.loads((out / "config.json").read_text())["args"]["bits"] == "w4a8,w4a4"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == sorted(
        f"{m}_{b}.safetensors" for m in ("rtn", "gptq", "qronos") for b in ("w4a8", "w4a4"))


def test_cpu_leaves_latency_and_vram_empty_not_zero(runs):
    (_, rows, _), _ = runs
    for row in rows:
        assert row["latency_s"] == "" and row["peak_vram_gb"] == "" and row["denoiser_latency_s"] == ""
        assert row["num_processes"] == "1"
        # the default recipe: 4-bit activations behind a Hadamard rotation, 8-bit ones unrotated
        assert row["rotate"] == ("hadamard" if row["abits"] == "4" else "")
        assert float(row["model_size_gb"]) > 0 and float(row["images_per_s"]) > 0  # wall clock: on the CPU too
    fp, quantized = rows[0], rows[1:]
    assert fp["calib_time_s"] == "" and all(float(r["calib_time_s"]) > 0 for r in quantized)
    assert all(float(r["model_size_gb"]) < float(fp["model_size_gb"]) for r in quantized)


def test_skipped_metrics_are_empty_with_a_message(runs):
    (_, rows, res), _ = runs
    for metric in ("fid", "clip_score", "lpips"):
        assert all(r[metric] == "" for r in rows), metric
        assert f"{metric} skipped (value empty)" in res.stderr, metric
    assert all(r["fid_features"] == "" for r in rows)
    assert rows[0]["psnr"] == "inf" and rows[0]["ssim"] == "1"
    assert all(0 < float(r["psnr"]) < float("inf") and 0 < float(r["ssim"]) < 1 for r in rows[1:])
    # the injected (here random) bundled evaluator fills prompt_acc and fid_bundled
    assert all(0 <= float(r["prompt_acc"]) <= 1 and r["fid_bundled"] != "" for r in rows)


def test_checkpoints_reproduce_the_quantizing_run(runs):
    (_, first, _), (_, second, res) = runs
    assert "quantizing" not in res.stderr  # every variant came from a checkpoint
    assert [r["source"] for r in second] == ["fp"] + [f"{r['method']}_w{r['wbits']}a{r['abits']}.safetensors"
                                                      for r in second[1:]]
    for a, b in zip(first, second, strict=True):
        assert _same_but_timing(a, b), a["method"]  # psnr, ssim, calib_time_s ...


def _run_in_process(args, tmp_path, name):
    """The script's main in this process (no interpreter start-up: a second each); metric weights point nowhere."""
    spec = importlib.util.spec_from_file_location("benchmark_final", "qronos_diffusion/benchmark_final.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / name
    module.main(["--model", "tiny-dit", "--n_images", "2", "--num_inference_steps", "2", "--n_calib", "2",
                 "--calib_steps", "2", "--calib_batch_size", "2", "--fid_weights", str(tmp_path / "none.pth"),
                 "--clip_model", str(tmp_path / "none"), "--lpips_weights", str(tmp_path / "none.pth"),
                 "--out_dir", str(out), *args])
    with (out / "metrics.csv").open(newline="") as f:
        return out, list(csv.DictReader(f))


@pytest.fixture(scope="module")
def rotated_runs(tmp_path_factory):
    """Qronos W4A4 (dynamic per-token activations) behind a Hadamard rotation, saved; then evaluated from the file
    without --rotate (the checkpoint's rotation is what runs)."""
    tmp = tmp_path_factory.mktemp("bench_rot")
    variant = ["--methods", "fp,qronos", "--bits", "w4a4"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as OMP_NUM_THREADS=1 in _run: on a shared CPU, far faster for the tiny model
    try:
        first = _run_in_process([*variant, "--act_quant", "dynamic", "--rotate", "hadamard", "--rotate_seed", "3",
                                 "--save_checkpoints"], tmp, "run1")
        second = _run_in_process([*variant, "--checkpoints", str(first[0])], tmp, "run2")
    finally:
        torch.set_num_threads(threads)
    return first, second


def test_rotate_hadamard_rotates_every_quantized_layer_and_is_saved(rotated_runs):
    (out, rows), _ = rotated_runs
    assert [(r["method"], r["abits"], r["rotate"]) for r in rows] == [("fp", "", ""), ("qronos", "4", "hadamard")]
    assert 0 < float(rows[1]["psnr"]) < float("inf")
    args = json.loads((out / "config.json").read_text())["args"]
    assert (args["rotate"], args["rotate_seed"], args["rotate_conv"], args["act_quant"]) == ("hadamard", 3, False,
                                                                                            "dynamic")
    path = out / "checkpoints" / "qronos_w4a4.safetensors"
    meta, _ = read_checkpoint(path)
    assert meta["quant"]["rotate"] == "hadamard" and meta["quant"]["rotate_seed"] == 3
    pipe = load_quantized(path)
    layers = dict(quant_layers(family_of(pipe).denoiser(pipe)))
    assert layers and len(layers) == len(meta["layers"])
    for name, layer in layers.items():  # tiny-dit's blocks hold Linear layers only: all rotated
        assert layer.rotation is not None and layer.rotation.kind == "hadamard", name
        assert layer.rotation.seed == 3 and layer.act_quant is not None, name


def test_rotated_checkpoint_reevaluates_to_identical_metrics(rotated_runs):
    (_, first), (_, second) = rotated_runs
    assert second[1]["source"] == "qronos_w4a4.safetensors" and second[1]["rotate"] == "hadamard"
    for a, b in zip(first, second, strict=True):
        assert _same_but_timing(a, b), a["method"]
