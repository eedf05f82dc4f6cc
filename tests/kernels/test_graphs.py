"""GraphedDenoiser: a transparent pass-through off CUDA (tiny pipelines give the same images), the signature and LRU
logic, the capture / replay / fallback plumbing with a CPU stand-in for CUDAGraph, and on a GPU real replays."""
import copy
import logging

import pytest
import torch
from torch import nn

from diffptq.data.calib import move_inputs
from diffptq.kernels import GraphedDenoiser, InferenceConfig, convert_for_inference, graph_denoiser
from diffptq.kernels import graphs as graphs_mod
from diffptq.kernels.graphs import GraphCache, call_signature, rebuild_call, tensors_of
from diffptq.models import family_of, load_pipeline

pytestmark = pytest.mark.usefixtures("one_thread")
LOGGER = "diffptq.kernels.graphs"


class Toy(nn.Module):
    """A denoiser-like module: diffusers-style arguments, a tuple or a dict output."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.config = {"in_channels": 4}

    def forward(self, hidden_states, timestep=None, added_cond_kwargs=None, return_dict=True):
        out = self.proj(hidden_states) * (1 if timestep is None else timestep.float().reshape(-1, 1))
        return {"sample": out} if return_dict else (out,)


class ReplayOnCpu:
    """Stands in for a CUDAGraph: replay reruns the function on the static inputs into the static outputs."""

    def __init__(self, fn, args, kwargs, outputs):
        self.fn, self.args, self.kwargs, self.outputs = fn, args, kwargs, outputs

    def replay(self):
        for static, new in zip(tensors_of(self.outputs), tensors_of(self.fn(*self.args, **self.kwargs)), strict=True):
            static.copy_(new)


@pytest.fixture
def fake_cuda(monkeypatch):
    """Graphs 'captured' on the CPU: returns the list of (warmup) of each capture."""
    captures = []

    def capture(fn, args, kwargs, warmup, pool):
        captures.append(warmup)
        outputs = fn(*args, **kwargs)
        return ReplayOnCpu(fn, args, kwargs, outputs), outputs

    monkeypatch.setattr(graphs_mod, "cuda_reason", lambda: None)
    monkeypatch.setattr(graphs_mod, "device_reason", lambda tensors: None if tensors else "no tensor argument")
    monkeypatch.setattr(graphs_mod, "capture_graph", capture)
    return captures


def _x(batch, seed=0):
    return torch.randn(batch, 4, generator=torch.Generator().manual_seed(seed))


# ---- signature and cache --------------------------------------------------------------------------------------------
def test_signature_separates_what_one_graph_cannot_replay():
    t1, t2 = torch.ones(2), torch.ones(1)
    same = call_signature((_x(2),), {"timestep": t1, "return_dict": False, "added_cond_kwargs": {"r": None}})
    again = call_signature((_x(2, seed=1),), {"added_cond_kwargs": {"r": None}, "return_dict": False, "timestep": t1})
    assert same[0] == again[0] and len(same[1]) == 2  # values differ, kwargs order differs: one graph
    assert call_signature((_x(1),), {"timestep": t2, "return_dict": False, "added_cond_kwargs": {"r": None}})[0] != \
        same[0]  # another batch
    for kwargs in ({"timestep": None}, {"timestep": t1.half()}, {"timestep": t1, "return_dict": True},
                   {"timestep": t1, "added_cond_kwargs": {"r": torch.ones(1)}}):
        assert call_signature((_x(2),), kwargs)[0] != call_signature((_x(2),), {"timestep": t1})[0], kwargs
    with torch.no_grad():
        no_grad = call_signature((_x(2),), {})[0]
    assert no_grad != call_signature((_x(2),), {})[0]
    with pytest.raises(graphs_mod.Unbufferable, match="an argument of type Generator"):
        call_signature((_x(2),), {"generator": torch.Generator()})


def test_rebuild_puts_buffers_where_the_tensors_were():
    args, kwargs = (_x(2),), {"timestep": torch.ones(2), "cond": {"a": torch.zeros(1), "b": 3}, "flag": False}
    _, tensors = call_signature(args, kwargs)
    static = [t.clone() for t in tensors]
    new_args, new_kwargs = rebuild_call(args, kwargs, static)
    # kwargs in name order: cond, flag, timestep
    assert new_args[0] is static[0] and new_kwargs["cond"]["a"] is static[1] and new_kwargs["timestep"] is static[2]
    assert new_kwargs["cond"]["b"] == 3 and new_kwargs["flag"] is False


def test_cache_keeps_the_most_recently_used():
    cache = GraphCache(2)
    assert cache.put("a", 1) == [] and cache.put("b", 2) == []
    assert cache.get("a") == 1  # now the most recent
    assert cache.put("c", 3) == ["b"] and cache.get("b") is None and len(cache) == 2


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_bad_sizes_are_refused(bad):
    with pytest.raises(ValueError, match="integer ≥ 1"):
        GraphedDenoiser(Toy(), max_graphs=bad)


def test_inference_config_checks_cuda_graphs():
    with pytest.raises(ValueError, match="InferenceConfig.cuda_graphs must be True or False, got 'yes'"):
        InferenceConfig(cuda_graphs="yes")
    assert InferenceConfig().cuda_graphs is False


def test_convert_for_inference_returns_the_graphed_model(tiny):
    _, _, den, _ = tiny()
    conv = convert_for_inference(den, "w4a8", config=InferenceConfig(force=True, cuda_graphs=True))
    assert isinstance(conv.graphed, GraphedDenoiser) and conv.graphed.denoiser is den
    assert convert_for_inference(den, "fake").graphed is None


# ---- off CUDA: a pass-through ---------------------------------------------------------------------------------------
def test_off_cuda_it_is_the_denoiser(caplog):
    toy = Toy()
    graphed = GraphedDenoiser(toy)
    assert graphed.config is toy.config and graphed.proj is toy.proj and graphed.denoiser is toy
    with caplog.at_level(logging.INFO, logger=LOGGER), torch.no_grad():
        for seed in (0, 1):
            x = _x(2, seed)
            assert torch.equal(graphed(x, return_dict=False)[0], toy(x, return_dict=False)[0])
    assert graphed.num_graphs == 0 and graphed.eager_calls == 2
    assert caplog.text.count("running eagerly") == 1  # one line per reason
    with pytest.raises(AttributeError):
        graphed.no_such_attribute  # noqa: B018


@pytest.mark.parametrize("name", ["tiny-dit", "tiny-unet"])
@pytest.mark.parametrize("replayed", [False, True])
def test_pipeline_images_are_the_same(name, replayed, request):
    """The pipeline runs with the wrapper as its denoiser (config, dtype, device read through it): the same images,
    off CUDA (eager) and with graphs replayed by the CPU stand-in (CFG: one signature, every step a replay)."""
    captures = request.getfixturevalue("fake_cuda") if replayed else None
    pipe = load_pipeline(name)
    kwargs = {**family_of(pipe).call_kwargs(pipe), "num_inference_steps": 2, "output_type": "pt"}

    def images():
        return pipe(prompt=["a red cat", "a cup"], generator=torch.Generator().manual_seed(0), **kwargs).images

    ref = images()
    graphed = graph_denoiser(pipe)
    assert family_of(pipe).denoiser(pipe) is graphed and graph_denoiser(pipe) is graphed  # installed once
    assert family_of(graphed) is family_of(graphed.denoiser)  # the wrapper alone is recognized through it
    assert torch.equal(images(), ref)
    if replayed:
        assert captures == [3] and graphed.replays == 2 and graphed.eager_calls == 0
    else:
        assert graphed.eager_calls == 2 and graphed.replays == 0


# ---- capture and replay (CPU stand-in) ------------------------------------------------------------------------------
def test_replays_refresh_the_buffers_and_evict_the_least_recent(fake_cuda, caplog):
    toy = Toy()
    graphed = GraphedDenoiser(toy, max_graphs=2, warmup=2)
    with caplog.at_level(logging.INFO, logger=LOGGER), torch.no_grad():
        for seed in range(3):  # one capture, then replays with new inputs
            x, t = _x(2, seed), torch.full((2,), seed + 1.0)
            out = graphed(x, timestep=t)
            assert torch.equal(out["sample"], toy(x, timestep=t)["sample"])
        assert fake_cuda == [2] and graphed.replays == 3 and graphed.num_graphs == 1
        graphed(_x(1), timestep=torch.ones(1))
        graphed(_x(3), timestep=torch.ones(3))  # a third signature: batch 2's graph goes
        assert graphed.num_graphs == 2 and "dropped the least recently used signature ((2, 4) float32" in caplog.text
        graphed(_x(2), timestep=torch.ones(2))
    assert fake_cuda == [2, 2, 2, 2]  # captured again


def test_outputs_are_copies_unless_asked(fake_cuda):
    with torch.no_grad():
        for clone, survives in ((True, True), (False, False)):
            graphed = GraphedDenoiser(Toy(), clone_outputs=clone)
            first = graphed(_x(2, 0), return_dict=False)[0]
            kept = first.clone()
            graphed(_x(2, 1), return_dict=False)
            assert torch.equal(first, kept) is survives  # static outputs: overwritten by the next call


def test_failed_captures_and_refusals_run_eagerly(fake_cuda, monkeypatch, caplog):
    def broken(*args):
        raise RuntimeError("operation not permitted when stream is capturing")

    toy = Toy()
    graphed = GraphedDenoiser(toy)
    with caplog.at_level(logging.INFO, logger=LOGGER), torch.no_grad():
        monkeypatch.setattr(graphs_mod, "capture_graph", broken)
        for _ in range(2):
            assert torch.equal(graphed(_x(2))["sample"], toy(_x(2))["sample"])
        assert graphed.eager_calls == 2 and len(graphed.cache) == 1  # not captured again
        assert caplog.text.count("capture failed for (2, 4) float32: RuntimeError: operation not permitted") == 1
        graphed(_x(1), added_cond_kwargs=object())
    assert "an argument of type object" in caplog.text
    with torch.no_grad():
        hooked = GraphedDenoiser(Toy())
        hooked.denoiser.register_forward_pre_hook(lambda m, a: None)
        hooked(_x(2))
        conditioned = GraphedDenoiser(Toy())
        conditioned.denoiser.proj.set_condition = lambda c: None
        conditioned(_x(2))
    assert "forward hooks on the denoiser" in next(iter(hooked.eager_reasons))
    assert "time-conditioned activation quantizers" in next(iter(conditioned.eager_reasons))


def test_autograd_moves_and_mode_switches(fake_cuda):
    graphed = GraphedDenoiser(Toy().eval())
    assert not graphed.training
    graphed(_x(2))  # grad enabled: eager
    assert graphed.num_graphs == 0 and graphed.eager_calls == 1
    with torch.no_grad():
        graphed(_x(2))
    assert graphed.num_graphs == 1
    copied = copy.deepcopy(graphed)
    assert copied.num_graphs == 0 and graphed.num_graphs == 1  # a copy captures its own
    graphed.to(torch.float64)
    assert graphed.num_graphs == 0  # cast: the graphs read the old weights
    with torch.no_grad():
        graphed(_x(2).double())
    graphed.train()
    assert graphed.num_graphs == 0 and graphed.denoiser.training


# ---- on a GPU -------------------------------------------------------------------------------------------------------
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")


@needs_cuda
@pytest.mark.parametrize("model", ["float", "w4"])
def test_replay_equals_eager_on_tiny_dit(tiny, model):
    pipe, fam, den, inputs = tiny()
    if model == "float":
        den = copy.deepcopy(fam.denoiser(pipe))
    else:  # the memory path: int4 dequantized inside the graph
        convert_for_inference(den, "w4", "cuda", InferenceConfig(fuse_qkv=False))
    den = den.cuda().eval()
    graphed = GraphedDenoiser(den)
    with torch.no_grad():
        for batch in (1, 2):
            for shift in (0.0, 1.0):  # the second call brings new inputs: the buffers are refreshed
                x = {k: v[:batch] if torch.is_tensor(v) else v for k, v in move_inputs(inputs, "cuda").items()}
                x["hidden_states"] = x["hidden_states"] + shift
                out = graphed(**x, return_dict=False)[0]
                torch.testing.assert_close(out, den(**x, return_dict=False)[0], rtol=1e-4, atol=1e-5)
    assert graphed.num_graphs == 2 and graphed.replays == 4 and graphed.eager_calls == 0


@needs_cuda
def test_cfg_pipeline_gives_the_eager_images():
    pipe = load_pipeline("tiny-dit", device="cuda")
    kwargs = {**family_of(pipe).call_kwargs(pipe), "num_inference_steps": 3, "output_type": "pt"}

    def images(n):
        prompts = ["a red cat", "a cup", "a tree"][:n]
        return pipe(prompt=prompts, generator=torch.Generator().manual_seed(0), **kwargs).images

    ref = [images(n) for n in (1, 2)]
    graphed = graph_denoiser(pipe)
    for n, r in zip((1, 2), ref, strict=True):
        torch.testing.assert_close(images(n), r, rtol=1e-4, atol=1e-4)
    assert graphed.num_graphs == 2 and graphed.eager_calls == 0  # CFG batches 2 and 4


@needs_cuda
def test_a_host_sync_in_forward_falls_back_to_eager():
    class Syncs(Toy):
        def forward(self, hidden_states, **kwargs):
            return (self.proj(hidden_states) * float(hidden_states.abs().max()),)

    den = Syncs().cuda()
    graphed = GraphedDenoiser(den)
    x = _x(2).cuda()
    with torch.no_grad():
        torch.testing.assert_close(graphed(x)[0], den(x)[0])
        torch.testing.assert_close(graphed(x + 1)[0], den(x + 1)[0])
    assert graphed.num_graphs == 0 and graphed.eager_calls == 2
    assert "capture failed" in next(iter(graphed.eager_reasons))
