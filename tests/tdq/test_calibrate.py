"""TdqActQuantizer: calibration protocol, the three conditions on one code path, asymmetric offsets, checkpoints."""
import pytest
import torch

from diffptq.quant.quantizer import QuantSpec, fit_rows
from diffptq.tdq.quantizer import TdqActQuantizer
from diffptq.tdq.checkpoint import build_tdq_act
from diffptq.tdq.fit import TdqFitConfig, quant_mse

FIT = TdqFitConfig(max_per_condition=4096, steps=200)
CONDS = (-1.0, -0.5, 0.0, 0.5, 1.0)


def _batches(shift: bool = False):
    """Per condition c: Gaussian activations whose spread grows 8× over c (and whose floor moves, if shift)."""
    gen = torch.Generator().manual_seed(0)
    for c in CONDS:
        sigma = 2.0 ** (1.5 * (c + 1))
        for _ in range(2):
            x = torch.randn(4, 64, 32, generator=gen) * sigma
            yield c, (x.abs() - (0.5 + c) if shift else x)


def _calibrated(spec, kind="logsnr", shift=False):
    q = TdqActQuantizer(spec, {"kind": kind, "bounds": [-10.0, 9.0], "clamp": False}, FIT)
    q.start_calibration()
    for c, x in _batches(shift):
        q.set_condition(0.0 if kind == "static" else c)
        assert torch.equal(q(x), x)  # calibrating: observe, return x unchanged
    q.finish_calibration()
    return q


@torch.no_grad()
def test_scales_follow_the_condition_and_beat_static():
    q = _calibrated(QuantSpec(4, scale_method="mse"))
    assert q.calibrated and q.fit.conds.tolist() == pytest.approx(CONDS)
    summary = q.fit_summary
    assert summary["log_rmse_mlp"] < 0.05 < summary["log_rmse_static"]
    assert summary["mse_ratio_mlp"] < 1.05 < summary["mse_ratio_static"]
    for c, opt in zip(CONDS, q.fit.opt_scales, strict=True):
        with torch.no_grad():
            q.set_condition(c)
        assert float(q._scale) == pytest.approx(float(opt), rel=0.05)
    x = torch.randn(8, 32)
    q.set_condition(1.0)
    s = float(q._scale)
    torch.testing.assert_close(q(x), torch.clamp(torch.round(x / s), -8, 7) * s)


def test_static_condition_is_one_scale_on_the_same_path():
    spec = QuantSpec(4, scale_method="mse")
    q = _calibrated(spec, kind="static")
    assert q.fit.conds.tolist() == [0.0]
    pooled = torch.cat([x.reshape(-1) for _, x in _batches()])
    ref, _ = fit_rows(pooled.reshape(1, -1), spec)  # the static fit on (a sample of) everything
    scales = []
    for c in CONDS:
        q.set_condition(c)
        scales.append(float(q._scale.detach()))
    assert max(scales) == min(scales) == pytest.approx(q.fit.static_scale)
    # its error on all the data is that of the static optimum fitted on all of it (sampling costs < 5 %)
    assert quant_mse(pooled, q.fit.static_scale, 0.0, spec) < 1.05 * quant_mse(pooled, float(ref), 0.0, spec)


@torch.no_grad()
def test_asymmetric_offset_moves_with_the_condition():
    spec = QuantSpec(4, symmetric=False, scale_method="mse")
    q = _calibrated(spec, shift=True)
    assert q.fit_summary["mse_ratio_mlp"] < 1.1
    floors = []
    for c, (s_opt, z_opt) in zip(CONDS, zip(q.fit.opt_scales, q.fit.opt_zeros, strict=True), strict=True):
        q.set_condition(c)
        floors.append(float(q._scale * q._zero))
        assert floors[-1] == pytest.approx(float(s_opt * z_opt), abs=float(s_opt))  # within one step
    assert floors[0] < floors[-1]  # the floor −s·z moves down as the inputs' minimum does


def test_uncalibrated_use_raises_and_empty_calibration_raises():
    q = TdqActQuantizer(QuantSpec(8), {"kind": "logsnr", "bounds": [-1.0, 1.0], "clamp": False})
    q.set_condition(0.0)
    with pytest.raises(RuntimeError, match="set_condition"):
        q(torch.randn(3))
    q.start_calibration()
    with pytest.raises(RuntimeError, match="no batch"):
        q.finish_calibration()
    q.start_calibration()
    q.current_condition = None
    with pytest.raises(RuntimeError, match="condition"):
        q(torch.randn(3))


@pytest.mark.parametrize("symmetric", [True, False])
def test_checkpoint_entry_rebuilds_the_same_quantizer(symmetric):
    from diffptq.io.checkpoint import layer_entry
    from diffptq.quant.layers import QuantLinear

    spec = QuantSpec(4, symmetric=symmetric, scale_method="mse")
    q = _calibrated(spec, shift=not symmetric)
    layer = QuantLinear(torch.nn.Linear(32, 8), q, QuantSpec(8))
    entry = layer_entry("fc", layer)
    assert entry["act_kind"] == "tdq" and entry["act_extra"]["condition"]["kind"] == "logsnr"
    state = {k: v.detach().float().clone() for k, v in q.state_dict().items()}
    q2 = build_tdq_act(entry)
    q2.load_state_dict(state)
    x = torch.randn(4, 32) * 3
    for c in (-1.0, 0.3, 1.7):  # 1.7: beyond the calibrated range, extrapolated the same way
        q.set_condition(c)
        q2.set_condition(c)
        torch.testing.assert_close(q2(x), q(x), rtol=0, atol=0)


def test_recorded_trajectories_have_no_stale_inputs():
    """Every recorded latent equals what the denoiser really got (the recorder's address-keyed sharing can hand a
    freed step's copy to a later step whose latents reuse the address)."""
    from diffptq.models import family_of, load_pipeline

    pipe = load_pipeline("tiny-unet")
    pipe.text_encoder.eval()
    den = family_of(pipe).denoiser(pipe)
    seen = []
    handle = den.register_forward_pre_hook(lambda m, a, k: seen.append(k.get("sample", a[0] if a else None).clone()),
                                           with_kwargs=True)
    from diffptq.data.calib import collect_calibration

    calib = collect_calibration(pipe, ["a red cat", "a dog", "a cup", "a tree"], 8, None, 2, 0, progress=False)
    handle.remove()
    assert len(seen) == len(calib) == 16
    assert all(torch.equal(r.inputs["sample"], x) for r, x in zip(calib.records, seen, strict=True))


@torch.no_grad()
def test_beyond_the_calibrated_conditions_clamp_holds_the_edge_scale():
    q = _calibrated(QuantSpec(4, scale_method="mse"))
    assert q.cond_range == [-1.0, 1.0]
    q.set_condition(1.0)
    edge = float(q._scale)
    q.set_condition(3.0)
    assert float(q._scale) == edge
    free = TdqActQuantizer(q.spec, q.condition, FIT, extrapolate="mlp")
    free.load_state_dict(q.state_dict())
    free.set_condition(3.0)
    assert free.cond_range is None and float(free._scale) != edge
