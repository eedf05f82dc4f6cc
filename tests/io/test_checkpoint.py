"""Checkpoints: save -> load round trip, and refusal of corrupted, foreign and pickled files."""
import os
import pickle

import pytest
import torch

import diffptq
from diffptq.algo.driver import SequentialConfig, quantize_sequential
from diffptq.data.calib import collect_calibration
from diffptq.data.prompts import load_prompts
from diffptq.errors import CheckpointError
from diffptq.io.checkpoint import read_checkpoint, save_quantized
from diffptq.models import family_of, load_pipeline
from diffptq.models.build import DiTSpec, build_pixart_pipeline
from diffptq.models.tokenizers import vocabulary_from_texts
from diffptq.quant.layers import quant_layers
from diffptq.quant.quantizer import QuantSpec


def _quantized(name, tmp_path, wbits=4, group_size=None, act_kind="static"):
    pipe = load_pipeline(name)
    fam = family_of(pipe)
    calib = collect_calibration(pipe, ["a red cat", "a cup"], 2, batch_size=2, progress=False)
    cfg = SequentialConfig(method="gptq", weight=QuantSpec(wbits, group_size=group_size),
                           act=QuantSpec(8, symmetric=False), act_kind=act_kind, blocks=[0], holdout_every=0)
    quantize_sequential(fam.denoiser(pipe), fam, calib, cfg, progress=False)
    path = tmp_path / "ckpt.pt"
    save_quantized(path, fam.denoiser(pipe), {"source": name, "family": fam.name,
                                              "pipeline_class": type(pipe).__name__}, {"method": "gptq"})
    return pipe, fam, calib, path


@pytest.mark.parametrize("wbits,group_size,act_kind", [(4, None, "static"), (3, 8, "dynamic"), (8, None, "static")])
def test_round_trip_bit_identical_weights_and_outputs(tmp_path, wbits, group_size, act_kind):
    pipe, fam, calib, path = _quantized("tiny-dit", tmp_path, wbits, group_size, act_kind)
    loaded = diffptq.load_quantized(path)
    a = dict(quant_layers(fam.denoiser(pipe)))
    b = dict(quant_layers(fam.denoiser(loaded)))
    assert a.keys() == b.keys() and a
    for name in a:
        assert torch.equal(a[name].weight_codes, b[name].weight_codes), name
        assert torch.equal(a[name].weight_q, b[name].weight_q), name
    inputs = next(calib.batches())
    with torch.no_grad():
        torch.testing.assert_close(fam.denoiser(loaded)(**inputs).sample, fam.denoiser(pipe)(**inputs).sample,
                                   rtol=0, atol=0)


def test_int4_codes_are_stored_packed(tmp_path):
    pipe, fam, calib, path = _quantized("tiny-dit", tmp_path, 4)
    meta, tensors = read_checkpoint(path)
    for entry in meta["layers"]:
        out, cols = entry["weight_shape"][0], entry["weight_shape"][1]
        assert tensors[entry["name"] + ".codes"].numel() == (out * cols + 1) // 2


def test_truncated_corrupted_and_missing(tmp_path):
    _, _, _, path = _quantized("tiny-dit", tmp_path)
    data = path.read_bytes()
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        diffptq.load_quantized(tmp_path / "trunc.pt")
    bad = bytearray(data)
    bad[12:40] = b"\x00" * 28
    (tmp_path / "bad.pt").write_bytes(bytes(bad))
    with pytest.raises(CheckpointError):
        diffptq.load_quantized(tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="not found"):
        diffptq.load_quantized(tmp_path / "nope.pt")


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['DIFFPTQ_EVIL_MARK']}",))


def test_crafted_pickle_is_refused_and_nothing_runs(tmp_path, monkeypatch):
    mark = tmp_path / "pwned"
    monkeypatch.setenv("DIFFPTQ_EVIL_MARK", str(mark))
    evil = tmp_path / "logsnr_checkpoints.pt"
    evil.write_bytes(pickle.dumps({"weights": _Evil()}))
    with pytest.raises(CheckpointError, match="pickle"):
        diffptq.load_quantized(evil)
    assert not mark.exists()


def test_other_family_and_other_base_are_refused(tmp_path):
    _, _, _, path = _quantized("tiny-dit", tmp_path)
    with pytest.raises(CheckpointError, match="made for a pixart model"):
        diffptq.load_quantized(path, base_model="tiny-unet")
    # another version of the architecture: same layer shapes, different config (latent size)
    other = build_pixart_pipeline(DiTSpec(sample_size=16), vocabulary_from_texts(load_prompts()))
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(CheckpointError, match="config hash"):
        diffptq.load_quantized(path, base_model=str(tmp_path / "other"))
