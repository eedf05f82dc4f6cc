"""quantize_qronos_4blocks.py end to end on a tiny pipeline given as a local directory (--model <dir>)."""
import csv
import json
import subprocess
import sys

import torch

from diffptq.models import load_pipeline


def test_script_on_a_saved_directory(tmp_path):
    model_dir = tmp_path / "tiny"
    load_pipeline("tiny-dit").save_pretrained(model_dir)
    out = tmp_path / "out"
    cmd = [sys.executable, "qronos_diffusion/quantize_qronos_4blocks.py", "--model", str(model_dir),
           "--method", "qronos", "--blocks", "0-1", "--n_calib", "2", "--calib_steps", "2",
           "--calib_batch_size", "2", "--out_dir", str(out), "--save_path", str(out / "q.pt")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={"HF_HUB_OFFLINE": "1",
                                                                             "PATH": "/usr/bin:/bin"})
    assert res.returncode == 0, res.stderr[-2000:]
    rows = list(csv.DictReader((out / "layers.csv").open()))
    assert list(rows[0]) == ["block", "layer", "method", "wbits", "abits", "damp", "rel_out_err",
                            "heldout_err"]
    assert {r["block"] for r in rows} == {"0", "1"} and all(float(r["rel_out_err"]) > 0 for r in rows)
    summary = list(csv.DictReader((out / "summary.csv").open()))
    assert len(summary) == 1 and summary[0]["method"] == "qronos" and float(summary[0]["final_denoiser_err"]) > 0
    config = json.loads((out / "config.json").read_text())
    assert config["args"]["model"] == str(model_dir) and "torch" in config["versions"]
    assert (out / "q.pt").is_file()
    # an existing out_dir is never overwritten without --overwrite
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={"HF_HUB_OFFLINE": "1",
                                                                               "PATH": "/usr/bin:/bin"})
    assert again.returncode == 2 and "--overwrite" in again.stderr
    # --offload_done --offload_pending (blocks wait in host memory but for their turn): the same checkpoint and errors
    from safetensors.torch import load_file

    off = tmp_path / "off"
    cmd_off = cmd[:cmd.index("--out_dir")] + ["--out_dir", str(off), "--save_path", str(off / "q.pt"), "--offload_done",
                                              "--offload_pending"]
    res = subprocess.run(cmd_off, capture_output=True, text=True, timeout=600, env={"HF_HUB_OFFLINE": "1",
                                                                                 "PATH": "/usr/bin:/bin"})
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads((off / "config.json").read_text())["args"]["offload_done"] is True
    assert json.loads((off / "config.json").read_text())["args"]["offload_pending"] is True
    first, second = load_file(out / "q.pt"), load_file(off / "q.pt")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    assert [r["rel_out_err"] for r in csv.DictReader((off / "layers.csv").open())] == [r["rel_out_err"] for r in rows]
