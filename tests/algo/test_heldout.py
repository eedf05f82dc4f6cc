"""Damping chosen on held-out data (algo.heldout, Damping "adaptive"): the held-out error from statistics equals the
error of explicit outputs, the choice is the grid's minimiser on a real bundled layer, pooling is the statistics of
all rows, and the driver holds out whole prompt batches."""
import math

import pytest
import torch

from diffptq.algo.heldout import Grams, heldout_error, pooled, select_damping, solve
from diffptq.algo.hessian import gram_from_inputs, hessian_from_inputs
from diffptq.config import CalibConfig, Damping, QuantSpec, SequentialConfig
from diffptq.errors import ConfigError

W4 = QuantSpec(4)


def _grams(Xq: torch.Tensor, X: torch.Tensor, with_f: bool = False) -> Grams:
    H, G = gram_from_inputs(Xq, X)
    return Grams(H, G, Xq.shape[0], hessian_from_inputs(X) if with_f else None)


def _explicit_error(Q, W, Xq, X) -> float:
    ref = X @ W.T
    return math.sqrt(float((Xq @ Q.T - ref).pow(2).sum() / ref.pow(2).sum()))


def test_heldout_error_equals_the_error_of_explicit_outputs():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(300, 24, generator=g, dtype=torch.float64).float()
    Xq = X + 0.1 * torch.randn(300, 24, generator=g)
    W, Q = torch.randn(8, 24, generator=g), torch.randn(8, 24, generator=g)
    assert heldout_error(Q, W, _grams(Xq, X, with_f=True)) == pytest.approx(_explicit_error(Q, W, Xq, X), rel=1e-4)
    assert heldout_error(W, W, _grams(X, X, with_f=True)) == pytest.approx(0.0, abs=1e-3)


def test_pooled_statistics_are_those_of_all_rows():
    g = torch.Generator().manual_seed(1)
    X, Xq = torch.randn(100, 16, generator=g), torch.randn(100, 16, generator=g)
    a, b = _grams(Xq[:70], X[:70]), _grams(Xq[70:], X[70:])
    both = pooled(a, b)
    ref = _grams(Xq, X)
    assert both.n == 100
    torch.testing.assert_close(both.H, ref.H, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(both.G, ref.G, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["gptq", "qronos"])
def test_the_choice_minimises_the_heldout_error_on_a_real_layer(method):
    """A bundled-dit feed-forward layer, its inputs recorded on calibration trajectories, X̃ emulated by 4-bit
    per-token activations; rows split by prompt batch. The chosen damping is the grid's minimiser of the explicit
    held-out error of each grid value's solve."""
    from diffptq.data.calib import collect_calibration
    from diffptq.data.prompts import calibration_prompts
    from diffptq.models import family_of, load_pipeline
    from diffptq.quant.act import DynamicActQuantizer

    torch.manual_seed(0)
    pipe = load_pipeline("bundled-dit")
    den = family_of(pipe).denoiser(pipe)
    layer = den.get_submodule("transformer_blocks.2.ff.net.2")
    calib = collect_calibration(pipe, calibration_prompts(pipe, 8), 3, batch_size=4, progress=False)
    inputs = {0: [], 1: []}
    hook = layer.register_forward_pre_hook(lambda m, a: inputs[batch].append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        for record, kwargs in zip(calib.records, calib.batches()):
            batch = record.batch
            den(**kwargs)
    hook.remove()
    act = DynamicActQuantizer(QuantSpec(4, symmetric=False))
    X = {b: torch.cat(v)[::3] for b, v in inputs.items()}  # every third token: enough rows, a fast test
    Xq = {b: act(x) for b, x in X.items()}
    W = layer.weight.detach().float()
    train, held = _grams(Xq[0], X[0]), _grams(Xq[1], X[1], with_f=True)
    damping = Damping("adaptive", grid=(1e-3, 1e-2, 1e-1, 1.0))
    chosen, errors = select_damping(method, W, train, held, W4, damping)
    explicit = {g: _explicit_error(solve(method, W, train, W4, Damping("mean_diag", g)).weight, W, Xq[1], X[1])
                for g in damping.grid}
    assert errors == pytest.approx(explicit, rel=1e-3)
    assert chosen == min(explicit, key=explicit.get)
    assert len(set(round(e, 6) for e in errors.values())) > 1  # the grid values do give different solves


def test_prompt_holdout_never_splits_a_prompt():
    from diffptq.data.calib import collect_calibration
    from diffptq.models import load_pipeline

    pipe = load_pipeline("tiny-dit")
    calib = collect_calibration(pipe, [f"a {c} cat" for c in ("red", "blue", "green", "pink", "gray")], 2,
                                batch_size=2, progress=False)
    assert [r.batch for r in calib.records] == [0, 0, 1, 1, 2, 2]
    held = set(calib.prompt_holdout(0.25))
    assert held == {4, 5}  # the last of 3 batches: both of its steps, nothing of the others
    for b in range(3):
        sides = {i in held for i, r in enumerate(calib.records) if r.batch == b}
        assert len(sides) == 1
    assert calib.prompt_holdout(0.5) == [2, 3, 4, 5]  # at least one batch stays for training
    one = collect_calibration(pipe, ["a cat"], 2, batch_size=2, progress=False)
    assert one.prompt_holdout(0.25) == []


def test_the_driver_chooses_per_layer_from_the_grid_and_reports_the_heldout_error():
    from diffptq.algo.driver import SequentialQuantizer
    from diffptq.data.calib import collect_calibration
    from diffptq.models import family_of, load_pipeline

    pipe = load_pipeline("tiny-dit")
    fam = family_of(pipe)
    calib = collect_calibration(pipe, ["a red cat", "a dog", "a blue cup", "a tree"], 3, batch_size=2,
                                progress=False)
    grid = (1e-3, 1e-2, 1e-1, 1.0)
    cfg = SequentialConfig(method="qronos", damp=Damping("adaptive", grid=grid, holdout=0.5), blocks=[0])
    res = SequentialQuantizer(fam.denoiser(pipe), fam, calib, cfg, "cpu", progress=False).run()
    assert res.layers and all(any(math.isclose(r.damp, g, rel_tol=1e-4) for g in grid) for r in res.layers)
    assert all(math.isfinite(r.heldout_err) and r.heldout_err >= 0 for r in res.layers)
    one_batch = collect_calibration(pipe, ["a red cat", "a dog"], 2, batch_size=2, progress=False)
    with pytest.raises(ConfigError, match="at least two calibration batches"):
        SequentialQuantizer(fam.denoiser(load_pipeline("tiny-dit")), fam, one_batch, cfg, "cpu",
                            progress=False).run()


def test_adaptive_needs_two_prompt_batches_at_parse_time():
    from diffptq.config import check_calibration_fits

    cfg = SequentialConfig(method="gptq", damp=Damping("adaptive"))
    calib = CalibConfig(n_calib=8, batch_size=8)
    with pytest.raises(ConfigError, match="give at least two calibration batches"):
        check_calibration_fits(cfg, calib.n_calib, calib.batch_size)
    check_calibration_fits(cfg, 16, 8)
    check_calibration_fits(SequentialConfig(method="rtn", damp=Damping("adaptive")), 8, 8)
