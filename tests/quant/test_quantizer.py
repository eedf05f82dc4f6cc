import pytest
import torch

from diffptq.quant.quantizer import (
    QuantSpec,
    check_group_size,
    dequantize,
    fake_quant,
    fit_rows,
    fit_weight_params,
    pack_codes,
    pack_int4,
    quantize_codes,
    unpack_codes,
    unpack_int4,
)


@pytest.mark.parametrize("bits", [0, 1, 9, 16, -4])
def test_spec_rejects_bits_outside_2_to_8(bits):
    with pytest.raises(ValueError, match=rf"bits.*2\.\.8.*{bits}"):
        QuantSpec(bits)


@pytest.mark.parametrize("group_size", [0, -128])
def test_spec_rejects_nonpositive_group_size(group_size):
    with pytest.raises(ValueError, match=rf"group_size.*{group_size}"):
        QuantSpec(4, group_size=group_size)


def test_spec_rejects_unknown_scale_method():
    with pytest.raises(ValueError, match="scale_method.*'l1'"):
        QuantSpec(4, scale_method="l1")


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_qrange(bits):
    sym, asym = QuantSpec(bits), QuantSpec(bits, symmetric=False)
    assert (sym.qmin, sym.qmax) == (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    assert (asym.qmin, asym.qmax) == (0, 2**bits - 1)
    assert sym.qmax - sym.qmin + 1 == asym.qmax - asym.qmin + 1 == 2**bits


def test_group_size_must_divide_width():
    check_group_size(256, 128)
    check_group_size(100, None)
    with pytest.raises(ValueError, match="100.*96|96.*100"):
        check_group_size(100, 96)
    with pytest.raises(ValueError, match="100"):
        fit_weight_params(torch.randn(4, 100), QuantSpec(4, group_size=96))


def test_minmax_params_match_independent_formula():
    w = torch.randn(6, 32)
    s, z = fit_weight_params(w, QuantSpec(4))
    torch.testing.assert_close(s, w.abs().amax(1, keepdim=True) / 7)
    assert (z == 0).all()
    s, z = fit_weight_params(w, QuantSpec(3, symmetric=False))
    lo, hi = w.amin(1, keepdim=True).clamp(max=0), w.amax(1, keepdim=True).clamp(min=0)
    torch.testing.assert_close(s, (hi - lo) / 7)
    torch.testing.assert_close(z, torch.round(-lo / s))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [None, 8])
def test_codes_in_range_and_dequantize_exact(bits, symmetric, group_size):
    spec = QuantSpec(bits, symmetric=symmetric, group_size=group_size)
    w = torch.randn(5, 24) * 3
    s, z = fit_weight_params(w, spec)
    assert s.shape == (5, 1 if group_size is None else 3)
    codes = quantize_codes(w, s, z, spec)
    assert codes.dtype == spec.code_dtype
    assert int(codes.min()) >= spec.qmin and int(codes.max()) <= spec.qmax
    wq = dequantize(codes, s, z)
    full_s = s.repeat_interleave(24 // s.shape[1], dim=1)
    full_z = z.repeat_interleave(24 // z.shape[1], dim=1)
    assert torch.equal(wq, full_s * (codes.float() - full_z))
    # min-max never clips: the error is at most half a step
    assert ((wq - w).abs() <= full_s / 2 + 1e-6).all()
    assert torch.equal(fake_quant(w, s, z, spec), wq)


def test_mse_search_error_not_above_minmax():
    w = torch.randn(16, 64)
    w[:, 0] *= 20  # an outlier per row makes clipping pay off
    errs = {}
    for method in ("minmax", "mse"):
        spec = QuantSpec(4, scale_method=method)
        s, z = fit_rows(w, spec)
        errs[method] = (dequantize(quantize_codes(w, s, z, spec), s, z) - w).pow(2).sum(1)
    assert (errs["mse"] <= errs["minmax"] + 1e-6).all()
    assert errs["mse"].sum() < errs["minmax"].sum()


def test_zero_row_stays_zero():
    w = torch.zeros(2, 8)
    for spec in (QuantSpec(4), QuantSpec(4, symmetric=False)):
        s, z = fit_weight_params(w, spec)
        assert torch.isfinite(s).all() and (s > 0).all()
        assert (dequantize(quantize_codes(w, s, z, spec), s, z) == 0).all()


def test_fake_quant_ste_identity_inside_zero_outside():
    spec = QuantSpec(4)
    scale, zero = torch.tensor([0.1]), torch.tensor([0.0])
    x = torch.tensor([-0.55, -0.31, 0.0, 0.12, 0.69, 2.0, -3.0], requires_grad=True)
    fake_quant(x, scale, zero, spec).sum().backward()
    inside = (x >= scale * spec.qmin) & (x <= scale * spec.qmax)
    assert torch.equal(x.grad, inside.float())
    assert inside.sum() == 5


def test_fake_quant_scale_gets_gradient():
    s = torch.tensor([0.1], requires_grad=True)
    fake_quant(torch.tensor([0.123, 5.0]), s, torch.zeros(1), QuantSpec(4)).sum().backward()
    # LSQ: round(x/s) − x/s inside (1 − 1.23), qmax outside (7)
    torch.testing.assert_close(s.grad, torch.tensor([1 - 1.23 + 7]))


@pytest.mark.parametrize("numel", [1, 2, 7, 8, 33])
@pytest.mark.parametrize("signed", [True, False])
def test_int4_pack_roundtrip(numel, signed):
    lo, hi = (-8, 8) if signed else (0, 16)
    codes = torch.randint(lo, hi, (numel,), dtype=torch.int8)
    packed = pack_int4(codes)
    assert packed.dtype == torch.uint8 and packed.numel() == (numel + 1) // 2
    assert torch.equal(unpack_int4(packed, codes.shape, signed), codes)


def test_int4_pack_rejects_wide_codes_and_wrong_size():
    with pytest.raises(ValueError, match="4-bit"):
        pack_int4(torch.tensor([16]))
    with pytest.raises(ValueError, match="packed bytes"):
        unpack_int4(torch.zeros(3, dtype=torch.uint8), (7, 1), signed=True)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_pack_codes_roundtrip_bit_exact(bits, symmetric):
    spec = QuantSpec(bits, symmetric=symmetric)
    codes = torch.randint(spec.qmin, spec.qmax + 1, (3, 7), dtype=torch.int16).to(spec.code_dtype)
    packed = pack_codes(codes, spec)
    assert packed.element_size() == 1
    assert packed.numel() == (21 + 1) // 2 if bits <= 4 else packed.numel() == 21
    out = unpack_codes(packed, codes.shape, spec)
    assert out.dtype == codes.dtype and torch.equal(out, codes)
