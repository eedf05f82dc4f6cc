"""benchmark_final.py --peers: names checked at parse time; a peer whose package is absent is a warning and a row
with empty metrics and the install line in `note`; a peer that cannot run on the CPU likewise with its reason; a peer
that runs is a row like ours (when its library is installed). The interval columns against a computation from the
saved images, and the tie marks of metrics.md."""
import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from diffptq.peers import INSTALL_HINT, PEERS
from diffptq.run.benchmark_report import TIE_LEGEND, acc_marks

ROOT = Path(__file__).resolve().parents[2]
N_IMAGES = 4
PEER_LIST = "torchao:int8da_int4w,quanto:w4a8,modelopt:nvfp4"


def _env(tmp_path) -> dict:
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "OMP_NUM_THREADS": "1", "TORCH_HOME": str(tmp_path / "torch_home"), "HF_HOME": str(tmp_path / "hf_home")}


def _script(argv: list[str], absent: str = "") -> list[str]:
    """benchmark_final.py with `argv`, in a Python where the package `absent` cannot be imported."""
    code = (f"import runpy, sys\nif {absent!r}: sys.modules[{absent!r}] = None\nsys.argv = ['benchmark_final.py', "
            f"*{argv!r}]\nrunpy.run_path('qronos_diffusion/benchmark_final.py', run_name='__main__')")
    return [sys.executable, "-c", code]


