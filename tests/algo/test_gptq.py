"""Grid membership and structural properties shared by RTN, GPTQ and Qronos."""
import pytest
import torch

from diffptq.algo import gptq_quantize, gptq_quantize_ex, qronos_quantize_ex, rtn_quantize, rtn_quantize_ex
from diffptq.quant.quantizer import QuantSpec

METHODS = ("rtn", "gptq", "qronos")


def _inputs(n=256, d=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g) @ torch.randn(d, d, generator=g) / d**0.5
    xq = x + 0.1 * torch.randn(n, d, generator=g)
    return x, xq


def _run(method, W, x, xq, spec, **kw):
    H, G = xq.T @ xq / len(x), xq.T @ x / len(x)
    if method == "rtn":
        return rtn_quantize_ex(W, spec)
    if method == "gptq":
        return gptq_quantize_ex(W, H, spec, **kw)
    return qronos_quantize_ex(W, H, G, spec, **kw)


def assert_on_grid(res, spec, W):
    """Codes in range, weight == scale·(codes − zero) exactly, and weight/scale + zero integer (independently)."""
    assert res.weight.shape == W.shape and res.weight.dtype == W.dtype
    assert torch.isfinite(res.weight).all()
    codes = res.codes.long()
    assert int(codes.min()) >= spec.qmin and int(codes.max()) <= spec.qmax
    reps = res.codes.shape[1] // res.scale.shape[1]
    s, z = res.scale.repeat_interleave(reps, 1), res.zero.repeat_interleave(reps, 1)
    w = res.weight.reshape(W.shape[0], -1).float()
    assert torch.equal(w, s * (res.codes.float() - z))
    r = w / s + z
    assert (r - r.round()).abs().max() < 1e-3
    assert r.round().min() >= spec.qmin and r.round().max() <= spec.qmax


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_on_grid_per_channel(method, bits, symmetric):
    x, xq = _inputs()
    W = torch.randn(24, 32)
    spec = QuantSpec(bits, symmetric=symmetric)
    assert_on_grid(_run(method, W, x, xq, spec), spec, W)


@pytest.mark.parametrize("method", ("gptq", "qronos"))
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("scale_method", ["minmax", "mse"])
def test_on_grid_groups_and_act_order(method, act_order, symmetric, scale_method):
    x, xq = _inputs()
    W = torch.randn(24, 32)
    spec = QuantSpec(4, symmetric=symmetric, group_size=8, scale_method=scale_method)
    res = _run(method, W, x, xq, spec, act_order=act_order, block_size=5)
    assert res.scale.shape == (24, 4)
    assert_on_grid(res, spec, W)
    # static groups: the scales are those fitted on W itself, whatever the sweep order
    torch.testing.assert_close(res.scale, rtn_quantize_ex(W, spec).scale)


@pytest.mark.parametrize("method", ("gptq", "qronos"))
def test_lazy_block_size_does_not_change_the_result(method):
    x, xq = _inputs()
    W = torch.randn(16, 32)
    spec = QuantSpec(3)
    ref = _run(method, W, x, xq, spec, block_size=128)
    for bs in (1, 7, 16):
        other = _run(method, W, x, xq, spec, block_size=bs)
        assert (other.codes != ref.codes).float().mean() < 0.01
        torch.testing.assert_close(other.weight, ref.weight, atol=float(ref.scale.max()) * 1.01, rtol=0)


@pytest.mark.parametrize("method", METHODS)
def test_dead_columns(method):
    x, xq = _inputs()
    dead = torch.tensor([0, 5, 17, 31])
    x[:, dead] = 0
    xq[:, dead] = 0
    W = torch.randn(12, 32) * 2
    spec = QuantSpec(4)
    res = _run(method, W, x, xq, spec, act_order=(method == "qronos"))
    assert_on_grid(res, spec, W)
    if method != "rtn":
        assert (res.weight[:, dead] == 0).all()
        assert not res.fell_back


def test_conv_weight_and_dtype_are_kept():
    _, xq = _inputs(d=18)
    W = torch.randn(6, 2, 3, 3, dtype=torch.float64)
    spec = QuantSpec(4)
    Wq = gptq_quantize(W, xq.T @ xq / len(xq), spec)
    assert Wq.shape == W.shape and Wq.dtype == torch.float64
    assert rtn_quantize(W, spec).shape == W.shape


def test_gptq_beats_rtn_on_the_calibration_inputs():
    x, _ = _inputs(n=512, d=32)
    W = torch.randn(32, 32)
    spec = QuantSpec(3)
    H = x.T @ x / len(x)
    err = {m: float((x @ (Wq - W).T).norm()) for m, Wq in
           (("rtn", rtn_quantize(W, spec)), ("gptq", gptq_quantize(W, H, spec)))}
    assert err["gptq"] < err["rtn"]


def test_shape_mismatch_is_reported():
    with pytest.raises(ValueError, match=r"\(8, 8\)"):
        gptq_quantize(torch.randn(4, 8), torch.eye(6), QuantSpec(4))
