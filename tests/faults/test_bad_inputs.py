"""Bad input to every script, as a new user gives it: one `error:` line, exit status 2, no traceback, and no file
left under a final name. Flags are refused at parse time; paths, step counts, block indices and group sizes before
any calibration; a damaged or hand-edited checkpoint when it is read."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[2]
QUANTIZE = ("qronos_diffusion", "quantize_qronos_4blocks")
BENCHMARK = ("qronos_diffusion", "benchmark_final")
CALIBRATE = ("LogSnr-DiT", "calibrate_snr")
COMPARE = ("LogSnr-DiT", "evaluate_compare")
SMALL = ["--model", "tiny-dit", "--n_calib", "2", "--calib_steps", "2", "--calib_batch_size", "2", "--blocks", "1"]


def _script(folder: str, name: str):
    module_name = f"bad_{folder}_{name}".replace("-", "_")
    spec = importlib.util.spec_from_file_location(module_name, ROOT / folder / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _fails(script, argv, capsys) -> str:
    """Run a script's main through run_main as the command line does; assert one `error:` line and exit 2."""
    module = _script(*script) if isinstance(script, tuple) else script
    with pytest.raises(SystemExit) as exit_info:
        module.run_main(lambda: module.main(argv))
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2, err
    assert "Traceback" not in err and err.startswith("error: ")
    assert len(err.splitlines()) == 1, err
    return err


