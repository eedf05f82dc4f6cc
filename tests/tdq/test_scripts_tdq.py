"""LogSnr-DiT / LogSnr-Unet scripts end to end on the tiny models (in process; one CLI run in a subprocess)."""
import csv
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from diffptq.io.load import load_quantized
from diffptq.tdq.inference import HOOK_ATTR

ROOT = Path(__file__).resolve().parents[2]
SMALL = ["--n_calib", "2", "--calib_steps", "3", "--calib_batch_size", "2", "--mlp_steps", "40",
         "--max_per_condition", "2048"]


def _script(folder: str, name: str):
    spec = importlib.util.spec_from_file_location(f"{folder}_{name}", ROOT / folder / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("folder,model", [("LogSnr-DiT", "tiny-dit"), ("LogSnr-Unet", "tiny-unet")])
def test_calibrate_snr_writes_a_loadable_checkpoint(folder, model, tmp_path):
    torch.set_num_threads(1)
    out = tmp_path / "out"
    _script(folder, "calibrate_snr").main(["--model", model, "--condition", "logsnr", "--abits", "8", "--wbits", "4",
                                           "--scheduler", "ddim", "--out_dir", str(out),
                                           "--save_path", str(out / "logsnr_checkpoints.pt"), *SMALL])
    rows = list(csv.DictReader((out / "layers.csv").open()))
    assert rows and {"log_rmse_mlp", "mse_ratio_mlp", "rel_out_err"} <= set(rows[0])
    summary = list(csv.DictReader((out / "summary.csv").open()))[0]
    assert summary["condition"] == "logsnr" and summary["wbits"] == "4" and float(summary["final_denoiser_err"]) > 0
    pipe = load_quantized(out / "logsnr_checkpoints.pt")
    assert getattr(pipe, HOOK_ATTR) is not None
    assert pipe.diffptq_checkpoint["quant"]["condition"] == "logsnr"
    assert json.loads((out / "config.json").read_text())["args"]["condition"] == "logsnr"


def test_evaluate_compare_table_plot_and_grids(tmp_path):
    torch.set_num_threads(1)
    out = tmp_path / "cmp"
    _script("LogSnr-DiT", "evaluate_compare").main([
        "--model", "tiny-dit", "--conditions", "static", "timestep", "logsnr", "--wbits", "8", "--abits", "8",
        "--eval", "ddim:3,euler-karras:4", "--n_prompts", "2", "--eval_batch_size", "2", "--plot_layers", "2",
        "--out_dir", str(out), *SMALL])
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert list(rows[0])[:7] == ["condition", "scheduler", "steps", "abits", "wbits", "act_mse", "eps_mse"]
    assert {(r["condition"], r["scheduler"], r["steps"]) for r in rows} == {
        (c, s, n) for c in ("fp", "static", "timestep", "logsnr") for s, n in (("ddim", "3"), ("euler-karras", "4"))}
    quant = [r for r in rows if r["condition"] != "fp"]
    assert all(float(r["act_mse"]) > 0 and float(r["eps_mse"]) > 0 and float(r["psnr"]) > 0 for r in quant)
    novel = {r["scheduler"]: float(r["novel_steps"]) for r in quant}
    assert novel["ddim"] == 0.0 and novel["euler-karras"] > 0  # calibrated on DDIM-3: Karras sigmas fall between
    for name in ("scales_w8a8.png", "act_mse_steps_w8a8.png", "grid_w8a8_ddim-3.png", "act_mse.md", "metrics.md"):
        assert (out / name).is_file(), name


def test_cli_exit_status_and_bad_flags(tmp_path):
    cmd = [sys.executable, "LogSnr-Unet/calibrate_snr.py", "--model", "tiny-unet", "--abits", "16",
           "--out_dir", str(tmp_path / "x")]
    env = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert res.returncode == 2 and "TDQ needs 2..8" in res.stderr
