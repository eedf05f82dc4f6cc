"""The measured claims of log-SNR TDQ on the bundled DiT (skipped without its weights).

Small settings (block 0, 8 calibration prompts × DDIM-10, 4 eval prompts) so the file stays under a minute; the
full tables come from LogSnr-DiT/evaluate_compare.py (README). What these assert is what was measured there:
* on the calibration sampler, log-SNR TDQ has a lower act_mse than static, at A8 and at A4;
* on a sampler with other noise levels (Euler, Karras sigmas), log-SNR TDQ does NOT beat timestep TDQ: the
  optimal scales of this model move with the sampler as well as with λ, and both conditionings extrapolate the
  calibration alike (within 3 % at A4; at A8 timestep-TDQ was better by 8 % on DPM-20, 30 % on Euler-30-Karras).
"""
from functools import cache

import pytest
import torch

from diffptq.cli import Run
from diffptq.data.prompts import evaluation_prompts
from diffptq.models.load import BUNDLED_MODELS
from diffptq.run import tdq
from diffptq.run.tdq_flags import parse_calibrate_args
from diffptq.run.tdq_compare import EvalSampler, fp_reference, replay_errors

pytestmark = pytest.mark.skipif(not (BUNDLED_MODELS["bundled-dit"] / "model_index.json").is_file(),
                                reason="bundled-dit weights absent")
ARGS = parse_calibrate_args("pixart", "", ["--model", "bundled-dit", "--scheduler", "ddim", "--n_calib", "8",
                                           "--calib_steps", "10", "--blocks", "1", "--max_per_condition", "2048",
                                           "--mlp_steps", "100"])
RUN = Run(out_dir=None, device=torch.device("cpu"), dtype=torch.float32, args=ARGS, script="test")


@cache
def _fp():
    torch.set_num_threads(1)
    fp = tdq.load_model(ARGS, RUN)
    calib = tdq.record_calibration(fp, ARGS, progress=False)
    prompts = evaluation_prompts(ARGS.model, 4)
    refs = {s.label: fp_reference(fp, s, prompts, ARGS.guidance_scale, 4, ARGS.seed, RUN.device, RUN.dtype,
                                  images=False) for s in (EvalSampler("ddim", 10), EvalSampler("euler-karras", 12))}
    return calib, refs


@cache
def _act_mse(condition: str, abits: int) -> dict[str, float]:
    """act_mse of one calibration (W8, block 0) on each eval sampler."""
    calib, refs = _fp()
    pipe = tdq.load_model(ARGS, RUN)
    tdq.calibrate(pipe, *tdq.tdq_configs(pipe, ARGS, condition, 8, abits), ARGS, RUN, calib=calib, progress=False)
    out = {}
    for label, ref in refs.items():
        tdq.switch_scheduler(pipe, ref.sampler.scheduler)
        out[label] = replay_errors(pipe, ref, RUN.device, RUN.dtype)[0]
    return out


@pytest.mark.parametrize("abits", [8, 4])
def test_logsnr_beats_static_on_the_calibration_sampler(abits):
    assert _act_mse("logsnr", abits)["ddim-10"] < 0.95 * _act_mse("static", abits)["ddim-10"]


def test_logsnr_does_not_beat_timestep_on_new_noise_levels():
    logsnr, timestep = _act_mse("logsnr", 4)["euler-karras-12"], _act_mse("timestep", 4)["euler-karras-12"]
    assert logsnr > 0.97 * timestep, (logsnr, timestep)
