"""`make demo` (python -m diffptq.demo), shrunk: quantize with Qronos W4A8, then benchmark from that checkpoint."""
import csv
import os
import subprocess
import sys

from diffptq import demo
from diffptq.models import load


def test_falls_back_to_tiny_dit_with_a_note(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(load.BUNDLED_MODELS, "bundled-dit", tmp_path / "absent")
    assert demo.demo_model() == "tiny-dit"
    assert "no bundled-dit weights" in capsys.readouterr().out
    monkeypatch.setitem(load.BUNDLED_MODELS, "bundled-dit", tmp_path)
    (tmp_path / "model_index.json").write_text("{}")
    assert demo.demo_model() == "bundled-dit"


def test_demo_end_to_end_on_tiny_dit(tmp_path):
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TORCH_HOME": str(tmp_path / "torch_home"), "HF_HOME": str(tmp_path / "hf_home")}
    cmd = [sys.executable, "-m", "diffptq.demo", "--model", "tiny-dit", "--out_dir", str(tmp_path / "demo"),
           "--n_images", "2", "--num_inference_steps", "2", "--n_calib", "2", "--calib_steps", "2"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "| method | dtype | wbits | abits |" in res.stdout and "demo finished in" in res.stdout
    bench = tmp_path / "demo" / "benchmark"
    with (bench / "metrics.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["method"], r["wbits"], r["abits"]) for r in rows] == [
        ("fp", "", ""), ("rtn", "4", "8"), ("gptq", "4", "8"), ("qronos", "4", "8"),
        ("rtn", "4", "4"), ("gptq", "4", "4"), ("qronos", "4", "4")]
    sources = {r["method"] + r["abits"]: r["source"] for r in rows}
    assert sources["qronos8"] == "qronos_w4a8.safetensors" and sources["gptq8"] == "quantized"
    for name in ("grid.png", "metrics.png", "metrics.md", "config.json"):
        assert (bench / name).is_file(), name
    assert (tmp_path / "demo" / "quantize" / "summary.csv").is_file()
