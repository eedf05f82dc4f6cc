"""The Brevitas adapter: block layers swapped for QuantLinear / QuantConv2d with int4 per-channel weights and int8
static activations, solved by GPTQ or Qronos in Brevitas' own layer-by-layer loop; every other layer untouched.

Brevitas' loop is slow on the CPU (one pass per layer through Python quantizer proxies): Qronos runs on tiny-dit,
GPTQ (the same adapter code but the solver) on both models."""
import pytest
from peer_checks import check_quantized

from diffptq.peers import PEERS

pytest.importorskip("brevitas.graph.qronos", reason="brevitas is not installed (requirements-peers.txt)")
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("model, name", [("tiny-dit", "brevitas:gptq"), ("tiny-dit", "brevitas:qronos"),
                                         ("tiny-unet", "brevitas:gptq")])
def test_gptq_and_qronos_quantize_every_block_layer(tiny_models, model, name):
    tiny = tiny_models[model]
    den = tiny.copy()
    note = PEERS[name].quantize(den, tiny.records[:1] if model == "tiny-unet" else tiny.records, "cpu")
    n = len(tiny.block_names)
    assert note.startswith(f"{n}/{n} block layers quantized") and f"solved {n} layers" in note
    check_quantized(tiny, den, 4, lambda m: m.quant_weight().value, lambda *_: None)
    for layer in map(den.get_submodule, tiny.block_names):
        assert type(layer).__module__.startswith("brevitas.nn")
        assert layer.input_quant.is_quant_enabled and layer.input_quant.bit_width() == 8


def test_swapped_layers_live_on_the_denoisers_device(tiny_models):
    """Brevitas creates its quantizers' state on the default device (the CPU); after the swap every tensor of the
    denoiser is on the device its weights were on (here "meta", standing in for a GPU)."""
    from diffptq.peers.brevitas import _swap_block_layers
    from diffptq.peers.common import block_layers

    den = tiny_models["tiny-dit"].copy().to("meta")
    _swap_block_layers(den, block_layers(den), 4, 8)
    tensors = dict(den.named_parameters()) | dict(den.named_buffers())
    assert any(".input_quant." in n for n in tensors)
    assert {n for n, t in tensors.items() if t.device.type != "meta"} == set()
