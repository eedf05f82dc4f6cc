"""Rotation through the sequential driver and checkpoints: H/G on rotated inputs, unchanged layer groups, a saved
rotation rebuilt on load (bit-identical outputs), files without rotations still readable by version-1 readers."""
import pytest
import torch

import diffptq
from diffptq.algo.driver import SequentialConfig, SequentialQuantizer
from diffptq.data.calib import collect_calibration
from diffptq.io.checkpoint import read_checkpoint, save_quantized
from diffptq.models import family_of, load_pipeline
from diffptq.quant.layers import QuantLinear, quant_layers, rotate_layers
from diffptq.quant.quantizer import QuantSpec
from diffptq.quant.rotation import make_rotation

PROMPTS = ["a red cat on a sofa", "a blue cup"]


@pytest.fixture(scope="module")
def tiny_dit():
    pipe = load_pipeline("tiny-dit")
    return collect_calibration(pipe, PROMPTS, 2, batch_size=2, progress=False)


def _driver(calib, rotate, monkeypatch=None, **kw):
    pipe = load_pipeline("tiny-dit")
    fam = family_of(pipe)
    cfg = SequentialConfig(**{"method": "qronos", "weight": QuantSpec(4), "act": None, "blocks": [0],
                              "holdout_every": 0, **kw})
    drv = SequentialQuantizer(fam.denoiser(pipe), fam, calib, cfg, "cpu", progress=False)
    if rotate:
        rotate_layers(drv.swap(), "hadamard")
    return pipe, fam, drv


def test_driver_accumulates_h_and_g_on_rotated_inputs_and_keeps_groups(tiny_dit, monkeypatch):
    grams, groups = {}, {}
    solve = SequentialQuantizer._solve
    for rotate in (False, True):
        seen = grams[rotate] = {}

        def spy(self, k, name, layer, grams, consume=False, held=None, seen=seen):
            # the solver may consume (empty) the statistics: keep copies
            seen[name] = (grams.H.clone(), None if grams.G is None else grams.G.clone())
            return solve(self, k, name, layer, grams, consume, held)
        monkeypatch.setattr(SequentialQuantizer, "_solve", spy)
        _, _, drv = _driver(tiny_dit, rotate)
        drv.run()
        groups[rotate] = drv.plans[0].groups
    assert groups[True] == groups[False]  # q, k, v still share one (rotated) input tensor
    assert ["transformer_blocks.0.attn1.to_q", "transformer_blocks.0.attn1.to_k",
            "transformer_blocks.0.attn1.to_v"] in groups[True]
    # layers whose inputs no quantized layer reaches (block 0, no activation quantizer): H and G of the rotated
    # run are exactly Rᵀ H R and Rᵀ G R of the plain run
    first = [f"transformer_blocks.0.attn1.to_{c}" for c in "qkv"] + [f"transformer_blocks.0.attn2.to_{c}" for c in "kv"]
    for name in first:
        H, G = grams[False][name]
        R = make_rotation("hadamard", H.shape[0]).matrix().float()
        torch.testing.assert_close(grams[True][name][0], R.T @ H @ R, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(grams[True][name][1], R.T @ G @ R, rtol=1e-4, atol=1e-5)


def test_rotated_checkpoint_round_trip_is_bit_identical(tiny_dit, tmp_path):
    pipe, fam, drv = _driver(tiny_dit, True, act=QuantSpec(4, symmetric=False), act_kind="dynamic")
    drv.run()
    path = tmp_path / "rot.safetensors"
    save_quantized(path, fam.denoiser(pipe), {"source": "tiny-dit", "family": fam.name,
                                              "pipeline_class": type(pipe).__name__}, {"method": "qronos"})
    meta, _ = read_checkpoint(path)
    assert meta["version"] == 2
    assert all(e["rotation"] == {"kind": "hadamard", "size": e["weight_shape"][1], "seed": 0} for e in meta["layers"])
    loaded = diffptq.load_quantized(path)
    a, b = dict(quant_layers(fam.denoiser(pipe))), dict(quant_layers(fam.denoiser(loaded)))
    for name, layer in b.items():
        assert layer.rotation is a[name].rotation and torch.equal(layer.weight_q, a[name].weight_q), name
    inputs = next(tiny_dit.batches())
    with torch.no_grad():
        torch.testing.assert_close(fam.denoiser(loaded)(**inputs).sample, fam.denoiser(pipe)(**inputs).sample,
                                   rtol=0, atol=0)


def test_checkpoint_without_rotation_stays_version_1(tiny_dit, tmp_path):
    pipe, fam, drv = _driver(tiny_dit, False)
    drv.run()
    path = tmp_path / "plain.safetensors"
    save_quantized(path, fam.denoiser(pipe), {"source": "tiny-dit", "family": fam.name,
                                              "pipeline_class": type(pipe).__name__}, {"method": "qronos"})
    meta, _ = read_checkpoint(path)
    assert meta["version"] == 1 and all(e["rotation"] is None for e in meta["layers"])
    loaded = diffptq.load_quantized(path)
    assert all(isinstance(m, QuantLinear) and m.rotation is None for _, m in quant_layers(fam.denoiser(loaded)))


def test_quantize_pipeline_rotates_the_driver_layers():
    from diffptq.config import CalibConfig
    from diffptq.run.quantize import quantize_pipeline

    pipe = load_pipeline("tiny-dit")
    cfg = SequentialConfig(method="gptq", weight=QuantSpec(4), act=QuantSpec(4, symmetric=False), act_kind="dynamic",
                           blocks=[0], rotate="hadamard")
    run = quantize_pipeline(pipe, cfg, CalibConfig(n_calib=2, calib_steps=2, batch_size=2), torch.device("cpu"),
                            torch.float32, progress=False)
    layers = dict(quant_layers(family_of(pipe).denoiser(pipe)))
    assert layers and all(m.rotation is not None and m.is_quantized for m in layers.values())
    assert run.summary_row(cfg, "0")["rotate"] == "hadamard"
