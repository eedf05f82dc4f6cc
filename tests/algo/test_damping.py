import logging

import pytest
import torch

from diffptq.algo import gptq_quantize_ex, qronos_quantize_ex, rtn_quantize_ex
from diffptq.algo.damping import (Damping, all_finite, any_nonfinite, as_damping, damped_inverse_cholesky, fp32_matmul,
                                  initial_delta, invert_lower_in_place, lambda_max, reverse_in_place)
from diffptq.quant.quantizer import QuantSpec, dequantize

SPEC = QuantSpec(4)


def _check(res, W):
    assert torch.isfinite(res.weight).all()
    assert torch.equal(res.weight, dequantize(res.codes, res.scale, res.zero))
    assert int(res.codes.min()) >= SPEC.qmin and int(res.codes.max()) <= SPEC.qmax
    assert res.weight.shape == W.shape


def _spectrum_H(eigs, seed=0):
    q, _ = torch.linalg.qr(torch.randn(len(eigs), len(eigs), generator=torch.Generator().manual_seed(seed)))
    return (q * eigs) @ q.T


def test_as_damping():
    assert as_damping(0.05) == Damping("mean_diag", 0.05)
    assert as_damping("adaptive").mode == "adaptive" and as_damping("spread").mode == "spread"
    assert as_damping("lambda_max") == Damping("lambda_max", 1e-6)
    with pytest.raises(ValueError, match="'percent'"):
        as_damping("percent")
    with pytest.raises(ValueError, match="mode.*'x'"):
        Damping("x")


def test_lambda_max_matches_eigvalsh():
    x = torch.randn(200, 24)
    H = x.T @ x / 200
    assert lambda_max(H, iters=200) == pytest.approx(float(torch.linalg.eigvalsh(H)[-1]), rel=1e-3)


def test_mean_diag_delta_is_relative_to_mean_diag():
    H = _spectrum_H(torch.linspace(1, 3, 16))
    f = damped_inverse_cholesky(H, as_damping(0.01))
    assert f.delta == pytest.approx(0.01 * float(torch.diagonal(H).mean()), rel=1e-6)
    assert f.damp_rel == pytest.approx(0.01) and f.retries == 0
    Hinv = torch.linalg.inv(H + f.delta * torch.eye(16))
    torch.testing.assert_close(f.U.T @ f.U, Hinv, rtol=1e-4, atol=1e-5)


def test_spread_rule_damps_heavy_tailed_h_more():
    base = torch.randn(400, 32)
    tail = base.clone()
    tail[:, :2] *= 100  # two outlier channels: diag spread 1e4
    rel = {}
    for name, x in (("base", base), ("tail", tail)):
        H = x.T @ x / 400
        rel[name] = initial_delta(H, Damping("spread")) / float(torch.diagonal(H).mean())
    assert rel["base"] == pytest.approx(0.01, rel=1e-6)
    assert rel["tail"] > 2 * rel["base"]


@pytest.mark.parametrize("method", ["gptq", "qronos"])
@pytest.mark.parametrize("damp", [0.01, "spread", "adaptive", "lambda_max"])
def test_rank_deficient_h(method, damp):
    x = torch.randn(8, 48)  # 8 samples for 48 inputs: rank 8
    H = x.T @ x / 8
    W = torch.randn(16, 48)
    res = gptq_quantize_ex(W, H, SPEC, damp=damp) if method == "gptq" else qronos_quantize_ex(W, H, H, SPEC, damp=damp)
    _check(res, W)
    assert not res.fell_back and res.delta > 0 and res.damp_rel > 0


@pytest.mark.parametrize("damp", [0.01, "spread", "adaptive"])
def test_badly_scaled_h(damp):
    x = torch.randn(256, 32)
    x[:, ::4] *= 1e6
    H = x.T @ x / 256
    W = torch.randn(16, 32)
    res = gptq_quantize_ex(W, H, SPEC, damp=damp, act_order=True)
    _check(res, W)
    assert not res.fell_back and res.delta > 0
    assert res.damp_rel == pytest.approx(res.delta / float(torch.diagonal(H).mean()), rel=1e-5)


def test_indefinite_h_succeeds_after_retries():
    eigs = torch.linspace(1, 2, 32)
    eigs[0] = -0.05  # δ = 0.01·mean diag ≈ 0.015 fails, ×10 succeeds
    H = _spectrum_H(eigs)
    W = torch.randn(8, 32)
    res = gptq_quantize_ex(W, H, SPEC, damp=0.01)
    _check(res, W)
    assert res.retries == 1 and not res.fell_back
    assert res.damp_rel == pytest.approx(0.1, rel=1e-5)


@pytest.mark.parametrize("damp", [0.01, "spread", "adaptive"])
def test_hopeless_h_falls_back_to_rtn(damp, caplog):
    eigs = torch.linspace(1, 2, 64)
    eigs[0] = -90  # mean diag ≈ 0.07: even the largest δ tried (≈ 0.07 · 0.1 · 10^4) stays below 90
    H = _spectrum_H(eigs)
    W = torch.randn(8, 64)
    with caplog.at_level(logging.WARNING):
        res = qronos_quantize_ex(W, H, H, SPEC, damp=damp)
    _check(res, W)
    assert res.fell_back and "Cholesky" in res.reason and res.method == "qronos"
    assert res.retries == Damping().max_retries
    assert torch.equal(res.weight, rtn_quantize_ex(W, SPEC).weight)
    assert "fell back to RTN" in caplog.text


