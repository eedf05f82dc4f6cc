"""SequentialConfig.offload_done: finished blocks leave the compute device and are back before run() returns.

On the CPU, storage and compute device are one, so the CPU tests move blocks with a stand-in that copies every tensor
and poisons the memory it leaves (NaN, or 3 in integer codes): anything that reads a block's old memory after its
move (a later block, a report, the returned model) changes the result, which must equal the run without the option
bit for bit.
"""
import copy
import gc

import pytest
import torch

import diffptq.algo.driver.offload as driver_offload
from diffptq.algo.driver import SequentialConfig, SequentialQuantizer
from diffptq.data.calib import collect_calibration
from diffptq.models import family_of, load_pipeline
from diffptq.quant.layers import float_mode
from diffptq.quant.quantizer import QuantSpec

PROMPTS = ["a red cat on a sofa", "a blue cup", "a dog on a beach", "a tree in a field"]


def _poison_move(t):
    new = t.clone()
    t.fill_(float("nan") if t.is_floating_point() else 3)
    return new


def _spy_moves(monkeypatch, units):
    """Unit indices in the order the driver moves them, with the poisoning stand-in as the move."""
    index = {id(u.module): k for k, u in enumerate(units)}
    moved = []
    real = driver_offload.move_module_tensors

    def fake(module, move, skip=None, keep=frozenset()):
        moved.append(index[id(module)])
        return real(module, _poison_move, skip, keep)
    monkeypatch.setattr(driver_offload, "move_module_tensors", fake)
    return moved


def _run(den, fam, calib, on_block=None, **kw):
    cfg = SequentialConfig(**{"method": "gptq", "weight": QuantSpec(4), "act": QuantSpec(8, symmetric=False),
                              "holdout_every": 3, **kw})
    return SequentialQuantizer(den, fam, calib, cfg, "cpu", progress=False, on_block=on_block).run()


def _tensors(den):
    return {**{n: p for n, p in den.named_parameters()}, **{n: b for n, b in den.named_buffers()}}


@torch.no_grad()
def _assert_same_model(den, ref, calib, res, ref_res):
    a, b = _tensors(den), _tensors(ref)
    assert a.keys() == b.keys()
    for n in a:
        assert a[n].device == b[n].device and torch.equal(a[n], b[n]), n
    inputs = next(calib.batches("cpu"))
    assert torch.equal(den(**inputs, return_dict=False)[0], ref(**inputs, return_dict=False)[0])
    with float_mode(den), float_mode(ref):
        assert torch.equal(den(**inputs, return_dict=False)[0], ref(**inputs, return_dict=False)[0])
    assert [(r.layer, r.rel_out_err) for r in res.layers] == [(r.layer, r.rel_out_err) for r in ref_res.layers]


@pytest.mark.parametrize(("name", "method", "drop"), [("tiny-dit", "gptq", False), ("tiny-dit", "qronos", True),
                                                      ("tiny-unet", "gptq", True), ("tiny-unet", "qronos", False)])
def test_offload_done_gives_the_same_model_bit_for_bit(name, method, drop, monkeypatch):
    pipe = load_pipeline(name)
    fam = family_of(pipe)
    calib = collect_calibration(pipe, PROMPTS, 2, batch_size=2, progress=False)
    den = fam.denoiser(pipe)
    ref = copy.deepcopy(den)
    ref_res = _run(ref, fam, calib, method=method, drop_float_weights=drop)
    units = fam.units(den)
    moved = _spy_moves(monkeypatch, units)
    seen = []
    res = _run(den, fam, calib, lambda k, sq: seen.append(list(moved)), method=method, drop_float_weights=drop,
               offload_done=True)
    n, u = len(fam.blocks(den)), len(units)
    # each unit leaves once done, all of a block's before on_block sees it
    assert seen == [[j for j in range(u) if units[j].block <= k] for k in range(n)]
    assert moved == [*range(u), *range(u)]  # and every one comes back before run() returns
    assert all(res.block_stats[k]["offload_bytes"] > 0 for k in range(n))
    _assert_same_model(den, ref, calib, res, ref_res)
    if drop:  # the dequantized weight is still the parameter's memory, not a second copy
        assert all(m.weight.data_ptr() == m.weight_q.data_ptr() for m in res.quant_layers.values())


