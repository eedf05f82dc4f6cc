import pytest
import torch

from diffptq.quant.act import TimeConditionedActQuantizer
from diffptq.quant.quantizer import QuantSpec
from diffptq.tdq.scale_mlp import ScaleMLP, softplus_inverse

CONDS = torch.tensor([-1.5, -1.0, -0.3, 0.0, 0.42, 1.0, 2.0])


@pytest.mark.parametrize("scale", [1e-4, 3e-3, 0.5, 1.0, 7.3, 50.0, 400.0])
@pytest.mark.parametrize("relative", [True, False])
def test_initial_output_is_static_scale(scale, relative):
    mlp = ScaleMLP(scale, relative=relative)
    out = mlp(CONDS)
    assert out.shape == CONDS.shape
    torch.testing.assert_close(out, torch.full_like(CONDS, scale), rtol=1e-6, atol=0)


def test_multi_output_and_split():
    init = torch.tensor([0.01, 1.0, 30.0])
    mlp = ScaleMLP(init, hidden=8)
    assert mlp(CONDS).shape == (len(CONDS), 3)
    torch.testing.assert_close(mlp(CONDS), init.expand(len(CONDS), 3), rtol=1e-6, atol=0)
    with torch.no_grad():  # make the heads condition-dependent, then split
        mlp.head.weight.normal_()
    parts = mlp.split()
    for i, part in enumerate(parts):
        assert part.n_out == 1 and part.config()["n_out"] == 1
        torch.testing.assert_close(part(CONDS), mlp(CONDS)[:, i])


def test_shapes_positivity_and_gradients():
    mlp = ScaleMLP(0.2, n_freqs=2, hidden=4, depth=3, act="relu")
    assert mlp(torch.tensor(0.1)).shape == (1,)
    assert mlp(torch.tensor([0.1])).shape == (1,)
    with torch.no_grad():
        mlp.head.bias.fill_(-60.0)  # softplus stays positive far into its tail
    assert bool((mlp(CONDS) > 0).all())
    mlp.log_scale(CONDS).sum().backward()
    assert mlp.head.weight.grad is not None and mlp.head.weight.grad.abs().sum() > 0


def test_config_roundtrip():
    mlp = ScaleMLP([0.3, 2.0], n_freqs=2, hidden=6, depth=1)
    with torch.no_grad():
        mlp.head.weight.normal_()
    again = ScaleMLP.from_config(mlp.config())
    again.load_state_dict(mlp.state_dict())
    torch.testing.assert_close(again(CONDS), mlp(CONDS))


def test_softplus_inverse_and_validation():
    y = torch.tensor([1e-6, 1e-2, 1.0, 25.0])
    torch.testing.assert_close(torch.nn.functional.softplus(softplus_inverse(y.double())), y.double())
    with pytest.raises(ValueError):
        ScaleMLP(0.0)
    with pytest.raises(ValueError):
        ScaleMLP([1.0, float("nan")])


def test_plugs_into_time_conditioned_quantizer():
    mlp = ScaleMLP(0.05)
    q = TimeConditionedActQuantizer(QuantSpec(8), mlp)
    q.set_condition(0.3)
    x = torch.randn(2, 5, 16)
    ref = torch.clamp(torch.round(x / 0.05), -128, 127) * 0.05
    torch.testing.assert_close(q(x), ref)
    q.set_condition(torch.tensor([0.3, -0.7]))  # per-sample conditions of a mixed batch
    assert q(x).shape == x.shape
