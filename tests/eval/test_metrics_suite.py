"""compute_image_metrics / ImageMetrics: keys, skipping of absent weights, injected extractor and bundled evaluator."""
import logging
import math

import pytest
import torch
from PIL import Image
from torch import nn

from diffptq.eval.metrics import RESULT_KEYS, ImageMetrics, MetricOptions, compute_image_metrics


class MeanColour(nn.Module):
    """Features: per-channel mean and std of (N,3,H,W) images -> (N, 6)."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.cat([images.mean((2, 3)), images.std((2, 3))], dim=1)


class ToyEvaluator:
    """A bundled evaluator: 'recognises' a prompt when it names the dominant colour channel."""

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return images.mean((2, 3))

    def prompt_accuracy(self, images, prompts) -> float:
        names = ("red", "green", "blue")
        hits = [names[int(img.mean((1, 2)).argmax())] in p for img, p in zip(images, prompts, strict=True)]
        return sum(hits) / len(hits)


@pytest.fixture
def empty_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))


def _coloured(n: int, size: int = 16) -> torch.Tensor:
    """n images, each dominated by channel i % 3."""
    images = torch.rand(n, 3, size, size) * 0.3
    for i in range(n):
        images[i, i % 3] += 0.6
    return images


def test_all_keys_and_absent_weights_are_none_with_one_line_each(empty_caches, caplog):
    fp = _coloured(12)
    quant = (fp + 0.05 * torch.randn_like(fp)).clamp(0, 1)
    options = MetricOptions(fid_extractor=MeanColour(), clip_model="openai/clip-not-cached", batch_size=5)
    metrics = ImageMetrics(options)
    with caplog.at_level(logging.WARNING):
        first = metrics(quant, fp, ["a red thing"] * 12)
        second = metrics(fp, fp, ["a red thing"] * 12)
    assert set(first) == set(RESULT_KEYS)
    assert first["clip_score"] is None and first["lpips"] is None
    assert first["prompt_acc"] is None and first["fid_bundled"] is None
    assert first["fid_features"] == 6 and first["fid_images"] == 12 and first["fid_ref_images"] == 12
    assert first["fid"] > second["fid"] >= -1e-6 and second["fid"] < 1e-4
    assert math.isfinite(first["psnr"]) and second["psnr"] == float("inf")
    assert first["ssim"] < 1 and second["ssim"] == pytest.approx(1.0, abs=1e-5)
    skipped = [r.message for r in caplog.records if "skipped" in r.message]
    assert len(skipped) == 2  # one for clip_score, one for lpips, not repeated on the second call
    assert any("clip_score" in m and "clip-not-cached" in m for m in skipped)
    assert any("lpips" in m and "alexnet-owt-7be5be79.pth" in m for m in skipped)


def test_missing_inception_weights_leave_fid_empty(empty_caches, tmp_path, caplog):
    images = torch.rand(4, 3, 16, 16)
    options = MetricOptions(fid_weights=str(tmp_path / "missing.pth"), metrics=("fid", "psnr"))
    with caplog.at_level(logging.WARNING):
        out = compute_image_metrics(images, images, ["p"] * 4, options)
    assert out["fid"] is None and out["fid_features"] is None
    assert out["psnr"] == float("inf") and out["ssim"] is None  # ssim not asked for
    assert any("missing.pth" in r.message and "fid_weights" in r.message for r in caplog.records)


def test_bundled_evaluator_adds_prompt_acc_and_fid_bundled(empty_caches):
    images = _coloured(6)
    prompts = ["red", "green", "blue", "red", "a cat", "blue"]  # 5 of 6 name the dominant channel
    options = MetricOptions(fid_extractor=MeanColour(), evaluator=ToyEvaluator(), metrics=("fid",), batch_size=4)
    out = compute_image_metrics(images, images.clone(), prompts, options)
    assert out["prompt_acc"] == pytest.approx(5 / 6)
    assert out["fid_bundled"] == pytest.approx(0.0, abs=1e-4)
    shifted = compute_image_metrics(images * 0.5, images, prompts, options)
    assert shifted["fid_bundled"] > 1e-3


def test_ref_dir_is_the_fid_reference_at_the_generated_size(empty_caches, tmp_path):
    ref = _coloured(4, size=24)
    for i, img in enumerate(ref):
        Image.fromarray((img * 255).round().byte().permute(1, 2, 0).numpy()).save(tmp_path / f"{i}.png")
    options = MetricOptions(fid_extractor=MeanColour(), ref_dir=str(tmp_path), metrics=("fid",))
    out = compute_image_metrics(_coloured(5), None, ["p"] * 5, options)
    assert out["fid_ref_images"] == 4 and out["fid_images"] == 5
    assert math.isfinite(out["fid"])
    assert out["psnr"] is None  # no FP images: no paired metrics


def test_without_fp_images_or_ref_dir_reference_metrics_are_none(empty_caches):
    options = MetricOptions(fid_extractor=MeanColour(), metrics=("fid", "psnr", "ssim"))
    out = compute_image_metrics(torch.rand(3, 3, 16, 16), None, ["a", "b", "c"], options)
    assert all(out[k] is None for k in ("fid", "psnr", "ssim"))


def test_inputs_are_checked():
    with pytest.raises(ValueError, match="unknown metrics"):
        ImageMetrics(MetricOptions(metrics=("fid", "bleu")))
    with pytest.raises(ValueError, match="prompts"):
        compute_image_metrics(torch.rand(2, 3, 8, 8), None, ["one"], MetricOptions(metrics=()))
    with pytest.raises(ValueError, match="differ in shape"):
        compute_image_metrics(torch.rand(2, 3, 8, 8), torch.rand(2, 3, 8, 4), ["a", "b"], MetricOptions(metrics=()))


class CpuFeatures(ToyEvaluator):
    """Like the project's bundled evaluator: features come back on the CPU whatever the input device."""

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return super().features(images).cpu()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_metrics_on_cuda_with_an_evaluator_returning_cpu_features(empty_caches):
    images = _coloured(6)
    options = MetricOptions(device="cuda", fid_extractor=MeanColour(), evaluator=CpuFeatures(), metrics=("fid", "psnr"))
    out = compute_image_metrics(images * 0.5, images, ["red", "green", "blue"] * 2, options)
    assert out["fid"] > 0 and out["fid_bundled"] > 0 and math.isfinite(out["psnr"])