def test_offload_done_leaves_unselected_blocks_and_undoes_an_early_stop(monkeypatch):
    pipe = load_pipeline("tiny-unet")
    fam = family_of(pipe)
    calib = collect_calibration(pipe, PROMPTS[:2], 2, batch_size=2, progress=False)
    den = fam.denoiser(pipe)
    ref = copy.deepcopy(den)
    ref_res = _run(ref, fam, calib, lambda k, sq: k == 2, method="gptq", blocks=[0, 2, 4])
    units = fam.units(den)
    moved = _spy_moves(monkeypatch, units)
    seen = []
    res = _run(den, fam, calib, lambda k, sq: seen.append(list(moved)) or k == 2, method="gptq", blocks=[0, 2, 4],
               offload_done=True)
    # block 1 (not selected, propagated) stays; block 4 is never reached; 0 and 2 come back after the stop
    of = {k: [j for j, unit in enumerate(units) if unit.block == k] for k in (0, 2)}
    assert seen == [of[0], of[0], of[0] + of[2]] and moved == 2 * (of[0] + of[2]) and res.stopped_after == 2
    assert res.block_stats[1]["offload_bytes"] == 0
    _assert_same_model(den, ref, calib, res, ref_res)


def test_offload_done_moves_blocks_back_when_the_run_raises(monkeypatch):
    pipe = load_pipeline("tiny-dit")
    fam = family_of(pipe)
    calib = collect_calibration(pipe, PROMPTS[:2], 2, batch_size=2, progress=False)
    den = fam.denoiser(pipe)
    moved = _spy_moves(monkeypatch, fam.units(den))

    def fail(k, sq):
        raise RuntimeError("stop")
    with pytest.raises(RuntimeError, match="stop"):
        _run(den, fam, calib, fail, method="rtn", offload_done=True)
    assert moved == [0, 0]
    assert all(torch.isfinite(t).all() for t in _tensors(den).values() if t.is_floating_point())


def _device_bytes(den, device):
    """Bytes of the distinct memory the model's tensors hold on `device`."""
    return sum({t.data_ptr(): t.untyped_storage().nbytes() for t in _tensors(den).values() if t.device == device}
               .values())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_offload_done_keeps_cuda_memory_flat_and_returns_the_model_on_the_device():
    pipe = load_pipeline("tiny-unet")
    fam = family_of(pipe)
    calib = collect_calibration(pipe, PROMPTS, 2, batch_size=2, progress=False)
    dev = torch.device("cuda", torch.cuda.current_device())
    runs = {}
    for offload, pending in ((False, False), (True, False), (True, True)):
        den = copy.deepcopy(fam.denoiser(pipe)).to(dev)
        cfg = SequentialConfig(method="gptq", weight=QuantSpec(4), act=QuantSpec(8, symmetric=False),
                               holdout_every=3, drop_float_weights=True, offload_done=offload,
                               offload_pending=pending)
        res = SequentialQuantizer(den, fam, calib, cfg, dev, progress=False).run()
        assert all(t.device == dev for t in _tensors(den).values())
        assert all(m.weight.data_ptr() == m.weight_q.data_ptr() for m in res.quant_layers.values())
        with torch.no_grad():
            out = den(**next(calib.batches(dev)), return_dict=False)[0].cpu()
        runs[offload, pending] = ([res.block_stats[k]["allocated_bytes"] for k in sorted(res.block_stats)], out,
                                  res.peak_vram_bytes, _device_bytes(den, dev))
        del den, res  # the next run starts from an empty device
        gc.collect()
        torch.cuda.empty_cache()
    (grow, out, peak, size), (flat, out_off, peak_off, size_off) = runs[False, False], runs[True, False]
    lean, out_lean, peak_lean, size_lean = runs[True, True]
    assert all(b <= a for a, b in zip(flat, flat[1:])) and flat[-1] < flat[0], flat  # finished blocks leave
    assert grow[-1] > flat[-1], (grow, flat)  # without the option the codes of finished blocks stay
    assert size_off == size and peak_off <= peak  # the same model comes back, without a higher peak
    assert lean[0] < flat[0] and size_lean == size  # the blocks still to come wait in host memory
    torch.testing.assert_close(out_lean, out)
    torch.testing.assert_close(out_off, out)


@pytest.mark.parametrize("done", [True, False])
def test_offload_pending_moves_each_unit_in_just_before_its_turn(done, monkeypatch):
    """Units after the first wait on storage (poisoned where they were) until their turn: a pass that read a pending
    unit before it moved in, or a unit left behind, changes the model, which must equal the plain run's."""
    pipe = load_pipeline("tiny-unet")
    fam = family_of(pipe)
    calib = collect_calibration(pipe, PROMPTS[:2], 2, batch_size=2, progress=False)
    den = fam.denoiser(pipe)
    ref = copy.deepcopy(den)
    ref_res = _run(ref, fam, calib, method="qronos", drop_float_weights=True)
    units = fam.units(den)
    u = len(units)
    moved = _spy_moves(monkeypatch, units)
    res = _run(den, fam, calib, method="qronos", drop_float_weights=True, offload_done=done, offload_pending=True)
    away = list(range(1, u))
    if done:  # away; 0 done and out; each later one in and, once done, out; all back at the end
        assert moved == away + [0] + [j for k in away for j in (k, k)] + list(range(u))
    else:  # away, then each in before its turn; nothing left to bring back
        assert moved == away + away
    _assert_same_model(den, ref, calib, res, ref_res)
