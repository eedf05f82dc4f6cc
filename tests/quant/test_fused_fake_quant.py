"""The fused fake-quant kernel: bit-identical to the eager grid formula (under Triton's interpreter here, on CUDA
where there is one), its layout checks, its backend choice and the autograd path it leaves alone."""
import logging
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from diffptq.quant import fused
from diffptq.quant.act import DynamicActQuantizer, StaticActQuantizer
from diffptq.quant.fused import fake_quant_backend, fused_fake_quant, param_layout
from diffptq.quant.quantizer import QuantSpec, fake_quant, round_to_grid

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SPECS = (QuantSpec(4), QuantSpec(8, symmetric=False))
# (x shape, scale shape, zero shape): per tensor, per token, per conv position, per sample, mixed, > one block
LAYOUTS = [
    ((3, 5, 37), (1,), (1,)),
    ((7, 19), (), ()),
    ((2, 7, 37), (2, 7, 1), (2, 7, 1)),
    ((2, 5, 3, 7), (2, 1, 3, 7), (2, 1, 3, 7)),
    ((3, 5, 7, 11), (3, 1, 1, 1), (3, 1, 1, 1)),
    ((2, 7, 37), (2, 7, 1), (1,)),
    ((3, 455), (3, 1), (3, 1)),
]
HERE = os.path.dirname(os.path.abspath(__file__))


def _case(x_shape, s_shape, z_shape, spec, dtype, device="cpu", seed=0):
    """x with NaN, ±inf, exact .5 ties and values past the grid; scales with powers of two (exact ties)."""
    g = torch.Generator().manual_seed(seed)
    scale = (torch.rand(s_shape, generator=g) * 0.5 + 0.05).float()
    scale.view(-1)[::2] = 0.25
    if spec.symmetric:
        zero = torch.zeros(z_shape)
    else:
        zero = torch.randint(0, spec.qmax + 1, z_shape, generator=g).float()
    x = torch.randn(x_shape, generator=g) * 0.5 * (spec.qmax - spec.qmin) * 0.25
    flat = x.view(-1)
    ties = torch.tensor([0.125, 0.375, -0.125, -0.375, 0.625, -0.625, 1.125, 0.875, -1.875, 0.0])
    flat[3:3 + ties.numel()] = ties  # (k + ½)·0.25, a tie wherever this element's scale is 0.25
    flat[0], flat[1], flat[2] = float("nan"), float("inf"), float("-inf")
    flat[-1] = 1e4  # far past qmax
    return x.to(dtype).to(device), scale.to(device), zero.to(device)


def _eager(x, scale, zero, spec):
    return round_to_grid(x.float(), scale.float(), zero.float(), spec.qmin, spec.qmax)[1].to(x.dtype)


def _assert_same_bits(a, b):
    """Equal dtype, shape, NaN positions, and bit patterns everywhere else (NaN payloads may differ)."""
    assert a.dtype == b.dtype and a.shape == b.shape
    nan = a.isnan()
    assert torch.equal(nan, b.isnan())
    ints = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}[a.dtype]
    assert torch.equal(a.masked_fill(nan, 0).view(ints), b.masked_fill(nan, 0).view(ints))


def test_param_layout():
    assert param_layout(torch.Size((3, 5)), torch.Size((1,))) == (15, 1)
    assert param_layout(torch.Size((3, 5)), torch.Size(())) == (15, 1)
    assert param_layout(torch.Size((2, 7, 37)), torch.Size((2, 7, 1))) == (37, 1)
    assert param_layout(torch.Size((2, 5, 3, 7)), torch.Size((2, 1, 3, 7))) == (5, 21)
    assert param_layout(torch.Size((3, 5, 7, 11)), torch.Size((3, 1, 1, 1))) == (385, 1)
    assert param_layout(torch.Size((2, 1, 37)), torch.Size((2, 1, 1))) == (37, 1)  # size-1 dims of x match anything
    assert param_layout(torch.Size((7, 37)), torch.Size((1, 37))) == (7, 37)  # per channel
    assert param_layout(torch.Size((4, 32)), torch.Size((4, 32))) is None  # element-wise (group params expanded)
    assert param_layout(torch.Size((2, 3, 4, 5)), torch.Size((2, 1, 4, 1))) is None  # two broadcast runs
    assert param_layout(torch.Size((2, 3)), torch.Size((3, 1))) is None  # does not broadcast
    assert param_layout(torch.Size((5,)), torch.Size((1, 1))) is None  # would add a dim
    assert param_layout(torch.Size((3, 5)), torch.Size((3, 5, 1))) is None


