"""benchmarks/w4a4_recipes.py on tiny-dit (2 blocks, 2 prompts × 2 steps of calibration, 4 images, a random bundled
evaluator): every requested row with its columns, intervals around their estimates, the FP row's infinite PSNR, one
calibration set for all rows, recipes that really differ in the quantized layers, the tie marks, the card in the
default file name, and bad flags as one line before torch is imported."""
import csv
import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from diffptq.errors import ConfigError
from diffptq.quant.layers import quant_layers

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "w4a4_recipes.py"
COLUMNS = ["model", "method", "recipe", "damp", "correction", "prompt_acc", "prompt_acc_lo", "prompt_acc_hi", "psnr",
           "psnr_lo", "psnr_hi", "fid_bundled", "calib_time_s", "model_size_gb"]
RECIPES = ["hadamard", "lowrank", "smooth+lowrank", "pca", "pca+lowrank"]
RANK, KEEP = 4, 4


def _script():
    spec = importlib.util.spec_from_file_location("w4a4_recipes", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def _layer_state(layer) -> tuple:
    """What a recipe changes in a quantized layer: rotation kind, low-rank branch, smoothing, 8-bit leading channels."""
    return (layer.rotation.kind if layer.rotation is not None else None, layer.lowrank_up is not None,
            layer.input_scale is not None, getattr(layer.act_quant, "keep", 0))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """RTN and GPTQ (adaptive damping: the held-out path) × every recipe on tiny-dit, with the default --out (in a
    scratch folder); the layers of each quantized row and the calibration sets collected are recorded on the way."""
    from diffptq.data import calib as calib_module
    from diffptq.models.bundled.evaluator import EvalNet, EvaluatorSpec, save_evaluator
    from diffptq.models.bundled.sampling import eval_prompts

    tmp = tmp_path_factory.mktemp("recipes")
    save_evaluator(EvalNet(EvaluatorSpec()), tmp / "evaluator")
    (tmp / "scenes.txt").write_text("\n".join(eval_prompts(4)) + "\n")
    module, layers, collected = _script(), {}, []
    quantize, collect = module.quantized_denoiser, calib_module.calibration_set

    def spy_quantize(pipe, fp_cpu, calib, job, *rest):
        denoiser, seconds = quantize(pipe, fp_cpu, calib, job, *rest)
        layers[(job.method, job.recipe, job.damp.label if job.damp else "")] = {
            name: _layer_state(layer) for name, layer in quant_layers(denoiser)}
        return denoiser, seconds

    def spy_collect(*args, **kwargs):
        collected.append(1)
        return collect(*args, **kwargs)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # far faster for the tiny model on a busy CPU
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(module, "quantized_denoiser", spy_quantize)
        mp.setattr(calib_module, "calibration_set", spy_collect)
        mp.chdir(tmp)
        try:
            module.main(["--models", "tiny-dit", "--methods", "rtn,gptq", "--damps", "adaptive",
                         "--lowrank_rank", str(RANK), "--keep", str(KEEP), "--n_images", "4", "--batch_size", "4",
                         "--num_inference_steps", "2", "--n_calib", "2", "--calib_steps", "2",
                         "--calib_batch_size", "1", "--prompts", "scenes.txt", "--evaluator", "evaluator"])
        finally:
            torch.set_num_threads(threads)
    out = tmp / "benchmarks" / "results" / "w4a4_recipes_tiny_dit_cpu.md"
    with out.with_suffix(".csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    return module, out, rows, layers, collected


def test_every_requested_row_with_its_columns(run):
    _, out, rows, _, collected = run
    with out.with_suffix(".csv").open(newline="") as f:
        assert next(csv.reader(f)) == COLUMNS
    expected = [("fp", "", "")] + [("rtn", r, "") for r in RECIPES] + [("gptq", r, "adaptive") for r in RECIPES]
    assert [(r["method"], r["recipe"], r["damp"]) for r in rows] == expected
    assert {r["model"] for r in rows} == {"tiny-dit"}
    assert collected == [1]  # one calibration set, shared by all 10 quantized rows


def test_qronos_rows_are_repeated_per_correction_and_carry_it(run):
    module = run[0]
    jobs = module.parse_args(["--methods", "gptq,qronos", "--recipes", "lowrank", "--damps", "0.01",
                              "--corrections", "1,0.25,1"]).jobs
    assert [(j.method, j.correction) for j in jobs] == [("gptq", None), ("qronos", 1.0), ("qronos", 0.25)]
    assert [module.recipe_config(j, rank=8, keep=0).correction for j in jobs] == [1.0, 1.0, 0.25]
    _, out, rows, _, _ = run
    assert {r["correction"] for r in rows} == {""}  # no Qronos row in that run: the column stays empty


def test_rows_are_method_recipe_damping_with_one_rtn_row_per_recipe(run):
    module = run[0]
    jobs = module.parse_args(["--recipes", "pca,hadamard", "--damps", "0.01,adaptive,0.010"]).jobs
    assert [(j.method, j.recipe, j.damp.label if j.damp else None) for j in jobs] == [
        ("rtn", "pca", None), ("rtn", "hadamard", None)] + [
        (m, r, d) for m in ("gptq", "qronos") for r in ("pca", "hadamard") for d in ("0.01", "adaptive")]
    config = module.recipe_config(jobs[-1], rank=8, keep=16)  # qronos hadamard adaptive: the default W4A4 recipe
    assert (config.weight.bits, config.act.bits, config.act_kind, config.rotate, config.lowrank, config.keep,
            config.smooth, config.damp.mode) == (4, 4, "dynamic", "hadamard", 0, 0, None, "adaptive")


def test_intervals_hold_their_estimates_and_fp_psnr_is_infinite(run):
    _, _, rows, _, _ = run
    fp, quantized = rows[0], rows[1:]
    assert (fp["psnr"], fp["psnr_lo"], fp["psnr_hi"], fp["calib_time_s"]) == ("inf", "inf", "inf", "")
    for row in rows:
        acc, lo, hi = (float(row[k]) for k in ("prompt_acc", "prompt_acc_lo", "prompt_acc_hi"))
        assert 0 <= lo <= acc <= hi <= 1 and hi > lo, row
        assert row["fid_bundled"] != "" and float(row["model_size_gb"]) > 0
    for row in quantized:
        psnr, lo, hi = (float(row[k]) for k in ("psnr", "psnr_lo", "psnr_hi"))
        assert math.isfinite(psnr) and lo <= psnr <= hi, row
        assert float(row["calib_time_s"]) > 0


def test_recipes_change_the_quantized_layers(run):
    _, _, rows, layers, _ = run
    assert sorted(layers) == sorted((r["method"], r["recipe"], r["damp"]) for r in rows[1:])
    expected = {"hadamard": ("hadamard", False, False, 0), "lowrank": ("hadamard", True, False, 0),
                "smooth+lowrank": ("hadamard", True, True, 0), "pca": ("pca", False, False, KEEP),
                "pca+lowrank": ("pca", True, False, KEEP)}
    for (method, recipe, damp), states in layers.items():
        assert states and set(states.values()) == {expected[recipe]}, (method, recipe, damp)  # tiny-dit: Linear only
    rtn = {r["recipe"]: r for r in rows if r["method"] == "rtn"}
    assert len({r["psnr"] for r in rtn.values()}) == len(RECIPES)  # and so do the images
    size = {recipe: float(r["model_size_gb"]) for recipe, r in rtn.items()}  # branches and PCA matrices are counted
    assert size["hadamard"] < float(rows[0]["model_size_gb"]) and size["hadamard"] < size["lowrank"] < size[
        "smooth+lowrank"] and size["hadamard"] < size["pca"] < size["pca+lowrank"]


def test_markdown_holds_the_run_and_marks_the_ties(run):
    module, out, rows, _, _ = run
    text = out.read_text()
    assert "torch " in text and "diffusers " in text and "git " in text and "Partial" not in text
    assert "Command: `python benchmarks/w4a4_recipes.py --models tiny-dit --methods rtn,gptq" in text
    assert "## tiny-dit" in text and text.count("\n| tiny-dit |") == len(rows)
    fp_line = next(line for line in text.splitlines() if line.startswith("| tiny-dit | fp |"))
    assert "★" not in fp_line and "≈" not in fp_line
    # the random evaluator's intervals all overlap: one best row, every other quantized row tied with it
    assert text.count(" ★ |") == 1 and text.count(" ≈ |") == len(rows) - 2


def test_default_file_name_has_the_models_and_the_card(run):
    module, out, _, _, _ = run
    assert out.name.endswith("_cpu.md") and out.with_suffix(".csv").is_file()
    assert module.default_out(["bundled-dit", "bundled-unet"], "h200") == Path(
        "benchmarks/results/w4a4_recipes_bundled_dit_unet_h200.md")


def test_a_step_count_the_scheduler_cannot_sample_stops_before_any_work(run, tmp_path):
    module = run[0]
    out = tmp_path / "table.md"
    with pytest.raises(ConfigError, match="--calib_steps 1: the PixArt pipeline .* at least 2 steps"):
        module.main(["--models", "tiny-dit", "--methods", "rtn", "--calib_steps", "1", "--out", str(out)])
    assert not tmp_path.joinpath("table.csv").exists() and not out.exists()


BAD_FLAGS = [
    (["--recipes", "hadamard,quarot"], "argument --recipes: expected a comma list of hadamard, lowrank"),
    (["--methods", "gptq,awq"], "argument --methods: expected a comma list of rtn, gptq, qronos"),
    (["--damps", "0.01,0"], "--damps: must be > 0"),
    (["--lowrank_rank", "0"], "argument --lowrank_rank:"),
    (["--corrections", "1,1.5"], "--corrections"),
    (["--corrections", ","], "argument --corrections: give at least one value in [0, 1]"),
    (["--out", "table.csv"], "argument --out: a markdown file name ending in .md"),
    (["--n_calib", "8", "--calib_batch_size", "8"], "--damp adaptive chooses each layer's damping on held-out"),
]


def test_bad_flags_are_one_line_before_torch_is_imported():
    code = ("import contextlib, io, json, runpy, sys\nresults = []\n"
            f"for argv in {json.dumps([argv for argv, _ in BAD_FLAGS])}:\n"
            "    sys.argv, err = ['w4a4_recipes.py', *argv], io.StringIO()\n"
            "    try:\n"
            "        with contextlib.redirect_stderr(err):\n"
            f"            runpy.run_path({str(SCRIPT)!r}, run_name='__main__')\n"
            "    except SystemExit as e:\n"
            "        results.append([e.code, err.getvalue()])\n"
            "print(json.dumps({'torch': 'torch' in sys.modules, 'results': results}))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    got = json.loads(res.stdout)
    assert got["torch"] is False and len(got["results"]) == len(BAD_FLAGS), res.stderr[-2000:]
    for (argv, message), (code_, err) in zip(BAD_FLAGS, got["results"]):
        lines = err.strip().splitlines()
        assert code_ == 2 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (argv, err)
