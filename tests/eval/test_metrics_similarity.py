"""LPIPS (real torchmetrics loader on random AlexNet weights in the real file format), PSNR and SSIM vs FP images."""
import logging
import math

import numpy as np
import pytest
import torch
import torchvision

from diffptq.eval.metrics import ALEXNET_WEIGHTS, lpips_metric, lpips_score, psnr_score, ssim_score


@pytest.fixture(scope="module")
def alexnet_weights(tmp_path_factory):
    """torchvision's AlexNet with random init, its state_dict saved under the real torch-hub file name."""
    path = tmp_path_factory.mktemp("alexnet") / ALEXNET_WEIGHTS
    torch.save(torchvision.models.alexnet(weights=None).state_dict(), path)
    return path


@pytest.fixture
def pair():
    images = torch.rand(2, 3, 64, 64)
    perturbed = (images + 0.1 * torch.randn_like(images)).clamp(0, 1)
    return images, perturbed


def test_lpips_from_a_path_option_is_zero_for_identical_and_positive_for_perturbed(
    alexnet_weights, pair, tmp_path, monkeypatch
):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty cache: the path option must be what is used
    metric = lpips_metric(alexnet_weights)
    assert metric is not None
    images, perturbed = pair
    assert lpips_score(metric, images, images.clone()) == pytest.approx(0.0, abs=1e-6)
    different = lpips_score(metric, perturbed, images)
    assert math.isfinite(different) and different > 0
    assert torch.hub.get_dir() == str(tmp_path / "hub")  # the temporary hub dir was undone


def test_lpips_finds_alexnet_in_the_torch_hub_cache(alexnet_weights, pair, tmp_path, monkeypatch):
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    (cache / ALEXNET_WEIGHTS).symlink_to(alexnet_weights)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    metric = lpips_metric()
    assert metric is not None
    images, perturbed = pair
    assert lpips_score(metric, (perturbed * 255).round().to(torch.uint8), images) > 0


def test_lpips_on_images_too_small_for_alexnet_is_none(alexnet_weights, caplog):
    metric = lpips_metric(alexnet_weights)
    small = torch.rand(2, 3, 16, 16)
    with caplog.at_level(logging.WARNING):
        assert lpips_score(metric, small, small) is None
    assert any("32 px" in r.message for r in caplog.records)


def test_missing_alexnet_gives_none_and_names_the_file(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with caplog.at_level(logging.WARNING):
        assert lpips_metric() is None
        assert lpips_metric(tmp_path / "nowhere.pth") is None
    lines = [r.message for r in caplog.records]
    assert len(lines) == 2
    assert ALEXNET_WEIGHTS in lines[0] and "lpips_weights" in lines[0]
    assert "nowhere.pth" in lines[1]


def test_psnr_is_inf_for_identical_and_matches_mse_for_perturbed(pair):
    images, perturbed = pair
    assert psnr_score(images, images.clone()) == float("inf")
    mse = ((perturbed.double() - images.double()) ** 2).flatten(1).mean(1)
    expected = float((10 * torch.log10(1.0 / mse)).mean())
    assert psnr_score(perturbed, images, batch_size=1) == pytest.approx(expected, rel=1e-4)


def test_psnr_accepts_uint8():
    images = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    noisy = (images.int() + 3).clamp(0, 255).to(torch.uint8)
    mse = ((noisy.double() - images.double()) / 255).pow(2).flatten(1).mean(1)
    assert psnr_score(noisy, images) == pytest.approx(float((10 * torch.log10(1 / mse)).mean()), rel=1e-4)


def test_ssim_is_one_for_identical_and_lower_for_perturbed(pair):
    images, perturbed = pair
    assert ssim_score(images, images.clone()) == pytest.approx(1.0, abs=1e-5)
    assert ssim_score(perturbed, images) < 0.99


def test_paired_metrics_reject_mismatched_shapes():
    with pytest.raises(ValueError, match="equal shapes"):
        psnr_score(torch.rand(2, 3, 16, 16), torch.rand(3, 3, 16, 16))


def test_image_scores_psnr_interval_and_prompt_acc():
    from diffptq.eval.metrics.similarity import image_scores

    g = torch.Generator().manual_seed(0)
    ref = torch.rand(40, 3, 8, 8, generator=g)
    noisy = (ref + 0.02 * torch.randn(ref.shape, generator=g)).clamp(0, 1)
    per_image = -10 * torch.log10((noisy.double() - ref.double()).pow(2).flatten(1).mean(1))

    class Evaluator:  # the bundled evaluator's interface: which images show their prompt
        def prompt_correct(self, images, prompts):
            return np.array([p == "yes" for p in prompts])

    prompts = ["yes"] * 30 + ["no"] * 10
    out = image_scores(noisy, ref, prompts, Evaluator())
    assert out["psnr"] == pytest.approx(float(per_image.mean()), rel=1e-9) and out["n_images"] == 40
    assert out["psnr_lo"] < out["psnr"] < out["psnr_hi"]
    assert out["prompt_acc"] == 0.75 and out["acc_lo"] < 0.75 < out["acc_hi"]
    same = image_scores(ref, ref)
    assert same["psnr"] == same["psnr_lo"] == float("inf") and "prompt_acc" not in same
