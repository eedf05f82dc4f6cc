"""load_pipeline: project models, local directories, and the clear errors for missing weights."""
import subprocess
import sys
import time

import pytest
import torch

from diffptq.errors import ModelNotFoundError, UnknownModelError
from diffptq.models import PIXART, SD, family_of, load_pipeline


@pytest.mark.parametrize("name,family,cls", [("tiny-dit", PIXART, "PixArtAlphaPipeline"),
                                             ("tiny-unet", SD, "StableDiffusionPipeline")])
def test_tiny_models_load_through_the_entry_point(name, family, cls):
    pipe = load_pipeline(name)
    assert type(pipe).__name__ == cls
    assert family_of(pipe) is family
    blocks = family.blocks(family.denoiser(pipe))
    assert len(blocks) >= 2
    layers = family.quantizable_layers(blocks[0][1])
    assert layers and all(isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) for _, m in layers)


@pytest.mark.parametrize("name", ["tiny-dit", "tiny-unet", "bundled-unet"])
@pytest.mark.parametrize("fine", [False, True])
def test_unrolled_forward_equals_the_denoiser(name, fine):
    pipe = load_pipeline(name)
    fam = family_of(pipe)
    den = fam.denoiser(pipe)
    g = torch.Generator().manual_seed(1)
    lat = torch.randn(2, 4, 8, 8, generator=g)
    ehs = torch.randn(2, pipe.tokenizer.model_max_length, den.config.cross_attention_dim if fam is SD
                      else den.config.caption_channels, generator=g)
    t = torch.tensor([500, 500])
    inputs = ({"hidden_states": lat, "encoder_hidden_states": ehs, "timestep": t,
               "added_cond_kwargs": {"resolution": None, "aspect_ratio": None},
               "encoder_attention_mask": torch.ones(2, ehs.shape[1])} if fam is PIXART
              else {"sample": lat, "encoder_hidden_states": ehs, "timestep": t})
    with torch.no_grad():
        ref = den(**inputs, return_dict=False)[0]
        out = fam.forward_unrolled(den, inputs, fine=fine)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)


def test_sd_blocks_are_down_mid_up():
    den = load_pipeline("tiny-unet").unet
    names = [n for n, _ in SD.blocks(den)]
    assert names == [f"down_blocks.{i}" for i in range(len(den.down_blocks))] + ["mid_block"] + \
        [f"up_blocks.{i}" for i in range(len(den.up_blocks))]


def test_saved_directory_loads_back_identically(tmp_path):
    pipe = load_pipeline("tiny-dit")
    pipe.save_pretrained(tmp_path / "m")
    again = load_pipeline(str(tmp_path / "m"))
    for (n, a), (_, b) in zip(pipe.transformer.state_dict().items(), again.transformer.state_dict().items()):
        assert torch.equal(a, b), n
    assert again.tokenizer("a red bicycle").input_ids == pipe.tokenizer("a red bicycle").input_ids


def test_missing_hub_weights_fail_fast_with_advice(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    with pytest.raises(ModelNotFoundError) as err:
        load_pipeline("PixArt-alpha/PixArt-XL-2-512x512")
    assert time.perf_counter() - t0 < 15
    msg = str(err.value)
    assert "PixArt-alpha/PixArt-XL-2-512x512" in msg and "cache" in msg
    assert "huggingface-cli download" in msg and "bundled-dit" in msg


def test_bad_path_and_unknown_name_and_non_pipeline_dir(tmp_path):
    with pytest.raises(ModelNotFoundError, match="not found"):
        load_pipeline(str(tmp_path / "nothing-here"))
    with pytest.raises(UnknownModelError, match="unknown model 'pixart'"):
        load_pipeline("pixart")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="model_index.json"):
        load_pipeline(str(tmp_path / "empty"))


def test_script_prints_one_line_for_missing_weights(tmp_path):
    env = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    res = subprocess.run([sys.executable, "qronos_diffusion/quantize_qronos_4blocks.py", "--out_dir",
                          str(tmp_path / "o")], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 2
    assert "Traceback" not in res.stderr
    assert "error: model PixArt-alpha/PixArt-XL-2-512x512 is not in the Hugging Face cache" in res.stderr


def test_the_light_model_names_are_the_loaders():
    """diffptq.models.names (read by the command line before torch is imported) lists exactly what load_pipeline
    knows, and every bundled model, the 28-block DiT included, loads offline with its sampling settings."""
    from diffptq.models.fullsize import FULLSIZE_MODELS
    from diffptq.models.load import BUNDLED_MODELS, PROJECT_MODELS
    from diffptq.models.names import BUNDLED_NAMES, FULLSIZE_NAMES, PROJECT_MODEL_NAMES, TINY_NAMES
    from diffptq.models.schedulers import SCHEDULERS
    from diffptq.models.names import SCHEDULER_NAMES
    from diffptq.models.tiny import TINY_MODELS

    assert tuple(PROJECT_MODELS) == PROJECT_MODEL_NAMES and tuple(BUNDLED_MODELS) == BUNDLED_NAMES
    assert tuple(TINY_MODELS) == TINY_NAMES and tuple(FULLSIZE_MODELS) == FULLSIZE_NAMES
    assert tuple(SCHEDULERS) == SCHEDULER_NAMES
    deep = load_pipeline("bundled-dit-deep")
    assert len(deep.transformer.transformer_blocks) == 28 and deep.diffptq_sampling["guidance_scale"] > 1