def test_backend_choice(monkeypatch):
    x = torch.randn(4, 8)
    monkeypatch.setenv("DIFFPTQ_FAKEQUANT", "cuda")
    with pytest.raises(ValueError, match="DIFFPTQ_FAKEQUANT"):
        fake_quant_backend(x)
    monkeypatch.setenv("DIFFPTQ_FAKEQUANT", "auto")
    assert fake_quant_backend(x) == "eager"  # CPU tensors stay eager unless triton is forced
    monkeypatch.setenv("DIFFPTQ_FAKEQUANT", "eager")
    assert fused_fake_quant(x, torch.ones(1), torch.zeros(1), -8, 7) is None
    monkeypatch.setattr(fused, "triton", None)
    monkeypatch.setenv("DIFFPTQ_FAKEQUANT", "triton")
    with pytest.raises(RuntimeError, match="not installed"):
        fake_quant_backend(x)
    monkeypatch.setenv("DIFFPTQ_FAKEQUANT", "auto")
    assert fake_quant_backend(x) == "eager"


@pytest.mark.skipif(fused.triton is None, reason="needs Triton")
def test_unsupported_inputs_return_none(monkeypatch):
    """Checked before any launch, so forcing triton on CPU without the interpreter must not reach the kernel."""
    monkeypatch.setenv("DIFFPTQ_FAKEQUANT", "triton")
    monkeypatch.setattr(fused, "_launch", lambda *a: pytest.fail("launched"))
    x, s1, z1 = torch.randn(4, 32), torch.ones(1), torch.zeros(1)
    assert fused_fake_quant(x, torch.rand(4, 32) + 0.1, torch.zeros(4, 32), -8, 7) is None  # group params
    assert fused_fake_quant(x.T, s1, z1, -8, 7) is None  # strided x
    assert fused_fake_quant(x.double(), s1, z1, -8, 7) is None
    assert fused_fake_quant(x[:0], s1, z1, -8, 7) is None  # empty: nothing to fuse
    assert fused_fake_quant(torch.randn(2, 3, 4, 5), torch.ones(2, 1, 4, 1), torch.zeros(2, 1, 4, 1), -8, 7) is None
    spec = QuantSpec(4, group_size=8)  # fake_quant then takes the eager path and gives its values
    s, z = torch.rand(4, 4) + 0.1, torch.zeros(4, 4)
    assert torch.equal(fake_quant(x, s, z, spec), _eager(x, s.repeat_interleave(8, 1), z.repeat_interleave(8, 1), spec))
    assert fake_quant(x[:0], s1, z1, QuantSpec(4)).shape == (0, 32)


@pytest.mark.skipif(fused.triton is None, reason="needs Triton")
def test_kernel_failure_falls_back_once_unless_forced(monkeypatch, caplog):
    def broken(*a):
        raise RuntimeError("no GPU compiler")

    monkeypatch.setattr(fused, "_launch", broken)
    monkeypatch.setattr(fused.BACKEND, "broken", None)
    monkeypatch.setattr(fused, "fake_quant_backend", lambda x: "triton")
    x = torch.randn(4, 8)
    monkeypatch.setenv("DIFFPTQ_FAKEQUANT", "triton")
    with pytest.raises(RuntimeError, match="no GPU compiler"):
        fused_fake_quant(x, torch.ones(1), torch.zeros(1), -8, 7)
    monkeypatch.delenv("DIFFPTQ_FAKEQUANT")
    with caplog.at_level(logging.WARNING, logger="diffptq.triton_backend"):
        assert fused_fake_quant(x, torch.ones(1), torch.zeros(1), -8, 7) is None
    assert "no GPU compiler" in caplog.text and fused.BACKEND.broken


def test_gradient_needs_take_the_autograd_path(monkeypatch):
    calls = []

    def recorder(*a):
        calls.append(a)
        return None

    monkeypatch.setattr("diffptq.quant.quantizer.fused_fake_quant", recorder)
    spec = QuantSpec(4)
    x = torch.randn(6, 16, requires_grad=True)
    scale = torch.full((1,), 0.3, requires_grad=True)
    out = fake_quant(x, scale, torch.zeros(1), spec)
    out.sum().backward()
    assert not calls
    y = x.detach() / scale.detach()
    inside = (y >= spec.qmin) & (y <= spec.qmax)
    assert torch.equal(x.grad, inside.float()) and scale.grad is not None
    fake_quant(x.detach(), scale.detach(), torch.zeros(1), spec)  # nothing needs a gradient
    with torch.no_grad():
        fake_quant(x, scale, torch.zeros(1), spec)  # grad mode off
    assert len(calls) == 2