def test_an_unknown_peer_is_one_line_before_torch_is_imported():
    code = ("import runpy, sys; sys.argv = ['x', '--peers', 'quanto:w4a8,awq:int4']\ntry:\n"
            "    runpy.run_path('qronos_diffusion/benchmark_final.py', run_name='__main__')\n"
            "except SystemExit as e:\n    print('exit', e.code, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.stdout.strip() == "exit 2 False"
    assert out.stderr.strip().splitlines() == [
        f"error: argument --peers: unknown peer awq:int4; choose from {', '.join(PEERS)} (see --help)"]


@pytest.fixture(scope="module")
def peer_run(tmp_path_factory):
    """fp, RTN W4A8 and three peers on tiny-dit, quanto made absent, with a (random) bundled evaluator and the
    images saved."""
    from diffptq.models.bundled.evaluator import EvalNet, EvaluatorSpec, save_evaluator
    from diffptq.models.bundled.sampling import eval_prompts

    tmp = tmp_path_factory.mktemp("bench_peers")
    torch.manual_seed(0)
    save_evaluator(EvalNet(EvaluatorSpec()), tmp / "evaluator")
    (tmp / "scenes.txt").write_text("\n".join(eval_prompts(N_IMAGES)) + "\n")
    out = tmp / "run"
    argv = ["--model", "tiny-dit", "--device", "cpu", "--n_images", str(N_IMAGES), "--num_inference_steps", "2",
            "--n_calib", "2", "--calib_steps", "2", "--calib_batch_size", "2", "--batch_size", "4", "--methods",
            "fp,rtn", "--bits", "w4a8", "--peers", PEER_LIST, "--prompts", str(tmp / "scenes.txt"), "--evaluator",
            str(tmp / "evaluator"), "--save_images", "--out_dir", str(out)]
    res = subprocess.run(_script(argv, absent="optimum.quanto"), capture_output=True, text=True, timeout=600,
                         env=_env(tmp), cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    with (out / "metrics.csv").open(newline="") as f:
        rows = {row["method"]: row for row in csv.DictReader(f)}
    return out, rows, res


def test_each_peer_is_one_more_row(peer_run):
    _, rows, _ = peer_run
    assert list(rows) == ["fp", "rtn", *PEER_LIST.split(",")]
    for name in PEER_LIST.split(","):
        row = rows[name]
        assert (row["wbits"], row["abits"], row["dtype"], row["source"]) == (
            str(PEERS[name].wbits), str(PEERS[name].abits), "fp32", "peer")
    assert rows["fp"]["note"] == rows["rtn"]["note"] == rows["rtn"]["peer_version"] == ""


def test_an_absent_package_is_a_warning_and_a_row_that_says_so(peer_run):
    _, rows, res = peer_run
    line = PEERS["quanto:w4a8"].missing()
    assert f"warning: {line}; its row keeps empty metrics" in res.stderr.splitlines()
    row = rows["quanto:w4a8"]
    assert row["note"] == line and row["note"].endswith(INSTALL_HINT)
    assert row["n_images"] == "0" and row["peer_version"] == ""
    for col in ("psnr", "ssim", "prompt_acc", "psnr_lo", "prompt_acc_lo", "model_size_gb", "calib_time_s"):
        assert row[col] == "", col


def test_a_peer_that_cannot_run_here_keeps_empty_metrics_and_its_reason(peer_run):
    _, rows, _ = peer_run
    row = rows["modelopt:nvfp4"]
    peer = PEERS["modelopt:nvfp4"]
    expected = peer.cuda_only if peer.available() else peer.missing()
    assert expected in row["note"] and row["psnr"] == row["prompt_acc"] == "" and row["n_images"] == "0"


def test_a_peer_that_runs_is_scored_like_ours(peer_run):
    peer = PEERS["torchao:int8da_int4w"]
    if not peer.available():
        pytest.skip("torchao is not installed (requirements-peers.txt)")
    out, rows, _ = peer_run
    row = rows[peer.name]
    assert row["peer_version"] == "0.18.0" and "block layers quantized" in row["note"]
    assert row["n_images"] == str(N_IMAGES) and 0 < float(row["psnr"]) < math.inf and float(row["calib_time_s"]) > 0
    assert (out / "images" / "torchao-int8da_int4w_w4a8.safetensors").is_file()


def _bootstrap(values: torch.Tensor) -> list[float]:
    """Percentile bootstrap of the mean, written out: 2000 resamples from a generator seeded 0, 2.5 / 97.5%."""
    idx = torch.randint(0, len(values), (2000, len(values)), generator=torch.Generator().manual_seed(0))
    return torch.quantile(values[idx].mean(1), torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()


def test_interval_columns_match_an_independent_computation(peer_run):
    from scipy.stats import binomtest

    from diffptq.eval.image_store import load_images

    out, rows, _ = peer_run
    fp = load_images(out / "images" / "fp.safetensors").images.double() / 255
    checked = 0
    for path in sorted((out / "images").glob("*.safetensors")):
        if path.stem == "fp":
            continue
        row = next(r for r in rows.values() if r["method"].replace(":", "-") in path.stem)
        images = load_images(path).images.double() / 255
        psnr = -10 * torch.log10((images - fp).pow(2).flatten(1).mean(1))
        assert float(row["psnr"]) == pytest.approx(float(psnr.mean()), rel=1e-4)
        assert [float(row["psnr_lo"]), float(row["psnr_hi"])] == pytest.approx(_bootstrap(psnr), rel=1e-5)
        correct = round(float(row["prompt_acc"]) * N_IMAGES)
        wilson = binomtest(correct, N_IMAGES).proportion_ci(method="wilson")
        assert [float(row["prompt_acc_lo"]), float(row["prompt_acc_hi"])] == pytest.approx(
            [wilson.low, wilson.high], abs=1e-5)
        checked += 1
    assert checked >= 1
    assert rows["fp"]["psnr_lo"] == rows["fp"]["psnr_hi"] == "inf"


def test_ties_are_marked_per_bit_width():
    rows = [{"wbits": None, "abits": None, "prompt_acc": 0.9, "prompt_acc_lo": 0.8, "prompt_acc_hi": 0.95},
            {"wbits": 4, "abits": 8, "prompt_acc": 0.80, "prompt_acc_lo": 0.70, "prompt_acc_hi": 0.88},
            {"wbits": 4, "abits": 8, "prompt_acc": 0.60, "prompt_acc_lo": 0.50, "prompt_acc_hi": 0.69},
            {"wbits": 4, "abits": 8, "prompt_acc": 0.75, "prompt_acc_lo": 0.65, "prompt_acc_hi": 0.83},
            {"wbits": 4, "abits": 8, "prompt_acc": None, "prompt_acc_lo": None, "prompt_acc_hi": None},
            {"wbits": 4, "abits": 4, "prompt_acc": 0.40, "prompt_acc_lo": 0.30, "prompt_acc_hi": 0.50},
            {"wbits": 4, "abits": 4, "prompt_acc": 0.41, "prompt_acc_lo": 0.31, "prompt_acc_hi": 0.51}]
    assert acc_marks(rows) == {1: "★", 3: "≈", 6: "★", 5: "≈"}  # fp alone in its width: unmarked


def test_metrics_md_marks_the_best_of_a_width_only_when_it_has_company(peer_run):
    out, rows, _ = peer_run
    text = (out / "metrics.md").read_text()
    w4a8 = [r for r in rows.values() if r["wbits"] == "4" and r["abits"] == "8" and r["prompt_acc"]]
    assert (TIE_LEGEND in text) == (len(w4a8) > 1)
    assert ("★" in text) == (len(w4a8) > 1)
