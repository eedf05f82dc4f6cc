"""diffptq.kernels.compiled: the whole denoiser compiled in place, combo kernels on quantized paths, order checks."""
import shutil

import pytest
import torch
from torch._inductor import config as inductor_config

from diffptq.kernels import graph_denoiser
from diffptq.kernels.compiled import compile_denoiser
from diffptq.models import load_pipeline


@pytest.fixture
def pipe():
    with inductor_config.patch(combo_kernels=False):  # restored after each test
        yield load_pipeline("tiny-dit")


@pytest.mark.parametrize("path,combo", [("w4", True), ("w4a8", True), ("fake", False)])
def test_the_pipelines_denoiser_is_compiled_whole_with_combo_kernels_on_the_quantized_paths_only(pipe, path, combo):
    den = compile_denoiser(pipe, path)
    assert den is pipe.transformer and den._compiled_call_impl is not None  # nn.Module.compile, in place
    assert all(getattr(m, "_compiled_call_impl", None) is None for m in den.transformer_blocks)  # not per block
    assert inductor_config.combo_kernels is combo


def test_a_module_is_compiled_in_place_with_the_mode_given(pipe, monkeypatch):
    seen = []
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: seen.append(kw) or real_compile(fn, **kw))
    den = compile_denoiser(pipe.transformer, "w4a8", mode="max-autotune-no-cudagraphs")
    assert den is pipe.transformer and seen == [{"mode": "max-autotune-no-cudagraphs"}]


def test_graphs_before_compilation_and_unknown_paths_are_refused(pipe):
    with pytest.raises(ValueError, match="path must be one of"):
        compile_denoiser(pipe, "int4")
    graph_denoiser(pipe)
    with pytest.raises(ValueError, match="already wrapped in CUDA graphs; compile it first"):
        compile_denoiser(pipe, "w4")
    assert inductor_config.combo_kernels is False  # refused before any setting changed


@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                    reason="inductor's CPU backend needs a C++ compiler")
def test_the_compiled_denoiser_computes_what_the_eager_one_does(pipe):
    """One compiled call on the CPU (inductor's C++ backend) against the eager module."""
    den = pipe.transformer.eval()
    inputs = dict(hidden_states=torch.randn(1, den.config.in_channels, 8, 8),
                  encoder_hidden_states=torch.randn(1, 4, den.config.caption_channels),
                  timestep=torch.tensor([500]), added_cond_kwargs={"resolution": None, "aspect_ratio": None})
    with torch.no_grad():
        eager = den(**inputs).sample
        compile_denoiser(den, "w4")
        compiled = den(**inputs).sample
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)
