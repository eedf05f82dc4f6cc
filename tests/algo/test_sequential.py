"""Sequential block-by-block driver on tiny models: once per block, paired streams, storage, orderings."""
import math
import statistics

import pytest
import torch

from diffptq.algo.sequential import NonFiniteActivationError, SequentialConfig, SequentialQuantizer
from diffptq.data.calib import collect_calibration
from diffptq.models import family_of, load_pipeline
from diffptq.quant.layers import quant_layers
from diffptq.quant.quantizer import QuantSpec

PROMPTS = ["a red cat on a sofa", "a blue cup", "a dog on a beach", "a tree in a field"]


def _setup(name, steps=3, prompts=PROMPTS):
    pipe = load_pipeline(name)
    fam = family_of(pipe)
    calib = collect_calibration(pipe, prompts, steps, batch_size=2, progress=False)
    return pipe, fam, fam.denoiser(pipe), calib


def _quantizer(den, fam, calib, **kw):
    cfg = SequentialConfig(**{"weight": QuantSpec(4), "act": QuantSpec(8, symmetric=False), "holdout_every": 3, **kw})
    return SequentialQuantizer(den, fam, calib, cfg, "cpu", progress=False)


@pytest.mark.parametrize("name", ["tiny-dit", "tiny-unet"])
def test_each_selected_block_quantized_once_and_caches_stay_on_storage(name, monkeypatch):
    _, fam, den, calib = _setup(name, steps=2, prompts=PROMPTS[:2])
    sq = _quantizer(den, fam, calib, method="gptq", holdout_every=2)
    seen = []
    orig = sq.propagate

    def spy(k, measure):
        orig(k, measure)
        cached = [t for st in (sq.fp + sq.q) for t in [st[0], *st[1]]] + \
            [v for c in sq.ctx for v in c.values() if isinstance(v, torch.Tensor)]
        seen.append((k, len(sq.fp), {t.device.type for t in cached}))
    monkeypatch.setattr(sq, "propagate", spy)
    res = sq.run()
    n_blocks = len(fam.blocks(den))
    assert res.block_quant_calls == {k: 1 for k in range(n_blocks)}
    assert [k for k, _, _ in seen] == list(range(n_blocks))
    assert all(n == len(calib) and devs == {"cpu"} for _, n, devs in seen)
    # every quantizable layer of every block was quantized and reported exactly once
    names = [r.layer for r in res.layers]
    assert len(names) == len(set(names)) == sum(1 for _, layer in quant_layers(den) if layer.is_quantized)
    if fam.name == "sd":  # skip tensors of both streams are cached and consumed: up blocks must see them
        assert any(n.startswith("up_blocks") for n in names)


def test_unselected_blocks_stay_float_and_streams_pair_up():
    pipe, fam, den, calib = _setup("tiny-dit")
    res = _quantizer(den, fam, calib, method="rtn", blocks=[1]).run()
    assert {r.block for r in res.layers} == {1}
    assert all(n.startswith("transformer_blocks.1.") for n in res.quant_layers)
    assert all(not math.isnan(r.rel_out_err) for r in res.layers)


def test_layer_error_ordering_rtn_gptq_qronos():
    errs = {}
    for method in ("rtn", "gptq", "qronos"):
        pipe, fam, den, calib = _setup("tiny-dit", steps=4)
        res = _quantizer(den, fam, calib, method=method, act=QuantSpec(4, symmetric=False)).run()
        errs[method] = statistics.mean(r.rel_out_err for r in res.layers)
    assert errs["qronos"] <= errs["gptq"] <= errs["rtn"], errs


def test_nan_in_calibration_names_layer_and_block():
    pipe, fam, den, calib = _setup("tiny-dit", steps=2)
    for rec in calib.records:
        rec.inputs["hidden_states"] = rec.inputs["hidden_states"].clone()
        rec.inputs["hidden_states"][0, 0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteActivationError, match=r"layer transformer_blocks\.0\.attn1\.to_q \(block 0\)"):
        _quantizer(den, fam, calib, method="gptq").run()
