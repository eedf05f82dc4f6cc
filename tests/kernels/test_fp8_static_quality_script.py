"""benchmarks/fp8_static_quality.py end to end on bundled-dit with a tiny calibration: every numerics row is there and
every quantized pipeline's images differ from the FP32 ones (PSNR finite) while staying close to them."""
import math
import re
import subprocess
import sys


def test_script_writes_every_row(tmp_path):
    out = tmp_path / "q.md"
    cmd = [sys.executable, "benchmarks/fp8_static_quality.py", "--n_calib", "2", "--calib_steps", "3", "--n_eval", "4",
           "--num_inference_steps", "4", "--mlp_steps", "20",
           "--act_scale", "minmax", "--out", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={"HF_HUB_OFFLINE": "1",
                                                                             "PATH": "/usr/bin:/bin"})
    assert res.returncode == 0, res.stderr[-2000:]
    rows = re.findall(r"^\| (.+?) \| ([0-9.]+) \| (inf|[0-9.]+) \|$", out.read_text(), re.M)
    names = [r[0] for r in rows]
    assert names[0] == "FP32" and len(names) == 6 and any("TDQ" in n for n in names)
    assert float(rows[0][2]) == math.inf  # the reference itself
    for name, acc, psnr in rows[1:]:
        assert 0.0 <= float(acc) <= 1.0 and 10 < float(psnr) < 60, (name, psnr)  # quantized: close, not identical
