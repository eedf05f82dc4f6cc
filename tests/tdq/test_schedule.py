import math

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

from diffptq.tdq.schedule import (
    log_snr_at,
    log_snr_bounds,
    log_snr_from_alphas_cumprod,
    log_snr_from_sigma,
    log_snr_table,
    ConditionFn,
    make_condition_fn,
)

SD15 = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
PIXART = dict(beta_schedule="linear", beta_start=0.0001, beta_end=0.02)
COSINE = dict(beta_schedule="squaredcos_cap_v2")
SCHEDULES = {"sd15": SD15, "pixart": PIXART, "cosine": COSINE}


def _lam(acp: np.ndarray) -> np.ndarray:
    return np.log(acp) - np.log1p(-acp)


@pytest.mark.parametrize("kw", [PIXART, SD15], ids=["linear", "scaled_linear"])
def test_linear_betas_match_independent_cumprod(kw):
    T = 1000
    b0, b1 = kw["beta_start"], kw["beta_end"]
    if kw["beta_schedule"] == "linear":
        betas = np.linspace(b0, b1, T, dtype=np.float64)
    else:
        betas = np.linspace(b0**0.5, b1**0.5, T, dtype=np.float64) ** 2
    ref = _lam(np.cumprod(1.0 - betas))
    lam = log_snr_table(DDPMScheduler(**kw)).numpy()
    # the scheduler builds its betas/cumprod in float32: ~1e-7 relative in ᾱ, amplified by 1/(1-ᾱ) at small t
    np.testing.assert_allclose(lam, ref, atol=5e-4, rtol=0)


def test_cosine_matches_closed_form_with_last_beta_clipped():
    T = 1000

    def f(s):
        return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

    acp = np.array([f((i + 1) / T) / f(0.0) for i in range(T)], dtype=np.float64)
    # betas_for_alpha_bar clips β at 0.999: only the last step (its closed-form β is ≈ 1) is affected
    acp[-1] = acp[-2] * (1.0 - 0.999)
    lam = log_snr_table(DDPMScheduler(**COSINE)).numpy()
    np.testing.assert_allclose(lam, _lam(acp), atol=5e-4, rtol=1e-4)
    assert lam[-1] == pytest.approx(-19.836, abs=1e-2)


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_log_snr_decreasing_and_sigma_table_agrees(name):
    sched = DDPMScheduler(**SCHEDULES[name])
    lam = log_snr_table(sched)
    assert lam.dtype == torch.float64 and lam.shape == (1000,)
    assert bool((lam[1:] < lam[:-1]).all())
    acp = sched.alphas_cumprod.double()
    sigma = ((1 - acp) / acp).sqrt()
    torch.testing.assert_close(log_snr_from_sigma(sigma), lam, atol=1e-9, rtol=1e-9)


def test_fractional_timesteps_interpolate_in_lambda():
    acp = DDPMScheduler(**SD15).alphas_cumprod
    table = log_snr_from_alphas_cumprod(acp)
    t = torch.tensor([0.0, 10.25, 500.5, 998.75, 999.0])
    lam = log_snr_from_alphas_cumprod(acp, t)
    expected = torch.stack([table[0], 0.75 * table[10] + 0.25 * table[11], (table[500] + table[501]) / 2,
                            0.25 * table[998] + 0.75 * table[999], table[999]])
    torch.testing.assert_close(lam, expected)
    assert log_snr_from_alphas_cumprod(acp, 7).shape == ()
    assert float(log_snr_from_alphas_cumprod(acp, 7)) == pytest.approx(float(table[7]))


@pytest.mark.parametrize(
    "cls,kw,atol",
    [
        (EulerDiscreteScheduler, dict(use_karras_sigmas=True), 1e-5),  # fractional t from σ: exact inversion
        (EulerDiscreteScheduler, dict(use_exponential_sigmas=True), 1e-5),
        (EulerDiscreteScheduler, dict(timestep_spacing="leading", steps_offset=1), 1e-5),  # integer t
        (EulerDiscreteScheduler, {}, 1e-3),  # linspace t, σ interpolated linearly (not in log): 2nd-order gap
        (DPMSolverMultistepScheduler, {}, 1e-5),
    ],
)
@pytest.mark.parametrize("name", ["sd15", "pixart"])
def test_lambda_at_pipeline_timesteps_matches_scheduler_sigmas(cls, kw, atol, name):
    sched = cls(**SCHEDULES[name], **kw)
    for n in (7, 20, 50):
        sched.set_timesteps(n)
        lam = log_snr_at(sched, sched.timesteps)
        ref = log_snr_from_sigma(sched.sigmas[: len(sched.timesteps)])
        torch.testing.assert_close(lam, ref, atol=atol, rtol=0)


