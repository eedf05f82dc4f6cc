"""calibrate_tdq_pipeline on the tiny models: driver integration, hook for any scheduler, checkpoint round trip."""
import pytest
import torch

from diffptq.io.checkpoint import save_quantized
from diffptq.io.load import load_quantized
from diffptq.models import family_of, load_pipeline
from diffptq.run.tdq import switch_scheduler
from diffptq.config import QuantSpec, SequentialConfig
from diffptq.data.calib import collect_calibration
from diffptq.tdq.calibrate import TdqConfig, calibrate_tdq_pipeline
from diffptq.tdq.quantizer import tdq_quantizers
from diffptq.tdq.fit import TdqFitConfig
from diffptq.tdq.inference import HOOK_ATTR

PROMPTS = ["a red cat on a sofa", "a blue cup", "a dog on a beach", "a tree in a field"]
FIT = TdqFitConfig(max_per_condition=2048, steps=60)


def _pipe(name):
    pipe = load_pipeline(name)
    for m in pipe.components.values():
        if isinstance(m, torch.nn.Module):
            m.eval()  # the tiny pipelines are built in training mode (T5 dropout)
    return pipe


def _run(pipe, scheduler, steps=3, seed=0):
    switch_scheduler(pipe, scheduler)  # from the original config: set_scheduler alone keeps earlier overrides
    gen = torch.Generator().manual_seed(seed)
    return pipe(PROMPTS[:2], num_inference_steps=steps, generator=gen, output_type="latent",
                **family_of(pipe).call_kwargs(pipe)).images


@pytest.mark.parametrize("name,condition,symmetric", [("tiny-dit", "logsnr", False), ("tiny-unet", "timestep", True)])
def test_calibrate_save_load_and_sample_with_another_scheduler(name, condition, symmetric, tmp_path):
    torch.set_num_threads(1)
    pipe = _pipe(name)
    switch_scheduler(pipe, "ddim")
    cfg = TdqConfig(condition=condition, act_symmetric=symmetric, fit=FIT)
    seq = SequentialConfig(method="rtn", weight=QuantSpec(8), act=QuantSpec(8), blocks=[0, 1])
    res = calibrate_tdq_pipeline(pipe, cfg, seq, collect_calibration(pipe, PROMPTS, 3, batch_size=2, progress=False),
                                 progress=False)
    den = family_of(pipe).denoiser(pipe)
    qs = tdq_quantizers(den)
    assert qs and all(q.calibrated and q.fit.conds.numel() == 3 for q in qs)  # one condition per DDIM step
    assert set(res.quantizers) == {r.layer for r in res.result.layers}
    assert all(0 < e < 1 for e in res.final_err_per_step.values())
    # a scheduler the calibration never saw: the hook feeds each step's condition, once per step
    hook = getattr(pipe, HOOK_ATTR)
    hook.n_updates = 0
    out = _run(pipe, "euler-karras", steps=4)
    assert hook.n_updates == 4 and torch.isfinite(out).all()
    expected = float(hook.condition_fn(pipe.scheduler.timesteps[-1])[0])
    assert all(q.current_condition == pytest.approx(expected) for q in qs)
    # checkpoint round trip: same scales, same samples, hook attached by load_quantized
    path = tmp_path / "tdq.pt"
    save_quantized(path, den, {"source": name, "family": family_of(pipe).name,
                               "pipeline_class": type(pipe).__name__}, {"condition": condition})
    loaded = load_quantized(path)
    for m in loaded.components.values():
        if isinstance(m, torch.nn.Module):
            m.eval()
    assert getattr(loaded, HOOK_ATTR) is not None
    torch.testing.assert_close(_run(loaded, "dpm", 3), _run(pipe, "dpm", 3), rtol=1e-4, atol=1e-4)


def test_static_condition_and_refinement():
    torch.set_num_threads(1)
    pipe = _pipe("tiny-dit")
    cfg = TdqConfig(condition="static", fit=FIT, refine_steps=6, refine_lr=1e-2)
    seq = SequentialConfig(method="rtn", weight=QuantSpec(8), act=QuantSpec(4), blocks=[0])
    res = calibrate_tdq_pipeline(pipe, cfg, seq,
                                 collect_calibration(pipe, PROMPTS[:2], 3, batch_size=2, progress=False),
                                 progress=False)
    qs = list(res.quantizers.values())
    assert all(q.fit.conds.tolist() == [0.0] for q in qs)
    first, last = res.refine_loss[0]
    assert 0 < last < 2 * first
    # refinement moved the scales off the MSE fit, and the cache was refreshed for the current condition
    moved = [abs(float(q.scale_fn(torch.zeros(1)).detach()) / q.fit.static_scale - 1) for q in qs]
    assert max(moved) > 1e-4
    for q in qs:
        with torch.no_grad():
            q.set_condition(0.0)
            assert float(q._scale) == pytest.approx(float(q.scale_fn(torch.zeros(1))))