def test_non_finite_or_negative_h_falls_back():
    H = torch.eye(8)
    H[1, 2] = float("nan")
    res = gptq_quantize_ex(torch.randn(4, 8), H, SPEC)
    assert res.fell_back and "non-finite" in res.reason
    res = gptq_quantize_ex(torch.randn(4, 8), -torch.eye(8), SPEC)
    assert res.fell_back and "non-positive mean diagonal" in res.reason


def test_fp32_matmul_restores_precision():
    prev = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        with fp32_matmul():
            assert torch.get_float32_matmul_precision() == "highest"
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(prev)


@pytest.mark.parametrize("shift", [0.0, -1.5])  # -1.5: indefinite H, the first tries fail and δ grows
def test_overwrite_gives_the_factor_of_a_copy_and_releases_h(shift):
    H = _spectrum_H(torch.linspace(0.5, 3, 16)) + shift * torch.eye(16)
    kept = H.clone()
    ref = damped_inverse_cholesky(H, as_damping(0.01))
    torch.testing.assert_close(H, kept, rtol=0, atol=0)  # without overwrite H is left as it was
    own = damped_inverse_cholesky(H, as_damping(0.01), overwrite=True)
    assert H.numel() == 0  # its memory went as soon as its factor existed
    assert own.retries == ref.retries and own.delta == ref.delta and (shift == 0) == (ref.retries == 0)
    assert torch.equal(own.U, ref.U)
    A = kept + ref.delta * torch.eye(16)  # δ added to the diagonal: exactly H + δI
    torch.testing.assert_close(ref.U.T @ ref.U, torch.linalg.inv(A.double()).float(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("n,chunk", [(7, 5), (8, 1 << 24), (9, 1)])
@pytest.mark.parametrize("column_major", [False, True])
def test_reverse_in_place_is_j_a_j_for_both_layouts(n, chunk, column_major):
    A = torch.arange(n * n, dtype=torch.float32).view(n, n)
    if column_major:
        A = A.t().contiguous().t()
    ref, ptr = A.flip(0, 1).clone(), A.data_ptr()
    out = reverse_in_place(A, chunk)
    assert out is A and A.data_ptr() == ptr and A.stride() == ((1, n) if column_major else (n, 1))
    assert torch.equal(A, ref)
    strided = torch.arange(4 * 6.0).view(4, 6)[:, ::2].clone().as_strided((3, 3), (1, 4))  # neither layout
    ref = strided.flip(0, 1).clone()
    assert torch.equal(reverse_in_place(strided), ref)


@pytest.mark.parametrize("n,block", [(1, 4), (10, 3), (16, 4), (33, 1024)])
def test_invert_lower_in_place_matches_the_inverse(n, block):
    g = torch.Generator().manual_seed(n)
    L = torch.tril(torch.randn(n, n, generator=g, dtype=torch.float64)) + 3 * torch.eye(n, dtype=torch.float64)
    ref = torch.linalg.inv(L)
    col = L.t().contiguous().t()  # LAPACK's layout
    for M in (L.clone(), col):
        ptr = M.data_ptr()
        invert_lower_in_place(M, block)
        assert M.data_ptr() == ptr
        torch.testing.assert_close(M, ref, rtol=1e-10, atol=1e-12)
        assert torch.equal(M.triu(1), torch.zeros_like(M))


def test_factor_is_the_upper_cholesky_factor_of_the_inverse():
    """Unique factor: U upper with a positive diagonal and UᵀU = (H + δI)⁻¹ equals LAPACK's upper Cholesky factor
    of the explicitly inverted matrix (float64 reference)."""
    H = _spectrum_H(torch.logspace(-3, 1, 48), seed=3)
    f = damped_inverse_cholesky(H, as_damping(0.01))
    A = H.double() + f.delta * torch.eye(48, dtype=torch.float64)
    ref = torch.linalg.cholesky(torch.linalg.inv(A), upper=True)
    assert torch.equal(f.U, f.U.triu()) and bool((torch.diagonal(f.U) > 0).all())
    torch.testing.assert_close(f.U.double(), ref, rtol=0, atol=3e-5 * float(ref.abs().max()))  # float32 rounding


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_any_nonfinite_finds_nan_and_both_infinities(dtype):
    t = torch.randn(5, 7).to(dtype)
    assert not bool(any_nonfinite(t)) and all_finite(t) and all_finite(torch.empty(0, 3))
    for bad in (float("nan"), float("inf"), float("-inf")):
        u = t.clone()
        u[3, 2] = bad
        assert bool(any_nonfinite(u)) == (not bool(torch.isfinite(u).all())) == (not all_finite(u)) is True
    huge = torch.full((4,), torch.finfo(dtype).max, dtype=dtype)  # finite extremes are finite
    assert all_finite(huge) and all_finite(-huge)