@pytest.fixture
def files(tmp_path):
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    (tmp_path / "binary.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    (tmp_path / "folder").mkdir()
    (tmp_path / "a_file").write_text("x")
    return tmp_path


@pytest.mark.parametrize("script,flags,message", [
    (QUANTIZE, ["--damp", "0"], "argument --damp: must be > 0, got 0"),
    (QUANTIZE, ["--damp", "inf"], "argument --damp: must be a finite number"),
    (QUANTIZE, ["--seed", str(2**64)], "argument --seed: must lie in 0..9223372036854775807"),
    (QUANTIZE, ["--seed", "-1"], "argument --seed: must lie in 0.."),
    (QUANTIZE, ["--guidance_scale", "nan"], "argument --guidance_scale: must be a finite number"),
    (QUANTIZE, ["--n_calib", "0"], "argument --n_calib: must be >= 1, got 0"),
    (QUANTIZE, ["--wbits", "16"], "--wbits: 16 leaves nothing to quantize"),
    (QUANTIZE, ["--blocks", "0-x"], "argument --blocks: expected all, N"),
    (QUANTIZE, ["--device", "gpu0"], "argument --device: expected auto, cpu, cuda or cuda:N"),
    (QUANTIZE, ["--wbitz", "3"], "unrecognized arguments: --wbitz 3"),
    (QUANTIZE, ["--keep", "4"], "--keep 4 keeps the leading PCA components at 8 bits: it needs --rotate pca"),
    (QUANTIZE, ["--rotate", "pca", "--keep", "-1"], "argument --keep: must be >= 0, got -1"),
    (QUANTIZE, ["--rotate", "pca", "--keep", "2.5"], "argument --keep: expected an integer, got '2.5'"),
    (QUANTIZE, ["--rotate", "pca", "--rotate_conv"], "it needs --rotate hadamard (the PCA rotation applies to Linear"),
    (QUANTIZE, ["--rotate", "svd"], "argument --rotate: invalid choice: 'svd'"),
    (BENCHMARK, ["--rotate", "hadamard", "--keep", "8"], "--keep 8 keeps the leading PCA components at 8 bits"),
    (CALIBRATE, ["--refine_steps", "-1"], "argument --refine_steps: must be >= 0, got -1"),
    (CALIBRATE, ["--abits", "16"], "argument --abits: 16 leaves no activation to quantize"),
    (CALIBRATE, ["--mlp_steps", "x"], "argument --mlp_steps: expected an integer, got 'x'"),
    (COMPARE, ["--eval", "foo:3"], "--eval 'foo:3': expected NAME:STEPS"),
    (COMPARE, ["--eval", "ddim:0"], "--eval 'ddim:0': expected NAME:STEPS with STEPS >= 1"),
    (COMPARE, ["--eval_batch_size", "0"], "argument --eval_batch_size: must be >= 1, got 0"),
    (COMPARE, ["--n_prompts", "0"], "argument --n_prompts: must be >= 1, got 0"),
    (COMPARE, ["--wbits", "8", "16"], "--wbits: 16 leaves nothing to quantize"),
    (BENCHMARK, ["--methods", "fp,awq"], "argument --methods: expected a comma list of fp, rtn, gptq, qronos"),
    (BENCHMARK, ["--bits", "w9a8"], "argument --bits: w9a8: weight bits 2..8"),
    (BENCHMARK, ["--latency_repeats", "0"], "argument --latency_repeats: must be >= 1"),
])
def test_bad_flags_are_refused_before_any_work(script, flags, message, tmp_path, capsys):
    out = tmp_path / "out"
    err = _fails(script, [*flags, "--out_dir", str(out)], capsys)
    assert message in err
    assert not out.exists()


@pytest.mark.parametrize("script", [QUANTIZE, BENCHMARK, CALIBRATE])
@pytest.mark.parametrize("kind,message", [
    ("latin1.txt", "is not UTF-8 text (byte 0xe9 at offset 3)"),
    ("binary.txt", "is a binary file, not text"),
    ("folder", "is a folder: give a text file"),
    ("none.txt", "prompt file not found"),
])
def test_prompt_files_that_are_not_text_are_named(script, kind, message, files, capsys):
    flag = "--calib_prompts" if script == BENCHMARK else "--prompts"
    err = _fails(script, [flag, str(files / kind), "--out_dir", str(files / "out")], capsys)
    assert message in err and str(files / kind) in err
    assert not (files / "out").exists()


@pytest.mark.parametrize("flags,message", [
    (["--out_dir", "{a_file}"], "--out_dir {a_file} is a file, not a folder"),
    (["--out_dir", "{a_file}/sub"], "cannot be created: {a_file} is a file, not a folder"),
    (["--save_path", "{folder}"], "--save_path {folder} is a folder: give a file name"),
    (["--save_path", "{a_file}/ckpt.pt"], "--save_path {a_file}/ckpt.pt cannot be created"),
])
def test_output_paths_are_checked_before_the_model_loads(flags, message, files, capsys):
    paths = {"a_file": files / "a_file", "folder": files / "folder"}
    argv = [*SMALL, *(f.format(**paths) for f in flags)]
    if "--out_dir" not in argv:
        argv += ["--out_dir", str(files / "out")]
    err = _fails(QUANTIZE, argv, capsys)
    assert message.format(**paths) in err
    assert sorted(p.name for p in files.iterdir()) == ["a_file", "binary.txt", "folder", "latin1.txt"]


@pytest.mark.parametrize("script,flags,message", [
    (QUANTIZE, ["--scheduler", "pndm", "--calib_steps", "1"],
     "--calib_steps 1: the PixArt pipeline with PNDMScheduler"),
    (QUANTIZE, ["--blocks", "5"], "--blocks 5: the model has 2 blocks"),
    (QUANTIZE, ["--group_size", "3"], "--group_size 3 does not divide the input width 16"),
    (CALIBRATE, ["--group_size", "3"], "--group_size 3 does not divide the input width 16"),
    (COMPARE, ["--eval", "dpm:1"], "--eval dpm:1: the PixArt pipeline with DPMSolverMultistepScheduler"),
])
def test_model_dependent_values_are_checked_before_calibration(script, flags, message, tmp_path, capsys):
    out = tmp_path / "out"
    err = _fails(script, [*SMALL, *flags, "--out_dir", str(out)], capsys)
    assert message in err and "nothing was written" in err
    assert not out.exists()  # the folder the run made is removed again


def test_benchmark_refuses_a_missing_reference_folder_before_generating(tmp_path, capsys):
    err = _fails(BENCHMARK, [*SMALL, "--ref_dir", str(tmp_path / "none"), "--out_dir", str(tmp_path / "o")], capsys)
    assert f"argument --ref_dir: no folder {tmp_path / 'none'}" in err
    assert not (tmp_path / "o").exists()


# ---- checkpoints ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A small RTN W8A8 checkpoint of tiny-dit."""
    from diffptq.config import CalibConfig, SequentialConfig
    from diffptq.io.checkpoint import save_quantized
    from diffptq.models import family_of, load_pipeline
    from diffptq.run.quantize import quant_metadata, quantize_pipeline

    pipe = load_pipeline("tiny-dit")
    cfg, calib = SequentialConfig(method="rtn").with_bits(8, 8), CalibConfig(n_calib=2, calib_steps=2, batch_size=2)
    quantize_pipeline(pipe, cfg, calib, torch.device("cpu"), torch.float32, progress=False)
    fam = family_of(pipe)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    save_quantized(path, fam.denoiser(pipe), {"source": "tiny-dit", "family": "pixart",
                                              "pipeline_class": type(pipe).__name__}, quant_metadata(cfg, calib))
    return path


def _edited(src: Path, dst: Path, edit_meta=None, edit_tensors=None) -> Path:
    with safe_open(str(src), framework="pt") as f:
        meta = json.loads(f.metadata()["diffptq"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if edit_meta:
        edit_meta(meta)
    if edit_tensors:
        edit_tensors(tensors)
    save_file(tensors, str(dst), metadata={"diffptq": json.dumps(meta)})
    return dst


def _set_layer(key, value):
    def edit(meta):
        meta["layers"][0][key] = {**meta["layers"][0][key], "bits": value}
    return edit


def _nan_scale(tensors):
    name = next(k for k in tensors if k.endswith(".scale"))
    tensors[name] = torch.full_like(tensors[name], float("nan"))


@pytest.mark.parametrize("edit_meta,edit_tensors,message", [
    (_set_layer("weight_spec", 9), None, "weight grid: QuantSpec.bits: bits must lie in 2..8, got 9"),
    (_set_layer("act_spec", 1), None, "activation grid: QuantSpec.bits: bits must lie in 2..8, got 1"),
    (lambda m: m.pop("base"), None, "metadata has no 'base' record"),
    (lambda m: m["quant"].update(wbits=9), None, "quant.wbits: bits must lie in 2..8, got 9"),
    (lambda m: m["layers"][0].update(kind="conv3d"), None, "kind 'conv3d' is not one of linear, conv2d"),
    (None, _nan_scale, "holds NaN or Inf: the file is damaged"),
    (None, lambda t: t.pop(next(k for k in t if k.endswith(".codes"))), "is missing"),
])
def test_edited_or_damaged_checkpoints_are_one_line(checkpoint, edit_meta, edit_tensors, message, tmp_path, capsys):
    import diffptq.__main__ as cli_main

    bad = _edited(checkpoint, tmp_path / "bad.safetensors", edit_meta, edit_tensors)
    err = _fails(cli_main, ["generate", "--checkpoint", str(bad), "--prompt", "a cat", "--steps", "2",
                            "--out", str(tmp_path / "images")], capsys)
    assert message in err and str(bad) in err
    assert not (tmp_path / "images").exists()


@pytest.mark.parametrize("flags,message", [
    (["--steps", "1"], "--steps 1: the PixArt pipeline with DPMSolverMultistepScheduler samples with at least 2"),
    (["--out", "{a_file}"], "--out {a_file} is a file, not a folder"),
    (["--seed", "-5"], "argument --seed: must lie in 0.."),
    (["--prompt", " "], "--prompt is empty"),
])
def test_generate_refuses_bad_requests_before_sampling(checkpoint, flags, message, files, capsys):
    import diffptq.__main__ as cli_main

    flags = [f.format(a_file=files / "a_file") for f in flags]
    argv = ["generate", "--checkpoint", str(checkpoint), "--prompt", "a cat", *flags]
    if "--out" not in argv:
        argv += ["--out", str(files / "images")]
    err = _fails(cli_main, argv, capsys)
    assert message.format(a_file=files / "a_file") in err
    assert not (files / "images").exists()


def test_an_interrupted_benchmark_says_which_finished_files_stay(tmp_path, capsys, monkeypatch):
    """Ctrl-C after a checkpoint was saved: the complete checkpoint stays, and the message says so (it does not
    claim that nothing was left)."""
    import diffptq.run.benchmark as bench

    saved = []
    real = bench.save_variant

    def save_then_interrupt(*args, **kwargs):
        real(*args, **kwargs)
        saved.append(args[0])
        raise KeyboardInterrupt
    monkeypatch.setattr(bench, "save_variant", save_then_interrupt)
    module = _script(*BENCHMARK)
    out = tmp_path / "o"
    with pytest.raises(SystemExit) as exit_info:
        module.run_main(lambda: module.main([*SMALL, "--methods", "fp,rtn", "--bits", "w8a8", "--n_images", "2",
                                             "--num_inference_steps", "2", "--save_checkpoints",
                                             "--out_dir", str(out)]))
    err = capsys.readouterr().err
    assert exit_info.value.code == 130
    assert saved and saved[0].is_file() and "checkpoints/rtn_w8a8.safetensors" in err
    assert "the files finished before it stay in" in err and not (out / "config.json").exists()
