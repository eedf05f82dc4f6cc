"""FID with an injected extractor: self-distance, shift, the few-images warning; reference folders."""
import logging
import math

import pytest
import torch
from PIL import Image
from torch import nn

from diffptq.eval.metrics import custom_fid_metric, fid_feature_dim, frechet_distance, load_image_dir


class PooledProjection(nn.Module):
    """A tiny extractor: 4x4 average pooling of (N,3,16,16) images, then a fixed random projection to d features."""

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.proj = nn.Linear(3 * 4 * 4, dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.proj(nn.functional.adaptive_avg_pool2d(images, 4).flatten(1))


def _images(n: int, size: int = 16) -> torch.Tensor:
    return torch.rand(n, 3, size, size)


def test_fid_of_a_set_with_itself_is_zero_and_grows_with_a_shift():
    metric = custom_fid_metric(PooledProjection(), _images(2))
    images = _images(64)
    assert fid_feature_dim(metric) == 8
    same = frechet_distance(metric, images, images.clone())
    shifted = frechet_distance(metric, (images * 0.5 + 0.4).clamp(0, 1), images)
    assert abs(same) < 1e-3
    assert shifted > 0.05
    assert shifted > 100 * abs(same)


def test_fid_accepts_uint8_images_for_an_injected_extractor():
    metric = custom_fid_metric(PooledProjection(), _images(2))
    images = _images(32)
    as_uint8 = (images * 255).round().to(torch.uint8)
    assert frechet_distance(metric, as_uint8, images) == pytest.approx(0.0, abs=1e-3)


def test_fid_on_fewer_images_than_features_warns(caplog):
    metric = custom_fid_metric(PooledProjection(dim=16), _images(2))
    with caplog.at_level(logging.WARNING):
        value = frechet_distance(metric, _images(6), _images(6))
    assert value is not None and math.isfinite(value)
    assert any("biased" in r.message and "16 features" in r.message for r in caplog.records)


def test_fid_on_enough_images_does_not_warn(caplog):
    metric = custom_fid_metric(PooledProjection(dim=4), _images(2))
    with caplog.at_level(logging.WARNING):
        frechet_distance(metric, _images(8), _images(8))
    assert not [r for r in caplog.records if "biased" in r.message]


def test_fid_on_one_image_is_none(caplog):
    metric = custom_fid_metric(PooledProjection(), _images(2))
    with caplog.at_level(logging.WARNING):
        assert frechet_distance(metric, _images(1), _images(4)) is None
    assert any("at least 2 images" in r.message for r in caplog.records)


def test_load_image_dir_resizes_to_the_generated_size(tmp_path):
    Image.new("RGB", (40, 20), (255, 0, 0)).save(tmp_path / "a.png")
    Image.new("RGB", (30, 30), (0, 0, 255)).save(tmp_path / "b.JPG")
    (tmp_path / "notes.txt").write_text("not an image")
    images = load_image_dir(tmp_path, (16, 24))
    assert images.shape == (2, 3, 16, 24) and images.dtype == torch.uint8
    assert images[0, 0].float().mean() > 250 and images[0, 2].float().mean() < 5  # a.png is red
    assert images[1, 2].float().mean() > 240  # b.JPG is blue


def test_load_image_dir_without_images_raises(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_image_dir(tmp_path, (8, 8))
