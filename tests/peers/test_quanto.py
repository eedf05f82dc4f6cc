"""The optimum-quanto adapter on tiny-dit and tiny-unet: qint4 weights on every block layer (Linear and Conv2d),
qint8 activations calibrated by quanto's Calibration for w4a8, none for w4a16; every other layer left alone."""
import pytest
from peer_checks import MODELS, check_quantized

from diffptq.peers import PEERS

pytest.importorskip("optimum.quanto", reason="optimum-quanto is not installed (requirements-peers.txt)")
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("name", ["quanto:w4a8", "quanto:w4a16"])
def test_qint4_weights_on_every_block_layer(tiny_models, model, name):
    tiny = tiny_models[model]
    den = tiny.copy()
    note = PEERS[name].quantize(den, tiny.records, "cpu")
    n = len(tiny.block_names)
    assert note.startswith(f"{n}/{n} block layers quantized")
    assert ("activation scales from 2 calibration records" in note) == (name == "quanto:w4a8")
    check_quantized(tiny, den, 4, lambda m: m.weight.dequantize(), lambda _, m: m.weight_group_size)
    for layer in map(den.get_submodule, tiny.block_names):
        assert (layer.activation_qtype is not None) == (name == "quanto:w4a8")
        if name == "quanto:w4a8":
            assert float(layer.input_scale) > 0  # set by the calibration pass