def test_dpmsolver_karras_rounded_timesteps_stay_close():
    sched = DPMSolverMultistepScheduler(**SD15, use_karras_sigmas=True)
    sched.set_timesteps(20)
    lam = log_snr_at(sched, sched.timesteps)
    ref = log_snr_from_sigma(sched.sigmas[:-1])
    # diffusers rounds t: the gap is at most half a table step of λ around each t
    slope = (log_snr_table(sched).diff().abs()).max()
    assert float((lam - ref).abs().max()) <= 0.5 * float(slope) + 1e-6


def test_continuous_v_prediction_euler():
    sched = EulerDiscreteScheduler(**SD15, timestep_type="continuous", prediction_type="v_prediction")
    sched.set_timesteps(10)
    torch.testing.assert_close(log_snr_at(sched, sched.timesteps), log_snr_from_sigma(sched.sigmas[:-1]))
    with pytest.raises(ValueError, match="timestep condition"):
        make_condition_fn("timestep", sched)


def test_zero_terminal_snr_is_finite():
    sched = DDPMScheduler(**SD15, rescale_betas_zero_snr=True)
    lo, hi = log_snr_bounds(sched)
    assert math.isfinite(lo) and lo == pytest.approx(-16.6355, abs=1e-3)


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_normalised_conditions_span_minus_one_to_one(name):
    sched = DDIMScheduler(**SCHEDULES[name])
    t = torch.arange(1000)
    c_snr = make_condition_fn("logsnr", sched)(t)
    c_t = make_condition_fn("timestep", sched)(t)
    assert c_snr.dtype == torch.float32 and c_snr.shape == (1000,)
    assert float(c_snr[0]) == pytest.approx(1.0) and float(c_snr[-1]) == pytest.approx(-1.0)
    assert float(c_t[0]) == pytest.approx(-1.0) and float(c_t[-1]) == pytest.approx(1.0)
    assert float(c_snr.abs().max()) <= 1.0 + 1e-6 and float(c_t.abs().max()) <= 1.0 + 1e-6
    assert bool((c_snr[1:] < c_snr[:-1]).all()) and bool((c_t[1:] > c_t[:-1]).all())


def test_sd15_bounds_documented():
    lo, hi = log_snr_bounds(DDPMScheduler(**SD15))
    assert (lo, hi) == (pytest.approx(-5.364, abs=1e-3), pytest.approx(7.069, abs=1e-3))
    lo, hi = log_snr_bounds(DDPMScheduler(**PIXART))
    assert (lo, hi) == (pytest.approx(-10.118, abs=1e-3), pytest.approx(9.210, abs=1e-3))


def test_out_of_range_extrapolates_unless_clamped():
    calib = make_condition_fn("logsnr", DDPMScheduler(**SD15))
    other = DDPMScheduler(**PIXART)  # wider λ range than SD 1.5's
    fn = make_condition_fn("logsnr", other, bounds=calib.bounds)
    c = fn(torch.tensor([0, 999]))
    lam = log_snr_at(other, torch.tensor([0.0, 999.0]))
    lo, hi = calib.bounds
    torch.testing.assert_close(c, (2 * (lam - lo) / (hi - lo) - 1).float())
    assert float(c[0]) > 1.0 and float(c[1]) < -1.0
    clamped = make_condition_fn("logsnr", other, bounds=calib.bounds, clip=True)(torch.tensor([0, 999]))
    assert clamped.tolist() == [1.0, -1.0]


def test_condition_shapes_static_and_config_roundtrip():
    sched = DDIMScheduler(**SD15)
    for kind in ("static", "timestep", "logsnr"):
        fn = make_condition_fn(kind, sched)
        assert fn(500).shape == (1,)
        assert fn(torch.tensor(500)).shape == (1,)
        assert fn(torch.tensor([500, 500, 20])).shape == (3,)
        again = ConditionFn.from_config(fn.to_config(), sched)
        torch.testing.assert_close(again(torch.arange(0, 1000, 37)), fn(torch.arange(0, 1000, 37)))
    assert make_condition_fn("static")(torch.tensor([1.0, 900.0])).tolist() == [0.0, 0.0]
    with pytest.raises(ValueError):
        make_condition_fn("sigma", sched)
