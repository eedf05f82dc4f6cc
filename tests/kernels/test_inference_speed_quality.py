"""benchmarks/inference_speed_quality.py: the sampled-image quality of the timed numerics carries its 95 % intervals."""
import copy
from types import SimpleNamespace

import pytest
import torch

from diffptq.eval.stats import wilson_interval
from diffptq.models.load import BUNDLED_MODELS


@pytest.fixture(scope="module")
def quality(benchmark_script):
    return benchmark_script("inference_speed_quality")


@pytest.mark.skipif(not (BUNDLED_MODELS["bundled-dit"] / "model_index.json").is_file(),
                    reason="needs the bundled-dit weights")
def test_prompt_acc_rows_carry_wilson_and_bootstrap_intervals(quality):
    from diffptq.models import load_pipeline

    fp = load_pipeline("bundled-dit")
    noisy = copy.deepcopy(fp)
    with torch.no_grad():
        torch.manual_seed(0)
        for p in noisy.transformer.transformer_blocks.parameters():
            p.add_(torch.randn_like(p) * 0.02 * p.abs().mean())
    out = quality.bundled_prompt_acc({"fp32": (fp, torch.float32), "noisy": (noisy, torch.float32)},
                                     SimpleNamespace(device="cpu", prompt_acc=8))
    ref, row = out["fp32"], out["noisy"]
    assert ref["n_images"] == row["n_images"] == 8
    assert ref["psnr_db"] == float("inf") and ref["psnr_lo"] is None  # the reference against itself: no interval
    assert (row["prompt_acc_lo"], row["prompt_acc_hi"]) == pytest.approx(
        wilson_interval(round(row["prompt_acc"] * 8), 8))
    assert row["psnr_lo"] <= row["psnr_db"] <= row["psnr_hi"] < float("inf")


def test_values_print_with_their_interval_when_they_have_one(benchmark_script):
    _with_interval = benchmark_script("inference_speed_report")._with_interval
    assert _with_interval(0.8125, 0.7764, 0.8439, ".3f") == "0.812 (0.776-0.844)"
    assert _with_interval(float("inf"), None, None, ".1f") == "inf"
