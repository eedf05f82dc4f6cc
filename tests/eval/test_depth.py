"""Error versus depth (diffptq.eval.depth, benchmarks/depth_error.py) on tiny-dit: the per-layer errors are the
driver's own rel_out_err, the block errors are an independent computation's, and the script writes its tables."""
import csv
import importlib.util
import math
from pathlib import Path

import pytest
import torch

from diffptq.algo.driver import SequentialQuantizer
from diffptq.config import SequentialConfig
from diffptq.data.calib import collect_calibration
from diffptq.eval.depth import depth_errors
from diffptq.models import family_of, load_pipeline
from diffptq.quant.layers import float_mode

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def quantized():
    pipe = load_pipeline("tiny-dit")
    fam = family_of(pipe)
    calib = collect_calibration(pipe, ["a red cat", "a dog", "a blue cup"], 3, batch_size=3, progress=False)
    cfg = SequentialConfig(method="gptq", holdout_every=3).with_bits(4, 8)
    result = SequentialQuantizer(fam.denoiser(pipe), fam, calib, cfg, "cpu", progress=False).run()
    return pipe, fam, calib.split(cfg.holdout_every)[1], result


def test_layer_errors_are_the_drivers_rel_out_err(quantized):
    pipe, fam, held, result = quantized
    d = depth_errors(fam.denoiser(pipe), fam, held)
    block0 = [r for r in result.layers if r.block == 0]
    assert len(block0) == 10
    for r in block0:
        assert d.layer_err[r.layer] == pytest.approx(r.rel_out_err, rel=1e-6)


def test_block_errors_match_an_independent_forward(quantized):
    """The depth errors from hooks on the denoiser's own forward, for the last block (the denoiser's whole stack)."""
    pipe, fam, held, _ = quantized
    den = fam.denoiser(pipe)
    d = depth_errors(den, fam, held)
    assert len(d.block_err) == 2 and all(0 < e < 1 for e in d.block_err)
    outs = {}
    hook = den.transformer_blocks[-1].register_forward_hook(lambda m, a, o: outs.setdefault("h", []).append(o))
    num = den_ = 0.0
    with torch.no_grad():
        for inputs in held.batches():
            outs.clear()
            with float_mode(den):
                den(**inputs)
            den(**inputs)
            ref, q = outs["h"]
            num += float((q - ref).pow(2).sum())
            den_ += float(ref.pow(2).sum())
    hook.remove()
    assert d.block_err[-1] == pytest.approx(math.sqrt(num / den_), rel=1e-5)


def test_depth_error_script_on_tiny_dit(tmp_path):
    spec = importlib.util.spec_from_file_location("depth_error", ROOT / "benchmarks" / "depth_error.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "de"
    module.main(["--models", "tiny-dit", "--methods", "rtn,gptq", "--bits", "w4a8", "--n_calib", "3",
                 "--calib_steps", "2", "--holdout_every", "3", "--n_images", "2", "--out_dir", str(out)])
    with (out / "depth_error.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["method"], r["depth"]) for r in rows] == [("rtn", "1"), ("rtn", "2"), ("gptq", "1"), ("gptq", "2")]
    with (out / "summary.csv").open() as f:
        summary = {r["method"]: r for r in csv.DictReader(f)}
    assert set(summary) == {"fp", "rtn", "gptq"}
    assert float(summary["rtn"]["psnr_lo"]) <= float(summary["rtn"]["psnr"]) <= float(summary["rtn"]["psnr_hi"])
    assert (out / "depth_error.png").stat().st_size > 0
    assert "## tiny-dit (2 blocks)" in (out / "depth_error.md").read_text()
