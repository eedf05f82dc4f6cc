"""Host cache, prefetch and block moves of the sequential driver: the prefetched tensors are the cached ones,
exactly; moved modules keep their aliases and leave nothing behind."""
import gc
import weakref

import pytest
import torch
from torch import nn

from diffptq.algo.driver.memory import PinnedPool, Prefetcher, move_module_tensors
from diffptq.quant.act import StaticActQuantizer
from diffptq.quant.layers import QuantLinear
from diffptq.quant.quantizer import QuantSpec

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _records(n, device="cpu", pin=False):
    g = torch.Generator().manual_seed(0)
    recs = []
    for _ in range(n):
        h = torch.randn(3, 5, 7, generator=g)
        skip = torch.randn(2, 4, generator=g)
        ctx = {"ehs": torch.randn(3, 2, 7, generator=g), "hw": (4, 4)}
        if pin:
            h, skip, ctx["ehs"] = h.pin_memory(), skip.pin_memory(), ctx["ehs"].pin_memory()
        recs.append(((h, [skip]), ctx))
    return recs


def test_prefetcher_on_the_cpu_passes_tensors_through_in_order():
    recs = _records(4)
    pf = Prefetcher(torch.device("cpu"))
    out = list(pf([2, 0, 3], lambda i: ({"fp": recs[i][0], "q": recs[i][0]}, recs[i][1])))
    assert [i for i, _ in out] == [2, 0, 3]
    for i, loaded in out:
        assert loaded.states["fp"][0] is recs[i][0][0] is loaded.states["q"][0]
        assert loaded.ctx["ehs"] is recs[i][1]["ehs"] and loaded.ctx["hw"] == (4, 4)
    assert pf.h2d_bytes == 0


@torch.no_grad()
def test_move_module_tensors_keeps_aliases_skips_and_frees_the_old_memory():
    """A stand-in move that copies (new memory on the CPU, like another device): the dequantized weight that
    drop_float_weight aliased to the parameter stays one tensor, copied once; the activation quantizer (skipped) and
    a parameter shared with a module outside (kept) stay; the old buffers lose their last reference."""
    layer = QuantLinear(nn.Linear(8, 4), StaticActQuantizer(QuantSpec(8)), QuantSpec(4))
    layer.set_quantized_weight(torch.randint(-8, 8, (4, 8), dtype=torch.int8), torch.rand(4, 1) + 0.1,
                               torch.zeros(4, 1))
    layer.drop_float_weight()
    block = nn.Sequential(layer, nn.LayerNorm(8))
    outside = nn.Linear(8, 8)
    block[1].weight = outside.weight  # shared with a module that is not part of the block
    param, weight = layer.weight, layer.weight.clone()
    act_scale, shared = layer.act_quant.scale, outside.weight.data_ptr()
    old = weakref.ref(layer.weight_codes), weakref.ref(layer.weight_q)
    copied = []

    def move(t):
        copied.append(t.data_ptr())
        return t.clone()
    nbytes = move_module_tensors(block, move, lambda m: isinstance(m, StaticActQuantizer), {id(outside.weight)})
    gc.collect()
    assert layer.weight is param and torch.equal(layer.weight, weight)  # the same Parameter, new data
    assert layer.weight.data_ptr() == layer.weight_q.data_ptr() and layer.weight.data_ptr() not in copied
    assert layer.act_quant.scale is act_scale and block[1].weight.data_ptr() == shared
    assert old[0]() is None and old[1]() is None
    # weight (with weight_q) once, codes, scale, zero, bias, the LayerNorm's bias
    assert len(copied) == 6 and nbytes == 4 * (32 + 4 + 4 + 4 + 8) + 32
    assert move_module_tensors(block, lambda t: t) == 0  # moving to where a tensor is copies nothing


@cuda
def test_prefetched_tensors_equal_the_cached_ones_and_round_trip_through_the_pool():
    """Three rounds over the records, nothing synchronized inside a round: each reads (H2D, side stream) the states
    the round before wrote (D2H, non_blocking) into pinned buffers that are handed back and reused record by
    record. Every tensor must arrive exactly."""
    dev = torch.device("cuda", torch.cuda.current_device())
    recs = _records(6, pin=True)
    pf, pool = Prefetcher(dev), PinnedPool()
    cache = {"states": [r[0] for r in recs]}

    def fetch(i):
        return {"q": cache["states"][i]}, recs[i][1]
    for rnd in range(3):
        expect = [(h.clone(), [s.clone() for s in sk]) for h, sk in cache["states"]]  # synchronized here
        got, new = [], []
        for i, loaded in pf(range(len(recs)), fetch):
            h, skips = loaded.states["q"]
            got.append((h.clone(), [s.clone() for s in skips], loaded.ctx["ehs"].clone()))
            out = [h * 2 + 1, *skips]
            bufs = []
            for t in out:
                b = pool.take(t.shape, t.dtype)
                b.copy_(t, non_blocking=True)
                bufs.append(b)
            new.append((bufs[0], bufs[1:]))
            if rnd:  # the record's old buffers go back and are reused by the next records' outputs
                old = cache["states"][i]
                pool.give([old[0], *old[1]])
        torch.cuda.synchronize()
        for (h, sk, ehs), (eh, esk), rec in zip(got, expect, recs):
            assert torch.equal(h.cpu(), eh) and torch.equal(sk[0].cpu(), esk[0])
            assert torch.equal(ehs.cpu(), rec[1]["ehs"])
        for (h, sk), (eh, esk) in zip(new, expect):
            assert torch.equal(h, eh * 2 + 1) and torch.equal(sk[0], esk[0])
        cache["states"] = new
    assert pf.h2d_bytes > 0


