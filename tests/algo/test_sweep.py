"""The GPTQ column sweep backends: eager (always) and Triton (GPU; its logic also under Triton's interpreter)."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from diffptq.algo import gptq_quantize_ex, qronos_quantize_ex
from diffptq.algo.sweep import gptq_sweep, triton
from diffptq.quant.quantizer import QuantSpec, expand_params, fit_weight_params, round_to_grid

SPECS = [QuantSpec(4), QuantSpec(3, symmetric=False), QuantSpec(4, group_size=16), QuantSpec(2, symmetric=False,
                                                                                              group_size=8)]


def _problem(d=64, out=37, n=300, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g) @ torch.randn(d, d, generator=g) / d**0.5
    xq = x + 0.1 * torch.randn(n, d, generator=g)
    W = torch.randn(out, d, generator=g)
    return [t.to(device) for t in (W, xq.T @ xq / n, xq.T @ x / n)]


def test_eager_sweep_matches_the_plain_column_loop():
    """Lazy blocks only regroup the updates: the codes equal an unblocked loop's (up to rare float near-ties)."""
    W, H, _ = _problem()
    spec = QuantSpec(4)
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H + 0.01 * H.diagonal().mean() *
                                                                           torch.eye(64))), upper=True)
    scale, zero = fit_weight_params(W, spec)
    s, z = expand_params(scale, 64).expand(37, 64), expand_params(zero, 64).expand(37, 64)
    ref, v = torch.zeros_like(W), W.clone()
    for i in range(64):
        q, wq = round_to_grid(v[:, i], s[:, i], z[:, i], spec.qmin, spec.qmax)
        ref[:, i] = q
        v[:, i + 1:] -= torch.outer((v[:, i] - wq) / U[i, i], U[i, i + 1:])
    codes = torch.zeros_like(W)
    gptq_sweep(W.clone(), U, s, z, codes, spec, block_size=16, backend="eager")
    assert (codes != ref).float().mean() < 0.01


def test_failing_kernel_under_auto_sweeps_eagerly_with_the_same_codes(monkeypatch):
    from diffptq.algo import sweep

    def broken(*args):
        raise RuntimeError("no GPU compiler")

    monkeypatch.setattr(sweep, "_sweep_triton", broken)
    monkeypatch.setattr(sweep.BACKEND, "broken", None)
    monkeypatch.setattr(sweep.BACKEND, "choose", lambda usable, backend=None: "triton")  # as on a GPU
    monkeypatch.delenv("DIFFPTQ_SWEEP", raising=False)
    W, H, _ = _problem()
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H + 0.01 * torch.eye(64))), upper=True)
    s, z = torch.full_like(W, 0.3), torch.zeros_like(W)
    got, ref = torch.zeros_like(W), torch.zeros_like(W)
    gptq_sweep(W.clone(), U, s, z, got, QuantSpec(4), block_size=16)
    assert sweep.BACKEND.broken == "RuntimeError: no GPU compiler"
    gptq_sweep(W.clone(), U, s, z, ref, QuantSpec(4), block_size=16, backend="eager")
    assert torch.equal(got, ref)
    with pytest.raises(RuntimeError, match="no GPU compiler" if triton is not None else "not installed"):
        gptq_sweep(W.clone(), U, s, z, got, QuantSpec(4), block_size=16, backend="triton")  # forced: no fallback


def test_backend_choice_is_checked():
    W, H, _ = _problem()
    with pytest.raises(ValueError, match="backend"):
        gptq_sweep(W, H, W, W, W, QuantSpec(4), backend="cuda")
    if triton is not None:
        with pytest.raises(ValueError, match="block_size"):
            gptq_sweep(W, H, W, W, W, QuantSpec(4), block_size=256, backend="triton")


@pytest.mark.skipif(triton is None, reason="needs Triton")
def test_triton_kernel_logic_equals_eager_under_the_interpreter():
    """The Triton kernel run by Triton's CPU interpreter gives the eager sweep's codes exactly."""
    code = textwrap.dedent(f"""
        import os, sys, torch
        sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})
        from diffptq.algo import gptq_quantize_ex, qronos_quantize_ex
        from test_sweep import SPECS, _problem
        for spec, act_order in zip(SPECS, (False, True, True, False)):
            W, H, G = _problem(seed=spec.bits)
            res = {{}}
            for be in ("eager", "triton"):
                os.environ["DIFFPTQ_SWEEP"] = be
                res[be] = (gptq_quantize_ex(W, H, spec, act_order=act_order, block_size=16),
                           qronos_quantize_ex(W, H, G, spec, act_order=act_order, block_size=16))
            for a, b in zip(res["eager"], res["triton"]):
                assert torch.equal(a.codes, b.codes), (spec, act_order)
                assert torch.equal(a.weight, b.weight)
        print("ok")
    """)
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


@pytest.mark.skipif(not torch.cuda.is_available() or triton is None, reason="needs CUDA and Triton")
@pytest.mark.parametrize("spec", SPECS)
def test_triton_sweep_on_the_gpu_agrees_with_eager(spec, monkeypatch):
    W, H, G = _problem(d=256, out=300, n=2000, device="cuda")
    res = {}
    for be in ("eager", "triton"):
        monkeypatch.setenv("DIFFPTQ_SWEEP", be)
        res[be] = (gptq_quantize_ex(W, H, spec, act_order=True), qronos_quantize_ex(W, H, G, spec))
    for a, b in zip(res["eager"], res["triton"]):  # fused multiply-adds may flip a rare near-tie
        assert (a.codes != b.codes).float().mean() < 0.01
        torch.testing.assert_close(a.scale, b.scale)
