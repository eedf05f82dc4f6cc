"""`python -m diffptq generate`: images from a checkpoint, bit-identical for the same seed."""
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from diffptq.__main__ import main
from diffptq.algo.driver import SequentialConfig, quantize_sequential
from diffptq.data.calib import collect_calibration
from diffptq.io.checkpoint import save_quantized
from diffptq.models import family_of, load_pipeline
from diffptq.quant.quantizer import QuantSpec


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    pipe = load_pipeline("tiny-dit")
    fam = family_of(pipe)
    calib = collect_calibration(pipe, ["a red cat", "a cup"], 2, batch_size=2, progress=False)
    quantize_sequential(fam.denoiser(pipe), fam, calib, SequentialConfig(method="gptq", act=QuantSpec(8)),
                        progress=False)
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    save_quantized(path, fam.denoiser(pipe), {"source": "tiny-dit", "family": "pixart",
                                              "pipeline_class": type(pipe).__name__}, {"method": "gptq"})
    return path


def _pixels(folder):
    return {p.name: np.asarray(Image.open(p)) for p in sorted(folder.glob("*.png"))}


def test_generate_writes_images_and_is_reproducible(checkpoint, tmp_path):
    for name in ("a", "b"):
        main(["generate", "--checkpoint", str(checkpoint), "--prompt", "a red bicycle", "--n", "3", "--seed", "5",
              "--steps", "3", "--out", str(tmp_path / name)])
    a, b = _pixels(tmp_path / "a"), _pixels(tmp_path / "b")
    assert list(a) == ["0000_seed5.png", "0001_seed6.png", "0002_seed7.png"]
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["0000_seed5.png"], a["0001_seed6.png"])  # different seeds, different images
    assert (tmp_path / "a" / "prompts.txt").read_text().count("a red bicycle") == 3


def test_generate_refuses_an_empty_prompt(checkpoint, tmp_path):
    from diffptq.errors import DiffptqError

    with pytest.raises(DiffptqError, match="empty"):
        main(["generate", "--checkpoint", str(checkpoint), "--prompt", "  ", "--out", str(tmp_path / "o")])