def test_prefetcher_moves_only_the_skips_a_unit_reads():
    g = torch.Generator().manual_seed(0)
    h, skips = torch.randn(2, 3, generator=g), [torch.randn(4, generator=g) for _ in range(3)]
    ctx = {"emb": torch.randn(5, generator=g)}
    pf = Prefetcher(torch.device("meta"))  # stands in for the compute device: a move makes a new (meta) tensor
    for read in (0, 1, None):
        pf.h2d_bytes = 0
        (_, loaded), = list(pf([0], lambda i: ({"q": (h, skips)}, ctx), read))
        h_dev, moved = loaded.states["q"]
        first = 0 if read is None else len(skips) - read
        assert h_dev.is_meta and loaded.ctx["emb"].is_meta
        assert [s.is_meta for s in moved] == [j >= first for j in range(len(skips))]
        assert all(m is s for m, s in zip(moved[:first], skips))  # left alone: the very host tensors
        assert pf.h2d_bytes == 4 * (h.numel() + ctx["emb"].numel() + sum(s.numel() for s in skips[first:]))


def test_pinned_pool_reuses_buffers_across_shapes_within_twice_the_size():
    pool = PinnedPool(pinned=False)
    a = pool.take((4, 8), torch.float32)  # 128 bytes
    assert a.shape == (4, 8) and a.dtype == torch.float32 and a.is_contiguous()
    a.copy_(torch.arange(32.0).view(4, 8))
    ptr = a.data_ptr()
    pool.give([a, torch.zeros(3)])  # a tensor the pool did not make is ignored
    assert pool.free_bytes == 128 and pool.live_bytes == 0
    b = pool.take((3, 10), torch.bfloat16)  # 60 bytes: 128 would waste more than half
    assert b.data_ptr() != ptr and pool.free_bytes == 128
    pool.take((20,), torch.int16)  # 40 bytes: 2 × 40 < 128, a new buffer
    pool.take((5, 3), torch.float32)  # 60 bytes: a new buffer too
    e = pool.take((2, 16), torch.float16)  # 64 bytes ≤ 128 ≤ 128: the first buffer again
    assert e.data_ptr() == ptr and e.shape == (2, 16) and e.dtype == torch.float16
    assert pool.free_bytes == 0 and pool.live_bytes == 128 + 60 + 40 + 60
    e.copy_(torch.full((2, 16), 3.0))
    assert torch.equal(e, torch.full((2, 16), 3.0, dtype=torch.float16))
    assert pool.take((0, 5), torch.float32).shape == (0, 5)


def test_pinned_pool_trim_releases_free_buffers_untouched_since_the_last_trim():
    pool = PinnedPool(pinned=False)
    big, small = pool.take((256,), torch.float32), pool.take((16,), torch.float32)
    pool.give([big, small])
    assert pool.trim() == 0  # both were in use since the pool began
    again = pool.take((200,), torch.float32)  # reuses the 1024-byte buffer: it stays, the 64-byte one goes
    assert again.data_ptr() == big.data_ptr()
    assert pool.trim() == 64 and pool.free_bytes == 0
    pool.give([again])  # given back in this generation: kept for the next unit, which may want the same size
    assert pool.trim() == 0 and pool.free_bytes == 1024
    assert pool.trim() == 1024 and pool.free_bytes == 0  # untouched for a whole generation
    live = pool.take((8,), torch.float32)
    pool.clear()
    assert pool.free_bytes == pool.live_bytes == 0 and live.numel() == 8


@cuda
def test_pinned_pool_registers_large_buffers_and_unregisters_them_on_release():
    pool = PinnedPool(register_min=1 << 16)
    large, small = pool.take((64, 1024), torch.float32), pool.take((16,), torch.float32)
    assert large.is_pinned() and small.is_pinned()
    assert large.data_ptr() % PinnedPool.PAGE == 0
    dev = large.to("cuda", non_blocking=True)
    torch.cuda.synchronize()
    assert torch.equal(dev.cpu(), large)
    pool.give([large])
    assert pool.trim() == 0 and pool.trim() == 64 * 1024 * 4  # kept one generation after its return
    assert not large.is_pinned()  # unregistered; the memory stays valid while referenced
    pool.clear()
