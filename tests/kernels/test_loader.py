"""Checkpoints load straight into the memory-path modules: the packed bytes as stored, no float weight made."""
import pytest
import torch

from diffptq.errors import CheckpointError
from diffptq.io.checkpoint import read_checkpoint, save_quantized
from diffptq.kernels import InferenceConfig, Int4WeightOnly, load_for_inference, load_int4_checkpoint
from diffptq.models import load_pipeline
from diffptq.quant.layers import quant_layers
from diffptq.quant.quantizer import QuantSpec


def _save(tmp_path, fam, den, name="tiny-dit"):
    path = tmp_path / "q.safetensors"
    save_quantized(path, den, {"source": name, "family": fam.name, "pipeline_class": "PixArtAlphaPipeline"},
                   {"method": "rtn"})
    return path


@pytest.mark.parametrize("symmetric", [True, False])
def test_int4_checkpoint_loads_packed_bytes_and_matches_fake_quant(tiny, tmp_path, symmetric):
    _, fam, den, inputs = tiny(weight=QuantSpec(4, symmetric=symmetric, group_size=8), act=QuantSpec(8))
    path = _save(tmp_path, fam, den)
    meta, tensors = read_checkpoint(path)
    fresh = fam.denoiser(load_pipeline("tiny-dit"))
    loaded = load_int4_checkpoint(fresh, (meta, tensors))
    assert len(loaded) == len(meta["layers"]) and all(isinstance(m, Int4WeightOnly) for m in loaded.values())
    for name, mod in loaded.items():  # the checkpoint's own bytes, viewed by rows: nothing unpacked or copied
        assert mod.packed.data_ptr() == tensors[f"{name}.codes"].data_ptr()
        assert (mod.zero is None) == symmetric
    for _, layer in quant_layers(den):  # reference: same codes, fp16-rounded scales, weight-only
        layer.set_quantized_weight(layer.weight_codes, layer.weight_scale.half().float(), layer.weight_zero)
        layer.act_quant.enabled = False
    with torch.no_grad():
        assert torch.equal(fresh(**inputs).sample, den(**inputs).sample)


def test_load_for_inference_and_refusals(tiny, tmp_path):
    _, fam, den, inputs = tiny(weight=QuantSpec(4, group_size=8))
    path = _save(tmp_path, fam, den)
    fresh = fam.denoiser(load_pipeline("tiny-dit"))
    result = load_for_inference(fresh, path, "w4", config=InferenceConfig(force=True, cuda_graphs=True))
    assert result.path == "w4" and result.fused_attention == 4 and result.graphed.denoiser is fresh
    assert result.sigmoid_gelu == len(fresh.transformer_blocks)  # the model-level rewrites of convert_for_inference
    assert set(result.modules.values()) == {"Int4WeightOnlyLinear"}
    other = fam.denoiser(load_pipeline("tiny-dit"))
    fallback = load_for_inference(other, path, "w4a8", config=InferenceConfig(cuda_graphs=True))
    assert fallback.path in ("fake", "w4a8") and fallback.graphed.denoiser is other  # fake-quant without an FP8 GPU
    _, fam8, den8, _ = tiny(weight=QuantSpec(8))
    path8 = _save(tmp_path / "8", fam8, den8)
    with pytest.raises(CheckpointError, match="4 bits"):
        load_int4_checkpoint(fam.denoiser(load_pipeline("tiny-dit")), path8)
    with pytest.raises(CheckpointError, match="pixart"):
        load_int4_checkpoint(load_pipeline("tiny-unet").unet, path)