def test_import_without_triton():
    code = textwrap.dedent("""
        import os, sys, torch
        sys.modules["triton"] = None  # any `import triton` now raises ImportError
        import diffptq.quant
        from diffptq.quant import fused, fake_quant, QuantSpec
        assert fused.triton is None
        x = torch.randn(3, 8)
        assert fused.fake_quant_backend(x) == "eager"
        assert fake_quant(x, torch.ones(1), torch.zeros(1), QuantSpec(4)).shape == x.shape
        os.environ["DIFFPTQ_FAKEQUANT"] = "triton"
        try:
            fake_quant(x, torch.ones(1), torch.zeros(1), QuantSpec(4))
        except RuntimeError as e:
            assert "not installed" in str(e)
        else:
            raise AssertionError("forcing triton without Triton must raise")
        print("ok")
    """)
    env = {k: v for k, v in os.environ.items() if k != "DIFFPTQ_FAKEQUANT"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


@pytest.mark.skipif(fused.triton is None, reason="needs Triton")
def test_kernel_under_the_interpreter_is_bit_identical_to_eager():
    """Triton's CPU interpreter runs the kernel itself (no silent fallback): every layout, dtype and grid."""
    code = textwrap.dedent(f"""
        import sys, warnings, torch
        warnings.simplefilter("ignore")  # numpy warns on inf - inf inside the interpreter; that is the point
        sys.path.insert(0, {HERE!r})
        from diffptq.quant import fused
        from diffptq.quant.act import DynamicActQuantizer
        from diffptq.quant.quantizer import QuantSpec, fake_quant
        from test_fused_fake_quant import DTYPES, LAYOUTS, SPECS, _assert_same_bits, _case, _eager
        assert type(fused._fake_quant_kernel).__name__ == "InterpretedFunction"
        launches = []
        launch = fused._launch
        fused._launch = lambda *a: launches.append(a[-2:]) or launch(*a)
        for spec in SPECS:
            for dtype in DTYPES:
                for i, (xs, ss, zs) in enumerate(LAYOUTS):
                    x, s, z = _case(xs, ss, zs, spec, dtype, seed=i)
                    y = fused.fused_fake_quant(x, s, z, spec.qmin, spec.qmax)
                    assert y is not None, (xs, ss)
                    _assert_same_bits(y, _eager(x, s, z, spec))
        assert len(launches) == len(SPECS) * len(DTYPES) * len(LAYOUTS)
        x = torch.randn(2, 5, 3, 7, dtype=torch.bfloat16)  # through fake_quant, from a per-position quantizer
        q = DynamicActQuantizer(QuantSpec(4, symmetric=False), channel_dim=1)
        _assert_same_bits(q(x), _eager(x, *q.params(x), q.spec))
        assert len(launches) == len(SPECS) * len(DTYPES) * len(LAYOUTS) + 1
        x, s, z = _case((2, 5, 3, 7), (2, 1, 3, 7), (2, 1, 3, 7), SPECS[1], torch.float16)
        out = torch.empty_like(x)  # the 64-bit index variant, which only tensors of 2^31 elements reach
        fused._fake_quant_kernel[(1,)](x, s.reshape(-1), z.reshape(-1), out, x.numel(), 5, 21, 0.0, 255.0,
                                       MODE=2, WIDE=True, BLOCK=256)
        _assert_same_bits(out, _eager(x, s, z, SPECS[1]))
        print("ok")
    """)
    env = {**os.environ, "TRITON_INTERPRET": "1", "DIFFPTQ_FAKEQUANT": "triton"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available() or fused.triton is None, reason="needs CUDA and Triton")


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("spec", SPECS)
def test_cuda_kernel_is_bit_identical_to_eager_cuda(spec, dtype, monkeypatch):
    monkeypatch.setenv("DIFFPTQ_FAKEQUANT", "auto")
    for i, (xs, ss, zs) in enumerate(LAYOUTS):
        x, s, z = _case(xs, ss, zs, spec, dtype, device="cuda", seed=i)
        y = fused_fake_quant(x, s, z, spec.qmin, spec.qmax)
        assert y is not None, (xs, ss)
        _assert_same_bits(y, _eager(x, s, z, spec))
    # realistic sizes: per-token Linear input, per-position conv input, static per-tensor
    g = torch.Generator(device="cuda").manual_seed(1)
    for shape, q in (((4, 1024, 1152), DynamicActQuantizer(spec)),
                     ((4, 320, 64, 64), DynamicActQuantizer(spec, channel_dim=1)),
                     ((4, 320, 64, 64), StaticActQuantizer(spec))):
        x = (torch.randn(shape, device="cuda", generator=g) * 3).to(dtype)
        if isinstance(q, StaticActQuantizer):
            q.to("cuda").observe(x)
            q.finish_calibration()
        s, z = q.params(x)
        y = q(x)
        assert fused.BACKEND.broken is None
        _assert_same_bits(y, _eager(x, s, z, spec))
        monkeypatch.setenv("DIFFPTQ_FAKEQUANT", "eager")
        _assert_same_bits(y, q(x))
        monkeypatch.setenv("DIFFPTQ_FAKEQUANT", "auto")


@needs_cuda
def test_cuda_gradient_still_flows():
    x = torch.randn(8, 64, device="cuda", requires_grad=True)
    scale = torch.full((1,), 0.1, device="cuda", requires_grad=True)
    out = fake_quant(x, scale, torch.zeros(1, device="cuda"), QuantSpec(4))
    out.sum().backward()
    y = x.detach() / scale.detach()
    assert torch.equal(x.grad, ((y >= -8) & (y <= 7)).float()) and scale.grad is not None
    assert out.grad_fn is not None
