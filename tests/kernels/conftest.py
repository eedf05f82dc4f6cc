"""Quantized tiny pipelines for the inference-module tests (RTN weights, optional int8 activation quantizers), and
the benchmark scripts as modules."""
import copy
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from diffptq.algo.rtn import rtn_quantize_ex
from diffptq.data.calib import collect_calibration
from diffptq.models import family_of, load_pipeline
from diffptq.quant.layers import QuantConfig, swap_modules
from diffptq.quant.quantizer import QuantSpec


def block_layer_names(family, denoiser) -> list[str]:
    return [f"{b}.{n}" for b, block in family.blocks(denoiser) for n, _ in family.quantizable_layers(block)]


def quantize_rtn(denoiser, family, weight: QuantSpec, act: QuantSpec | None = None, act_kind: str = "dynamic"):
    """Swap every block layer for a quant layer and round its weight to nearest; returns {name: layer}."""
    cfg = QuantConfig(weight=weight, act=act, act_kind=act_kind, include=tuple(block_layer_names(family, denoiser)))
    layers = swap_modules(denoiser, cfg)
    for layer in layers.values():
        res = rtn_quantize_ex(layer.weight.detach(), weight)
        layer.set_quantized_weight(res.codes, res.scale, res.zero)
    return layers


_BASES: dict = {}


def _base(name: str):
    """(pipe, one recorded denoiser input batch of 2 prompts under CFG), built once per test run."""
    if name not in _BASES:
        torch.manual_seed(0)
        pipe = load_pipeline(name)
        calib = collect_calibration(pipe, ["a red cat", "a cup"], 2, batch_size=2, progress=False)
        _BASES[name] = pipe, next(calib.batches())
    return _BASES[name]


@pytest.fixture
def tiny():
    """tiny(name, weight_spec, act_spec) -> (pipe, family, denoiser, inputs): a fresh quantized copy of a tiny
    pipeline's denoiser (the pipeline itself is shared: do not modify it) and one recorded input batch."""

    def make(name="tiny-dit", weight=None, act=None):
        weight = weight or QuantSpec(4)
        pipe, inputs = _base(name)
        fam = family_of(pipe)
        den = copy.deepcopy(fam.denoiser(pipe))
        quantize_rtn(den, fam, weight, act)
        return pipe, fam, den, inputs

    return make


@pytest.fixture(scope="module")
def benchmark_script():
    """benchmark_script(name) -> benchmarks/<name>.py loaded as module `name`, registered in sys.modules (dataclasses
    resolve annotations there) until the test module ends."""
    loaded = []

    def load(name: str):
        path = Path(__file__).resolve().parents[2] / "benchmarks" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        loaded.append(name)
        spec.loader.exec_module(mod)
        return mod

    yield load
    for name in loaded:
        sys.modules.pop(name, None)
