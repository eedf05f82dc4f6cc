"""The ModelOpt adapter on tiny-dit and tiny-unet: block layers quantized as the preset says (per-channel INT8 with
SmoothQuant, AWQ int4 groups fitted to the width), every other layer left in float; NVFP4 refuses the CPU."""
import pytest
import torch
from peer_checks import MODELS, check_quantized
from torch import nn

from diffptq.peers import PEERS, PeerFailed
from diffptq.peers.common import fitting_group

pytest.importorskip("modelopt.torch.quantization", reason="nvidia-modelopt is not installed (requirements-peers.txt)")

pytestmark = pytest.mark.usefixtures("one_thread")


def _weight(module: nn.Module) -> torch.Tensor:
    return module.weight_quantizer(module.weight)


@pytest.mark.parametrize("model", MODELS)
def test_int8_smoothquant_quantizes_every_block_layer_per_channel(tiny_models, model):
    tiny = tiny_models[model]
    den = tiny.copy()
    note = PEERS["modelopt:int8_sq"].quantize(den, tiny.records, "cpu")
    assert note.startswith(f"{len(tiny.block_names)}/{len(tiny.block_names)} block layers quantized")
    check_quantized(tiny, den, 8, _weight, lambda name, m: None)
    for name in tiny.block_names:  # on the grid of the per-channel scale amax / 127, and activations quantized
        layer = den.get_submodule(name)
        step = layer.weight_quantizer.amax.reshape(-1, *[1] * (layer.weight.dim() - 1)) / 127
        codes = _weight(layer) / step
        assert torch.allclose(codes, codes.round(), atol=1e-3), name
        assert layer.input_quantizer.is_enabled and layer.input_quantizer.num_bits == 8, name


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("name", ["modelopt:w4a8_awq", "modelopt:int4_awq"])
def test_awq_quantizes_the_block_linear_layers_in_groups(tiny_models, model, name):
    tiny = tiny_models[model]
    den = tiny.copy()
    note = PEERS[name].quantize(den, tiny.records, "cpu")
    linear = {n for n in tiny.block_names if isinstance(tiny.fp.get_submodule(n), nn.Linear)}
    assert note.startswith(f"{len(linear)}/{len(tiny.block_names)} block layers quantized")
    convs = len(tiny.block_names) - len(linear)
    assert (f"{convs} Conv2d (group-wise format) left in float" in note) == (convs > 0)
    check_quantized(tiny, den, 4, _weight, lambda n, m: fitting_group(m.in_features, 128), expect=linear)
    for n in linear:
        assert den.get_submodule(n).input_quantizer.is_enabled == (name == "modelopt:w4a8_awq"), n


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU refusal is what is tested")
@pytest.mark.parametrize("name", ["modelopt:nvfp4", "modelopt:nvfp4_svdquant"])
def test_nvfp4_says_it_needs_cuda(tiny_models, name):
    with pytest.raises(PeerFailed, match="runs on CUDA only"):
        PEERS[name].quantize(tiny_models["tiny-dit"].copy(), tiny_models["tiny-dit"].records, "cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="ModelOpt's NVFP4 fake-quant needs CUDA")
@pytest.mark.parametrize("model", MODELS)
def test_nvfp4_on_cuda(tiny_models, model):
    tiny = tiny_models[model]
    den = tiny.copy().cuda()
    note = PEERS["modelopt:nvfp4"].quantize(den, [{k: v.cuda() if torch.is_tensor(v) else v for k, v in r.items()}
                                                  for r in tiny.records], "cuda")
    assert "block layers quantized" in note
