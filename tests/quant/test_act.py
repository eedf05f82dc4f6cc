import pytest
import torch
from torch import nn

from diffptq.quant.act import DynamicActQuantizer, StaticActQuantizer, TimeConditionedActQuantizer, same_quantization
from diffptq.quant.quantizer import QuantSpec


def _calibrate(q, batches):
    q.start_calibration()
    for b in batches:
        assert torch.equal(q(b), b)  # observing passes the input through
    q.finish_calibration()


def test_static_minmax_scale_is_absmax_over_qmax():
    batches = [torch.randn(4, 10, 16) * (i + 1) for i in range(3)]
    q = StaticActQuantizer(QuantSpec(8))
    _calibrate(q, batches)
    absmax = max(float(b.abs().max()) for b in batches)
    assert q.scale.item() == pytest.approx(absmax / 127, rel=1e-6)
    x = batches[0]
    ref = torch.clamp(torch.round(x / q.scale), -128, 127) * q.scale
    assert torch.equal(q(x), ref)


def test_static_asymmetric_range():
    x = torch.rand(64, 8) * 3 + 0.5  # all positive: the range is widened to include 0
    q = StaticActQuantizer(QuantSpec(4, symmetric=False))
    _calibrate(q, [x])
    assert q.scale.item() == pytest.approx(float(x.max()) / 15, rel=1e-6)
    assert q.zero.item() == 0
    assert (q(x) - x).abs().max() <= q.scale.item() / 2 + 1e-6


def test_static_mse_error_not_above_minmax():
    x = torch.randn(32, 64)
    x[0, 0] = 40.0  # one outlier: clipping it is worth it
    errs = {}
    for method in ("minmax", "mse"):
        q = StaticActQuantizer(QuantSpec(4, scale_method=method))
        _calibrate(q, [x[:16], x[16:]])
        errs[method] = float((q(x) - x).pow(2).sum())
    assert errs["mse"] <= errs["minmax"]
    assert errs["mse"] < 0.9 * errs["minmax"]


def test_static_raises_before_calibration_and_state_dict_roundtrip():
    q = StaticActQuantizer(QuantSpec(8))
    with pytest.raises(RuntimeError, match="calibration"):
        q(torch.randn(3))
    _calibrate(q, [torch.randn(8, 4)])
    q2 = StaticActQuantizer(QuantSpec(8))
    q2.load_state_dict(q.state_dict())
    x = torch.randn(5, 4)
    assert torch.equal(q2(x), q(x))


def test_disabled_is_identity():
    q = DynamicActQuantizer(QuantSpec(2))
    q.enabled = False
    x = torch.randn(4, 8)
    assert torch.equal(q(x), x)


@pytest.mark.parametrize("symmetric", [True, False])
def test_dynamic_per_token_linear_matches_per_row(symmetric):
    spec = QuantSpec(4, symmetric=symmetric)
    x = torch.randn(2, 5, 16) * torch.linspace(0.1, 10, 5)[None, :, None]
    out = DynamicActQuantizer(spec)(x)
    for row_in, row_out in zip(x.reshape(-1, 16), out.reshape(-1, 16)):
        lo, hi = min(float(row_in.min()), 0.0), max(float(row_in.max()), 0.0)
        if symmetric:
            s, z = max(-lo, hi) / 7, 0.0
        else:
            s = (hi - lo) / 15
            z = round(-lo / s)
        ref = s * (torch.clamp(torch.round(row_in / s) + z, spec.qmin, spec.qmax) - z)
        torch.testing.assert_close(row_out, ref)


def test_dynamic_per_token_conv_is_per_spatial_position():
    x = torch.randn(2, 8, 3, 4)
    x[:, :, 0, 0] *= 100  # one loud position must not affect the others
    q = DynamicActQuantizer(QuantSpec(4), channel_dim=1)
    out = q(x)
    ref = DynamicActQuantizer(QuantSpec(4))(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    assert torch.equal(out, ref)
    quiet = (out - x)[:, :, 1:, :].abs().max()
    assert quiet <= x[:, :, 1:, :].abs().max() / 7 / 2 + 1e-6


class _CountingScale(nn.Module):
    def __init__(self):
        super().__init__()
        self.calls = 0
        self.w = nn.Parameter(torch.tensor([0.05]))

    def forward(self, c):
        assert c.shape == (1,)
        self.calls += 1
        return self.w.abs() * (1 + c)


def test_time_conditioned_caches_scale_per_condition():
    fn = _CountingScale()
    q = TimeConditionedActQuantizer(QuantSpec(8), fn)
    with pytest.raises(RuntimeError, match="set_condition"):
        q(torch.randn(3))
    x = torch.randn(4, 16)
    q.set_condition(2.0)
    outs = [q(x) for _ in range(5)]
    assert fn.calls == 1
    s = 0.05 * 3
    torch.testing.assert_close(outs[-1], s * torch.clamp(torch.round(x / s), -128, 127))
    q.set_condition(0.0)
    assert fn.calls == 2
    assert not torch.equal(q(x), outs[-1])


def test_time_conditioned_per_sample_conditions():
    fn = _CountingScale()
    q = TimeConditionedActQuantizer(QuantSpec(8), fn, channel_dim=1)
    x = torch.randn(3, 4, 2, 2)
    q.set_condition(torch.tensor([1.0, 0.0, 1.0]))
    assert fn.calls == 2  # once per distinct condition
    out = q(x)
    for i, c in enumerate([1.0, 0.0, 1.0]):
        q1 = TimeConditionedActQuantizer(QuantSpec(8), _CountingScale())
        q1.set_condition(c)
        torch.testing.assert_close(out[i], q1(x[i]))


def test_time_conditioned_scale_fn_receives_gradient():
    fn = _CountingScale()
    q = TimeConditionedActQuantizer(QuantSpec(4), fn)
    q.set_condition(0.5)
    q(torch.randn(64) * 3).pow(2).sum().backward()
    assert fn.w.grad is not None and fn.w.grad.abs() > 0


def test_static_mse_sample_is_bounded_and_keeps_the_range():
    q = StaticActQuantizer(QuantSpec(8, scale_method="mse"), max_samples=256)
    q.start_calibration()
    batches = [torch.randn(1000) for _ in range(10)]
    for b in batches:
        q(b)
        assert q._n_samples <= 256 + 1000 // 16 + 4
    q.finish_calibration()
    absmax = max(float(b.abs().max()) for b in batches)
    assert 0.2 * absmax / 127 <= q.scale.item() <= absmax / 127 * (1 + 1e-6)


def test_same_quantization_means_equal_outputs():
    x = torch.randn(3, 40) * 4

    def static(data, spec=None):
        q = StaticActQuantizer(spec or QuantSpec(8, symmetric=False))
        q.observe(data)
        q.finish_calibration()
        return q
    a, b, c = static(x), static(x.clone()), static(x * 2)
    assert same_quantization(a, b) and torch.equal(a(x), b(x))
    assert not same_quantization(a, c) and not torch.equal(a(x), c(x))
    assert not same_quantization(a, static(x, QuantSpec(8)))  # another grid
    assert same_quantization(DynamicActQuantizer(QuantSpec(8)), DynamicActQuantizer(QuantSpec(8)))
    assert not same_quantization(a, DynamicActQuantizer(QuantSpec(8, symmetric=False)))
    tdq = TimeConditionedActQuantizer(QuantSpec(8), nn.Linear(1, 1))
    assert not same_quantization(tdq, tdq)  # its scale depends on the condition it is given
    fresh = StaticActQuantizer(QuantSpec(8, symmetric=False))
    assert not same_quantization(fresh, fresh)  # not calibrated