class CorrectEvaluator(ToyEvaluator):
    """ToyEvaluator that also answers image by image (as the bundled evaluator's prompt_correct)."""

    def prompt_correct(self, images, prompts):
        names = ("red", "green", "blue")
        return [names[int(img.mean((1, 2)).argmax())] in p for img, p in zip(images, prompts, strict=True)]


@pytest.mark.parametrize("evaluator", [ToyEvaluator(), CorrectEvaluator()], ids=["per-image accuracy", "correct"])
def test_intervals_match_an_independent_computation(empty_caches, evaluator):
    images = _coloured(6)
    prompts = ["red", "green", "blue", "red", "a cat", "blue"]  # 5 of 6 right
    noisy = (images + 0.05 * torch.randn_like(images)).clamp(0, 1)
    options = MetricOptions(evaluator=evaluator, metrics=("psnr",), batch_size=4)
    out = compute_image_metrics(noisy, images, prompts, options)
    p, n, z = 5 / 6, 6, 1.959964  # Wilson score interval, written out
    centre, half = (p + z * z / (2 * n)) / (1 + z * z / n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (
        1 + z * z / n)
    assert out["prompt_acc"] == pytest.approx(p)
    assert (out["prompt_acc_lo"], out["prompt_acc_hi"]) == pytest.approx((centre - half, min(1.0, centre + half)))
    per_image = [float(10 * torch.log10(1 / ((a - b) ** 2).mean())) for a, b in zip(noisy, images, strict=True)]
    assert out["psnr"] == pytest.approx(sum(per_image) / 6, rel=1e-4)
    gen = torch.Generator().manual_seed(0)  # the bootstrap of diffptq.eval.stats: 2000 resamples, seed 0
    means = torch.tensor(per_image, dtype=torch.float64)[torch.randint(0, 6, (2000, 6), generator=gen)].mean(1)
    expected = torch.quantile(means, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    assert [out["psnr_lo"], out["psnr_hi"]] == pytest.approx(expected, rel=1e-5)
    assert out["psnr_lo"] < out["psnr"] < out["psnr_hi"]


def test_psnr_interval_of_identical_images(empty_caches):
    images = _coloured(4)
    out = compute_image_metrics(images, images.clone(), ["p"] * 4, MetricOptions(metrics=("psnr",)))
    assert out["psnr"] == out["psnr_lo"] == out["psnr_hi"] == float("inf")
    partly = images.clone()
    partly[0] = partly[0] * 0.9
    out = compute_image_metrics(partly, images, ["p"] * 4, MetricOptions(metrics=("psnr",)))
    assert out["psnr"] == float("inf") and out["psnr_lo"] is None and out["psnr_hi"] is None
