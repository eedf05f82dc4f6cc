import pytest
import torch
import torch.nn.functional as F
from torch import nn

from diffptq.algo.hessian import GramAccumulator, conv_patches, gram_from_inputs, hessian_from_inputs


def _conv_rows_by_loop(x, conv):
    """Patches by explicit indexing over output positions (independent of F.unfold)."""
    kh, kw = conv.kernel_size
    sh, sw = conv.stride
    dh, dw = conv.dilation
    ph, pw = conv.padding
    xp = F.pad(x, (pw, pw, ph, ph))
    n, _, hp, wp = xp.shape
    oh, ow = (hp - dh * (kh - 1) - 1) // sh + 1, (wp - dw * (kw - 1) - 1) // sw + 1
    rows = []
    for b in range(n):
        for i in range(oh):
            for j in range(ow):
                patch = xp[b, :, i * sh: i * sh + dh * (kh - 1) + 1: dh, j * sw: j * sw + dw * (kw - 1) + 1: dw]
                rows.append(patch.reshape(-1))
    return torch.stack(rows)


@pytest.mark.parametrize("stride,padding,dilation", [(1, 0, 1), (2, 1, 1), (1, 2, 2), ((2, 1), (1, 0), (1, 2))])
def test_conv_patches_match_loop_and_conv(stride, padding, dilation):
    conv = nn.Conv2d(3, 4, (3, 2), stride=stride, padding=padding, dilation=dilation, bias=False)
    x = torch.randn(2, 3, 7, 6)
    rows = conv_patches(x, conv)
    torch.testing.assert_close(rows, _conv_rows_by_loop(x, conv))
    # the column order is weight.reshape(out, -1)'s: patches times the flat weight give the conv output
    y = conv(x)
    torch.testing.assert_close(rows @ conv.weight.reshape(4, -1).T, y.permute(0, 2, 3, 1).reshape(-1, 4))


@pytest.mark.parametrize("padding,mode", [("same", "zeros"), ("valid", "zeros"), (1, "reflect"), (1, "circular")])
def test_conv_patches_padding_modes(padding, mode):
    conv = nn.Conv2d(2, 3, 3, padding=padding, padding_mode=mode, bias=False)
    x = torch.randn(2, 2, 5, 5)
    torch.testing.assert_close(conv_patches(x, conv) @ conv.weight.reshape(3, -1).T,
                               conv(x).permute(0, 2, 3, 1).reshape(-1, 3))


def test_streaming_linear_equals_at_once():
    x = torch.randn(6, 5, 12)
    xq = x + 0.1 * torch.randn_like(x)
    acc = GramAccumulator(cross=True, chunk_rows=7)  # chunks split batches
    for a, b in ((0, 2), (2, 5), (5, 6)):
        acc.update(xq[a:b], x[a:b])
    X, Xq = x.reshape(-1, 12).double(), xq.reshape(-1, 12).double()
    assert acc.n == 30
    torch.testing.assert_close(acc.H.double(), Xq.T @ Xq / 30, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(acc.G.double(), Xq.T @ X / 30, rtol=1e-5, atol=1e-6)
    H, G = gram_from_inputs(xq, x)
    torch.testing.assert_close(acc.H, H)
    torch.testing.assert_close(acc.G, G)


def test_streaming_conv_equals_loop_unfold():
    conv = nn.Conv2d(3, 4, 3, stride=2, padding=1, dilation=1)
    x = torch.randn(5, 3, 6, 6)
    xq = x.round()
    acc = GramAccumulator(conv, cross=True, chunk_rows=20)
    acc.update(xq[:2], x[:2])
    acc.update(xq[2:], x[2:])
    R, Rq = _conv_rows_by_loop(x, conv).double(), _conv_rows_by_loop(xq, conv).double()
    assert acc.n == R.shape[0] == 5 * 9
    torch.testing.assert_close(acc.H.double(), Rq.T @ Rq / R.shape[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(acc.G.double(), Rq.T @ R / R.shape[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(hessian_from_inputs(xq, conv), acc.H)


def test_pairing_is_checked():
    acc = GramAccumulator(cross=True)
    with pytest.raises(ValueError, match="x_fp"):
        acc.update(torch.randn(3, 4))
    with pytest.raises(ValueError, match="shape"):
        acc.update(torch.randn(3, 4), torch.randn(2, 4))
    with pytest.raises(RuntimeError, match="cross=True"):
        _ = GramAccumulator().G


def test_row_chunks_by_element_budget_equal_at_once():
    x = torch.randn(3, 50, 24)
    xq = x + 0.1 * torch.randn_like(x)
    acc = GramAccumulator(cross=True, chunk_elems=24 * 7)  # 7 rows per chunk
    acc.update(xq, x)
    H, G = gram_from_inputs(xq, x)
    torch.testing.assert_close(acc.H, H)
    torch.testing.assert_close(acc.G, G)
    assert acc.n == 150


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_on_tensor_cores_are_exact_products(dtype):
    """TF32 holds fp16/bf16 values exactly: H matches a float64 reference to float32 accumulation error."""
    x = torch.randn(4, 512, 96, device="cuda").to(dtype)
    xq = (x.float() + 0.05 * torch.randn_like(x.float())).to(dtype)
    acc = GramAccumulator(cross=True)
    acc.update(xq, x)
    X, Xq = x.reshape(-1, 96).double(), xq.reshape(-1, 96).double()
    torch.testing.assert_close(acc.H.double(), Xq.T @ Xq / 2048, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(acc.G.double(), Xq.T @ X / 2048, rtol=1e-5, atol=1e-6)


def test_finish_returns_h_and_g_in_place_and_empties_the_accumulator():
    g = torch.Generator().manual_seed(4)
    X = torch.randn(50, 12, generator=g)
    Xq = X + 0.1 * torch.randn(50, 12, generator=g)
    acc = GramAccumulator(cross=True, chunk_rows=16)
    acc.update(Xq, X)
    H_prop, G_prop = acc.H, acc.G
    raw = acc._h.data_ptr()
    H, G = acc.finish()
    assert H.data_ptr() == raw  # divided in place, no copy
    assert torch.equal(H, H_prop) and torch.equal(G, G_prop)
    torch.testing.assert_close(H.double(), Xq.double().T @ Xq.double() / 50, rtol=1e-5, atol=1e-6)
    with pytest.raises(RuntimeError, match="no batch"):
        acc.finish()
