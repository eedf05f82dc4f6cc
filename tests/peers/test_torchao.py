"""The torchao adapter on tiny-dit and tiny-unet: int4 weights in groups fitted to the width with int8 dynamic
activations on the block Linear layers (Conv2d left in float, as torchao's configs take Linear layers); int4
weight-only needs the CUDA tinygemm kernel."""
import pytest
import torch
from peer_checks import MODELS, check_quantized
from torch import nn

from diffptq.peers import PEERS, PeerFailed
from diffptq.peers.common import fitting_group

pytest.importorskip("torchao.quantization", reason="torchao is not installed (requirements-peers.txt)")
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("model", MODELS)
def test_int8da_int4w_quantizes_the_block_linear_layers(tiny_models, model):
    tiny = tiny_models[model]
    den = tiny.copy()
    note = PEERS["torchao:int8da_int4w"].quantize(den, tiny.records, "cpu")
    linear = {n for n in tiny.block_names if isinstance(tiny.fp.get_submodule(n), nn.Linear)}
    convs = len(tiny.block_names) - len(linear)
    assert note.startswith(f"{len(linear)}/{len(tiny.block_names)} block layers quantized")
    assert (f"{convs} Conv2d (torchao quantizes nn.Linear) left in float" in note) == (convs > 0)
    check_quantized(tiny, den, 4, lambda m: m.weight.dequantize(),
                    lambda n, m: fitting_group(m.in_features, 32), expect=linear)
    for n in linear:
        assert type(den.get_submodule(n).weight).__module__.startswith("torchao"), n


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU refusal is what is tested")
def test_int4_weight_only_says_it_needs_cuda(tiny_models):
    with pytest.raises(PeerFailed, match="runs on CUDA only"):
        PEERS["torchao:int4wo"].quantize(tiny_models["tiny-dit"].copy(), [], "cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="torchao's int4 weight-only kernel (tinygemm) needs CUDA")
def test_int4_weight_only_wants_bf16_on_cuda(tiny_models):
    with pytest.raises(PeerFailed, match="bf16"):
        PEERS["torchao:int4wo"].quantize(tiny_models["tiny-dit"].copy().cuda(), [], "cuda")
    den = tiny_models["tiny-dit"].copy().to("cuda", torch.bfloat16)
    assert "block layers quantized" in PEERS["torchao:int4wo"].quantize(den, [], "cuda")