def test_cuda_graphs_needs_a_cuda_device(checkpoint):
    from diffptq.errors import ConfigError

    with pytest.raises(ConfigError, match="--cuda_graphs needs a CUDA device, got --device cpu"):
        main(["generate", "--checkpoint", str(checkpoint), "--prompt", "a cup", "--cuda_graphs", "--device", "cpu"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the pass-through off CUDA")
def test_cuda_graphs_off_cuda_changes_no_image(checkpoint, tmp_path, caplog):
    for name, flags in (("eager", []), ("graphs", ["--cuda_graphs"])):  # --device auto: the CPU here
        with caplog.at_level(logging.INFO, logger="diffptq.kernels.graphs"):
            main(["generate", "--checkpoint", str(checkpoint), "--prompt", "a cup", "--n", "1", "--steps", "2",
                  "--out", str(tmp_path / name), *flags])
        assert ("GraphedDenoiser: running eagerly: CUDA is not available" in caplog.text) == bool(flags)
    a, b = _pixels(tmp_path / "eager"), _pixels(tmp_path / "graphs")
    assert list(a) == list(b) and all(np.array_equal(a[k], b[k]) for k in a)


def test_fp8_attention_changes_the_images_a_little(checkpoint, tmp_path):
    """--fp8_attention switches the self-attention processors: the images differ from exact attention's, slightly
    (the same seed; e4m3 operands)."""
    for name, flags in (("exact", []), ("fp8", ["--fp8_attention"])):
        main(["generate", "--checkpoint", str(checkpoint), "--prompt", "a cup", "--n", "1", "--steps", "2",
              "--out", str(tmp_path / name), *flags])
    a, b = _pixels(tmp_path / "exact"), _pixels(tmp_path / "fp8")
    diff = [np.abs(a[k].astype(int) - b[k].astype(int)) for k in a]
    assert list(a) == list(b) and any(d.max() > 0 for d in diff) and all(d.mean() < 8 for d in diff)


def test_kernels_off_their_device_keep_the_fake_quant_images_and_say_why(checkpoint, tmp_path, capsys):
    """--kernels w4a8 / w4 on the CPU: one line saying the layers stay fake-quant and why; the same images."""
    for name, flags in (("fake", []), ("w4a8", ["--kernels", "w4a8"]), ("w4", ["--kernels", "w4"])):
        main(["generate", "--checkpoint", str(checkpoint), "--prompt", "a cup", "--n", "1", "--steps", "2",
              "--device", "cpu", "--out", str(tmp_path / name), *flags])
    out = capsys.readouterr().out
    assert "kernels: fake-quant layers kept (w4a8 unavailable: " in out
    assert "kernels: fake-quant layers kept (w4 unavailable: the int4 memory path targets CUDA GPUs" in out
    ref = _pixels(tmp_path / "fake")
    for name in ("w4a8", "w4"):
        assert all(np.array_equal(ref[k], v) for k, v in _pixels(tmp_path / name).items())


@pytest.mark.parametrize("kernels,module", [("w4a8", "Fp8W4A8Linear"), ("w4", "Int4WeightOnlyLinear")])
def test_converted_kernels_run_the_checkpoint_close_to_its_fake_quant_images(checkpoint, kernels, module, capsys):
    """The real modules (their reference implementations on the CPU) replace every quantized layer, and the images
    stay close to the fake-quant ones (same W4 codes; e4m3 or no activation quantization instead of int8)."""
    import diffptq
    from diffptq.__main__ import convert_kernels
    from diffptq.eval.sample import generate
    from diffptq.kernels import is_inference_module
    from diffptq.quant.layers import quant_layers

    fake = diffptq.load_quantized(checkpoint)
    real = diffptq.load_quantized(checkpoint)
    assert convert_kernels(real, kernels, "auto", "cpu", force=True) == kernels
    assert convert_kernels(diffptq.load_quantized(checkpoint), kernels, "auto", "cpu") == "fake"  # not forced
    line = capsys.readouterr().out.splitlines()[0]
    mods = [m for m in real.transformer.modules() if is_inference_module(m)]
    assert mods and all(type(m).__name__ == module for m in mods)
    quantized = sum(layer.is_quantized for _, layer in quant_layers(fake.transformer))
    assert line.startswith(f"kernels: {kernels} (") and f"{quantized} {module}; 0 kept fake-quant" in line
    a, b = (generate(p, ["a cup"], [3], num_inference_steps=2) for p in (fake, real))
    assert not torch.equal(a, b) and (a - b).abs().mean() < 0.01  # pixels in [0, 1]


def test_act_mode_needs_the_w4a8_kernels(checkpoint):
    from diffptq.errors import ConfigError

    with pytest.raises(ConfigError, match="--act_mode sets the FP8 activation scales of --kernels w4a8; got "
                                          "--kernels w4"):
        main(["generate", "--checkpoint", str(checkpoint), "--prompt", "a cup", "--kernels", "w4",
              "--act_mode", "static"])


def test_compile_gets_the_path_the_denoiser_was_converted_to(checkpoint, tmp_path, monkeypatch):
    """--compile compiles the pipeline's denoiser after the conversion, with the settings of the path really taken:
    --kernels w4 on the CPU stays fake-quant, so no memory-path settings."""
    import diffptq.kernels.compiled as compiled

    seen = []
    monkeypatch.setattr(compiled, "compile_denoiser", lambda pipe, path: seen.append((type(pipe.transformer), path)))
    main(["generate", "--checkpoint", str(checkpoint), "--prompt", "a cup", "--n", "1", "--steps", "2",
          "--device", "cpu", "--kernels", "w4", "--compile", "--out", str(tmp_path / "o")])
    from diffusers import PixArtTransformer2DModel

    assert seen == [(PixArtTransformer2DModel, "fake")]
