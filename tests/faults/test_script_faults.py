"""Bad input and faults at the script level: what the user sees, and that no file appears under a final name."""
import hashlib
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from diffptq.models import load_pipeline

SCRIPT = Path("qronos_diffusion/quantize_qronos_4blocks.py")
ENV = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
SMALL = ["--blocks", "all", "--n_calib", "2", "--calib_steps", "2", "--calib_batch_size", "2"]


def _script_module():
    spec = importlib.util.spec_from_file_location("quantize_script", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(args, **kw):
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=600,
                          env=ENV, **kw)


@pytest.mark.parametrize("flags,message", [
    (["--wbits", "9"], "bits must lie in 2..8"),
    (["--abits", "1"], "bits must lie in 2..8"),
    (["--group_size", "12"], "--group_size 12 does not divide the input width 16 of layer"),
    (["--blocks", "0-9"], "indices must lie in 0..1"),
    (["--damp", "lots"], "argument --damp: expected a number > 0 (relative to mean diag H), 'adaptive', 'spread'"),
])
def test_bad_flag_values_give_one_line(tmp_path, flags, message, capsys):
    code, err = _main_in_process(["--model", "tiny-dit", *SMALL, "--out_dir", str(tmp_path / "o"), *flags], capsys)
    assert code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_empty_and_missing_prompt_file(tmp_path, capsys):
    empty = tmp_path / "p.txt"
    empty.write_text("\n\n")
    for path, message in [(empty, "holds no prompt"), (tmp_path / "none.txt", "prompt file not found")]:
        args = ["--model", "tiny-dit", *SMALL, "--prompts", str(path), "--out_dir", str(tmp_path / path.stem)]
        code, err = _main_in_process(args, capsys)
        assert code == 2 and message in err and "Traceback" not in err


def _main_in_process(argv, capsys) -> tuple[int, str]:
    """Run the script's main through run_main as the command line would; returns (exit code, stderr)."""
    mod = _script_module()
    with pytest.raises(SystemExit) as exit_info:
        mod.run_main(lambda: mod.main(argv))
    return exit_info.value.code, capsys.readouterr().err


def test_nan_activations_name_layer_and_block_and_write_nothing(tmp_path):
    pipe = load_pipeline("tiny-dit")
    with torch.no_grad():
        pipe.transformer.pos_embed.proj.weight[0, 0, 0, 0] = float("nan")
    pipe.save_pretrained(tmp_path / "nan-model")
    out = tmp_path / "o"
    res = _run(["--model", str(tmp_path / "nan-model"), *SMALL, "--out_dir", str(out), "--method", "gptq"])
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "NaN/Inf in the input of layer transformer_blocks.0.attn1.to_q (block 0)" in res.stderr
    assert not out.exists()  # no checkpoint, no CSV, no config: the folder the run made is gone again


def test_cuda_oom_is_caught_with_advice(tmp_path, monkeypatch, capsys):
    import diffptq.run.quantize

    mod = _script_module()

    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
    monkeypatch.setattr(diffptq.run.quantize, "quantize_pipeline", oom)
    with pytest.raises(SystemExit) as exit_info:
        mod.run_main(lambda: mod.main(["--model", "tiny-dit", *SMALL, "--out_dir", str(tmp_path / "o")]))
    assert exit_info.value.code == 3
    err = capsys.readouterr().err
    assert "CUDA out of memory" in err and "--n_calib" in err and "--calib_batch_size" in err
    assert "--offload_done --offload_pending" in err
    assert not (tmp_path / "o").exists()


def test_interrupted_save_leaves_no_final_file(tmp_path, monkeypatch):
    import diffptq.io.checkpoint as ckpt

    mod = _script_module()
    real_save = ckpt.save_file

    def save_then_interrupt(tensors, filename, metadata=None):
        real_save(tensors, filename, metadata=metadata)  # the temporary file is complete ...
        raise KeyboardInterrupt  # ... and the run is interrupted before the rename
    monkeypatch.setattr(ckpt, "save_file", save_then_interrupt)
    out = tmp_path / "o"
    with pytest.raises(SystemExit) as exit_info:
        mod.run_main(lambda: mod.main(["--model", "tiny-dit", *SMALL, "--out_dir", str(out),
                                       "--save_path", str(out / "ckpt.pt")]))
    assert exit_info.value.code == 130
    assert not (out / "ckpt.pt").exists() and not (out / "config.json").exists()
    assert not (out / "ckpt.pt.partial").exists()
    assert not (out / "layers.csv").exists()


def test_same_command_same_seed_gives_identical_checkpoint(tmp_path):
    digests = []
    for name in ("a", "b"):
        out = tmp_path / name
        res = _run(["--model", "tiny-dit", *SMALL, "--method", "qronos", "--out_dir", str(out)])
        assert res.returncode == 0, res.stderr[-1500:]
        data = (out / "checkpoint.safetensors").read_bytes()
        digests.append(hashlib.sha256(data).hexdigest())
        config = (out / "config.json").read_text()
        assert digests[-1] in config  # config.json records the checkpoint's hash
    assert digests[0] == digests[1]


def test_a_file_system_error_is_one_line_and_leaves_no_partial_file(tmp_path, monkeypatch, capsys):
    import errno

    import diffptq.io.checkpoint as ckpt

    def disk_full(tensors, filename, metadata=None):
        raise OSError(errno.ENOSPC, "No space left on device", filename)
    monkeypatch.setattr(ckpt, "save_file", disk_full)
    out = tmp_path / "o"
    code, err = _main_in_process(["--model", "tiny-dit", *SMALL, "--out_dir", str(out)], capsys)
    last = err.strip().splitlines()[-1]  # progress bars of the calibration come before it
    assert code == 2 and "Traceback" not in err
    assert last.startswith(f"error: No space left on device: {out / 'checkpoint.safetensors.partial'}")
    assert not out.exists()
