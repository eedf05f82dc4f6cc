import pytest
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler
from torch import nn

from diffptq.quant.act import TimeConditionedActQuantizer
from diffptq.quant.quantizer import QuantSpec
from diffptq.tdq.step_hook import apply_condition, attach_condition_hook, detach_condition_hook
from diffptq.tdq.scale_mlp import ScaleMLP
from diffptq.tdq.schedule import log_snr_from_sigma, make_condition_fn

SD15 = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


class FakeQuantizer:
    def __init__(self):
        self.calls: list = []

    def set_condition(self, c):
        self.calls.append(c)


class UNetLike(nn.Module):
    """forward(sample, timestep, encoder_hidden_states): the UNet's signature, called positionally."""

    def forward(self, sample, timestep, encoder_hidden_states=None, return_dict=True):
        return sample


class PixArtLike(nn.Module):
    """forward(hidden_states, encoder_hidden_states, timestep, ...): timestep is the 3rd parameter."""

    def forward(self, hidden_states, encoder_hidden_states=None, timestep=None, added_cond_kwargs=None):
        return hidden_states


def test_positional_timestep_once_per_step():
    sched = DDIMScheduler(**SD15, steps_offset=1)
    sched.set_timesteps(5)
    fn = make_condition_fn("logsnr", sched)
    den, q1, q2 = UNetLike(), FakeQuantizer(), FakeQuantizer()
    handle = attach_condition_hook(den, [q1, q2], fn)
    x = torch.zeros(2, 4, 8, 8)
    for t in sched.timesteps:  # as StableDiffusionPipeline: t is a 0-d tensor, CFG batch of 2
        den(x, t, encoder_hidden_states=None)
        den(x, t)  # e.g. CFG halves run as two calls: same step, no update
    assert q1.calls == q2.calls == [pytest.approx(float(fn(t)[0])) for t in sched.timesteps]
    assert all(isinstance(c, float) for c in q1.calls)
    assert handle.n_updates == 5
    detach_condition_hook(handle)
    den(x, torch.tensor(3))
    assert len(q1.calls) == 5


def test_keyword_fractional_timestep_matches_euler_sigma():
    sched = EulerDiscreteScheduler(**SD15, use_karras_sigmas=True)
    sched.set_timesteps(6)
    fn = make_condition_fn("logsnr", sched)
    den, q = PixArtLike(), FakeQuantizer()
    ehs = torch.zeros(2, 3, 4)  # the 2nd positional argument must not be taken for the timestep
    with attach_condition_hook(den, [q], fn) as handle:
        for t in sched.timesteps:  # as PixArtAlphaPipeline: keyword, expanded to the batch
            den(torch.zeros(2, 4, 8, 8), ehs, timestep=t.expand(2))
    lo, hi = fn.bounds
    expected = 2 * (log_snr_from_sigma(sched.sigmas[:-1]) - lo) / (hi - lo) - 1
    torch.testing.assert_close(torch.tensor(q.calls, dtype=torch.float64), expected, atol=1e-5, rtol=0)
    assert handle.last_timestep == (float(sched.timesteps[-1]),)
    den(torch.zeros(1), ehs, timestep=torch.tensor([5.0]))  # removed on exit
    assert len(q.calls) == 6


def test_mixed_timesteps_pass_a_tensor_and_reset():
    fn = make_condition_fn("timestep", DDIMScheduler(**SD15))
    den, q = PixArtLike(), FakeQuantizer()
    handle = attach_condition_hook(den, [q], fn)
    den(torch.zeros(3), timestep=torch.tensor([0, 999, 0]))
    assert isinstance(q.calls[0], torch.Tensor) and q.calls[0].tolist() == [-1.0, 1.0, -1.0]
    den(torch.zeros(3), None, torch.tensor([0, 999, 0]))  # positional at its real index
    assert len(q.calls) == 1
    handle.reset()
    den(torch.zeros(3), timestep=torch.tensor([0, 999, 0]))
    assert len(q.calls) == 2
    with pytest.raises(ValueError, match="without a timestep"):
        den(torch.zeros(3))
    handle.remove()


def test_apply_condition_direct():
    q = FakeQuantizer()
    fn = make_condition_fn("static")
    assert apply_condition([q], fn, torch.tensor([10, 10])) == 0.0 and q.calls == [0.0]


def test_module_search_with_real_quantizers():
    sched = DDIMScheduler(**SD15)
    fn = make_condition_fn("logsnr", sched)
    qs = nn.ModuleList([TimeConditionedActQuantizer(QuantSpec(8), ScaleMLP(s)) for s in (0.1, 0.2)])
    den = UNetLike()
    den.quantizers = qs
    handle = attach_condition_hook(den, den, fn)
    assert handle.quantizers == list(qs)
    den(torch.zeros(1), torch.tensor(500))
    x = torch.randn(4, 8)
    torch.testing.assert_close(qs[1](x), torch.clamp(torch.round(x / 0.2), -128, 127) * 0.2)
    handle.remove()


@pytest.mark.parametrize("name,scheduler", [("tiny-dit", "euler-karras"), ("tiny-unet", "default")])
def test_real_pipeline(name, scheduler):
    """The hook inside an unmodified diffusers pipeline (tiny random weights, 4 steps, CFG)."""
    from diffptq.models.families import family_of
    from diffptq.models.schedulers import set_scheduler
    from diffptq.models.tiny import build_tiny_pipeline

    pipe = build_tiny_pipeline(name)
    set_scheduler(pipe, scheduler)
    family = family_of(pipe)
    fn = make_condition_fn("logsnr", pipe.scheduler)
    q = FakeQuantizer()
    with attach_condition_hook(family.denoiser(pipe), [q], fn):
        pipe("a red house", num_inference_steps=4, guidance_scale=2.0, output_type="latent",
             **family.call_kwargs(pipe))
    expected = [float(fn(t)[0]) for t in pipe.scheduler.timesteps]
    assert q.calls == pytest.approx(expected) and len(q.calls) == 4
