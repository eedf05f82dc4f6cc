"""Saved images: the round trip keeps images, prompts, seeds and info; bad files fail with one clear line; the
difference of two sets in 8-bit levels."""
import math

import pytest
import torch

from diffptq.eval.image_store import ImageStoreError, image_difference, load_images, save_images

pytestmark = pytest.mark.usefixtures("one_thread")


def test_round_trip(tmp_path):
    images = torch.randint(0, 256, (3, 3, 8, 8), dtype=torch.uint8)
    prompts, seeds = ["a cat", "a dog | with a pipe", "ünïcode"], [5, 6, 7]
    path = save_images(tmp_path / "images" / "rtn_w4a8.safetensors", images, prompts, seeds, {"label": "rtn w4a8"})
    got = load_images(path)
    assert torch.equal(got.images, images) and got.prompts == prompts and got.seeds == seeds
    assert got.info == {"label": "rtn w4a8"}
    assert not list(path.parent.glob("*.tmp"))


def test_bad_input_and_files(tmp_path):
    with pytest.raises(ValueError, match="uint8"):
        save_images(tmp_path / "x.safetensors", torch.zeros(1, 3, 4, 4), ["p"], [0])
    with pytest.raises(ValueError, match="2 seeds"):
        save_images(tmp_path / "x.safetensors", torch.zeros(1, 3, 4, 4, dtype=torch.uint8), ["p"], [0, 1])
    with pytest.raises(ImageStoreError, match="--save_images"):
        load_images(tmp_path / "absent.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ImageStoreError, match="not a readable image file"):
        load_images(tmp_path / "junk.safetensors")


def test_image_difference_in_levels():
    a = torch.full((2, 3, 4, 4), 100, dtype=torch.uint8)
    assert image_difference(a, a.clone()) == {"max_abs": 0.0, "mean_abs": 0.0, "frac_pixels_differ": 0.0,
                                              "psnr_db": math.inf}
    b = a.clone()
    b[1, :, 0, 0] = 97  # one pixel (all 3 channels) off by 3 levels
    b[0, 2, 3, 3] = 101  # one value of another pixel off by 1
    d = image_difference(a, b, chunk=1)
    assert d["max_abs"] == 3 and d["frac_pixels_differ"] == 2 / 32
    assert d["mean_abs"] == pytest.approx((3 * 3 + 1) / 96)
    assert d["psnr_db"] == pytest.approx(10 * math.log10(255**2 / ((3 * 9 + 1) / 96)))
    with pytest.raises(ValueError, match="shapes"):
        image_difference(a, a[:1])
