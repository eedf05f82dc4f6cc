"""benchmark_final --save_images and benchmarks/multi_gpu_compare.py: two runs of tiny-dit with the same seed give
identical images (exit 0), a perturbed image or other seeds fail (exit 1, the variant named), unusable folders fail
with one line; and two real processes (torchrun, gloo on the CPU) make the images of one process."""
import csv
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from diffptq.errors import ConfigError
from diffptq.eval.image_store import load_images, save_images

ROOT = Path(__file__).resolve().parents[2]
TORCHRUN = Path(sys.executable).parent / "torchrun"
RUN_ARGS = ["--model", "tiny-dit", "--methods", "fp,rtn", "--bits", "w4a8", "--n_images", "4",
            "--num_inference_steps", "2", "--n_calib", "2", "--calib_steps", "2", "--calib_batch_size", "2",
            "--batch_size", "4", "--save_images"]

pytestmark = pytest.mark.usefixtures("one_thread")


def _script(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def compare():
    return _script("multi_gpu_compare", ROOT / "benchmarks" / "multi_gpu_compare.py").main


def _no_weights(tmp: Path) -> list[str]:
    return ["--fid_weights", str(tmp / "none.pth"), "--clip_model", str(tmp / "none"),
            "--lpips_weights", str(tmp / "none.pth")]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two one-process runs with the same seed (the script's main in this process)."""
    tmp = tmp_path_factory.mktemp("mgc")
    bench = _script("benchmark_final", ROOT / "qronos_diffusion" / "benchmark_final.py")
    for name in ("a", "b"):
        bench.main([*RUN_ARGS, *_no_weights(tmp), "--out_dir", str(tmp / name)])
    return tmp / "a", tmp / "b"


def _rows(out: Path) -> list[dict]:
    with (out / "metrics.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def test_images_and_throughput_are_saved(runs):
    a, _ = runs
    assert sorted(p.name for p in (a / "images").iterdir()) == ["fp.safetensors", "rtn_w4a8.safetensors"]
    stored = load_images(a / "images" / "rtn_w4a8.safetensors")
    assert stored.images.shape == (4, 3, 16, 16) and stored.seeds == [0, 1, 2, 3] and len(stored.prompts) == 4
    assert stored.info["label"] == "rtn w4a8" and stored.info["num_processes"] == 1
    for row in _rows(a):
        assert float(row["images_per_s"]) > 0 and row["num_processes"] == "1"


def test_same_seed_runs_match(runs, compare, tmp_path):
    a, b = runs
    out = tmp_path / "cmp.md"
    assert compare(["--runs", str(a), str(b), "--out", str(out)]) == 0
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["ok"] and set(report["variants"]) == {"fp", "rtn_w4a8"}
    v = report["variants"]["rtn_w4a8"]
    assert v["max_abs"] == 0 and v["psnr_db"] == "inf" and v["same_seeds"] and v["same_prompts"]
    assert v["metrics"]["psnr"]["diff"] == 0 and v["throughput"]["num_processes_b"] == 1
    assert v["throughput"]["ratio"] > 0
    assert "**PASS**" in out.read_text()


def test_a_perturbed_image_or_other_seeds_fail(runs, compare, tmp_path):
    a, b = runs
    c = tmp_path / "c"
    shutil.copytree(b, c)
    path = c / "images" / "rtn_w4a8.safetensors"
    stored = load_images(path)
    stored.images[2, 1, 5, 5] = (int(stored.images[2, 1, 5, 5]) + 50) % 256
    save_images(path, stored.images, stored.prompts, stored.seeds, stored.info)
    out = tmp_path / "c.md"
    assert compare(["--runs", str(a), str(c), "--out", str(out)]) == 1
    text = out.read_text()
    assert "**FAIL**" in text and "- rtn_w4a8: max abs difference" in text and "- fp:" not in text
    fp = c / "images" / "fp.safetensors"
    stored = load_images(fp)
    save_images(fp, stored.images, stored.prompts, [s + 1 for s in stored.seeds], stored.info)
    assert compare(["--runs", str(a), str(c), "--out", str(out)]) == 1
    assert "- fp: seeds differ" in out.read_text()


def test_unusable_folders_fail_with_one_line(runs, compare, tmp_path):
    a, _ = runs
    with pytest.raises(ConfigError, match="run folder not found"):
        compare(["--runs", str(a), str(tmp_path / "absent")])
    bare = tmp_path / "bare"
    shutil.copytree(a, bare, ignore=shutil.ignore_patterns("images"))
    with pytest.raises(ConfigError, match="with --save_images"):
        compare(["--runs", str(a), str(bare)])
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    res = subprocess.run([sys.executable, "benchmarks/multi_gpu_compare.py", "--runs", str(a), str(bare)],
                         capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert res.returncode == 2 and res.stderr.startswith("error: ") and "Traceback" not in res.stderr


@pytest.mark.skipif(not TORCHRUN.is_file(), reason="torchrun not installed beside this python")
def test_two_processes_make_the_images_of_one(runs, compare, tmp_path):
    """torchrun --nproc_per_node 2 (as accelerate launch --multi_gpu --num_processes 2) on the CPU, gloo."""
    a, _ = runs
    out = tmp_path / "two"
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "OMP_NUM_THREADS": "1", "HF_HOME": str(tmp_path / "hf_home"), "TORCH_HOME": str(tmp_path / "torch_home"),
           "PYTHONPATH": str(ROOT)}  # this checkout's diffptq, whichever one the interpreter has installed
    res = subprocess.run([str(TORCHRUN), "--standalone", "--nproc_per_node", "2",
                          "qronos_diffusion/benchmark_final.py", *RUN_ARGS,
                          "--device", "cpu", *_no_weights(tmp_path), "--out_dir", str(out)],
                         capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert {row["num_processes"] for row in _rows(out)} == {"2"}
    assert compare(["--runs", str(a), str(out), "--out", str(tmp_path / "cmp.md")]) == 0
    report = json.loads((tmp_path / "cmp.json").read_text())
    assert all(v["throughput"]["num_processes_b"] == 2 for v in report["variants"].values())
