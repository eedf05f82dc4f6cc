"""Hardware measurements: None (not 0) where CUDA is absent; checkpoint and in-memory sizes; card names; timers."""
import time

import pytest
import torch
from torch import nn

from diffptq.eval.hardware import (
    CallTimer,
    card_name,
    checkpoint_bytes,
    measure_latency,
    measure_peak_vram,
    module_bytes,
    wall_seconds,
)

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_latency_and_vram_are_none_on_cpu_without_running_fn():
    calls = []
    assert measure_latency(lambda: calls.append(1), device="cpu") is None
    assert measure_peak_vram(lambda: calls.append(1), device="cpu") is None
    assert calls == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA default")
def test_latency_and_vram_default_to_none_without_cuda():
    assert measure_latency(lambda: None) is None
    assert measure_peak_vram(lambda: None) is None


def test_wall_seconds_times_one_call_on_the_cpu():
    calls = []
    seconds = wall_seconds(lambda: (calls.append(1), time.sleep(0.02)), device="cpu")
    assert calls == [1] and 0.02 <= seconds < 1.0


class _Slow(nn.Module):
    def forward(self, x, pause=0.0):
        time.sleep(pause)
        return x + 1


def test_call_timer_times_each_call_and_puts_the_method_back():
    m = _Slow()
    with CallTimer(m, "forward", device="cpu") as timer:
        assert m(torch.zeros(1)).item() == 1  # through nn.Module.__call__, keyword arguments passed on
        m(torch.zeros(1), pause=0.02)
        first = timer.seconds()
        assert timer.seconds() == []  # read once
    assert len(first) == 2 and first[1] >= 0.02 > first[0]
    assert "forward" not in m.__dict__ and m(torch.zeros(1)).item() == 1


def test_call_timer_keeps_an_instance_method_such_as_a_compiled_forward():
    m = _Slow()
    m.forward = lambda x: x + 2  # what `m.forward = torch.compile(m.forward)` leaves on the instance
    timer = CallTimer(m, "forward", device="cpu")
    assert m(torch.zeros(1)).item() == 2 and len(timer.seconds()) == 1
    timer.remove()
    assert m(torch.zeros(1)).item() == 2


@needs_cuda
def test_call_timer_on_cuda_uses_events():
    m = nn.Linear(512, 512, device="cuda")
    with CallTimer(m, device="cuda") as timer:
        for _ in range(3):
            m(torch.randn(256, 512, device="cuda"))
        seconds = timer.seconds()
    assert len(seconds) == 3 and all(s > 0 for s in seconds)


@needs_cuda
def test_latency_on_cuda_is_per_image_median():
    x = torch.randn(1024, 1024, device="cuda")
    calls = []

    def work():
        calls.append(1)
        return x @ x

    latency = measure_latency(work, images_per_call=4, warmup=2, repeats=3)
    assert latency is not None and latency > 0 and len(calls) == 5


@needs_cuda
def test_peak_vram_counts_a_temporary_allocation():
    peak = measure_peak_vram(lambda: torch.empty(64 << 20, dtype=torch.uint8, device="cuda"))
    assert peak is not None and peak >= 64 << 20


def test_checkpoint_bytes_of_a_file_and_a_directory(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"x" * 100)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.json").write_bytes(b"y" * 23)
    assert checkpoint_bytes(tmp_path / "a.bin") == 100
    assert checkpoint_bytes(tmp_path) == 123
    with pytest.raises(FileNotFoundError):
        checkpoint_bytes(tmp_path / "missing")


class PackedLinear(nn.Module):
    """A toy int4 layer: packed uint8 weights + fp16 scales, and a float dequantized cache marked as excluded."""

    _size_exclude = ("weight",)

    def __init__(self, out_features: int, in_features: int) -> None:
        super().__init__()
        self.register_buffer("packed", torch.zeros(out_features, in_features // 2, dtype=torch.uint8))
        self.register_buffer("scale", torch.ones(out_features, dtype=torch.float16))
        self.weight = nn.Parameter(torch.zeros(out_features, in_features))


def test_module_bytes_counts_stored_dtypes_and_honours_size_exclude():
    lin = nn.Linear(8, 4)  # 32 + 4 float32
    assert module_bytes(lin) == (32 + 4) * 4
    packed = PackedLinear(4, 8)
    assert module_bytes(packed) == 4 * 4 * 1 + 4 * 2  # the float32 cache is not counted
    bn = nn.BatchNorm1d(3)  # weight, bias, running_mean, running_var (float32) + num_batches_tracked (int64)
    assert module_bytes(bn) == 4 * 3 * 4 + 8
    model = nn.Sequential(lin, packed)
    assert module_bytes(model) == (32 + 4) * 4 + 24


def test_module_bytes_counts_tied_weights_once():
    emb = nn.Embedding(10, 4)
    head = nn.Linear(4, 10, bias=False)
    head.weight = emb.weight
    assert module_bytes(nn.ModuleList([emb, head])) == 10 * 4 * 4


@pytest.mark.parametrize("device_name, card", [
    ("NVIDIA H200", "h200"), ("NVIDIA H100 80GB HBM3", "h100"), ("NVIDIA A100-SXM4-80GB", "a100"),
    ("NVIDIA GeForce RTX 4090", "rtx4090"), ("Tesla V100-SXM2-16GB", "v100"), ("NVIDIA H100 NVL", "h100")])
def test_card_name_is_the_short_name_of_result_files(monkeypatch, device_name, card):
    assert card_name("cpu") == "cpu" and card_name("cpu", count=2) == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: device_name)
    assert card_name("cuda") == card_name() == card and card_name("cuda:0", count=2) == card + "x2"
    assert card_name("cpu") == "cpu"
